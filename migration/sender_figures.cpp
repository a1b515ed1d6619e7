// migration/sender_figures.cpp - the Sender's figures (issue 14): each
// round's harvest interval, rate and saturation, the expected downtime, the
// true counts after a failure, QEMU's mbps and pages-per-second, the guest's
// progress series and the configuration echo. (The phases are in sender.cpp.)
#include <algorithm>
#include <fmt/format.h>

#include "migration/sender.hpp"
#include "vmm/host_info.hpp"
#include "vmm/stress/sampler.hpp"

namespace mvm::migration {

namespace {

double since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

double Sender::harvested()
{
    const auto now = clock::now();
    const double s = std::chrono::duration<double>(now - last_harvest_).count();
    last_harvest_ = now;
    return s;
}

RoundReport Sender::begin_round(uint32_t round, const char* kind, clock::time_point start) const
{
    RoundReport rr;
    rr.round = round;
    rr.kind = kind;
    rr.start_ms = std::chrono::duration<double>(start - t0_).count() * 1e3;
    rr.tracked_pages = tracked_pages_;
    rr.throttle_pct = throttle_pct_;
    return rr;
}

// Dirty pages over the interval they accrued in (previous harvest -> this
// one); when every tracked page is dirty the true rate can be any higher.
void Sender::rate(RoundReport& rr, uint64_t dirty, double interval_s, uint64_t guest_dirty) const
{
    rr.harvest_interval_s = interval_s;
    rr.dirty_rate = interval_s > 0 ? static_cast<double>(dirty) / interval_s : 0;
    rr.saturated = tracked_pages_ > 0 && guest_dirty >= tracked_pages_;
}

// Distinct dirty pages of the guest's memory slots (the system slot aside) in a, or in a and b.
uint64_t Sender::guest_dirty(const dirty::Harvest& a, const dirty::Harvest* b) const
{
    uint64_t n = 0;
    for (const auto& s : a.slots) {
        if (s.vnode < 0)
            continue;
        const dirty::SlotDirty* o = b ? b->slot(s.slot) : nullptr;
        if (!o || o->bits.size() != s.bits.size()) {
            n += s.count;
            continue;
        }
        for (size_t w = 0; w < s.bits.size(); w++)
            n += static_cast<uint64_t>(__builtin_popcountll(s.bits[w] | o->bits[w]));
    }
    return n;
}

// The dirty set plus the guest_memfd slots (sent whole at stop) at the bandwidth measured so far.
double Sender::expected_downtime_ms(uint64_t dirty_pages) const
{
    const double bytes = static_cast<double>(dirty_pages * 4096 + rep_.untracked_bytes);
    return bw_ > 0 ? bytes / bw_ * 1e3 : 0;
}

void Sender::begin_send(const RoundReport& rr, uint64_t pages)
{
    inflight_ = true;
    inflight_round_ = rr;
    inflight_pages_ = pages;
    inflight_sent_pages_ = channels_.sent_pages();
    inflight_sent_bytes_ = channels_.sent_bytes();
    inflight_start_ = clock::now();
    std::lock_guard lk(live_mu_);
    live_round_pages_ = pages;
    live_round_base_ = inflight_sent_pages_;
    live_inflight_ = true;
}

void Sender::end_send()
{
    inflight_ = false;
    std::lock_guard lk(live_mu_);
    live_inflight_ = false;
    live_.remaining_pages = 0;
}

// QEMU's mbps and pages-per-second: over total - setup (migration_calculate_complete()).
void Sender::fill_rates()
{
    rep_.pages = channels_.sent_pages();
    const double transfer_s = (rep_.total_ms - rep_.setup_ms) / 1e3;
    if (transfer_s > 0) {
        rep_.mbps = static_cast<double>(rep_.transferred_bytes) * 8 / 1e6 / transfer_s;
        rep_.pages_per_second = static_cast<double>(rep_.pages) / transfer_s;
    }
}

// After a failure: the round it cut short, what was sent, what was left.
// Remaining is QEMU's ram_bytes_remaining(): the distinct pages still to
// send (the interrupted round's unsent pages, a harvest not yet sent, what
// the guest dirtied since), never more than the guest has.
void Sender::count_failure()
{
    const bool stop_sent = !rep_.rounds.empty() && rep_.rounds.back().kind == "stop";
    const bool in_stop = inflight_ && inflight_round_.kind == "stop";
    std::vector<uint64_t> left;  // GPAs
    auto add_harvest = [&left](const dirty::Harvest& h) {
        for (const auto& s : h.slots)
            s.for_each([&](uint64_t page) { left.push_back(s.gpa + page * 4096); });
    };
    if (pending_ && !in_stop && !stop_sent)
        add_harvest(*pending_);
    if (inflight_) {
        RoundReport rr = inflight_round_;
        rr.kind = "interrupted";
        rr.pages = channels_.sent_pages() - inflight_sent_pages_;
        rr.bytes = channels_.sent_bytes() - inflight_sent_bytes_;
        rr.duration_s = since(inflight_start_);
        for (uint32_t c = 0; c < inflight_per_.size(); c++) {
            const auto& v = inflight_per_[c];
            const uint64_t done = std::min<uint64_t>(v.size(), channels_.channel_progress(c));
            left.insert(left.end(), v.begin() + static_cast<std::ptrdiff_t>(done), v.end());
        }
        if (!in_stop) {
            precopy_bytes_ += rr.bytes;
            precopy_s_ += rr.duration_s;
        }
        rep_.rounds.push_back(rr);
        rounds_++;
        inflight_ = false;
    }
    if (tracking_ && !parked_) {
        try {  // what the guest dirtied since the last harvest is left too
            add_harvest(tracker_.harvest());
        } catch (...) {
        }
    }
    std::sort(left.begin(), left.end());
    rep_.remaining_bytes = static_cast<uint64_t>(std::unique(left.begin(), left.end()) - left.begin()) * 4096;
    rep_.transferred_bytes = channels_.sent_bytes();
    {  // split by when, as live() does: the three add up to transferred
        const uint64_t t = rep_.transferred_bytes, park = park_mark_.load(), resume = resume_mark_.load();
        rep_.precopy_bytes = std::min(t, park);
        rep_.downtime_bytes = t > park ? std::min(t, resume) - park : 0;
        rep_.postcopy.bytes = t > resume ? t - resume : 0;
    }
    rep_.zero_pages = channels_.zero_pages();
    rep_.throughput = precopy_s_ > 0 ? static_cast<double>(precopy_bytes_) / precopy_s_ : 0;
    if (!switched_over_)
        rep_.total_ms = since(t0_) * 1e3;
    fill_rates();
}

void Sender::start_series()
{
    series_ = std::make_unique<ProgressSampler>(src_, 10000, true);
    series_offset_ms_ = since(t0_) * 1e3;
    series_->start();
}

// The kept samples, summed over vCPUs, binned to at most ~400 points of at
// least kProgressBinMs each.
void Sender::stop_series()
{
    if (!series_)
        return;
    series_->stop();
    for (const auto& [t, rate] : all_vcpus_rate(series_->samples(), kProgressBinMs, 400))
        rep_.guest_progress.push_back({series_offset_ms_ + t, rate});
    series_.reset();
}

nlohmann::json config_echo(const StressVm& src, const MigrateOptions& o, uint32_t channels)
{
    nlohmann::json j;
    j["to"] = o.to;
    j["tracker"] = dirty::mode_name(o.tracker);
    j["ring_bytes_per_vcpu"] = src.config().dirty_ring_bytes;
    j["bandwidth_bytes_per_s"] = o.bandwidth;
    j["max_downtime_ms"] = o.max_downtime_ms;
    j["max_iterations"] = o.max_iterations;
    j["timeout_s"] = o.timeout_s;
    j["throttle"] = o.throttle == Throttle::AutoConverge ? "auto-converge"
                    : o.throttle == Throttle::DirtyLimit ? fmt::format("dirty-limit:{}", o.dirty_limit)
                                                         : "none";
    j["channels"] = channels;
    j["compress"] = o.compress.name();
    j["verify"] = o.verify;
    j["post_run_s"] = o.post_run_s;
    j["machine"] = machine_echo(src.config());
    j["host"] = host_echo();
    return j;
}

}  // namespace mvm::migration
