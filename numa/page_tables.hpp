// numa/page_tables.hpp - where the kernel put KVM's own page tables: the
// per-node `SecPageTables` counter (secondary page tables: KVM's TDP/shadow
// page tables, IOMMU tables) in /sys/devices/system/node/nodeN/meminfo.
// KVM allocates them with the mempolicy and on the node of the task that
// makes it allocate (a faulting vCPU thread, the thread enabling dirty
// logging when it splits huge pages eagerly, the harvester at the first
// clear), which is what the "NUMA-aware eager page splitting" thread is about.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

namespace mvm::numa {

// One meminfo field on every host node, in KiB.
struct NodeKib {
    std::map<int, uint64_t> kib;  // host node -> value
    bool available = false;       // the field exists on this kernel (SecPageTables: 6.0+)
};

// Reads `field` ("SecPageTables") from every node's meminfo, after folding
// the per-CPU counter differences in (vm.stat_refresh, when we may write it).
NodeKib node_meminfo_kib(const std::string& field);
inline NodeKib secondary_page_tables() { return node_meminfo_kib("SecPageTables"); }

// How a per-node counter moved between two reads.
struct NodeKibDelta {
    std::map<int, int64_t> kib;  // host node -> after - before
    bool available = false;

    int64_t total() const;
    int64_t on(int node) const;  // 0 when the node is not there
    // "n0 +128 KiB, n1 +0 KiB", or "unavailable (no SecPageTables in node meminfo)".
    std::string summary() const;
    nlohmann::json json() const;  // {"available": true, "per_host_node_kib": {"0": 128}, "total_kib": 128}
};

NodeKibDelta operator-(const NodeKib& after, const NodeKib& before);

}  // namespace mvm::numa
