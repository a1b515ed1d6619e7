// engines/huge_mapping_probe.hpp - does KVM map this host's huge pages huge
// in the guest's page tables (pages_2m), or 4 KiB whatever the backing? It
// depends on the kernel and the MMU (the shadow MMU of kvm-pvm mapped 4 KiB
// only until 2026-12, then 2 MiB), so the docs quote this probe, not a
// belief: a small guest on 2 MiB-backed memory writes every page once and
// KVM's own VM stats say how it was mapped.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "vmm/kvm/kvm.hpp"

namespace mvm::engines {

struct HugeMappingProbe {
    // "2M" (KVM mapped some of it with 2 MiB pages), "4K" (every mapping
    // 4 KiB), or "unknown" with why.
    std::string verdict = "unknown";
    std::string why;
    std::string backing;       // hugetlb2m (a free pool) or thp
    uint64_t bytes = 0;        // guest memory the guest wrote, once
    int64_t pages_2m = -1, pages_4k = -1;  // KVM's VM stats after the pass (-1: no such stat)
    std::string summary() const;  // one line
    nlohmann::json to_json() const;
};

HugeMappingProbe probe_huge_mappings(const Kvm& kvm, uint64_t bytes = 8ull << 20);

}  // namespace mvm::engines
