// vmm/kvm/kvm.hpp - RAII owners of the KVM fd hierarchy: Kvm (/dev/kvm),
// Vm (a VM fd), Vcpu (a vCPU fd with its mmapped kvm_run and, when enabled,
// its dirty ring). Move-only; nothing here knows about guests or memory.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/fd.hpp"
#include "vmm/kvm/kvm_abi.h"

namespace mvm {

class Vm;

// /dev/kvm. Capability values are probed once and cached.
class Kvm {
public:
    // Opens /dev/kvm (or `path`); throws KvmUnavailable with advice when it cannot.
    explicit Kvm(const std::string& path = "/dev/kvm");

    int fd() const noexcept { return fd_.get(); }
    int api_version() const noexcept { return api_version_; }
    // KVM_CHECK_EXTENSION on /dev/kvm; 0 when absent.
    int cap(int cap) const;
    // Throws Unsupported "this host's KVM lacks NAME (needed for WHY)" when cap() == 0.
    int require(int cap, const std::string& why) const;
    size_t vcpu_mmap_size() const noexcept { return vcpu_mmap_size_; }
    // KVM_GET_SUPPORTED_CPUID, grown until it fits.
    std::vector<kvm_cpuid_entry2> supported_cpuid() const;

    Vm create_vm(unsigned long type = 0) const;

private:
    UniqueFd fd_;
    int api_version_ = 0;
    size_t vcpu_mmap_size_ = 0;  // KVM_GET_VCPU_MMAP_SIZE, the same for every vCPU
    mutable std::mutex cap_mutex_;
    mutable std::map<int, int> cap_cache_;
};

class Vcpu;

class Vm {
public:
    Vm(const Kvm& kvm, UniqueFd fd);
    Vm(Vm&&) noexcept = default;
    Vm& operator=(Vm&&) noexcept = default;

    int fd() const noexcept { return fd_.get(); }
    const Kvm& kvm() const noexcept { return *kvm_; }
    // KVM_CHECK_EXTENSION on the VM fd (values may differ per VM).
    int cap(int cap) const;
    int require(int cap, const std::string& why) const;
    void enable_cap(uint32_t cap, uint64_t arg0 = 0, uint64_t arg1 = 0);

    // KVM_SET_USER_MEMORY_REGION2 when the host has USER_MEMORY2, else the
    // original ioctl (which cannot express guest_memfd).
    void set_memory_region(const kvm_userspace_memory_region2& region);
    int create_guest_memfd(uint64_t size, uint64_t flags);
    // Enables KVM_CAP_DIRTY_LOG_RING(_ACQ_REL); must precede create_vcpu().
    void enable_dirty_ring(uint32_t bytes, bool acq_rel);
    uint32_t dirty_ring_bytes() const noexcept { return dirty_ring_bytes_; }

    Vcpu create_vcpu(uint32_t id);
    UniqueFd stats_fd() const;

    // KVM_GET_DIRTY_LOG into `bitmap` (one bit per page of the slot).
    void get_dirty_log(uint32_t slot, uint64_t* bitmap);
    // KVM_CLEAR_DIRTY_LOG: clears and write-protects the set bits of `bitmap`
    // for pages [first_page, first_page + num_pages); first_page must be a
    // multiple of 64 and num_pages too unless the range ends at the slot's end.
    void clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages, uint64_t* bitmap);
    // KVM_RESET_DIRTY_RINGS with every signal blocked in the calling thread
    // for the length of the call; returns the count KVM reports. A signal
    // pending in the resetting thread makes this host's KVM (kvm-pvm) return
    // having counted entries it did not re-protect: their pages are never
    // logged again until logging is toggled, and the count still looks right
    // (docs/host-notes.md). A signal sent meanwhile stays pending and is
    // delivered when the mask is restored, so no kick is lost. Do not take
    // the count as proof that nothing was lost.
    uint64_t reset_dirty_rings();
    // The bare ioctl, signals as they come: only to probe whether a host has
    // that bug (engines/ring_probe).
    uint64_t reset_dirty_rings_unguarded();

private:
    const Kvm* kvm_;
    UniqueFd fd_;
    uint32_t dirty_ring_bytes_ = 0;
    bool has_region2_ = false;
};

class Vcpu {
public:
    Vcpu(uint32_t id, UniqueFd fd, size_t mmap_size, uint32_t dirty_ring_bytes);
    Vcpu(Vcpu&&) noexcept = default;
    Vcpu& operator=(Vcpu&&) noexcept = default;

    uint32_t id() const noexcept { return id_; }
    int fd() const noexcept { return fd_.get(); }
    kvm_run* run_struct() const noexcept { return reinterpret_cast<kvm_run*>(run_.get()); }
    kvm_dirty_gfn* dirty_ring() const noexcept { return reinterpret_cast<kvm_dirty_gfn*>(ring_.get()); }
    uint32_t dirty_ring_entries() const noexcept { return static_cast<uint32_t>(ring_.size() / sizeof(kvm_dirty_gfn)); }

    // One KVM_RUN; returns 0 or -errno (EINTR when kicked, EAGAIN where KVM asks to retry).
    // Under inject_run_faults() some calls return the injected error instead.
    int run() noexcept;

    kvm_regs regs() const;
    void set_regs(const kvm_regs& r);
    kvm_sregs sregs() const;
    void set_sregs(const kvm_sregs& s);
    void set_cpuid(const std::vector<kvm_cpuid_entry2>& entries);
    // KVM_SET_MSRS / KVM_GET_MSRS; set throws unless every MSR was accepted.
    void set_msrs(const std::vector<std::pair<uint32_t, uint64_t>>& msrs);
    std::vector<std::pair<uint32_t, uint64_t>> msrs(const std::vector<uint32_t>& indices) const;
    uint32_t tsc_khz() const;
    UniqueFd stats_fd() const;

private:
    uint32_t id_;
    UniqueFd fd_;
    Mapping run_;
    Mapping ring_;
    uint64_t runs_ = 0;  // KVM_RUN calls, for fault injection
};

// Fault injection (tests): from now on, every `every`-th KVM_RUN of each vCPU
// and the `burst` - 1 after it return -err (EINTR or EAGAIN) without entering
// the guest, as a signal storm or a KVM that asks to retry would. every = 0
// turns it off.
struct RunFaults {
    uint32_t every = 0, burst = 1;
    int err = 4;  // EINTR
};
void inject_run_faults(const RunFaults& f);
// KVM_RUN calls answered by injection so far (process-wide).
uint64_t injected_run_faults();

}  // namespace mvm
