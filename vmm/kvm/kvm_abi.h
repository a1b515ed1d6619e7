// vmm/kvm/kvm_abi.h - the KVM ABI that Debian 12's Linux 6.1 headers lack,
// transcribed from Documentation/virt/kvm/api.rst and include/uapi/linux/kvm.h.
// Every definition is guarded so that newer system headers win.
#pragma once

#include <linux/kvm.h>

// ---- capabilities newer than 6.1 -----------------------------------------
#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225
#endif
#ifndef KVM_CAP_PMU_EVENT_MASKED_EVENTS
#define KVM_CAP_PMU_EVENT_MASKED_EVENTS 226
#endif
#ifndef KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE
#define KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE 228
#endif
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
#ifndef KVM_CAP_MEMORY_ATTRIBUTES
#define KVM_CAP_MEMORY_ATTRIBUTES 233
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#ifndef KVM_CAP_PRE_FAULT_MEMORY
#define KVM_CAP_PRE_FAULT_MEMORY 236
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#endif

// ---- KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2) -------------------
#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    __u64 guest_memfd_offset;
    __u32 guest_memfd;
    __u32 pad1;
    __u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif

// ---- guest_memfd (KVM_CAP_GUEST_MEMFD) ------------------------------------
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
    __u64 size;
    __u64 flags;
    __u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif

// ---- VM types (KVM_CAP_VM_TYPES returns a bitmask of these) --------------
#ifndef KVM_X86_DEFAULT_VM
#define KVM_X86_DEFAULT_VM 0
#define KVM_X86_SW_PROTECTED_VM 1
#define KVM_X86_SEV_VM 2
#define KVM_X86_SEV_ES_VM 3
#define KVM_X86_SNP_VM 4
#define KVM_X86_TDX_VM 5
#endif

// x86: the dirty ring lives at this page offset of the vCPU fd mapping.
// 6.1's generic header defines it as 0 unless the arch header did first.
#define MINIVMM_DIRTY_LOG_PAGE_OFFSET 64

// ---- flexible-array structs, C layout --------------------------------------
// Debian 12's uapi headers declare flexible arrays with __DECLARE_FLEX_ARRAY,
// which in C++ inserts an empty struct before the array: sizeof(kvm_cpuid2)
// is 12 instead of 8, `entries` moves, and so does the size encoded in the
// ioctl numbers (KVM_SET_CPUID2 fails with EINVAL). Use these instead.
#include <cstddef>
#include <cstdint>

namespace mvm::abi {

struct cpuid2_header {  // struct kvm_cpuid2 without its entries
    __u32 nent;
    __u32 padding;
};
struct msrs_header {  // struct kvm_msrs without its entries
    __u32 nmsrs;
    __u32 pad;
};
struct msr_list_header {  // struct kvm_msr_list without its indices
    __u32 nmsrs;
};
// struct kvm_stats_desc: the name follows these 16 bytes.
struct stats_desc_header {
    __u32 flags;
    __s16 exponent;
    __u16 size;
    __u32 offset;
    __u32 bucket_size;
};
static_assert(sizeof(cpuid2_header) == 8 && sizeof(msrs_header) == 8 && sizeof(stats_desc_header) == 16);

}  // namespace mvm::abi

#define MVM_KVM_GET_SUPPORTED_CPUID _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x05, sizeof(mvm::abi::cpuid2_header))
#define MVM_KVM_SET_CPUID2 _IOC(_IOC_WRITE, KVMIO, 0x90, sizeof(mvm::abi::cpuid2_header))
#define MVM_KVM_GET_CPUID2 _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x91, sizeof(mvm::abi::cpuid2_header))
#define MVM_KVM_GET_MSRS _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x88, sizeof(mvm::abi::msrs_header))
#define MVM_KVM_SET_MSRS _IOC(_IOC_WRITE, KVMIO, 0x89, sizeof(mvm::abi::msrs_header))
#define MVM_KVM_GET_MSR_INDEX_LIST _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x02, sizeof(mvm::abi::msr_list_header))
#define MVM_KVM_GET_XSAVE _IOC(_IOC_READ, KVMIO, 0xa4, 4096)
#define MVM_KVM_SET_XSAVE _IOC(_IOC_WRITE, KVMIO, 0xa5, 4096)
