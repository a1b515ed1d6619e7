#include "vmm/config.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include <fmt/format.h>

#include "base/error.hpp"
#include "vmm/kvm/kvm.hpp"
#include "memory/hugetlb.hpp"
#include "base/units.hpp"

namespace mvm {

std::string fill_name(const WorkloadConfig& w)
{
    switch (w.fill) {
    case 0:
        return "zero";
    case 1:
        return "stamp";
    case 2:
        return "random";
    case 3:
        return fmt::format("ratio:{:g}", w.fill_ratio);
    default:
        return fmt::format("fill#{}", w.fill);
    }
}

uint32_t fill_qwords(const WorkloadConfig& w)
{
    constexpr uint32_t kPageQwords = 512;
    if (w.fill == 2)
        return kPageQwords;
    if (w.fill != 3 || !(w.fill_ratio >= 1))
        return 1;
    const double q = std::round(kPageQwords / w.fill_ratio);
    return static_cast<uint32_t>(std::clamp(q, 1.0, double(kPageQwords)));
}

MachineConfig single_node_config(uint32_t vcpus, uint64_t mem, BackingKind backing)
{
    MachineConfig c;
    c.vcpus = vcpus;
    NodeConfig n;
    n.id = 0;
    n.mem_bytes = mem;
    n.backing = backing;
    for (uint32_t i = 0; i < vcpus; i++)
        n.vcpus.push_back(i);
    c.nodes.push_back(n);
    return c;
}


std::string to_string(const AccessConfig& a)
{
    switch (a.mode) {
    case Access::Local: return "local";
    case Access::Remote: return "remote";
    case Access::Mixed: return fmt::format("mixed:{}", a.remote_pct);
    }
    return "?";
}

void validate_config(const MachineConfig& cfg, const numa::Topology& topo)
{
    if (cfg.vcpus == 0)
        throw UsageError("--vcpus must be at least 1");
    if (cfg.vcpus > 1024)
        throw UsageError(fmt::format("--vcpus {} exceeds minivmm's limit of 1024", cfg.vcpus));
    if (cfg.nodes.empty())
        throw UsageError("no memory configured: give --mem or --numa");
    if (cfg.nodes.size() > kMaxVnodes)
        throw UsageError(fmt::format("{} virtual nodes given; minivmm supports up to {}", cfg.nodes.size(), kMaxVnodes));

    std::vector<int> owner(cfg.vcpus, -1);
    std::set<uint32_t> ids;
    uint64_t total = 0;
    uint32_t cpu_nodes = 0;
    for (const auto& n : cfg.nodes) {
        if (!ids.insert(n.id).second)
            throw UsageError(fmt::format("{}: virtual node {} is given twice", n.origin, n.id));
        if (n.id >= cfg.nodes.size())
            throw UsageError(fmt::format("{}: virtual node ids must be 0..{} without gaps", n.origin, cfg.nodes.size() - 1));
        cpu_nodes += !n.vcpus.empty();
        for (uint32_t v : n.vcpus) {
            if (v >= cfg.vcpus)
                throw UsageError(fmt::format("{}: vCPU {} does not exist (--vcpus {}); use cpus= within 0-{}", n.origin, v,
                                             cfg.vcpus, cfg.vcpus - 1));
            if (owner[v] >= 0)
                throw UsageError(fmt::format("{}: vCPU {} is already in virtual node {}; vCPU lists must not overlap",
                                             n.origin, v, owner[v]));
            owner[v] = static_cast<int>(n.id);
        }
        const uint64_t page = backing_page_size(n.backing);
        if (n.mem_bytes == 0 || n.mem_bytes % 4096)
            throw UsageError(fmt::format("{}: size {} is not a multiple of 4 KiB; use e.g. {}", n.origin,
                                         format_size(n.mem_bytes), format_size((n.mem_bytes / 4096 + 1) * 4096)));
        if (n.mem_bytes % page)
            throw UsageError(fmt::format("{}: size {} is not a multiple of the {} page size {}; use e.g. {}", n.origin,
                                         format_size(n.mem_bytes), backing_name(n.backing), format_size(page),
                                         format_size((n.mem_bytes / page + 1) * page)));
        if (!n.vcpus.empty() && n.mem_bytes / 4096 < n.vcpus.size())
            throw UsageError(fmt::format("{}: {} is too small for {} vCPUs (each needs at least one 4 KiB page)",
                                         n.origin, format_size(n.mem_bytes), n.vcpus.size()));
        if (cfg.slots_per_node == 0 || n.mem_bytes / page < cfg.slots_per_node)
            throw UsageError(fmt::format("{}: {} cannot be split into {} memslots of whole {} pages; use fewer slots",
                                         n.origin, format_size(n.mem_bytes), cfg.slots_per_node, format_size(page)));
        try {
            n.host_policy.validate(topo);
        } catch (const UsageError& e) {
            throw UsageError(fmt::format("{}: {}", n.origin, e.what()));
        }
        for (int c : n.host_cpus)
            if (!topo.has_cpu(c))
                throw UsageError(fmt::format("{}: host CPU {} does not exist (host CPUs: {}); use host-cpus= within {}",
                                             n.origin, c, numa::format_cpu_list(topo.all_cpus()),
                                             numa::format_cpu_list(topo.all_cpus())));
        if (n.host_cpus_given && n.vcpus.empty())
            throw UsageError(fmt::format("{}: host-cpus= given for a node without vCPUs; add cpus= or drop host-cpus=",
                                         n.origin));
        for (int hn : n.host_policy.nodes) {
            const numa::Node* node = topo.node(hn);
            if (node && node->mem_total_bytes == 0 && n.host_policy.policy == numa::Policy::Bind &&
                n.host_policy.nodes.size() == 1)
                throw UsageError(fmt::format("{}: host node {} has no memory; bind to a node with memory", n.origin, hn));
        }
        total += n.mem_bytes;
    }
    for (uint32_t v = 0; v < cfg.vcpus; v++)
        if (owner[v] < 0)
            throw UsageError(fmt::format("vCPU {} belongs to no virtual node; list it in some --numa cpus=", v));
    if (cfg.access.mode != Access::Local && cpu_nodes < 2)
        throw UsageError(fmt::format("--access {}: remote access needs vCPUs on at least 2 virtual nodes; "
                                     "give two --numa with cpus= or use --access local",
                                     to_string(cfg.access)));
    if (cfg.access.remote_pct > 100)
        throw UsageError(fmt::format("--access mixed:{}: the remote share is out of range; use 0..100", cfg.access.remote_pct));
    if (cfg.workload.write_pct > 100)
        throw UsageError(fmt::format("--write-pct {} is out of range; use 0..100", cfg.workload.write_pct));
    if (cfg.workload.watchdog_ms <= 0)
        throw UsageError("--watchdog-ms must be positive");
    (void)total;
}

std::string check_hugetlb_pools(const MachineConfig& cfg, const std::vector<HugetlbPool>& pools)
{
    auto find = [&](uint64_t bytes, int node) -> const HugetlbPool* {
        for (const auto& p : pools)
            if (p.page_bytes == bytes && p.node == node)
                return &p;
        return nullptr;
    };
    // Global need per page size, and per host node for single-node binds.
    std::map<uint64_t, uint64_t> need;
    std::map<std::pair<uint64_t, int>, uint64_t> need_on;
    std::map<uint64_t, const NodeConfig*> first;
    for (const auto& n : cfg.nodes) {
        if (n.backing != BackingKind::Hugetlb2M && n.backing != BackingKind::Hugetlb1G)
            continue;
        const uint64_t page = backing_page_size(n.backing);
        const uint64_t pages = n.mem_bytes / page;
        if (!find(page, -1))
            return fmt::format("{}: backing {} needs {} hugetlb pages, which this kernel does not offer "
                               "(no /sys/kernel/mm/hugepages/hugepages-{}kB); use another backing",
                               n.origin, backing_name(n.backing), format_size(page), page / 1024);
        need[page] += pages;
        first.emplace(page, &n);
        if (n.host_policy.policy == numa::Policy::Bind && n.host_policy.nodes.size() == 1) {
            const int hn = n.host_policy.nodes[0];
            uint64_t& want = need_on[{page, hn}];
            want += pages;
            const HugetlbPool* p = find(page, hn);
            if (p && p->free < want)
                return fmt::format("{}: backing {} needs {} free {} pages on host node {} but {} are free ({} missing); "
                                   "raise {} by {}",
                                   n.origin, backing_name(n.backing), want, format_size(page), hn, p->free,
                                   want - p->free, p->nr_path, want - p->free);
        }
    }
    for (const auto& [page, pages] : need) {
        const HugetlbPool* p = find(page, -1);
        const uint64_t avail = p->free > p->resv ? p->free - p->resv : 0;
        if (avail < pages)
            return fmt::format("{}: hugetlb needs {} free {} pages in all but {} are available ({} missing); raise {} by {}",
                               first[page]->origin, pages, format_size(page), avail, pages - avail, p->nr_path,
                               pages - avail);
    }
    return {};
}

void check_kvm_vcpu_limit(const MachineConfig& cfg, const Kvm& kvm)
{
    int max_vcpus = kvm.cap(KVM_CAP_MAX_VCPUS);
    if (max_vcpus <= 0)
        max_vcpus = kvm.cap(KVM_CAP_NR_VCPUS);
    if (max_vcpus > 0 && cfg.vcpus > static_cast<uint32_t>(max_vcpus))
        throw UsageError(fmt::format("--vcpus {} exceeds this host's KVM_CAP_MAX_VCPUS ({}); use at most {}", cfg.vcpus,
                                     max_vcpus, max_vcpus));
}

void check_room_for_second_vm(const MachineConfig& cfg, const std::string& option)
{
    MachineConfig both = cfg;
    uint64_t one = 0;
    for (const auto& n : cfg.nodes) {
        both.nodes.push_back(n);
        if (n.backing != BackingKind::Hugetlb2M && n.backing != BackingKind::Hugetlb1G)
            one += n.mem_bytes;
    }
    if (std::string why = check_hugetlb_pools(both, hugetlb_pools()); !why.empty())
        throw UsageError(fmt::format("{}: the source and its in-process destination together: {}", option, why));
    const uint64_t avail = numa::host_mem_available_bytes();
    if (avail && 2 * one > avail)
        throw UsageError(fmt::format("{}: the source and its in-process destination need 2 x {} = {} of guest memory, "
                                     "the host has {} available; use a smaller guest, or --to tcp:HOST:PORT with "
                                     "minivmm receive on another host",
                                     option, format_size(one), format_size(2 * one), format_size(avail)));
}

void check_host_resources(const MachineConfig& cfg, const Kvm& kvm)
{
    check_kvm_vcpu_limit(cfg, kvm);
    uint64_t total = 0;  // outside hugetlb pools, which MemAvailable does not count
    for (const auto& n : cfg.nodes) {
        if (n.backing != BackingKind::Hugetlb2M && n.backing != BackingKind::Hugetlb1G)
            total += n.mem_bytes;
        if (n.backing == BackingKind::Gmem)
            if (std::string why = check_gmem_support(n.origin, kvm.cap(KVM_CAP_GUEST_MEMFD),
                                                     kvm.cap(KVM_CAP_GUEST_MEMFD_FLAGS));
                !why.empty())
                throw UsageError(why);
    }
    if (std::string why = check_hugetlb_pools(cfg, hugetlb_pools()); !why.empty())
        throw UsageError(why);
    uint64_t avail = numa::host_mem_available_bytes();
    if (avail && total > avail) {
        // Name the option the size came from: --mem, dirty-log-perf's -b, or --numa mem=.
        const std::string origin = cfg.nodes.size() == 1 ? cfg.nodes[0].origin : std::string("--numa");
        const bool numa = origin.rfind("--numa", 0) == 0;
        throw UsageError(fmt::format("{}: {} of guest memory exceeds the host's available memory ({}); use {}", origin,
                                     format_size(total), format_size(avail),
                                     numa ? "smaller --numa mem= sizes" : "a smaller " + origin));
    }
    // Pinning: the CPUs must be ones this process may run on (cpusets, taskset).
    std::vector<int> allowed = numa::current_thread_cpus();
    for (const auto& n : cfg.nodes)
        for (int c : n.host_cpus)
            if (!std::binary_search(allowed.begin(), allowed.end(), c))
                throw UsageError(fmt::format("{}: host CPU {} is outside this process's CPU affinity ({}); use CPUs "
                                             "within {} or run minivmm with a wider taskset/cpuset",
                                             n.origin, c, numa::format_cpu_list(allowed), numa::format_cpu_list(allowed)));
}

std::string check_gmem_support(const std::string& origin, int cap_guest_memfd, int cap_guest_memfd_flags)
{
    const uint64_t want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    if (cap_guest_memfd <= 0)
        return fmt::format("{}: backing gmem needs guest_memfd, which this kernel's KVM lacks (no KVM_CAP_GUEST_MEMFD); "
                           "use another backing",
                           origin);
    const auto have = static_cast<uint64_t>(std::max(0, cap_guest_memfd_flags));
    if ((have & want) != want)
        return fmt::format("{}: backing gmem needs guest_memfd flags MMAP|INIT_SHARED ({:#x}) to map and mbind it, but "
                           "this kernel offers {:#x}; use another backing",
                           origin, want, have);
    return {};
}

}  // namespace mvm
