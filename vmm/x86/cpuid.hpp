// vmm/x86/cpuid.hpp - the CPUID a vCPU is given: what KVM supports here
// (KVM_GET_SUPPORTED_CPUID, as a hardware VMM must set it), with its own APIC ids.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <vector>

namespace mvm::x86 {

// KVM_GET_SUPPORTED_CPUID adjusted for one vCPU: its APIC ids.
std::vector<kvm_cpuid_entry2> cpuid_for_vcpu(std::vector<kvm_cpuid_entry2> entries, uint32_t vcpu_id);

}  // namespace mvm::x86
