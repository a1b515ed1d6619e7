// engines/run.hpp - runs the guest workload for a while with a live progress
// line, and stops it cleanly on a deadline, on a failure or on SIGINT/SIGTERM.
#pragma once

#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "vmm/stress/stress_vm.hpp"
#include "engines/run_report.hpp"
#include "vmm/dirty/tracker.hpp"

namespace mvm::engines {

struct RunOptions {
    double duration_s = 3;   // 0 with max_passes: until the guest is done
    bool progress = false;   // live one-line display on stderr
    bool verify = true;      // stamp check after the stop
    // Called about every tick_ms with the elapsed seconds while the guest runs.
    std::function<void(double)> on_tick;
    double tick_ms = 100;
    // A controller's (run --qmp): told once the vCPUs run; asked every tick
    // whether to end the run now; told when the run ends, before the guest
    // is stopped (it finishes what it does with the guest); asked whether
    // the guest was migrated away (parked for good: killed, not asked to stop).
    std::function<void()> on_started;
    std::function<bool()> until;
    std::function<void()> before_stop;
    std::function<bool()> parked_for_good;
};

// Starts the machine's vCPUs, runs, stops, and reports.
RunReport run_workload(StressVm& m, const RunOptions& opt);

// "vcpu0 61.2M/s  vcpu1 60.8M/s  [1.5/3.0 s]" (per-vCPU pages/s since the last call).
class ProgressLine {
public:
    explicit ProgressLine(const StressVm& m, bool enabled);
    void update(double elapsed_s, double total_s);
    void finish();

private:
    const StressVm& m_;
    bool enabled_;
    std::vector<uint64_t> last_pages_;
    double last_t_ = 0;
};

// run --dirty-log: what the harvests of a whole run added up to.
struct DirtyLogStats {
    std::string mode;
    uint64_t harvests = 0, dirty_pages = 0, max_dirty = 0, ring_full = 0, entries = 0, reset = 0;
    double harvest_s = 0, max_harvest_s = 0, enable_s = 0, disable_s = 0;
    std::vector<std::pair<uint32_t, std::string>> untracked;

    void add(const dirty::Harvest& h);
    std::string table() const;
    nlohmann::json json() const;
};

struct DirtyLogOptions {
    dirty::Mode mode = dirty::Mode::Bitmap;
    double harvest_ms = 100;  // the runner's thread harvests this often
};

struct RunResult {
    RunReport report;
    std::optional<DirtyLogStats> dirty_log;  // with DirtyLogOptions
};

// run_workload(), with dirty logging on for the whole run when `log` is set:
// enabled before the vCPUs start, harvested by the runner's thread (never a
// vCPU thread, except at ring-full), disabled after the stop. A ring mode
// needs `m` made with a dirty ring.
RunResult run_command(StressVm& m, RunOptions opt, const std::optional<DirtyLogOptions>& log);

}  // namespace mvm::engines
