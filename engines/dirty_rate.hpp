// engines/dirty_rate.hpp - `minivmm dirty-rate`: how fast a running guest
// dirties memory, measured like QEMU's calc-dirty-rate: with the dirty ring,
// the dirty bitmap, or by sampling (hash a random sample of pages twice, no
// logging at all). Rates count distinct pages dirtied per period, so a guest
// rewriting a small working set saturates at its size: a window in which every
// page that could be dirtied was dirty is flagged `saturated` and its rate is
// only a lower bound. `interval_s` adds a time series of shorter windows.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "vmm/dirty/tracker.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::engines {

enum class RateMode { Ring, Bitmap, Sampling };

struct RateOptions {
    RateMode mode = RateMode::Bitmap;
    double period_s = 1.0;
    double interval_s = 0;                // > 0: also a window every interval_s (time series)
    double warmup_s = 0.5;                // after every vCPU finished its first pass
    double baseline_s = 0.5;              // logging modes: unlogged window before logging goes on (0: none)
    uint64_t sample_pages_per_gib = 512;  // sampling (QEMU's default)
    bool progress = false;
    // A guest already running (a monitor's calc-dirty-rate): not started,
    // warmed or stopped here, and no baseline window; logging modes use
    // `tracker` (the machine's, not enabled; left disabled) instead of their own.
    bool running = false;
    dirty::Tracker* tracker = nullptr;
    const std::atomic<bool>* cancel = nullptr;  // set: stop early (throws Error "cancelled")
};

// One vCPU over one window.
struct VcpuRate {
    uint32_t vcpu = 0;
    uint64_t dirty_pages = 0;        // distinct pages of its working set dirtied (estimated when sampling)
    uint64_t working_set_pages = 0;  // what it can dirty at most
    bool saturated = false;          // dirty_pages == working_set_pages
    double pages_per_s = 0, mib_per_s = 0;  // dirty_pages over the window
    uint64_t ring_entries = 0;       // ring: entries its ring received (a page counts again after every reset)
    double ring_entries_per_s = 0;
    double guest_writes_per_s = 0;   // what the guest itself counted (page writes, not distinct pages)
};

// One virtual node over one window.
struct VnodeRate {
    uint32_t vnode = 0;
    uint64_t dirty_pages = 0, pages = 0;  // distinct dirty pages; pages the node has (tracked / sampled)
    bool saturated = false;
    double pages_per_s = 0, mib_per_s = 0;
};

// One measured window: the whole period, or one step of the time series.
struct RateWindow {
    double start_s = 0;              // from the start of the measured period
    double period_s = 0;             // measured length
    uint64_t dirty_pages = 0;        // distinct (estimated when sampling)
    uint64_t capacity_pages = 0;     // pages that could be dirtied (working sets)
    bool saturated = false;          // every page that could be dirtied was (sampling: every sample changed)
    bool lower_bound = false;        // saturated, or some vCPU/vnode is: the true rate is >= the figure
    double pages_per_s = 0, mib_per_s = 0;
    double guest_writes_per_s = 0;   // sum over vCPUs
    uint64_t samples = 0, samples_changed = 0;  // sampling
    std::vector<VcpuRate> vcpus;
    std::vector<VnodeRate> vnodes;
};

// The guest's own write rate without logging (baseline window) and with it.
struct LoggingCost {
    bool measured = false;
    double baseline_s = 0;
    double unlogged_writes_per_s = 0, logged_writes_per_s = 0;  // sums over vCPUs
    std::vector<double> unlogged_vcpu;                            // per vCPU
    double slowdown = 0;                                          // unlogged / logged
};

struct RateResult {
    RateMode mode = RateMode::Bitmap;
    RateWindow total;                 // the whole period
    std::vector<RateWindow> series;   // --interval windows, in order
    double interval_s = 0;
    LoggingCost logging;
    double harvest_s = 0;             // logging modes: time spent harvesting
    std::string note;
};

const char* rate_mode_name(RateMode m);
// Runs on a machine that is not started yet (ring mode needs it made with a
// ring), or with opt.running on one that runs (opt.tracker for ring and bitmap).
RateResult measure_dirty_rate(StressVm& m, const RateOptions& opt);
// Sets the window's rates and saturation flags from its counts and period_s.
void finish_window(RateWindow& w);
nlohmann::json to_json(const RateResult& r);
std::string to_table(const RateResult& r);

}  // namespace mvm::engines
