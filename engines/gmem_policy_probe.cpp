#include "engines/gmem_policy_probe.hpp"

#include <sys/mman.h>

#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "base/error.hpp"
#include "base/fd.hpp"
#include "numa/placement.hpp"
#include "numa/topology.hpp"
#include "vmm/config.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::engines {

std::string GmemPolicyProbe::summary() const
{
    if (verdict == "unknown")
        return "cannot tell: " + why;
    std::string where;
    for (const auto& [n, p] : pages_per_node)
        where += fmt::format("{}n{} {}", where.empty() ? "" : ", ", n, p);
    const char* meaning = verdict == "honoured" ? "KVM allocates by the gmem mapping's mbind policy"
                          : verdict == "ignored" ? "mbind was accepted but KVM allocates by the faulting thread's policy"
                                                 : "some pages followed the mbind policy, some the faulting thread's";
    return fmt::format("{}: {} ({} pages bound to host node {}, faulted by a vCPU thread bound to node {}: {}{})",
                       verdict, meaning, pages, bound_node, thread_node, where,
                       not_present ? fmt::format(", {} not present", not_present) : "");
}

nlohmann::json GmemPolicyProbe::to_json() const
{
    nlohmann::json per = nlohmann::json::object();
    for (const auto& [n, p] : pages_per_node)
        per[std::to_string(n)] = p;
    nlohmann::json j = {{"verdict", verdict}, {"honoured", honoured()}};
    if (verdict == "unknown") {
        j["why"] = why;
        j["honoured"] = nullptr;
        return j;
    }
    j.update({{"bound_node", bound_node}, {"thread_node", thread_node}, {"pages", pages},
              {"pages_per_host_node", per}, {"pages_not_present", not_present}});
    return j;
}

GmemPolicyProbe probe_gmem_mempolicy(const Kvm& kvm, uint64_t bytes)
{
    GmemPolicyProbe r;
    if (std::string why = check_gmem_support("guest_memfd", kvm.cap(KVM_CAP_GUEST_MEMFD),
                                             kvm.cap(KVM_CAP_GUEST_MEMFD_FLAGS));
        !why.empty()) {
        r.why = "no guest_memfd on this kernel";
        return r;
    }
    // The faulting thread on a node with CPUs; the policy on another node with memory.
    const numa::Topology topo = numa::host_topology();
    const numa::Node* thread = nullptr;
    const numa::Node* bound = nullptr;
    for (const auto& n : topo.nodes)
        if (!thread && !n.cpus.empty())
            thread = &n;
    for (const auto& n : topo.nodes)
        if (thread && n.id != thread->id && n.mem_free_bytes > 4 * bytes)
            bound = &n;
    if (!thread || !bound) {
        r.why = fmt::format("needs two host NUMA nodes with memory (this host has {}): on one node every policy is "
                            "met whatever KVM does",
                            topo.nodes.size());
        return r;
    }
    r.thread_node = thread->id;
    r.bound_node = bound->id;

    MachineConfig cfg = single_node_config(1, bytes, BackingKind::Gmem);
    NodeConfig& node = cfg.nodes[0];
    node.host_policy = {numa::Policy::Bind, {bound->id}};
    node.host_cpus = thread->cpus;
    node.host_cpus_given = true;
    node.vcpu_thread_policy = numa::NodePolicy{numa::Policy::Bind, {thread->id}};
    node.origin = "guest_memfd mempolicy probe";
    cfg.workload.max_passes = 1;
    StressVm m(kvm, cfg);
    m.start();
    if (!m.wait_finished(std::chrono::seconds(60)) || m.failure()) {
        r.why = m.failure() ? "the probe's guest failed: " + m.failure()->reason : "the probe's guest did not finish in 60 s";
        return r;
    }
    const Backing& b = m.node_backing(0);
    b.map_for_query();  // the guest wrote every page (one full pass): this finds its folios
    const numa::Placement pl = numa::query_placement(b.host(), b.size(), 4096);
    r.pages = pl.pages_queried;
    r.pages_per_node = pl.pages_per_node;
    r.not_present = pl.pages_not_present;
    const uint64_t on_bound = pl.pages_per_node.count(bound->id) ? pl.pages_per_node.at(bound->id) : 0;
    const uint64_t on_thread = pl.pages_per_node.count(thread->id) ? pl.pages_per_node.at(thread->id) : 0;
    if (r.pages == 0 || pl.pages_not_present == r.pages) {
        r.verdict = "unknown";
        r.why = "the guest's writes left no page present";
    } else if (on_bound == r.pages - pl.pages_not_present) {
        r.verdict = "honoured";
    } else if (on_thread == r.pages - pl.pages_not_present) {
        r.verdict = "ignored";
    } else {
        r.verdict = "partly";
    }
    return r;
}

std::string probe_gmem_dirty_logging(const Kvm& kvm)
{
    if (!check_gmem_support("guest_memfd", kvm.cap(KVM_CAP_GUEST_MEMFD), kvm.cap(KVM_CAP_GUEST_MEMFD_FLAGS)).empty())
        return "unknown: no guest_memfd on this kernel";
    constexpr uint64_t kSize = 2ull << 20;
    Vm vm = kvm.create_vm();
    UniqueFd gmem(vm.create_guest_memfd(kSize, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED));
    Mapping map = Mapping::map("gmem dirty-logging probe", kSize, PROT_READ | PROT_WRITE, MAP_SHARED, gmem.get());
    kvm_userspace_memory_region2 r{};
    r.slot = 0;
    r.flags = KVM_MEM_GUEST_MEMFD;
    r.memory_size = kSize;
    r.userspace_addr = reinterpret_cast<uint64_t>(map.bytes());
    r.guest_memfd = static_cast<uint32_t>(gmem.get());
    vm.set_memory_region(r);  // a plain gmem slot: must work where the backing does
    r.flags |= KVM_MEM_LOG_DIRTY_PAGES;
    try {
        vm.set_memory_region(r);
    } catch (const SysError& e) {
        return fmt::format("no: KVM refuses KVM_MEM_LOG_DIRTY_PAGES on a guest_memfd slot ({})", std::strerror(e.err()));
    }
    return "yes";
}

}  // namespace mvm::engines
