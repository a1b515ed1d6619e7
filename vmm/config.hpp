// vmm/config.hpp - what a VM is made of, as the CLI and tests describe it.
// Plain data; validate_config() checks it against the host before anything
// is created.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "memory/backing.hpp"
#include "numa/policy.hpp"

namespace mvm {

class Kvm;

// Virtual nodes a VM may have (the guest's MVM_MAX_VNODES).
inline constexpr uint32_t kMaxVnodes = 16;

struct WorkloadConfig {
    // The stress guest's own codes (guest/abi.h: MVM_PATTERN_*, MVM_FILL_*,
    // MVM_FAULT_*); plain numbers here, as the VM does not know the guest.
    uint32_t pattern = 0;  // MVM_PATTERN_SEQ
    uint32_t fill = 0;     // MVM_FILL_ZERO (--touch qword); MVM_FILL_STAMP is --touch page
    double fill_ratio = 0; // MVM_FILL_RATIO: R of ratio:R (>= 1)
    uint32_t write_pct = 100;
    uint64_t rate_pages_per_s = 0;  // per vCPU, 0 = unlimited
    uint64_t max_passes = 0;        // 0 = until stopped
    uint64_t working_set_pages = 0; // per vCPU, the first pages of its share; 0 = all of it
    uint64_t seed = 1;
    uint32_t vm_tag = 0;            // the VM's identity in its stamps (1..255); 0: StressVm picks one
    double watchdog_ms = 20.0;
    uint32_t fault = 0;               // test hook: this fault (0: MVM_FAULT_NONE) ...
    int fault_vcpu = -1;              // ... on this vCPU (-1: none)
};

// The fill as --fill spells it: "zero", "stamp", "random", "ratio:3.5".
std::string fill_name(const WorkloadConfig& w);
// Qwords of a written page that are not zero under fill random/ratio:R
// (boot parameter fill_qwords): 512 for random, round(512 / R) for ratio:R.
uint32_t fill_qwords(const WorkloadConfig& w);

// Which virtual nodes' memory a vCPU works in (--access).
enum class Access { Local, Remote, Mixed };
struct AccessConfig {
    Access mode = Access::Local;
    uint32_t remote_pct = 0;  // share of each vCPU's pages on the next node: 0 local, 100 remote
};
std::string to_string(const AccessConfig& a);  // "local", "remote", "mixed:30"

struct NodeConfig {
    uint32_t id = 0;
    std::vector<uint32_t> vcpus;
    uint64_t mem_bytes = 0;
    BackingKind backing = BackingKind::Anon;
    numa::NodePolicy host_policy;  // where on the host its memory goes (mbind)
    // The vCPU threads' own policy (set_mempolicy); unset: host_policy. Only
    // the guest_memfd mempolicy probe sets another, to tell the two apart.
    std::optional<numa::NodePolicy> vcpu_thread_policy;
    std::vector<int> host_cpus;    // host CPUs its vCPU threads are pinned to; empty: not pinned
    bool host_cpus_given = false;  // host-cpus= was spelled out (else derived from the host nodes)
    bool prealloc = false;         // MADV_POPULATE_WRITE before boot, by a thread on the node
    std::string origin = "--mem";  // how the user spelled it, for error messages
};

struct MachineConfig {
    uint32_t vcpus = 2;
    std::vector<NodeConfig> nodes;  // at least one; every vCPU in exactly one node
    WorkloadConfig workload;
    AccessConfig access;
    uint32_t dirty_ring_bytes = 0;  // >0: enable the dirty ring before creating vCPUs
    bool dirty_ring_acq_rel = true;
    bool show_progress = false;      // progress display for long setup steps (prealloc)
    uint32_t slots_per_node = 1;     // each node's memory split over this many memslots
    std::string uuid;                // QEMU's -uuid, lower case; "" when not given (QMP query-uuid: all zeros)
};

// One node holding every vCPU and `mem` bytes of `backing`.
MachineConfig single_node_config(uint32_t vcpus, uint64_t mem, BackingKind backing = BackingKind::Anon);

// Checks that need no host: sizes, node ids, vCPU coverage and overlap,
// workload knobs, and host nodes/CPUs against `topo` (the host's, or one a
// test supplies). Throws UsageError naming the offending option.
void validate_config(const MachineConfig& cfg, const numa::Topology& topo);

// Checks against this host and its KVM: vCPU limits, guest_memfd support,
// memory available, CPUs this process may run on, hugetlb pools.
void check_host_resources(const MachineConfig& cfg, const Kvm& kvm);
// Room for a second VM of `cfg` beside the first (migrate --to inproc: the
// destination is a copy in this process): twice the guest memory against
// MemAvailable and the hugetlb pools. Throws UsageError naming `option`.
void check_room_for_second_vm(const MachineConfig& cfg, const std::string& option);
// --vcpus against KVM_CAP_MAX_VCPUS (part of check_host_resources).
void check_kvm_vcpu_limit(const MachineConfig& cfg, const Kvm& kvm);

// The hugetlb pages each node needs, checked against the pools: global free
// minus reserved, and per host node when the policy binds to one node.
// Returns "" when they suffice, else one line naming the node, the missing
// page count and the sysfs file to raise.
struct HugetlbPool;

// "" when KVM's guest_memfd caps allow a gmem backing (MMAP|INIT_SHARED), else
// one line naming `origin` and what is missing.
std::string check_gmem_support(const std::string& origin, int cap_guest_memfd, int cap_guest_memfd_flags);
std::string check_hugetlb_pools(const MachineConfig& cfg, const std::vector<HugetlbPool>& pools);

}  // namespace mvm
