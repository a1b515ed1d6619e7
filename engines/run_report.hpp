// engines/run_report.hpp - the run report: per-vCPU progress from the mailboxes, the
// guest watchdog's events, KVM stats deltas. Rendered as a table and as JSON.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "vmm/kvm/stats.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::engines {

struct WatchdogEvent {
    double at_ms;   // since the vCPU's workload started
    double len_ms;
};

struct VcpuReport {
    uint32_t id = 0;
    uint32_t vnode = 0;
    uint64_t pages_written = 0, pages_read = 0, passes = 0;
    double pages_per_s = 0;       // over the whole run
    double warm_pages_per_s = 0;  // after the first pass (memory already faulted in)
    double max_stall_ms = 0;      // longest gap between two progress points
    uint64_t watchdog_events = 0;
    std::vector<WatchdogEvent> events;  // newest up to MVM_WD_RING
    uint64_t exits = 0, kicks = 0;
};

struct VnodeSummary {
    uint32_t id = 0;
    uint64_t gpa = 0, bytes = 0;
    std::string backing, policy, vcpus, host_cpus;  // host_cpus "" when unpinned
    bool prealloc = false;
};

struct RunReport {
    double duration_s = 0;
    uint32_t nr_vcpus = 0;
    uint64_t mem_bytes = 0;
    std::string pattern, fill, backing;
    uint32_t write_pct = 100;
    double watchdog_ms = 0;
    std::string access = "local";
    std::vector<VnodeSummary> vnodes;
    std::vector<VcpuReport> vcpus;
    StatDelta vm_stats;
    std::vector<StatDelta> vcpu_stats;
    std::optional<StampCheck> stamps;
    std::optional<VcpuFailure> failure;
    bool interrupted = false;
};

struct StatsBaseline {
    StatSnapshot vm;
    std::vector<StatSnapshot> vcpus;
};
StatsBaseline read_stats(const StressVm& m);

RunReport collect_report(const StressVm& m, const StatsBaseline& before, double duration_s);
nlohmann::json to_json(const RunReport& r);
std::string to_table(const RunReport& r);

// The vCPUs' binary stats since `before` (one snapshot per vCPU), summed over vCPUs.
StatDelta sum_vcpu_stats(const std::vector<StatSnapshot>& before, const StressVm& m);

}  // namespace mvm::engines
