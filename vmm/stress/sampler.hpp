// vmm/stress/sampler.hpp - reads every vCPU's progress from its mailbox at a fixed
// rate (>= 1 kHz) without any exit, keeps the samples for a timeline, and
// finds stalls: intervals in which a vCPU's page counter did not move.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "vmm/stress/stress_vm.hpp"

namespace mvm {

struct ProgressSample {
    double t_ms;        // since the sampler started
    uint32_t vcpu;
    uint64_t pages;     // written + read so far
};

struct Stall {
    uint32_t vcpu = 0;
    double start_ms = 0, len_ms = 0;  // from the sample that last moved to the last sample that had not moved since
    std::string phase;                // the phase it overlaps most (filled by callers)
};

class ProgressSampler {
public:
    // period_us: 1000 for 1 kHz. keep_samples: keep them for a timeline.
    ProgressSampler(const StressVm& m, uint32_t period_us = 1000, bool keep_samples = true);
    ~ProgressSampler();
    ProgressSampler(const ProgressSampler&) = delete;
    ProgressSampler& operator=(const ProgressSampler&) = delete;

    void start();
    void stop();
    double now_ms() const;  // on the sampler's clock

    // Valid after stop().
    const std::vector<ProgressSample>& samples() const { return samples_; }
    // Stalls longer than threshold_ms (a vCPU whose guest finished is not stalled).
    std::vector<Stall> stalls(double threshold_ms) const { return stalls_over(threshold_ms); }
    uint64_t ticks() const { return ticks_; }
    double cpu_seconds() const { return cpu_s_; }  // the sampler thread's own CPU time
    double wall_seconds() const { return wall_s_; }
    uint32_t period_us() const { return period_us_; }

private:
    void loop();
    std::vector<Stall> stalls_over(double threshold_ms) const;

    const StressVm& m_;
    uint32_t period_us_;
    bool keep_;
    std::chrono::steady_clock::time_point t0_;
    std::atomic<bool> stop_{false};
    std::thread thread_;
    std::vector<ProgressSample> samples_;
    // Gaps seen live (so they exist even when samples are not kept).
    std::vector<Stall> gaps_;
    uint64_t ticks_ = 0;
    double cpu_s_ = 0, wall_s_ = 0;
};

// The guest's progress over all vCPUs from kept samples: pages per second
// over bins of at least min_bin_ms, fewer than ~max_points of them; each
// point is (end of its bin on the samples' clock, pages/s over the bin).
std::vector<std::pair<double, double>> all_vcpus_rate(const std::vector<ProgressSample>& samples,
                                                      double min_bin_ms, size_t max_points);

}  // namespace mvm
