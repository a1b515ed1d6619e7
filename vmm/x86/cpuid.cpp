#include "vmm/x86/cpuid.hpp"

namespace mvm::x86 {

std::vector<kvm_cpuid_entry2> cpuid_for_vcpu(std::vector<kvm_cpuid_entry2> entries, uint32_t vcpu_id)
{
    for (auto& e : entries) {
        if (e.function == 1)
            e.ebx = (e.ebx & 0x00ffffff) | (vcpu_id << 24);  // initial APIC id
        if (e.function == 0xb || e.function == 0x1f)
            e.edx = vcpu_id;  // x2APIC id
    }
    return entries;
}

}  // namespace mvm::x86
