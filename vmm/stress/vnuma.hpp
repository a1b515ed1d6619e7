// vmm/stress/vnuma.hpp - the guest's view of its virtual NUMA nodes: which GPA
// ranges each node owns, which vCPUs it holds, and which pages each vCPU
// works on (--access local|remote|mixed:P). Pure functions of the config and
// the layout, so tests check them on any host.
#pragma once

#include <cstdint>
#include <vector>

#include "guest/abi.h"
#include "vmm/config.hpp"
#include "vmm/stress/layout.hpp"

namespace mvm {

// Per vCPU, its working set as segments (GPA, pages), local piece first.
//
// Each virtual node's pages are split into a local part, shared evenly by the
// node's own vCPUs, and a remote part (remote_pct of it), shared by the vCPUs
// of the previous node that has vCPUs: so node k's vCPUs reach into node
// k+1's memory. A node without vCPUs (memory only) is all remote. Working
// sets never overlap and together cover every page of every node.
std::vector<std::vector<mvm_segment>> plan_working_sets(const MachineConfig& cfg, const GuestLayout& layout);

// Writes nr_vnodes, the vnode table and each vCPU's vnode and segments.
void write_vnuma_table(const MachineConfig& cfg, const GuestLayout& layout, mvm_boot_params* bp);

}  // namespace mvm
