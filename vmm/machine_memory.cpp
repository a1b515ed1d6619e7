// vmm/machine_memory.cpp - the VM's memory: each node's backing placed by its
// policy before anything touches it, memslots over the backings, and
// preallocation on the nodes' own CPUs.
#include <algorithm>
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/units.hpp"
#include "vmm/machine.hpp"

namespace mvm {

void Machine::create_memory(const MemoryPlan& plan)
{
    backings_.push_back(Backing::create(BackingKind::Anon, plan.system_bytes, {}, "system"));
    MemoryRegion sys;
    sys.slot = 0;
    sys.gpa = 0;
    sys.size = plan.system_bytes;
    sys.host = backings_[0].host();
    sys.name = "system";
    slots_.add(sys);

    uint32_t next_slot = 1;
    for (size_t i = 0; i < cfg_.nodes.size(); i++) {
        const NodeConfig& node = cfg_.nodes[i];
        backings_.push_back(
            Backing::create(node.backing, node.mem_bytes, [this](uint64_t size) { return create_guest_memfd(size); },
                            fmt::format("node{}-{}", node.id, backing_name(node.backing))));
        const Backing& b = backings_.back();
        // Before anything touches it: where its pages may come from. For
        // guest_memfd this sets the file's shared policy through our mmap.
        try {
            numa::apply_to_range(b.host(), b.size(), node.host_policy);
        } catch (const Error& e) {
            throw Error(fmt::format("{}: applying policy {} to {}: {}", node.origin, numa::to_string(node.host_policy),
                                    backing_name(node.backing), e.what()));
        }
        // The node's memory as slots_per_node memslots over one backing.
        const uint64_t page = b.page_size(), pages = node.mem_bytes / page, k = cfg_.slots_per_node;
        for (uint64_t j = 0; j < k; j++) {
            const uint64_t first = pages * j / k * page, last = pages * (j + 1) / k * page;
            MemoryRegion r;
            r.slot = next_slot++;
            r.gpa = plan.node_gpa.at(i) + first;
            r.size = last - first;
            r.host = b.host() + first;
            r.backing = node.backing;
            r.vnode = static_cast<int>(node.id);
            r.name = k == 1 ? fmt::format("node{}", node.id) : fmt::format("node{}.{}", node.id, j);
            if (node.backing == BackingKind::Gmem) {
                r.flags |= KVM_MEM_GUEST_MEMFD;
                r.gmem_fd = b.fd();
                r.gmem_offset = first;
            }
            slots_.add(r);
        }
    }
    for (const auto& r : slots_.regions())
        vm_.set_memory_region(region2_of(r));
    preallocate();
}

int Machine::create_guest_memfd(uint64_t size)
{
    const uint64_t want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    const uint64_t have = static_cast<uint64_t>(vm_.cap(KVM_CAP_GUEST_MEMFD_FLAGS));
    if (vm_.cap(KVM_CAP_GUEST_MEMFD) <= 0)
        throw Unsupported("backing gmem: this kernel's KVM lacks KVM_CAP_GUEST_MEMFD; use another --backing");
    if ((have & want) != want)
        throw Unsupported(fmt::format("backing gmem: guest_memfd flags here are {:#x}, need MMAP|INIT_SHARED "
                                      "({:#x}) to map it; use another --backing",
                                      have, want));
    return vm_.create_guest_memfd(size, want);
}

kvm_userspace_memory_region2 Machine::region2_of(const MemoryRegion& r)
{
    kvm_userspace_memory_region2 m{};
    m.slot = r.slot;
    m.flags = r.flags;
    m.guest_phys_addr = r.gpa;
    m.memory_size = r.size;
    m.userspace_addr = reinterpret_cast<uint64_t>(r.host);
    if (r.is_gmem()) {
        m.guest_memfd = static_cast<uint32_t>(r.gmem_fd);
        m.guest_memfd_offset = r.gmem_offset;
    }
    return m;
}

void Machine::set_slot_flags(uint32_t slot, uint32_t flags)
{
    kvm_userspace_memory_region2 m;
    {
        std::lock_guard lk(slots_mu_);
        const MemoryRegion* r = slots_.by_slot(slot);
        if (!r)
            throw Error(fmt::format("memslot {} does not exist", slot));
        MemoryRegion copy = *r;
        copy.flags = flags;
        m = region2_of(copy);
    }
    // KVM serialises memslot updates itself (slots_lock); the slow part (write-
    // protecting or splitting for dirty logging) runs on the calling thread.
    vm_.set_memory_region(m);
    std::lock_guard lk(slots_mu_);
    slots_.set_flags(slot, flags);
}

void Machine::preallocate()
{
    std::vector<PreallocJob> jobs;
    for (size_t i = 0; i < cfg_.nodes.size(); i++) {
        const NodeConfig& node = cfg_.nodes[i];
        if (!node.prealloc)
            continue;
        const Backing& b = node_backing(i);
        PreallocJob j;
        j.name = fmt::format("node{}", node.id);
        j.addr = b.host();
        j.len = b.size();
        j.page_size = b.page_size();
        // The node's CPUs: its vCPUs' pinning, else those of its host nodes.
        j.cpus = node.host_cpus;
        j.policy = node.host_policy;
        jobs.push_back(std::move(j));
    }
    if (jobs.empty())
        return;
    uint64_t total = 0;
    for (const auto& j : jobs)
        total += j.len;
    const bool show = cfg_.show_progress && total >= (256ull << 20);
    prealloc_ = prealloc_parallel(jobs, [&](uint64_t done, uint64_t all) {
        if (show)
            fmt::print(stderr, "\r\033[Kprealloc: {} of {} ({:.0f}%) on {} thread(s)", human_bytes(done), human_bytes(all),
                       100.0 * static_cast<double>(done) / static_cast<double>(all), jobs.size());
    });
    if (show)
        fmt::print(stderr, "\r\033[K");
}

}  // namespace mvm
