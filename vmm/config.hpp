// vmm/config.hpp - what a VM is made of, as the CLI and tests describe it.
// Plain data; validate_config() checks it against the host before anything
// is created.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "guest/abi.h"
#include "memory/backing.hpp"
#include "numa/policy.hpp"

namespace mvm {

class Kvm;

struct WorkloadConfig {
    uint32_t pattern = MVM_PATTERN_SEQ;
    uint32_t touch = MVM_TOUCH_QWORD;
    uint32_t write_pct = 100;
    uint64_t rate_pages_per_s = 0;  // per vCPU, 0 = unlimited
    uint64_t max_passes = 0;        // 0 = until stopped
    uint64_t seed = 1;
    double watchdog_ms = 20.0;
    uint32_t fault = MVM_FAULT_NONE;  // test hook: this fault ...
    int fault_vcpu = -1;              // ... on this vCPU (-1: none)
};

struct NodeConfig {
    uint32_t id = 0;
    std::vector<uint32_t> vcpus;
    uint64_t mem_bytes = 0;
    BackingKind backing = BackingKind::Anon;
    numa::NodePolicy host_policy;  // where on the host its memory goes (mbind)
    bool prealloc = false;
    std::string origin = "--mem";  // how the user spelled it, for error messages
};

struct MachineConfig {
    uint32_t vcpus = 2;
    std::vector<NodeConfig> nodes;  // at least one; every vCPU in exactly one node
    WorkloadConfig workload;
    uint32_t dirty_ring_bytes = 0;  // >0: enable the dirty ring before creating vCPUs
    bool dirty_ring_acq_rel = true;
    bool pin_vcpus = false;          // pin each vCPU thread to its node's host CPUs
};

// One node holding every vCPU and `mem` bytes of `backing`.
MachineConfig single_node_config(uint32_t vcpus, uint64_t mem, BackingKind backing = BackingKind::Anon);

// Throws UsageError naming the offending option when cfg cannot work on this
// host (vCPU limits, sizes, memory available, node coverage).
void validate_config(const MachineConfig& cfg, const Kvm& kvm);

}  // namespace mvm
