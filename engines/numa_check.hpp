// engines/numa_check.hpp - `minivmm numa-check`: after the guest has touched
// every page, where did each virtual node's memory really land (move_pages
// on every page, or a sample), are the vCPU threads where they belong, and
// what does the host's NUMA balancing mean for this VM.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "numa/page_tables.hpp"
#include "numa/placement.hpp"
#include "vmm/dirty/tracker.hpp"
#include "vmm/kvm/stats.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "engines/run_report.hpp"

namespace mvm::engines {

struct NodePlacementReport {
    uint32_t vnode = 0;
    std::string backing, policy;
    uint64_t gpa = 0, bytes = 0;
    uint64_t query_page_bytes = 4096;  // one move_pages entry per this many bytes
    std::vector<int> expected_nodes;   // empty: any node is right (policy default)
    numa::Placement placement;
    double on_policy_pct = 0;          // of queried pages
    // The first range that is not where the policy says, as GPAs.
    std::optional<std::pair<uint64_t, uint64_t>> bad_range;  // start, length
    std::string bad_reason;                                 // "on host node 1" / "not present"
    std::optional<double> prealloc_s;
};

struct VcpuPlacementReport {
    uint32_t vcpu = 0, vnode = 0;
    int tid = 0;
    std::vector<int> affinity;  // read now with sched_getaffinity(tid)
    std::vector<int> expected;  // the node's host CPUs; empty: not pinned
    std::string mempolicy;      // as the vCPU thread read it back
    bool ok = true;
};

// Dirty logging enabled once after the placement check (bitmap, GET clears:
// with eager_page_split on, KVM splits the huge mappings at enable, making
// their 4 KiB page tables right then): from which thread(s), and where those
// page tables landed (SecPageTables per host node). Disabled again after.
struct LoggingEnableCheck {
    std::string requested;            // per-node | unbound | host-node:N
    std::string from;                 // as the tracker says it enabled
    std::string eager_note;           // eager_page_split as set / found
    bool eager_effective = false;     // eager_page_split=Y on the TDP MMU
    std::vector<dirty::SlotTiming> slots;
    // Slots logging could not cover (guest_memfd: KVM refuses
    // KVM_MEM_LOG_DIRTY_PAGES with KVM_MEM_GUEST_MEMFD), each with why.
    std::vector<std::pair<uint32_t, std::string>> untracked;
    StatDelta vm;                     // pages_4k / pages_2m / pages_1g over the enable
    numa::NodeKibDelta page_tables;   // SecPageTables per host node over the enable
};

struct NumaCheckReport {
    std::vector<NodePlacementReport> nodes;
    std::vector<VcpuPlacementReport> vcpus;
    std::string access;
    std::string numa_balancing;  // the sysctl's value, or "unavailable"
    std::string advice;
    double touch_s = 0;          // guest pass over all memory
    numa::NodeKibDelta touch_page_tables;  // KVM page tables made by the pass's faults (vCPU threads)
    std::optional<LoggingEnableCheck> logging;
    double check_s = 0;          // the move_pages queries
    uint64_t checked_bytes = 0;
    bool sampled = false;
    std::optional<StampCheck> stamps;
    std::optional<VcpuFailure> failure;
    bool interrupted = false;

    bool placement_ok() const;
    bool affinity_ok() const;
    // "vnode 1: GPA 0x140000000-0x1401fffff (2.0 MiB) is on host node 1, policy bind:0"
    std::string first_offender() const;
};

struct NumaCheckOptions {
    uint64_t sample_pages = 0;  // per node; 0 = every page
    // After the check, enable dirty logging from: "per-node" (a thread per
    // virtual node on its host CPUs and policy, in parallel), "unbound" (the
    // calling thread as it is), "host-node:N" (one thread on host node N);
    // "" not at all. eager_split sets eager_page_split for it (and restores).
    std::string enable_logging;
    std::optional<bool> eager_split;
    bool progress = false;
};

// The host nodes a virtual node's pages may be on: by default those its
// policy names (policy_nodes). Tests pass another judge, since a one-node
// host cannot misplace memory on its own.
using PlacementJudge = std::function<std::vector<int>(const NodeConfig& node)>;
std::vector<int> policy_nodes(const NodeConfig& node);

// Runs one full pass of the workload (every page written), then checks.
NumaCheckReport numa_check(StressVm& m, const NumaCheckOptions& opt, const PlacementJudge& judge = policy_nodes);

// Checks an --enable-logging value ("per-node", "unbound", "host-node:N");
// throws UsageError naming the option.
void check_enable_logging(const std::string& v);

// What the kernel developers advise for VMs given numa_balancing and the policies.
std::string numa_balancing_advice(const std::string& setting, const MachineConfig& cfg);

nlohmann::json to_json(const NumaCheckReport& r);
std::string to_table(const NumaCheckReport& r);

}  // namespace mvm::engines
