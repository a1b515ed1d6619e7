// migration/vcpu_state.hpp - everything a vCPU needs to resume elsewhere:
// general and segment registers, FPU/XSAVE and XCRs, MSRs (every MSR KVM
// lists that reads back here, TSC last, with its frequency and the wall time
// it was read at), pending events and mp_state. Our
// guest uses no in-kernel irqchip, so there is no LAPIC state to move.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "vmm/kvm/kvm.hpp"

namespace mvm::migration {

struct VcpuState {
    uint32_t id = 0;
    kvm_regs regs{};
    kvm_sregs sregs{};
    kvm_fpu fpu{};
    std::vector<uint8_t> xsave;  // KVM_GET_XSAVE2 (or XSAVE) image; empty when unsupported
    kvm_xcrs xcrs{};
    bool has_xcrs = false;
    kvm_vcpu_events events{};
    kvm_mp_state mp_state{};
    std::vector<std::pair<uint32_t, uint64_t>> msrs;  // TSC last
    // The TSC's frequency (KVM_GET_TSC_KHZ) and CLOCK_REALTIME when the TSC
    // was read (state version 2; 0 in a version 1 record). restore_vcpu()
    // sets the same frequency (KVM_SET_TSC_KHZ) and advances the TSC by the
    // wall time that passed meanwhile, so the guest's TSC runs on across the
    // move as KVM's documented migration does (api.rst, KVM_VCPU_TSC_OFFSET).
    uint32_t tsc_khz = 0;
    int64_t tsc_realtime_ns = 0;

    std::vector<uint8_t> serialize() const;
    // Throws Error naming the field when `data` is short or malformed.
    static VcpuState parse(std::span<const uint8_t> data);
};

// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST), cached.
const std::vector<uint32_t>& saveable_msrs(const Kvm& kvm);

// Reads the state of a vCPU that is outside KVM_RUN.
VcpuState save_vcpu(const Kvm& kvm, const Vcpu& vcpu);
// The TSC value to load for `s` at CLOCK_REALTIME `now_ns`: the saved one
// advanced by the wall time since it was read (as saved for a version 1
// record, or when the clocks disagree).
uint64_t restored_tsc(const VcpuState& s, int64_t now_ns);

// Loads it into a vCPU that is outside KVM_RUN. MSRs the destination refuses
// are skipped and returned, so callers can report them.
std::vector<uint32_t> restore_vcpu(const Kvm& kvm, Vcpu& vcpu, const VcpuState& s);

}  // namespace mvm::migration
