#include "engines/lockup.hpp"
#include "engines/run_report.hpp"

#include <fmt/format.h>
#include <fstream>

#include "base/error.hpp"
#include "base/units.hpp"

namespace mvm::engines {

nlohmann::json LockupReport::to_json() const
{
    using nlohmann::json;
    json j;
    j["status"] = interrupted ? "interrupted" : "completed";
    j["vcpus"] = vcpus;
    j["mem_bytes"] = mem_bytes;
    j["backing"] = backing;
    j["threshold_ms"] = threshold_ms;
    j["interrupted"] = interrupted;
    j["variants"] = json::array();
    for (const auto& v : variants) {
        json s = json::array();
        for (const auto& st : v.stalls)
            s.push_back({{"vcpu", st.vcpu}, {"start_ms", st.start_ms}, {"len_ms", st.len_ms}, {"phase", st.phase}});
        json ph = json::array();
        for (const auto& p : v.phases)
            ph.push_back({{"name", p.name}, {"start_ms", p.start_ms}, {"end_ms", p.end_ms}, {"vcpu", p.vcpu}});
        json vm = json::object(), vc = json::object();
        for (const auto& [k, x] : v.vm_stats)
            vm[k] = x;
        for (const auto& [k, x] : v.vcpu_stats)
            vc[k] = x;
        json ps = json::array();
        for (const auto& p : v.phase_stalls)
            ps.push_back({{"phase", p.phase},           {"duration_ms", p.duration_ms},
                          {"stalls", p.count},          {"stalls_per_vcpu_s", p.per_vcpu_s},
                          {"p50_ms", p.p50_ms},         {"p99_ms", p.p99_ms},
                          {"max_ms", p.max_ms},         {"vcpus", p.vcpus},
                          {"excess_p99_ms", p.excess_p99_ms}, {"excess_max_ms", p.excess_max_ms},
                          {"beyond_baseline", p.beyond_baseline}});
        j["variants"].push_back({{"name", v.name},
                                 {"skipped", v.skipped},
                                 {"interrupted", v.interrupted},
                                 {"enable_ms", v.enable_ms},
                                 {"disable_ms", v.disable_ms},
                                 {"longest_stall_ms", v.longest_stall_ms},
                                 {"longest_stall_vcpu", v.longest_vcpu},
                                 {"longest_stall_phase", v.longest_phase},
                                 {"stall_count", v.stall_count},
                                 {"p50_stall_ms", v.p50_stall_ms},
                                 {"p99_stall_ms", v.p99_stall_ms},
                                 {"vcpus_stalled", v.vcpus_stalled},
                                 {"vcpus_stalled_by_phase", v.vcpus_stalled_by_phase},
                                 {"baseline_phase", kBaselinePhase},
                                 {"phase_stalls", ps},
                                 {"watchdog_events", v.watchdog_events},
                                 {"watchdog_longest_ms", v.watchdog_longest_ms},
                                 {"dirty_rate_before_pages_per_s", v.rate_before},
                                 {"dirty_rate_during_pages_per_s", v.rate_during},
                                 {"write_slowdown_x", v.rate_during > 0 ? v.rate_before / v.rate_during : 0.0},
                                 {"harvests", v.harvests},
                                 {"harvests_expected", v.schedule.expected},
                                 {"harvest_period_ms", v.schedule.period_ms},
                                 {"harvest_late_max_ms", v.schedule.late_max_ms},
                                 {"harvester_starved", v.schedule.starved()},
                                 {"harvester_priority", v.harvester_priority},
                                 {"dirty_pages", v.dirty_pages},
                                 {"ring_full_exits", v.ring_full},
                                 {"sampler_hz", v.sampler_hz},
                                 {"kvm_stats", {{"vm", vm}, {"vcpus_sum", vc}}},
                                 {"enabled_from", v.enabled_from},
                                 {"logging_steps", steps_json(v)},
                                 {"huge_page_splits", split_steps_text(v)},
                                 {"stalls", s},
                                 {"phases", ph},
                                 {"verdict", v.verdict}});
    }
    return j;
}

namespace {

int64_t stat_of(const StatDelta& d, const char* k)
{
    auto it = d.find(k);
    return it == d.end() ? 0 : it->second;
}

}  // namespace

nlohmann::json steps_json(const VariantResult& v)
{
    nlohmann::json a = nlohmann::json::array();
    for (const auto& st : v.steps) {
        nlohmann::json vm = nlohmann::json::object();
        for (const char* k : {"pages_4k", "pages_2m", "pages_1g"})
            if (st.vm.count(k))
                vm[k] = st.vm.at(k);
        a.push_back({{"step", st.step}, {"vm", vm}, {"sec_page_tables", st.page_tables.json()}});
    }
    return a;
}

std::string split_steps_text(const VariantResult& v)
{
    std::string s;
    for (const auto& st : v.steps) {
        const int64_t d2 = stat_of(st.vm, "pages_2m"), d1 = stat_of(st.vm, "pages_1g");
        if (d2 >= 0 && d1 >= 0)
            continue;
        s += fmt::format("{}{} (pages_1g {:+} pages_2m {:+} pages_4k {:+}; page tables {})", s.empty() ? "" : "; ",
                         st.step, d1, d2, stat_of(st.vm, "pages_4k"), st.page_tables.summary());
    }
    if (!s.empty())
        return "huge mappings split in " + s;
    return v.steps.empty() ? "not measured" : "no huge mapping split while logging";
}

namespace {

std::string stat_text(const StatDelta& d, const char* k)
{
    auto it = d.find(k);
    return it == d.end() ? std::string("-") : fmt::format("{:+}", it->second);
}

// Per phase of one variant: its stalls against the steady baseline.
std::string phase_table(const VariantResult& v)
{
    std::string o = fmt::format("  {:<18} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>6} {:>12}\n", "phase", "ms", "stalls",
                                "/vCPU-s", "p50 ms", "p99 ms", "max ms", "vCPUs", "max excess");
    for (const auto& p : v.phase_stalls)
        o += fmt::format("  {:<18} {:>9.1f} {:>7} {:>10.2f} {:>8.1f} {:>8.1f} {:>8.1f} {:>6} {:>12}\n", p.phase,
                         p.duration_ms, p.count, p.per_vcpu_s, p.p50_ms, p.p99_ms, p.max_ms, p.vcpus,
                         p.phase == kBaselinePhase ? std::string("(baseline)")
                                                   : fmt::format("{:+.1f}{}", p.excess_max_ms, p.beyond_baseline ? " !" : ""));
    return o;
}

}  // namespace

std::string LockupReport::to_table() const
{
    std::string o = fmt::format("minivmm lockup: {} vCPUs, {} {}, stall threshold {:.0f} ms{}\n\n", vcpus,
                                human_bytes(static_cast<double>(mem_bytes)), backing, threshold_ms,
                                interrupted ? " (interrupted: partial report)" : "");
    o += fmt::format("{:<26} {:>9} {:>9} {:>6} {:>8} {:>8} {:>16} {:>6} {:>11} {:>11} {:>9} {:>8} {:>8} {:>9}\n", "variant",
                     "enable ms", "harvests", "stalls", "p50 ms", "p99 ms", "longest stall", "wd ev", "rate before",
                     "rate during", "pages_4k", "pages_2m", "pages_1g", "pf_fixed");
    for (const auto& v : variants) {
        if (!v.skipped.empty()) {
            o += fmt::format("{:<26} skipped: {}\n", v.name, v.skipped);
            continue;
        }
        o += fmt::format("{:<26} {:>9.2f} {:>9} {:>6} {:>8.1f} {:>8.1f} {:>16} {:>6} {:>11} {:>11} {:>9} {:>8} {:>8} {:>9}\n",
                         v.name, v.enable_ms, fmt::format("{}/{}", v.schedule.done, v.schedule.expected), v.stall_count,
                         v.p50_stall_ms, v.p99_stall_ms,
                         v.longest_vcpu >= 0 ? fmt::format("{:.1f} (vCPU {})", v.longest_stall_ms, v.longest_vcpu) : "-",
                         v.watchdog_events, fmt::format("{:.2f}M/s", v.rate_before / 1e6),
                         fmt::format("{:.2f}M/s", v.rate_during / 1e6), stat_text(v.vm_stats, "pages_4k"),
                         stat_text(v.vm_stats, "pages_2m"), stat_text(v.vm_stats, "pages_1g"), stat_text(v.vcpu_stats, "pf_fixed"));
    }
    o += fmt::format("stalls: the sampler's, gaps over {0:.0f} ms in a vCPU's page count read at 1 kHz from outside "
                     "(each length +-1 ms);\nwd ev: the guest's own watchdog, gaps over {0:.0f} ms between its progress "
                     "points on its TSC, exact;\ntwo instruments: a gap near {0:.0f} ms can count in one and not the other "
                     "(docs/lockup.md)\n",
                     threshold_ms);
    for (const auto& v : variants) {
        if (!v.skipped.empty())
            continue;
        o += fmt::format("\n{}: harvester {}, {} of {} harvests (every {:.0f} ms, latest start {:.1f} ms late)\n", v.name,
                         v.harvester_priority, v.schedule.done, v.schedule.expected, v.schedule.period_ms,
                         v.schedule.late_max_ms);
        o += fmt::format("{}: logging enabled from {}; {}\n", v.name, v.enabled_from, split_steps_text(v));
        o += phase_table(v);
    }
    o += "\n";
    for (const auto& v : variants)
        if (v.skipped.empty())
            o += fmt::format("{}: {}\n", v.name, v.verdict);
    return o;
}

void LockupReport::write_timeline(const std::string& path) const
{
    std::ofstream f(path);
    if (!f)
        throw UsageError(fmt::format("--timeline: cannot write '{}': {}", path, errno_text(errno)));
    f << "variant,t_ms,vcpu,pages,phase\n";
    for (const auto& v : variants) {
        // Samples are in time order per tick; walk the contiguous global
        // phases alongside (a sample outside them gets the nearest one).
        std::vector<const PhaseSpan*> global;
        for (const auto& p : v.phases)
            if (p.vcpu < 0)
                global.push_back(&p);
        size_t pi = 0;
        for (const auto& s : v.samples) {
            while (pi + 1 < global.size() && global[pi]->end_ms <= s.t_ms)
                pi++;
            const char* phase = global.empty() ? "none" : global[pi]->name.c_str();
            f << v.name << ',' << fmt::format("{:.3f}", s.t_ms) << ',' << s.vcpu << ',' << s.pages << ',' << phase << '\n';
        }
    }
}

}  // namespace mvm::engines
