// vmm/machine.hpp - a booted stress guest: the VM, its memslots, the guest
// layout, and one host thread per vCPU. Pause/resume parks every vCPU thread
// outside KVM_RUN (kick: immediate_exit + signal, as api.rst recommends).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "guest/abi.h"
#include "memory/backing.hpp"
#include "memory/memslot.hpp"
#include "memory/prealloc.hpp"
#include "numa/policy.hpp"
#include "vmm/config.hpp"
#include "vmm/stress/layout.hpp"
#include "vmm/stress/workload.hpp"
#include "vmm/kvm/kvm.hpp"
#include "vmm/kvm/stats.hpp"

namespace mvm {

// What stopped a vCPU other than finishing its workload.
struct VcpuFailure {
    uint32_t vcpu = 0;
    std::string reason;        // one line: "guest exception #UD (vector 6) at rip 0x..."
    std::string register_dump;
    int vector = -1;           // guest exception vector, when that is what it was
    uint64_t error_code = 0, fault_rip = 0, cr2 = 0;
};

// A consistent-enough copy of a mailbox's progress fields.
// What a vCPU thread looks like from the host, read on that thread after
// it pinned itself and set its memory policy (or did not).
struct VcpuThreadInfo {
    int tid = 0;
    std::vector<int> affinity;    // sched_getaffinity, sorted
    numa::NodePolicy mempolicy;   // get_mempolicy as the thread sees it
};

struct MailboxSnapshot {
    uint64_t generation, cursor, pages_written, pages_read, passes, last_tsc, start_tsc, warm_tsc, warm_pages;
    uint64_t wd_events, wd_max_gap_tsc;
    uint32_t state;
};

// Decodes a mailbox page (guest-written: any bit pattern is possible).
MailboxSnapshot read_mailbox(const mvm_mailbox& mb);

class Machine {
public:
    Machine(const Kvm& kvm, MachineConfig cfg);
    ~Machine();
    Machine(const Machine&) = delete;
    Machine& operator=(const Machine&) = delete;

    // Called on the vCPU's thread on KVM_EXIT_DIRTY_RING_FULL; must harvest
    // and reset the ring before returning (the vCPU re-enters right after).
    // May be changed while vCPUs run.
    void set_dirty_ring_full_handler(std::function<void(uint32_t vcpu)> fn)
    {
        std::lock_guard lk(ring_full_mu_);
        ring_full_ = std::move(fn);
    }

    void start();
    // Graceful: every guest finishes its current batch and reports done.
    void request_stop();
    // Until every vCPU finished or failed, or timeout. True when none is left running.
    bool wait_finished(std::chrono::milliseconds timeout);
    // Kicks every vCPU out of KVM_RUN and ends its thread (idempotent).
    void kill();
    // All vCPU threads parked outside KVM_RUN on return.
    void pause();
    void resume();
    bool paused() const { return pause_requested_.load(); }
    // start() was called (a machine runs one guest life: start, then stop or kill).
    bool started() const
    {
        std::lock_guard lk(mu_);
        return started_;
    }

    const MachineConfig& config() const { return cfg_; }
    const GuestLayout& layout() const { return layout_; }
    Vm& vm() { return vm_; }
    const Kvm& kvm() const { return *kvm_; }
    const MemslotRegistry& memslots() const { return slots_; }
    uint32_t vcpu_count() const { return static_cast<uint32_t>(vcpus_.size()); }
    Vcpu& vcpu(uint32_t i) { return vcpus_[i]->vcpu; }
    uint64_t tsc_khz() const { return tsc_khz_; }

    mvm_mailbox* mailbox(uint32_t i) const;
    MailboxSnapshot snapshot(uint32_t i) const;
    // The boot parameters as the host wrote them (its own copy, not guest memory).
    const mvm_boot_params* boot_params() const;
    // "" when the copy in guest memory still matches the host's (what a
    // receiver checks after a stream has overwritten it), else the first difference.
    std::string guest_boot_params_difference() const;
    const mvm_vcpu_params& vcpu_params(uint32_t i) const { return boot_params()->vcpu[i]; }
    // Host pointer for a guest-physical range inside one memslot.
    uint8_t* host_ptr(uint64_t gpa, uint64_t len = 1) const { return slots_.host_ptr(gpa, len); }

    std::optional<VcpuFailure> failure() const;
    uint32_t finished_count() const;
    uint64_t kicks(uint32_t i) const { return vcpus_[i]->kicks.load(); }
    // Valid once the vCPU thread has started (start() waits for that).
    VcpuThreadInfo vcpu_thread_info(uint32_t i) const;
    // The backing of virtual node i (index into config().nodes).
    const Backing& node_backing(size_t i) const { return backings_.at(1 + i); }
    // Re-registers a memslot with new KVM_MEM_* flags (dirty logging on/off).
    // Safe to call from several threads for different slots.
    void set_slot_flags(uint32_t slot, uint32_t flags);
    // Per-vCPU rate cap in pages/s (0: none) and idle share in % (auto-converge),
    // both read by the guest once per batch.
    void set_rate(uint32_t vcpu, uint64_t pages_per_s);
    void set_throttle(uint32_t vcpu, uint32_t pct);
    // Until every vCPU finished its first pass (its memory is faulted in),
    // a vCPU failed, or timeout. True when all did.
    bool wait_first_pass(std::chrono::milliseconds timeout);
    // Pause without signals: each guest finishes its batch, exits through the
    // park doorbell and is held outside KVM_RUN (exits the guest asks for lose
    // no dirty-ring entries here, signal kicks can). False if not every vCPU
    // parked within `timeout` (they stay asked to; unpark_guests() releases).
    bool park_guests(std::chrono::milliseconds timeout);
    void unpark_guests();
    // Lock-step passes: each vCPU starts pass g only once g <= gate (0: free running).
    void set_pass_gate(uint64_t gate);
    // Kicks every running vCPU out of KVM_RUN and waits until each has left
    // it once (flushes per-vCPU dirty state such as PML buffers into the
    // rings). False on timeout.
    bool sync_vcpus(std::chrono::milliseconds timeout = std::chrono::milliseconds(1000));
    // Per node with prealloc=on, in node order.
    const std::vector<PreallocResult>& prealloc_results() const { return prealloc_; }
    uint64_t exits(uint32_t i) const { return vcpus_[i]->exits.load(); }

    StatSnapshot vm_stats() const { return vm_stats_.read(); }
    StatSnapshot vcpu_stats(uint32_t i) const { return vcpus_[i]->stats.read(); }

private:
    struct VcpuSlot {
        explicit VcpuSlot(Vcpu v) : vcpu(std::move(v)) {}
        Vcpu vcpu;
        StatsReader stats;
        std::thread thread;
        std::atomic<uint64_t> kicks{0}, exits{0};
        bool finished = false;  // under Machine::mu_
        bool ready = false;     // under mu_: pinned, policy set, info filled
        bool held = false;      // under mu_: waiting at the pass gate, outside KVM_RUN
        VcpuThreadInfo info;    // under mu_
    };

    void create_memory();
    // A mappable guest_memfd of `size` bytes for a gmem backing (its fd).
    int create_guest_memfd(uint64_t size);
    void preallocate();
    static kvm_userspace_memory_region2 region2_of(const MemoryRegion& r);
    // On the vCPU thread: pin and set the node's policy; fills s.info.
    void enter_node(VcpuSlot& s);
    void load_guest();
    void open_stats();
    void vcpu_loop(VcpuSlot& s);
    // Returns false when the vCPU must stop running.
    bool handle_exit(VcpuSlot& s);
    void fail(VcpuSlot& s, std::string reason, std::optional<VcpuFailure> detail = {});
    void kick_all_locked();
    void park();

    const Kvm* kvm_;
    MachineConfig cfg_;
    GuestLayout layout_;
    Vm vm_;
    std::vector<Backing> backings_;  // [0] is the system slot
    MemslotRegistry slots_;
    mutable std::mutex slots_mu_;  // set_slot_flags from several threads
    std::vector<std::unique_ptr<VcpuSlot>> vcpus_;
    StatsReader vm_stats_;
    uint64_t tsc_khz_ = 0;
    std::function<void(uint32_t)> ring_full_;
    std::mutex ring_full_mu_;
    std::vector<PreallocResult> prealloc_;
    std::vector<int> vcpu_node_;  // vCPU -> index into cfg_.nodes
    std::vector<uint8_t> boot_params_host_;  // what load_guest() wrote

    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<bool> pause_requested_{false};
    std::atomic<bool> stop_all_{false};
    uint32_t parked_ = 0, live_ = 0;
    bool started_ = false;
    std::optional<VcpuFailure> failure_;
};

std::string format_registers(const kvm_regs& r, const kvm_sregs& s);

}  // namespace mvm
