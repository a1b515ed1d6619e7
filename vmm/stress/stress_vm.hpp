// vmm/stress/stress_vm.hpp - the stress guest running on a VM: loads it (image,
// page tables, descriptor tables, boot parameters, vCPU registers) and speaks
// its protocol. This folder is the one place that knows guest/abi.h.
//
// The protocol: each vCPU has a mailbox page the guest writes its progress
// into and reads the VMM's controls from once per batch (rate cap, throttle,
// pass gate, park, stop); the guest rings a doorbell (an 8-byte store to a
// GPA with no memslot, an MMIO exit) when it is done, wants to park, or
// waits at the pass gate, and reports a CPL0 exception on an I/O port.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "guest/abi.h"
#include "vmm/machine.hpp"
#include "vmm/stress/layout.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm {

class StressVm : public Machine {
public:
    // The VM of `cfg` with the stress guest loaded, its vCPUs not started.
    StressVm(const Kvm& kvm, MachineConfig cfg);

    const GuestLayout& layout() const { return layout_; }
    mvm_mailbox* mailbox(uint32_t i) const;
    MailboxSnapshot snapshot(uint32_t i) const;
    // The boot parameters as the host wrote them (its own copy, not guest memory).
    const mvm_boot_params* boot_params() const;
    const mvm_vcpu_params& vcpu_params(uint32_t i) const { return boot_params()->vcpu[i]; }
    // "" when the copy in guest memory still matches the host's (what a
    // receiver checks after a stream has overwritten it), else the first difference.
    std::string guest_boot_params_difference() const;
    // A destination continues its source's VM: after the boot parameters
    // arrived (and agree), take the VM tag the guest stamps pages with.
    void adopt_guest_vm_tag();
    uint32_t vm_tag() const { return boot_params()->vm_tag; }

    // ---- controls, read by the guest once per batch ----
    // Per-vCPU rate cap in pages/s (0: none) and idle share in % (auto-converge).
    void set_rate(uint32_t vcpu, uint64_t pages_per_s);
    void set_throttle(uint32_t vcpu, uint32_t pct);
    // Lock-step passes: each vCPU starts pass g only once g <= gate (0: free running).
    void set_pass_gate(uint64_t gate);
    // Graceful: every guest finishes its current batch and reports done.
    void request_stop();
    // Pause without signals: each guest finishes its batch, exits through the
    // park doorbell and is held outside KVM_RUN at a batch boundary, so its
    // last stamps and cursor agree (a signal kick stops it anywhere). False if not every vCPU
    // parked within `timeout` (they stay asked to; unpark_guests() releases).
    bool park_guests(std::chrono::milliseconds timeout);
    void unpark_guests();
    // Until every vCPU finished its first pass (its memory is faulted in),
    // a vCPU failed, or timeout. True when all did.
    bool wait_first_pass(std::chrono::milliseconds timeout);

private:
    StressVm(const Kvm& kvm, MachineConfig cfg, GuestLayout layout);
    static MemoryPlan memory_plan(const GuestLayout& layout);
    void load_guest();
    void set_vcpu_registers(uint64_t cr3);
    void attach_protocol();
    ExitAction on_doorbell(uint32_t vcpu, uint64_t value);
    ExitAction on_exception(uint32_t vcpu);

    GuestLayout layout_;
    std::vector<uint8_t> boot_params_host_;  // what load_guest() wrote
};

}  // namespace mvm
