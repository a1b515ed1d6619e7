#include "engines/lockup_analysis.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <set>

namespace mvm::engines {

void PhaseTimeline::enter(const std::string& name, double t_ms)
{
    if (open_)
        spans_.back().end_ms = t_ms;
    spans_.push_back({name, t_ms, t_ms, -1});
    open_ = true;
}

void PhaseTimeline::close(double t_ms)
{
    if (open_)
        spans_.back().end_ms = t_ms;
    open_ = false;
}

std::vector<std::string> timeline_gaps(const std::vector<PhaseSpan>& phases)
{
    std::vector<std::string> out;
    const PhaseSpan* prev = nullptr;
    for (const auto& p : phases) {
        if (p.vcpu >= 0)
            continue;
        if (p.end_ms < p.start_ms)
            out.push_back(fmt::format("{} ends ({:.3f} ms) before it starts ({:.3f} ms)", p.name, p.end_ms, p.start_ms));
        if (prev && prev->end_ms != p.start_ms)
            out.push_back(fmt::format("{} ends at {:.3f} ms, {} starts at {:.3f} ms", prev->name, prev->end_ms, p.name,
                                      p.start_ms));
        prev = &p;
    }
    return out;
}

std::string phase_of(const Stall& s, const std::vector<PhaseSpan>& phases)
{
    const double a = s.start_ms, b = s.start_ms + s.len_ms;
    std::string best, nearest;
    double best_overlap = 0, nearest_dist = INFINITY;
    for (const auto& p : phases) {
        if (p.vcpu >= 0 && p.vcpu != static_cast<int>(s.vcpu))
            continue;
        const double o = std::min(b, p.end_ms) - std::max(a, p.start_ms);
        if (p.vcpu >= 0) {
            if (o > 0)
                return p.name;
            continue;
        }
        if (o > best_overlap || (best.empty() && o >= 0 && a >= p.start_ms && a <= p.end_ms)) {
            best_overlap = std::max(o, 0.0);
            best = p.name;
        }
        const double d = a < p.start_ms ? p.start_ms - b : a - p.end_ms;
        if (d < nearest_dist) {
            nearest_dist = d;
            nearest = p.name;
        }
    }
    return best.empty() ? nearest : best;
}

double percentile(std::vector<double> v, double p)
{
    if (v.empty())
        return 0;
    std::sort(v.begin(), v.end());
    // Nearest rank: the smallest value with at least p% of the values at or below it.
    const double rank = std::ceil(p / 100.0 * static_cast<double>(v.size()));
    const size_t i = rank < 1 ? 0 : static_cast<size_t>(rank) - 1;
    return v[std::min(i, v.size() - 1)];
}

std::vector<PhaseStalls> phase_stalls(const std::vector<Stall>& stalls, const std::vector<PhaseSpan>& phases,
                                      uint32_t vcpus, double threshold_ms)
{
    std::vector<PhaseStalls> out;
    auto find = [&out](const std::string& name) -> PhaseStalls& {
        for (auto& p : out)
            if (p.phase == name)
                return p;
        out.push_back({});
        out.back().phase = name;
        return out.back();
    };
    for (const auto& p : phases)
        find(p.name).duration_ms += p.end_ms - p.start_ms;
    std::map<std::string, std::vector<double>> lens;
    std::map<std::string, std::set<uint32_t>> who;
    for (const auto& s : stalls) {
        find(s.phase);
        lens[s.phase].push_back(s.len_ms);
        who[s.phase].insert(s.vcpu);
    }
    for (auto& p : out) {
        const auto& l = lens[p.phase];
        p.count = static_cast<uint32_t>(l.size());
        // A ring-full span's duration is one vCPU's time; a global span's is every vCPU's.
        const bool per_vcpu = std::any_of(phases.begin(), phases.end(),
                                          [&](const PhaseSpan& s) { return s.name == p.phase && s.vcpu >= 0; });
        const double vcpu_s = p.duration_ms / 1e3 * (per_vcpu ? 1.0 : static_cast<double>(vcpus));
        p.per_vcpu_s = vcpu_s > 0 ? p.count / vcpu_s : 0;
        p.p50_ms = percentile(l, 50);
        p.p99_ms = percentile(l, 99);
        p.max_ms = l.empty() ? 0 : *std::max_element(l.begin(), l.end());
        p.vcpus = static_cast<uint32_t>(who[p.phase].size());
    }
    const PhaseStalls base = find(kBaselinePhase);
    for (auto& p : out) {
        p.excess_p99_ms = p.p99_ms - base.p99_ms;
        p.excess_max_ms = p.max_ms - base.max_ms;
        p.beyond_baseline = p.phase != kBaselinePhase && p.count > 0 && p.excess_max_ms > threshold_ms;
    }
    return out;
}

uint64_t harvest_slots(double window_ms, double period_ms)
{
    if (period_ms <= 0 || window_ms <= 0)
        return 1;
    return std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(window_ms / period_ms - 1e-9)));
}

namespace {

std::string rate_text(const VerdictInput& in)
{
    if (in.rate_before <= 0)
        return "";
    const double ratio = in.rate_during / in.rate_before;
    const std::string rates = fmt::format("guest write rate {:.2f} -> {:.2f} M pages/s while logging", in.rate_before / 1e6,
                                          in.rate_during / 1e6);
    if (ratio > 0.9)
        return "; " + rates;
    return fmt::format("; {} ({:.3g}x slower: a slowdown from dirty-logging write faults, counted apart from stalls)",
                       rates, in.rate_during > 0 ? in.rate_before / in.rate_during : INFINITY);
}

}  // namespace

std::string lockup_verdict(const VerdictInput& in)
{
    if (in.harvests.starved())
        return fmt::format("inconclusive: harvester starved (ran {} of {} scheduled harvests, every {:.0f} ms)",
                           in.harvests.done, in.harvests.expected, in.harvests.period_ms);
    const PhaseStalls* base = nullptr;
    const PhaseStalls* worst = nullptr;
    std::string others;
    for (const auto& p : in.phases) {
        if (p.phase == kBaselinePhase)
            base = &p;
        else if (p.beyond_baseline && (!worst || p.excess_max_ms > worst->excess_max_ms))
            worst = &p;
    }
    for (const auto& p : in.phases)
        if (p.beyond_baseline && &p != worst)
            others += (others.empty() ? "" : ", ") + p.phase;
    const double base_max = base ? base->max_ms : 0;
    const uint32_t base_n = base ? base->count : 0;
    if (!worst) {
        uint32_t n = 0;
        for (const auto& p : in.phases)
            n += p.count;
        if (n == 0)
            return fmt::format("no vCPU went without progress for > {:.0f} ms{}", in.threshold_ms,
                               rate_text(in));
        return fmt::format("no stall beyond the steady baseline (steady: {} stalls, max {:.0f} ms; no phase's longest "
                           "stall exceeds it by > {:.0f} ms){}",
                           base_n, base_max, in.threshold_ms, rate_text(in));
    }
    return fmt::format("stalls beyond the steady baseline during {}: {} of {} vCPUs, {} stalls, p99 {:.0f} ms, max {:.0f} "
                       "ms vs steady max {:.0f} ms ({:+.0f} ms){}; longest {:.0f} ms on vCPU {}{}",
                       worst->phase, worst->vcpus, in.vcpus, worst->count, worst->p99_ms, worst->max_ms, base_max,
                       worst->excess_max_ms, others.empty() ? "" : "; also during " + others, in.longest_ms,
                       in.longest_vcpu, rate_text(in));
}

}  // namespace mvm::engines
