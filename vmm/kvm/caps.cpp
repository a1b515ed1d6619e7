#include "vmm/kvm/caps.hpp"

#include "vmm/kvm/kvm_abi.h"

namespace mvm {

namespace {
constexpr CapInfo kCaps[] = {
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY", "memslots", false},
    {KVM_CAP_USER_MEMORY2, "KVM_CAP_USER_MEMORY2", "KVM_SET_USER_MEMORY_REGION2", true},
    {KVM_CAP_NR_MEMSLOTS, "KVM_CAP_NR_MEMSLOTS", "memslot limit", true},
    {KVM_CAP_NR_VCPUS, "KVM_CAP_NR_VCPUS", "recommended vCPU count", true},
    {KVM_CAP_MAX_VCPUS, "KVM_CAP_MAX_VCPUS", "vCPU limit", true},
    {KVM_CAP_MAX_VCPU_ID, "KVM_CAP_MAX_VCPU_ID", "vCPU id limit", true},
    {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID", "KVM_GET_SUPPORTED_CPUID", false},
    {KVM_CAP_GET_TSC_KHZ, "KVM_CAP_GET_TSC_KHZ", "guest TSC frequency", true},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT", "kicking vCPUs out of KVM_RUN", false},
    {KVM_CAP_BINARY_STATS_FD, "KVM_CAP_BINARY_STATS_FD", "KVM stats in reports", true},
    {KVM_CAP_XSAVE, "KVM_CAP_XSAVE", "vCPU state for migration", false},
    {KVM_CAP_XCRS, "KVM_CAP_XCRS", "vCPU state for migration", false},
    {KVM_CAP_SYNC_MMU, "KVM_CAP_SYNC_MMU", "MMU notifiers (NUMA balancing, THP)", true},
    {KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CLEAR_DIRTY_LOG, INITIALLY_SET", true},
    {KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING", "dirty ring (max bytes per vCPU)", true},
    {KVM_CAP_DIRTY_LOG_RING_ACQ_REL, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL", "dirty ring, acquire/release", true},
    {KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", "ring plus bitmap", true},
    {KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, "KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE", "arm64 eager page splitting", true},
    {KVM_CAP_GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD", "guest_memfd backing", true},
    {KVM_CAP_GUEST_MEMFD_FLAGS, "KVM_CAP_GUEST_MEMFD_FLAGS", "guest_memfd MMAP|INIT_SHARED", true},
    {KVM_CAP_MEMORY_ATTRIBUTES, "KVM_CAP_MEMORY_ATTRIBUTES", "private memory attributes", true},
    {KVM_CAP_VM_TYPES, "KVM_CAP_VM_TYPES", "VM types (bitmask)", false},
    {KVM_CAP_PRE_FAULT_MEMORY, "KVM_CAP_PRE_FAULT_MEMORY", "KVM_PRE_FAULT_MEMORY", true},
    {KVM_CAP_EXIT_HYPERCALL, "KVM_CAP_EXIT_HYPERCALL", "hypercall exits", true},
    {KVM_CAP_TSC_CONTROL, "KVM_CAP_TSC_CONTROL", "KVM_SET_TSC_KHZ on migration", true},
    {KVM_CAP_ADJUST_CLOCK, "KVM_CAP_ADJUST_CLOCK", "kvmclock on migration", true},
};
}  // namespace

std::span<const CapInfo> known_caps() { return kCaps; }

std::string_view cap_name(int cap)
{
    for (const auto& c : kCaps)
        if (c.number == cap)
            return c.name;
    return "KVM_CAP_?";
}

}  // namespace mvm
