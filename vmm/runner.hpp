// vmm/runner.hpp - runs the guest workload for a while with a live progress
// line, and stops it cleanly on a deadline, on a failure or on SIGINT/SIGTERM.
#pragma once

#include <atomic>
#include <cstdio>
#include <functional>

#include "vmm/machine.hpp"
#include "vmm/report.hpp"

namespace mvm {

// Set by the SIGINT/SIGTERM handler (install_stop_signals); 0 when none came.
extern std::atomic<int> g_stop_signal;
void install_stop_signals();

struct RunOptions {
    double duration_s = 3;   // 0 with max_passes: until the guest is done
    bool progress = false;   // live one-line display on stderr
    bool verify = true;      // stamp check after the stop
    // Called about every tick_ms with the elapsed seconds while the guest runs.
    std::function<void(double)> on_tick;
    double tick_ms = 100;
};

// Starts the machine's vCPUs, runs, stops, and reports.
RunReport run_workload(Machine& m, const RunOptions& opt);

// "vcpu0 61.2M/s  vcpu1 60.8M/s  [1.5/3.0 s]" (per-vCPU pages/s since the last call).
class ProgressLine {
public:
    explicit ProgressLine(const Machine& m, bool enabled);
    void update(double elapsed_s, double total_s);
    void finish();

private:
    const Machine& m_;
    bool enabled_;
    std::vector<uint64_t> last_pages_;
    double last_t_ = 0;
};

}  // namespace mvm
