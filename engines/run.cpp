#include "engines/run.hpp"

#include <algorithm>
#include <chrono>
#include <fmt/format.h>
#include <thread>

#include "base/stop_signal.hpp"

namespace mvm::engines {

ProgressLine::ProgressLine(const StressVm& m, bool enabled) : m_(m), enabled_(enabled), last_pages_(m.vcpu_count(), 0) {}

void ProgressLine::update(double t, double total)
{
    if (!enabled_ || t - last_t_ < 0.2)
        return;
    std::string line;
    double dt = t - last_t_;
    size_t shown = 0;
    double sum = 0;
    for (uint32_t i = 0; i < m_.vcpu_count(); i++) {
        auto s = m_.snapshot(i);
        uint64_t pages = s.pages_written + s.pages_read;
        double r = static_cast<double>(pages - last_pages_[i]) / dt;
        sum += r;
        last_pages_[i] = pages;
        if (shown++ < 8)
            line += fmt::format("vcpu{} {:.1f}M/s  ", i, r / 1e6);
    }
    if (m_.vcpu_count() > 8)
        line += fmt::format("... total {:.1f}M/s  ", sum / 1e6);
    line += total > 0 ? fmt::format("[{:.1f}/{:.1f} s]", t, total) : fmt::format("[{:.1f} s]", t);
    fmt::print(stderr, "\r\033[K{}", line);
    std::fflush(stderr);
    last_t_ = t;
}

void ProgressLine::finish()
{
    if (enabled_) {
        fmt::print(stderr, "\r\033[K");
        std::fflush(stderr);
    }
}

RunReport run_workload(StressVm& m, const RunOptions& opt)
{
    using clock = std::chrono::steady_clock;
    StatsBaseline before = read_stats(m);
    ProgressLine progress(m, opt.progress);
    auto t0 = clock::now();
    m.start();
    if (opt.on_started)
        opt.on_started();
    auto elapsed = [&] { return std::chrono::duration<double>(clock::now() - t0).count(); };
    bool interrupted = false;
    for (;;) {
        if (m.wait_finished(std::chrono::milliseconds(std::max<int64_t>(1, static_cast<int64_t>(opt.tick_ms)))))
            break;  // every vCPU is done (pass count reached) or failed
        if (m.failure())
            break;
        if (g_stop_signal.load()) {
            interrupted = true;
            break;
        }
        double t = elapsed();
        if (opt.on_tick)
            opt.on_tick(t);
        progress.update(t, opt.duration_s);
        if (opt.duration_s > 0 && t >= opt.duration_s)
            break;
        if (opt.until && opt.until())
            break;
    }
    double duration = elapsed();
    progress.finish();
    if (opt.before_stop)
        opt.before_stop();
    if (opt.parked_for_good && opt.parked_for_good()) {
        m.kill();  // its vCPUs stay parked: the guest runs on elsewhere
    } else {
        // Graceful stop: guests finish their batch and ring the done doorbell.
        m.request_stop();
        if (!m.wait_finished(std::chrono::seconds(5)))
            m.kill();
    }
    RunReport r = collect_report(m, before, duration);
    r.interrupted = interrupted;
    if (opt.verify && !r.failure)
        r.stamps = verify_stamps(m);
    return r;
}

void DirtyLogStats::add(const dirty::Harvest& h)
{
    harvests++;
    dirty_pages += h.dirty_pages;
    max_dirty = std::max(max_dirty, h.dirty_pages);
    ring_full += h.ring_full_harvests;
    entries += h.entries;
    reset += h.reset;
    const double t = h.sync_s + h.get_s + h.clear_s;
    harvest_s += t;
    max_harvest_s = std::max(max_harvest_s, t);
}

std::string DirtyLogStats::table() const
{
    std::string o = fmt::format("\ndirty log ({}): enabled in {:.3f} ms, {} harvests, {} dirty pages ({} per "
                                "harvest at most), harvest mean {:.3f} ms max {:.3f} ms, disabled in {:.3f} ms\n",
                                mode, enable_s * 1e3, harvests, dirty_pages, max_dirty,
                                harvests ? harvest_s / static_cast<double>(harvests) * 1e3 : 0.0, max_harvest_s * 1e3,
                                disable_s * 1e3);
    if (mode == "ring")
        o += fmt::format("ring: {} entries collected, {} reset, {} ring-full exits harvested on vCPU threads\n",
                         entries, reset, ring_full);
    for (const auto& [slot, why] : untracked)
        o += fmt::format("slot {} not tracked: {}\n", slot, why);
    return o;
}

nlohmann::json DirtyLogStats::json() const
{
    return {{"mode", mode},           {"enable_s", enable_s},       {"disable_s", disable_s},
            {"harvests", harvests},   {"dirty_pages", dirty_pages}, {"max_dirty_pages_per_harvest", max_dirty},
            {"harvest_s", harvest_s}, {"max_harvest_s", max_harvest_s}, {"ring_entries", entries},
            {"ring_reset", reset},    {"ring_full_harvests", ring_full}};
}

RunResult run_command(StressVm& m, RunOptions opt, const std::optional<DirtyLogOptions>& log)
{
    RunResult result;
    if (!log) {
        result.report = run_workload(m, opt);
        return result;
    }
    dirty::TrackerOptions to;
    to.mode = log->mode;
    to.ring_soft_limit = log->mode == dirty::Mode::Ring ? m.config().dirty_ring_bytes / 16 / 2 : 0;
    auto tracker = dirty::Tracker::create(m, to);
    DirtyLogStats& dls = result.dirty_log.emplace();
    dls.mode = dirty::mode_name(log->mode);
    dls.untracked = tracker->untracked_slots();
    dls.enable_s = tracker->enable().wall_s;
    double last = 0;
    opt.on_tick = [&](double t) {
        tracker->poll();
        if ((t - last) * 1000 >= log->harvest_ms) {
            dls.add(tracker->harvest());
            last = t;
        }
    };
    opt.tick_ms = std::min(100.0, log->harvest_ms);
    result.report = run_workload(m, opt);
    dls.add(tracker->harvest());
    dls.disable_s = tracker->disable().wall_s;
    return result;
}

}  // namespace mvm::engines
