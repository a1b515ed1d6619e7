// engines/gmem_policy_probe.hpp - does this kernel place guest_memfd pages by
// the mempolicy set with mbind on the gmem mapping (upstream 6.19: the policy
// lives in the inode, by file offset)? mbind's return value says nothing: a
// kernel that maps guest_memfd but keeps no shared policy for it accepts the
// mbind (the policy stays on our VMA) and allocates by the faulting thread's
// policy instead, which, with vCPU threads bound to their node, looks right
// by accident. So the probe binds a small gmem region to one host node, has a
// vCPU thread bound to *another* node fault every page in (the guest writes
// them), and looks where the pages are (move_pages). Needs two host nodes
// with memory; says it cannot tell on one.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "vmm/kvm/kvm.hpp"

namespace mvm::engines {

struct GmemPolicyProbe {
    // "honoured" (every page on the bound node), "ignored" (every page on the
    // faulting thread's node), "partly" (some of each), or "unknown" with why.
    std::string verdict = "unknown";
    std::string why;                  // for "unknown": why it could not tell
    int bound_node = -1;              // where mbind on the gmem mapping put the policy
    int thread_node = -1;             // where the faulting vCPU thread was bound and ran
    uint64_t pages = 0;               // 4 KiB pages the guest wrote
    std::map<int, uint64_t> pages_per_node;
    uint64_t not_present = 0;
    bool honoured() const { return verdict == "honoured"; }
    std::string summary() const;      // one line
    nlohmann::json to_json() const;
};

// Runs the probe with `bytes` of guest_memfd (a few MiB is plenty).
GmemPolicyProbe probe_gmem_mempolicy(const Kvm& kvm, uint64_t bytes = 4ull << 20);

// Can a guest_memfd memslot be dirty-logged here? Asks KVM: a 2 MiB gmem slot
// is made, then KVM_MEM_LOG_DIRTY_PAGES is added to it (as enabling logging
// does). "yes", "no: <the kernel's error>", or "unknown: <why>".
std::string probe_gmem_dirty_logging(const Kvm& kvm);

}  // namespace mvm::engines
