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

}  // namespace mvm
