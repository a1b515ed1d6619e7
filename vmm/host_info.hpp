// vmm/host_info.hpp - `minivmm caps`: the host as this tool sees it.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace mvm {

class Kvm;

// Probes /dev/kvm (and one scratch VM for VM-scoped capabilities), KVM module
// parameters, THP, hugetlb pools, NUMA nodes and numa_balancing.
nlohmann::json host_info(const Kvm& kvm);
std::string host_info_table(const nlohmann::json& info);

// For other reports' JSON (issue 14: every report echoes what it ran with).
// host_echo(): kernel release, KVM module parameters (as `caps` reports
// them), THP, numa_balancing; cheap, no scratch VM.
nlohmann::json host_echo();
struct MachineConfig;
// machine_echo(): vCPUs, dirty ring size, workload, and per virtual node its
// memory, backing, host policy and host CPUs.
nlohmann::json machine_echo(const MachineConfig& cfg);

// KVM module parameter (kvm, kvm_intel or kvm_amd): its value, or "" if absent.
std::string kvm_module_param(const std::string& name);

// Which of KVM's x86 MMUs maps guest memory on this host. The TDP MMU needs
// both kvm.tdp_mmu=Y and two-dimensional paging in the vendor module
// (kvm_amd npt=Y / kvm_intel ept=Y); anything else (tdp_mmu=N, npt=0, a
// paravirtual module such as kvm_pvm) runs the shadow MMU. Eager page
// splitting and 2M/1G mappings of huge pages take effect only on the TDP MMU.
struct GuestMmu {
    std::string name;  // "tdp" or "shadow"; "" when KVM has no tdp_mmu parameter (not x86)
    std::string why;   // "kvm_amd npt=Y, kvm.tdp_mmu=Y" ...
    bool tdp() const { return name == "tdp"; }
};
GuestMmu guest_mmu();

}  // namespace mvm
