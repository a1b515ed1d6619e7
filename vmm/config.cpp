#include "vmm/config.hpp"

#include <set>

#include <fmt/format.h>

#include "vmm/kvm/error.hpp"
#include "vmm/kvm/kvm.hpp"
#include "vmm/units.hpp"

namespace mvm {

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


void validate_config(const MachineConfig& cfg, const Kvm& kvm)
{
    if (cfg.vcpus == 0)
        throw UsageError("--vcpus must be at least 1");
    int max_vcpus = kvm.cap(KVM_CAP_MAX_VCPUS);
    if (max_vcpus <= 0)
        max_vcpus = kvm.cap(KVM_CAP_NR_VCPUS);
    if (max_vcpus > 0 && cfg.vcpus > static_cast<uint32_t>(max_vcpus))
        throw UsageError(fmt::format("--vcpus {} exceeds this host's KVM_CAP_MAX_VCPUS ({}); use at most {}", cfg.vcpus,
                                     max_vcpus, max_vcpus));
    if (cfg.vcpus > 1024)
        throw UsageError(fmt::format("--vcpus {} exceeds minivmm's limit of 1024", cfg.vcpus));
    if (cfg.nodes.empty())
        throw UsageError("no memory configured: give --mem or --numa");
    if (cfg.nodes.size() > MVM_MAX_VNODES)
        throw UsageError(fmt::format("{} virtual nodes given; minivmm supports up to {}", cfg.nodes.size(), MVM_MAX_VNODES));

    std::vector<int> owner(cfg.vcpus, -1);
    std::set<uint32_t> ids;
    uint64_t total = 0;
    for (const auto& n : cfg.nodes) {
        if (!ids.insert(n.id).second)
            throw UsageError(fmt::format("{}: virtual node {} is given twice", n.origin, n.id));
        if (n.id >= cfg.nodes.size())
            throw UsageError(fmt::format("{}: virtual node ids must be 0..{} without gaps", n.origin, cfg.nodes.size() - 1));
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
        total += n.mem_bytes;
    }
    for (uint32_t v = 0; v < cfg.vcpus; v++)
        if (owner[v] < 0)
            throw UsageError(fmt::format("vCPU {} belongs to no virtual node; list it in some --numa cpus=", v));
    uint64_t avail = host_mem_available_bytes();
    if (avail && total > avail)
        throw UsageError(fmt::format("{} of guest memory exceeds the host's available memory ({}); use a smaller --mem",
                                     format_size(total), format_size(avail)));
    if (cfg.workload.write_pct > 100)
        throw UsageError(fmt::format("--write-pct {} is out of range; use 0..100", cfg.workload.write_pct));
    if (cfg.workload.watchdog_ms <= 0)
        throw UsageError("--watchdog-ms must be positive");
}

}  // namespace mvm
