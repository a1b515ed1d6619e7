#include "vmm/stress/vnuma.hpp"

#include <algorithm>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm {

std::vector<std::vector<mvm_segment>> plan_working_sets(const MachineConfig& cfg, const GuestLayout& layout)
{
    const size_t n = cfg.nodes.size();
    std::vector<std::vector<mvm_segment>> sets(cfg.vcpus);
    auto has_cpus = [&](size_t i) { return !cfg.nodes[i].vcpus.empty(); };
    // The node whose vCPUs touch node j's remote part: the nearest earlier
    // node (cyclically) with vCPUs; -1 when no other node has any.
    auto remote_owner = [&](size_t j) -> long {
        for (size_t d = 1; d < n; d++) {
            size_t k = (j + n - d) % n;
            if (has_cpus(k))
                return static_cast<long>(k);
        }
        return -1;
    };
    auto split = [&](uint64_t gpa, uint64_t pages, const std::vector<uint32_t>& vcpus) {
        const uint64_t m = vcpus.size();
        for (uint64_t k = 0; k < m; k++) {
            uint64_t first = pages * k / m, last = pages * (k + 1) / m;
            if (last > first)
                sets[vcpus[k]].push_back({gpa + first * MVM_PAGE_SIZE, last - first});
        }
    };
    const uint32_t pct = cfg.access.mode == Access::Local ? 0 : cfg.access.remote_pct;
    // Local pieces first, so each vCPU's first segment is its own node's.
    std::vector<std::pair<size_t, uint64_t>> remote;  // node, first remote page
    for (size_t j = 0; j < n; j++) {
        const uint64_t pages = cfg.nodes[j].mem_bytes / MVM_PAGE_SIZE;
        const long owner = remote_owner(j);
        uint64_t local = pages;
        if (!has_cpus(j))
            local = 0;
        else if (owner >= 0)
            local = pages - pages * pct / 100;
        if (owner < 0 && !has_cpus(j))
            throw UsageError(fmt::format("virtual node {} has memory but no vCPU can reach it", cfg.nodes[j].id));
        split(layout.ram[j].gpa, local, cfg.nodes[j].vcpus);
        if (local < pages)
            remote.emplace_back(j, local);
    }
    for (auto [j, first] : remote) {
        const uint64_t pages = cfg.nodes[j].mem_bytes / MVM_PAGE_SIZE;
        split(layout.ram[j].gpa + first * MVM_PAGE_SIZE, pages - first, cfg.nodes[static_cast<size_t>(remote_owner(j))].vcpus);
    }
    for (uint32_t v = 0; v < cfg.vcpus; v++)
        if (sets[v].size() > MVM_MAX_SEGMENTS)
            throw UsageError(fmt::format("vCPU {} would work on {} memory pieces; the guest takes at most {}", v,
                                         sets[v].size(), MVM_MAX_SEGMENTS));
    return sets;
}

void write_vnuma_table(const MachineConfig& cfg, const GuestLayout& layout, mvm_boot_params* bp)
{
    bp->nr_vnodes = static_cast<uint32_t>(cfg.nodes.size());
    for (size_t i = 0; i < cfg.nodes.size(); i++) {
        const NodeConfig& node = cfg.nodes[i];
        mvm_vnode& vn = bp->vnode[i];
        vn = {};
        vn.id = node.id;
        vn.nr_ranges = 1;
        vn.range[0] = {layout.ram[i].gpa, node.mem_bytes / MVM_PAGE_SIZE};
        for (uint32_t v : node.vcpus) {
            vn.vcpu_mask[v / 64] |= 1ull << (v % 64);
            bp->vcpu[v].vnode = node.id;
        }
    }
    auto sets = plan_working_sets(cfg, layout);
    // A smaller working set (benchmarks dirty a set number of pages of a
    // larger memory): keep the first pages of each vCPU's share.
    if (const uint64_t limit = cfg.workload.working_set_pages)
        for (auto& set : sets) {
            uint64_t left = limit;
            std::vector<mvm_segment> cut;
            for (const auto& seg : set) {
                if (!left)
                    break;
                cut.push_back({seg.gpa, std::min(seg.pages, left)});
                left -= cut.back().pages;
            }
            set = std::move(cut);
        }
    for (uint32_t v = 0; v < cfg.vcpus; v++) {
        mvm_vcpu_params& vp = bp->vcpu[v];
        vp.nr_segments = static_cast<uint32_t>(sets[v].size());
        vp.total_pages = 0;
        for (size_t k = 0; k < sets[v].size(); k++) {
            vp.seg[k] = sets[v][k];
            vp.total_pages += sets[v][k].pages;
        }
    }
}

}  // namespace mvm
