#include "numa/policy.hpp"

#include <numa.h>
#include <numaif.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <fmt/format.h>

#include "base/error.hpp"
#include "numa/topology.hpp"

namespace mvm::numa {

namespace {

constexpr size_t kBitsPerLong = sizeof(unsigned long) * CHAR_BIT;

// Number of bits in the node masks we pass to the kernel: the kernel's
// nr_node_ids (node_id_limit), rounded up to whole longs.
size_t mask_bits() {
    const auto bits = static_cast<size_t>(node_id_limit());
    return (bits + kBitsPerLong - 1) / kBitsPerLong * kBitsPerLong;
}

std::vector<unsigned long> make_mask(const std::vector<int>& nodes, size_t bits) {
    std::vector<unsigned long> mask(bits / kBitsPerLong, 0);
    for (int n : nodes) {
        if (n < 0 || static_cast<size_t>(n) >= bits)
            throw UsageError(fmt::format("host node {} is out of range", n));
        mask[static_cast<size_t>(n) / kBitsPerLong] |= 1UL << (static_cast<size_t>(n) % kBitsPerLong);
    }
    return mask;
}

std::vector<int> mask_nodes(const std::vector<unsigned long>& mask) {
    std::vector<int> nodes;
    for (size_t i = 0; i < mask.size() * kBitsPerLong; ++i)
        if (mask[i / kBitsPerLong] & (1UL << (i % kBitsPerLong))) nodes.push_back(static_cast<int>(i));
    return nodes;
}

int to_mode(Policy p) {
    switch (p) {
    case Policy::Default: return MPOL_DEFAULT;
    case Policy::Bind: return MPOL_BIND;
    case Policy::Preferred: return MPOL_PREFERRED;
    case Policy::Interleave: return MPOL_INTERLEAVE;
    }
    return MPOL_DEFAULT;
}

NodePolicy from_kernel(int mode, const std::vector<unsigned long>& mask) {
    // Strip MPOL_F_STATIC_NODES / MPOL_F_RELATIVE_NODES / MPOL_F_NUMA_BALANCING.
#ifdef MPOL_MODE_FLAGS
    mode &= ~MPOL_MODE_FLAGS;
#else
    mode &= 0xff;
#endif
    NodePolicy p;
    switch (mode) {
    case MPOL_BIND: p.policy = Policy::Bind; break;
    case MPOL_PREFERRED: p.policy = Policy::Preferred; break;
    case MPOL_INTERLEAVE: p.policy = Policy::Interleave; break;
    default: p.policy = Policy::Default; return p;  // MPOL_DEFAULT, MPOL_LOCAL, others
    }
    p.nodes = mask_nodes(mask);
    if (p.policy == Policy::Preferred && p.nodes.empty()) p.policy = Policy::Default;  // "local"
    return p;
}

std::string node_ids(const Topology& topo) {
    std::vector<int> ids;
    for (const auto& n : topo.nodes) ids.push_back(n.id);
    std::sort(ids.begin(), ids.end());
    return format_cpu_list(ids);
}

}  // namespace

std::optional<Policy> parse_policy(std::string_view s) {
    if (s == "default") return Policy::Default;
    if (s == "bind") return Policy::Bind;
    if (s == "preferred") return Policy::Preferred;
    if (s == "interleave") return Policy::Interleave;
    return std::nullopt;
}

const char* policy_name(Policy p) {
    switch (p) {
    case Policy::Default: return "default";
    case Policy::Bind: return "bind";
    case Policy::Preferred: return "preferred";
    case Policy::Interleave: return "interleave";
    }
    return "?";
}

std::string to_string(const NodePolicy& p) {
    if (p.nodes.empty()) return policy_name(p.policy);
    return fmt::format("{}:{}", policy_name(p.policy), format_cpu_list(p.nodes));
}

void NodePolicy::validate(const Topology& topo) const {
    for (int n : nodes) {
        if (!topo.node(n)) {
            std::string ids = node_ids(topo);
            throw UsageError(fmt::format("host node {} does not exist (host nodes: {}); use host-nodes= within {}",
                                         n, ids, ids));
        }
    }
    switch (policy) {
    case Policy::Default:
        if (!nodes.empty())
            throw UsageError("policy=default takes no host-nodes; use policy=bind, preferred or interleave");
        break;
    case Policy::Preferred:
        if (nodes.size() != 1)
            throw UsageError(fmt::format("policy=preferred takes exactly one host node, got {} ({})",
                                         nodes.size(), format_cpu_list(nodes)));
        break;
    case Policy::Bind:
    case Policy::Interleave:
        if (nodes.empty())
            throw UsageError(fmt::format("policy={} needs host-nodes=, e.g. host-nodes={}", policy_name(policy),
                                         node_ids(topo)));
        break;
    }
}

void apply_to_range(void* addr, size_t len, const NodePolicy& p) {
    if (p.policy == Policy::Default) return;
    size_t bits = mask_bits();
    auto mask = make_mask(p.nodes, bits);
    // The kernel drops the last bit of maxnode; pass bits + 1.
    if (mbind(addr, len, to_mode(p.policy), mask.data(), bits + 1, 0) != 0)
        throw SysError(fmt::format("mbind {} {:#x}+{:#x}", to_string(p), reinterpret_cast<uintptr_t>(addr), len),
                       errno);
}

NodePolicy query_range_policy(void* addr) {
    size_t bits = mask_bits();
    std::vector<unsigned long> mask(bits / kBitsPerLong, 0);
    int mode = 0;
    if (get_mempolicy(&mode, mask.data(), bits, addr, MPOL_F_ADDR) != 0)
        throw SysError(fmt::format("get_mempolicy(MPOL_F_ADDR {:#x})", reinterpret_cast<uintptr_t>(addr)), errno);
    return from_kernel(mode, mask);
}

NodePolicy current_thread_policy() {
    size_t bits = mask_bits();
    std::vector<unsigned long> mask(bits / kBitsPerLong, 0);
    int mode = 0;
    if (get_mempolicy(&mode, mask.data(), bits, nullptr, 0) != 0) throw SysError("get_mempolicy", errno);
    return from_kernel(mode, mask);
}

void set_current_thread_policy(const NodePolicy& p) {
    size_t bits = mask_bits();
    int rc;
    if (p.policy == Policy::Default) {
        rc = set_mempolicy(MPOL_DEFAULT, nullptr, 0);
    } else {
        auto mask = make_mask(p.nodes, bits);
        rc = set_mempolicy(to_mode(p.policy), mask.data(), bits + 1);
    }
    if (rc != 0) throw SysError(fmt::format("set_mempolicy {}", to_string(p)), errno);
}

ThreadPolicyScope::ThreadPolicyScope(const NodePolicy& p) {
    size_t bits = mask_bits();
    saved_mask_.assign(bits / kBitsPerLong, 0);
    if (get_mempolicy(&saved_mode_, saved_mask_.data(), bits, nullptr, 0) != 0)
        throw SysError("get_mempolicy", errno);
    set_current_thread_policy(p);
}

ThreadPolicyScope::~ThreadPolicyScope() {
    int base = saved_mode_;
#ifdef MPOL_MODE_FLAGS
    base &= ~MPOL_MODE_FLAGS;
#endif
    if (base == MPOL_DEFAULT)
        set_mempolicy(MPOL_DEFAULT, nullptr, 0);
    else
        set_mempolicy(saved_mode_, saved_mask_.data(), saved_mask_.size() * kBitsPerLong + 1);
    // Nothing useful to do on failure in a destructor.
}

void pin_current_thread(const std::vector<int>& cpus) {
    if (cpus.empty()) throw UsageError("cannot pin a thread to an empty CPU list");
    int max_cpu = *std::max_element(cpus.begin(), cpus.end());
    if (*std::min_element(cpus.begin(), cpus.end()) < 0)
        throw UsageError(fmt::format("bad CPU list {}", format_cpu_list(cpus)));
    size_t ncpus = std::max<size_t>(static_cast<size_t>(max_cpu) + 1, CPU_SETSIZE);
    cpu_set_t* set = CPU_ALLOC(ncpus);
    if (!set) throw SysError("CPU_ALLOC", ENOMEM);
    size_t size = CPU_ALLOC_SIZE(ncpus);
    CPU_ZERO_S(size, set);
    for (int c : cpus) CPU_SET_S(static_cast<size_t>(c), size, set);
    int err = pthread_setaffinity_np(pthread_self(), size, set);
    CPU_FREE(set);
    if (err != 0) throw SysError(fmt::format("pthread_setaffinity_np {}", format_cpu_list(cpus)), err);
}

std::vector<int> current_thread_cpus() { return task_cpus(0); }

std::vector<int> task_cpus(int tid) {
    for (size_t ncpus = CPU_SETSIZE;; ncpus *= 2) {
        cpu_set_t* set = CPU_ALLOC(ncpus);
        if (!set) throw SysError("CPU_ALLOC", ENOMEM);
        size_t size = CPU_ALLOC_SIZE(ncpus);
        CPU_ZERO_S(size, set);
        if (sched_getaffinity(tid, size, set) != 0) {
            int err = errno;
            CPU_FREE(set);
            if (err == EINVAL && ncpus < (1u << 20)) continue;
            throw SysError("sched_getaffinity", err);
        }
        std::vector<int> cpus;
        for (size_t c = 0; c < ncpus; ++c)
            if (CPU_ISSET_S(c, size, set)) cpus.push_back(static_cast<int>(c));
        CPU_FREE(set);
        return cpus;
    }
}

std::vector<int> cpus_for_nodes(const Topology& topo, const std::vector<int>& nodes) {
    std::vector<int> cpus;
    for (int id : nodes) {
        const Node* n = topo.node(id);
        if (!n) {
            std::string ids = node_ids(topo);
            throw UsageError(fmt::format("host node {} does not exist (host nodes: {}); use host-nodes= within {}",
                                         id, ids, ids));
        }
        cpus.insert(cpus.end(), n->cpus.begin(), n->cpus.end());
    }
    std::sort(cpus.begin(), cpus.end());
    cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
    return cpus;
}

}  // namespace mvm::numa
