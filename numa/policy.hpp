// numa/policy.hpp - memory policies (mbind/set_mempolicy) and CPU pinning.
// Everything here works on a one-node host; the planning helpers take a
// Topology so tests can exercise several-node logic with a hand-built one.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "numa/topology.hpp"

namespace mvm::numa {

enum class Policy { Default, Bind, Preferred, Interleave };

// "default" | "bind" | "preferred" | "interleave" -> Policy; nullopt otherwise.
std::optional<Policy> parse_policy(std::string_view s);
const char* policy_name(Policy p);

struct NodePolicy {
    Policy policy = Policy::Default;
    std::vector<int> nodes;

    // Throws UsageError when a node does not exist in `topo`, when Preferred
    // does not name exactly one node, when Bind/Interleave name none, or when
    // Default names any.
    void validate(const Topology& topo) const;

    bool operator==(const NodePolicy&) const = default;
};

std::string to_string(const NodePolicy& p);  // "bind:0-1", "default"

// mbind(2) [addr, addr+len) with the policy (flags 0). Default does nothing.
// Throws SysError("mbind ...", errno).
void apply_to_range(void* addr, size_t len, const NodePolicy& p);

// Reads back the policy of the VMA containing addr (get_mempolicy MPOL_F_ADDR).
NodePolicy query_range_policy(void* addr);

// The calling thread's policy (get_mempolicy, flags 0).
NodePolicy current_thread_policy();

// Sets the calling thread's policy for the rest of its life (set_mempolicy).
void set_current_thread_policy(const NodePolicy& p);

// Saves the calling thread's mempolicy, sets `p` (set_mempolicy), and restores
// the saved one on destruction. Must be destroyed on the thread that made it.
class ThreadPolicyScope {
public:
    explicit ThreadPolicyScope(const NodePolicy& p);
    ~ThreadPolicyScope();
    ThreadPolicyScope(const ThreadPolicyScope&) = delete;
    ThreadPolicyScope& operator=(const ThreadPolicyScope&) = delete;

private:
    int saved_mode_ = 0;
    std::vector<unsigned long> saved_mask_;
};

// Restricts the calling thread to `cpus` (pthread_setaffinity_np).
void pin_current_thread(const std::vector<int>& cpus);
// The calling thread's CPU affinity, sorted.
std::vector<int> current_thread_cpus();
// Another thread's (by TID), sorted: what the scheduler will use for it now.
std::vector<int> task_cpus(int tid);

// Sorted union of the CPUs of `nodes`; throws UsageError for an unknown node.
std::vector<int> cpus_for_nodes(const Topology& topo, const std::vector<int>& nodes);

}  // namespace mvm::numa
