// engines/dirty_rate.hpp - `minivmm dirty-rate`: how fast a running guest
// dirties memory, measured like QEMU's calc-dirty-rate: with the dirty ring
// (per-vCPU counts), the dirty bitmap, or by sampling (hash a random sample of
// pages twice, no logging at all). Rates count distinct pages dirtied per
// period, so a guest rewriting a small working set saturates at its size.
#pragma once

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
    double warmup_s = 0.5;               // after every vCPU finished its first pass
    uint64_t sample_pages_per_gib = 512;  // sampling (QEMU's default)
    bool progress = false;
};

struct VcpuRate {
    uint32_t vcpu = 0;
    double pages_per_s = 0, mib_per_s = 0;
    double guest_writes_per_s = 0;  // what the guest itself counted (writes, not distinct pages)
};

struct RateResult {
    RateMode mode = RateMode::Bitmap;
    double period_s = 0;             // measured
    uint64_t dirty_pages = 0;        // distinct (estimated when sampling)
    double pages_per_s = 0, mib_per_s = 0;
    std::vector<VcpuRate> vcpus;
    uint64_t samples = 0, samples_changed = 0;  // sampling
    double harvest_s = 0;            // logging modes: time spent harvesting
    std::string note;
};

const char* rate_mode_name(RateMode m);
// Runs on a machine that is not started yet (ring mode needs it made with a ring).
RateResult measure_dirty_rate(StressVm& m, const RateOptions& opt);
nlohmann::json to_json(const RateResult& r);
std::string to_table(const RateResult& r);

}  // namespace mvm::engines
