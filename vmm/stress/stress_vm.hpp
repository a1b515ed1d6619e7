// vmm/stress/stress_vm.hpp - the stress guest running on a VM.
#pragma once

#include "vmm/machine.hpp"

namespace mvm {

using StressVm = Machine;

}  // namespace mvm
