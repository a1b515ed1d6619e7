// vmm/stress/layout.hpp - where the stress guest's fixed structures live in
// guest-physical memory, and its boot parameters. Pure functions of the
// config, so tests check them on any host.
#pragma once

#include <cstdint>
#include <vector>

#include "guest/abi.h"
#include "vmm/config.hpp"

namespace mvm {

// Where the guest's fixed structures live (all in the system memslot, slot 0).
struct GuestLayout {
    uint64_t idt_gpa = 0;
    uint64_t pt_pool_gpa = 0, pt_pool_pages = 0;
    uint64_t kernel_area_end = 0;   // [2M, kernel_area_end) is CPL0-only
    uint64_t boot_params_gpa = 0, boot_params_bytes = 0;
    uint64_t system_bytes = 0;      // size of slot 0
    std::vector<uint64_t> gdt_gpa, tss_gpa, kstack_top, mailbox_gpa, ustack_top;
    struct NodeRange {
        uint32_t node;
        uint64_t gpa, bytes;
    };
    std::vector<NodeRange> ram;     // one per virtual node, from MVM_RAM_GPA up
};

GuestLayout plan_layout(const MachineConfig& cfg);
// Fills the boot parameters (layout.boot_params_bytes at bp) except the TSC
// fields, which need a vCPU: knobs, vNUMA table, per-vCPU working sets.
void write_boot_params(const MachineConfig& cfg, const GuestLayout& layout, mvm_boot_params* bp);

}  // namespace mvm
