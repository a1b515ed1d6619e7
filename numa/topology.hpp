// numa/topology.hpp - the host's NUMA nodes as libnuma reports them. Tests
// build a Topology by hand to exercise several-node logic on a one-node host.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mvm::numa {

struct Node {
    int id = 0;
    std::vector<int> cpus;
    uint64_t mem_total_bytes = 0;
    uint64_t mem_free_bytes = 0;
};

struct Topology {
    std::vector<Node> nodes;
    std::vector<std::vector<int>> distance;  // [i][j] by index into nodes

    const Node* node(int id) const;
    bool has_cpu(int cpu) const;
    std::vector<int> all_cpus() const;
    int node_of_cpu(int cpu) const;  // -1 if unknown
};

// Reads the host (libnuma); a host without NUMA support is one node 0 holding all CPUs.
Topology host_topology();

// The kernel's nr_node_ids: the highest possible node id + 1, read from
// /sys/devices/system/node/possible (libnuma's possible-node count if it
// cannot be read). Every nodemask given to the kernel has at least this many
// bits: get_mempolicy refuses a smaller maxnode with EINVAL, and hosts with
// many (e.g. CXL memory-only) nodes have more than any constant assumes.
int node_id_limit();

// MemAvailable from /proc/meminfo (0 if unreadable).
uint64_t host_mem_available_bytes();

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}; throws std::invalid_argument on bad syntax.
std::vector<int> parse_cpu_list(const std::string& s);
std::string format_cpu_list(const std::vector<int>& cpus);

}  // namespace mvm::numa
