// vmm/machine.hpp - the VM: KVM's VM and vCPU objects, memslots over their
// backings (one or more per virtual node, placed by the node's policy), and
// one host thread per vCPU that runs KVM_RUN and dispatches exits through a
// small table. It knows nothing of the guest it runs: the guest's own
// protocol (vmm/stress/) registers exit handlers and holds vCPUs through it.
//
// Each vCPU thread is in exactly one VcpuRunState. Pause/resume parks every vCPU
// thread outside KVM_RUN (kick: immediate_exit + signal, as api.rst
// recommends); an exit handler can hold its own vCPU outside KVM_RUN until a
// condition of the guest's holds.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "memory/backing.hpp"
#include "memory/memslot.hpp"
#include "memory/prealloc.hpp"
#include "numa/policy.hpp"
#include "vmm/config.hpp"
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

// What a vCPU thread looks like from the host, read on that thread after
// it pinned itself and set its memory policy (or did not).
struct VcpuThreadInfo {
    int tid = 0;
    std::vector<int> affinity;    // sched_getaffinity, sorted
    numa::NodePolicy mempolicy;   // get_mempolicy as the thread sees it
};

// Where a vCPU's thread is. Transitions (under the machine's lock):
//   Created -> Placing (start) -> Running (pinned, policy set)
//   Running <-> Held     an exit handler holds it outside KVM_RUN (hold())
//   Running <-> Paused   the VMM paused the VM (pause()/resume())
//   any started state -> Exited (the guest finished, a failure, kill())
enum class VcpuRunState { Created, Placing, Running, Held, Paused, Exited };

// What an exit handler tells its vCPU thread.
enum class ExitAction { Continue, Stop };

// Where the VM's memory goes in guest-physical space, as the guest wants it:
// the system memslot (slot 0) of system_bytes at GPA 0, and each virtual
// node's RAM (config().nodes[i]) at node_gpa[i].
struct MemoryPlan {
    uint64_t system_bytes = 0;
    std::vector<uint64_t> node_gpa;
};

class Machine {
public:
    // Creates the VM (with the dirty ring when cfg asks), its memory by
    // `plan` (each node's backing placed by its policy, then memslots) and
    // the vCPUs with the CPUID KVM supports. Loading a guest is the caller's.
    Machine(const Kvm& kvm, MachineConfig cfg, const MemoryPlan& plan);
    virtual ~Machine();
    Machine(const Machine&) = delete;
    Machine& operator=(const Machine&) = delete;

    // ---- exit handlers (register before start(); read by vCPU threads) ----
    // An 8-byte guest write to `gpa` (which has no memslot): a doorbell.
    using MmioWriteHandler = std::function<ExitAction(uint32_t vcpu, uint64_t value)>;
    void on_mmio_write(uint64_t gpa, MmioWriteHandler h) { mmio_write_[gpa] = std::move(h); }
    // An OUT to `port`.
    using PortOutHandler = std::function<ExitAction(uint32_t vcpu)>;
    void on_port_out(uint16_t port, PortOutHandler h) { port_out_[port] = std::move(h); }
    // Called on the vCPU's thread on KVM_EXIT_DIRTY_RING_FULL; must harvest
    // and reset the ring before returning (the vCPU re-enters right after).
    // May be changed while vCPUs run.
    void set_dirty_ring_full_handler(std::function<void(uint32_t vcpu)> fn)
    {
        std::lock_guard lk(ring_full_mu_);
        ring_full_ = std::move(fn);
    }
    // From an exit handler, on vCPU `vcpu`'s own thread: keeps it outside
    // KVM_RUN (Held) until until() is true, the VM pauses, or it stops.
    // until() runs under the machine's lock; change what it reads through
    // wake_held() so no wake-up is lost.
    void hold(uint32_t vcpu, const std::function<bool()>& until);
    // Runs `change` under the machine's lock, then wakes held vCPUs to re-check.
    void wake_held(const std::function<void()>& change = {});
    // Until every vCPU is Held or Exited, or timeout. False on timeout.
    bool wait_all_held(std::chrono::milliseconds timeout);
    // Stops the whole VM from an exit handler (or anywhere): the first
    // failure is kept, every vCPU is kicked out and its thread ends.
    void fail_vcpu(uint32_t vcpu, std::string reason, std::optional<VcpuFailure> detail = {});

    // ---- running ----
    void start();
    // Until every vCPU finished or failed, or timeout. True when none is left running.
    bool wait_finished(std::chrono::milliseconds timeout);
    // Kicks every vCPU out of KVM_RUN and ends its thread (idempotent).
    void kill();
    // All vCPU threads parked outside KVM_RUN on return.
    void pause();
    void resume();
    bool paused() const { return pause_requested_.load(); }
    // start() was called (a machine runs one guest life: start, then stop or kill).
    bool started() const;
    // Kicks every running vCPU out of KVM_RUN and waits until each has left
    // it once (flushes per-vCPU dirty state such as PML buffers into the
    // rings). False on timeout.
    bool sync_vcpus(std::chrono::milliseconds timeout = std::chrono::milliseconds(1000));

    // ---- what it is made of ----
    const MachineConfig& config() const { return cfg_; }
    Vm& vm() { return vm_; }
    const Kvm& kvm() const { return *kvm_; }
    const MemslotRegistry& memslots() const { return slots_; }
    uint32_t vcpu_count() const { return static_cast<uint32_t>(vcpus_.size()); }
    Vcpu& vcpu(uint32_t i) { return vcpus_[i]->vcpu; }
    uint64_t tsc_khz() const { return tsc_khz_; }  // 0 without KVM_CAP_GET_TSC_KHZ
    // Host pointer for a guest-physical range inside one memslot.
    uint8_t* host_ptr(uint64_t gpa, uint64_t len = 1) const { return slots_.host_ptr(gpa, len); }
    // The backing of virtual node i (index into config().nodes).
    const Backing& node_backing(size_t i) const { return backings_.at(1 + i); }
    // Re-registers a memslot with new KVM_MEM_* flags (dirty logging on/off).
    // Safe to call from several threads for different slots.
    void set_slot_flags(uint32_t slot, uint32_t flags);
    // Per node with prealloc=on, in node order.
    const std::vector<PreallocResult>& prealloc_results() const { return prealloc_; }

    // ---- what happened ----
    std::optional<VcpuFailure> failure() const;
    uint32_t finished_count() const;
    uint64_t kicks(uint32_t i) const { return vcpus_[i]->kicks.load(); }
    uint64_t exits(uint32_t i) const { return vcpus_[i]->exits.load(); }
    // Valid once the vCPU thread has started (start() waits for that).
    VcpuThreadInfo vcpu_thread_info(uint32_t i) const;
    StatSnapshot vm_stats() const { return vm_stats_.read(); }
    StatSnapshot vcpu_stats(uint32_t i) const { return vcpus_[i]->stats.read(); }

private:
    struct VcpuSlot {
        explicit VcpuSlot(Vcpu v) : vcpu(std::move(v)) {}
        Vcpu vcpu;
        StatsReader stats;
        std::thread thread;
        std::atomic<uint64_t> kicks{0}, exits{0};
        VcpuRunState state = VcpuRunState::Created;  // under Machine::mu_
        VcpuThreadInfo info;                    // under mu_
    };
    using ExitHandler = ExitAction (Machine::*)(VcpuSlot&);
    struct ExitEntry {
        uint32_t reason;
        ExitHandler handle;
    };
    static const ExitEntry kExitTable[];

    void create_memory(const MemoryPlan& plan);
    // A mappable guest_memfd of `size` bytes for a gmem backing (its fd).
    int create_guest_memfd(uint64_t size);
    void preallocate();
    static kvm_userspace_memory_region2 region2_of(const MemoryRegion& r);
    void create_vcpus();
    void open_stats();
    // On the vCPU thread: pin and set the node's policy; fills s.info.
    void enter_node(VcpuSlot& s);
    void vcpu_loop(VcpuSlot& s);
    void set_state(VcpuSlot& s, VcpuRunState st);  // under mu_: notifies
    // True when every vCPU's state passes `in` (under mu_).
    template <class P>
    bool all_vcpus(P in) const;
    ExitAction handle_exit(VcpuSlot& s);
    ExitAction exit_mmio(VcpuSlot& s);
    ExitAction exit_io(VcpuSlot& s);
    ExitAction exit_dirty_ring_full(VcpuSlot& s);
    ExitAction exit_hlt(VcpuSlot& s);
    ExitAction exit_shutdown(VcpuSlot& s);
    ExitAction exit_system_event(VcpuSlot& s);
    ExitAction exit_internal_error(VcpuSlot& s);
    ExitAction exit_fail_entry(VcpuSlot& s);
    void kick_all_locked();
    void park(VcpuSlot& s);

    const Kvm* kvm_;
    MachineConfig cfg_;
    Vm vm_;
    std::vector<Backing> backings_;  // [0] is the system slot
    MemslotRegistry slots_;
    mutable std::mutex slots_mu_;  // set_slot_flags from several threads
    std::vector<std::unique_ptr<VcpuSlot>> vcpus_;
    StatsReader vm_stats_;
    uint64_t tsc_khz_ = 0;
    std::map<uint64_t, MmioWriteHandler> mmio_write_;
    std::map<uint16_t, PortOutHandler> port_out_;
    std::function<void(uint32_t)> ring_full_;
    std::mutex ring_full_mu_;
    std::vector<PreallocResult> prealloc_;
    std::vector<int> vcpu_node_;  // vCPU -> index into cfg_.nodes

    mutable std::mutex mu_;
    std::condition_variable cv_;
    // The VMM's requests, read by vCPU threads without the lock.
    std::atomic<bool> pause_requested_{false};
    std::atomic<bool> stop_all_{false};
    std::optional<VcpuFailure> failure_;  // under mu_
};

std::string format_registers(const kvm_regs& r, const kvm_sregs& s);

}  // namespace mvm
