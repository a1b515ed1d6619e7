// vmm/kvm/caps.hpp - every KVM capability the project uses, by name, and what
// it is needed for. The probe (Kvm::cap / Vm::cap) caches values; require()
// turns a missing capability into a message that names it.
#pragma once

#include <span>
#include <string_view>

namespace mvm {

struct CapInfo {
    int number;
    std::string_view name;
    std::string_view used_for;
    bool vm_scoped;  // ask the VM fd (values may differ per VM type), not /dev/kvm
};

std::span<const CapInfo> known_caps();
std::string_view cap_name(int cap);

}  // namespace mvm
