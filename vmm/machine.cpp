#include "vmm/machine.hpp"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/error.hpp"
#include "vmm/kvm/ioctl.hpp"
#include "vmm/x86/cpuid.hpp"

namespace mvm {

namespace {

constexpr int kKickSignal = SIGUSR1;

// The vCPU's kvm_run, for the kick signal handler on this thread.
thread_local kvm_run* tl_run = nullptr;

// kvm_run.immediate_exit is shared by the vCPU thread (which clears it after
// KVM_RUN returns), its signal handler and the kicking thread (which set it),
// and KVM (which reads it on entry): atomic byte stores, lock-free and so
// async-signal-safe.
void set_immediate_exit(kvm_run* run, uint8_t v)
{
    std::atomic_ref<uint8_t>(run->immediate_exit).store(v, std::memory_order_release);
}

void kick_handler(int)
{
    // Async-signal-safe: one byte store. KVM_RUN checks it on entry, which
    // closes the window between our flag check and the ioctl.
    if (tl_run)
        set_immediate_exit(tl_run, 1);
}

void install_kick_handler()
{
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_handler = kick_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
        sigaction(kKickSignal, &sa, nullptr);
    });
}

const char* exit_reason_name(uint32_t r)
{
    switch (r) {
    case KVM_EXIT_UNKNOWN: return "KVM_EXIT_UNKNOWN";
    case KVM_EXIT_EXCEPTION: return "KVM_EXIT_EXCEPTION";
    case KVM_EXIT_IO: return "KVM_EXIT_IO";
    case KVM_EXIT_HYPERCALL: return "KVM_EXIT_HYPERCALL";
    case KVM_EXIT_DEBUG: return "KVM_EXIT_DEBUG";
    case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
    case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
    case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN";
    case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
    case KVM_EXIT_INTR: return "KVM_EXIT_INTR";
    case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
    case KVM_EXIT_SYSTEM_EVENT: return "KVM_EXIT_SYSTEM_EVENT";
    case KVM_EXIT_DIRTY_RING_FULL: return "KVM_EXIT_DIRTY_RING_FULL";
    default: return "KVM_EXIT_?";
    }
}

}  // namespace

Machine::Machine(const Kvm& kvm, MachineConfig cfg, const MemoryPlan& plan)
    : kvm_(&kvm), cfg_(std::move(cfg)), vm_(kvm.create_vm()),
      slots_(static_cast<uint32_t>(std::max(1, vm_.cap(KVM_CAP_NR_MEMSLOTS))))
{
    // Pausing kicks vCPUs out of KVM_RUN with a signal plus kvm_run.immediate_exit.
    kvm.require(KVM_CAP_IMMEDIATE_EXIT, "kicking vCPUs out of KVM_RUN to pause them");
    if (cfg_.dirty_ring_bytes)
        vm_.enable_dirty_ring(cfg_.dirty_ring_bytes, cfg_.dirty_ring_acq_rel);
    vcpu_node_.assign(cfg_.vcpus, 0);
    for (size_t i = 0; i < cfg_.nodes.size(); i++)
        for (uint32_t v : cfg_.nodes[i].vcpus)
            vcpu_node_.at(v) = static_cast<int>(i);
    create_memory(plan);
    create_vcpus();
    open_stats();
}

Machine::~Machine() { kill(); }

// The vCPUs, with what KVM supports as their CPUID (a hardware VMM must set
// it: long mode needs the LM bit), and the TSC frequency they run at.
void Machine::create_vcpus()
{
    auto cpuid = kvm_->supported_cpuid();
    for (uint32_t v = 0; v < cfg_.vcpus; v++) {
        auto vcpu = vm_.create_vcpu(v);
        vcpu.set_cpuid(x86::cpuid_for_vcpu(cpuid, v));
        vcpus_.push_back(std::make_unique<VcpuSlot>(std::move(vcpu)));
    }
    if (kvm_->cap(KVM_CAP_GET_TSC_KHZ) > 0 && !vcpus_.empty())
        tsc_khz_ = vcpus_[0]->vcpu.tsc_khz();
}

bool Machine::sync_vcpus(std::chrono::milliseconds timeout)
{
    std::vector<uint64_t> before(vcpus_.size());
    {
        std::lock_guard lk(mu_);
        for (size_t i = 0; i < vcpus_.size(); i++)
            before[i] = vcpus_[i]->kicks.load();
        kick_all_locked();
    }
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        bool all = true;
        {
            std::lock_guard lk(mu_);
            for (size_t i = 0; i < vcpus_.size(); i++)
            {
                const VcpuRunState st = vcpus_[i]->state;
                all &= st == VcpuRunState::Exited || st == VcpuRunState::Held || st == VcpuRunState::Created ||
                       vcpus_[i]->kicks.load() != before[i] || pause_requested_.load();
            }
        }
        if (all)
            return true;
        if (std::chrono::steady_clock::now() > deadline)
            return false;
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
}

void Machine::set_state(VcpuSlot& s, VcpuRunState st)
{
    s.state = st;
    cv_.notify_all();
}

template <class P>
bool Machine::all_vcpus(P in) const
{
    return std::all_of(vcpus_.begin(), vcpus_.end(), [&](const auto& s) { return in(s->state); });
}

bool Machine::started() const
{
    std::lock_guard lk(mu_);
    return !all_vcpus([](VcpuRunState st) { return st == VcpuRunState::Created; });
}

void Machine::start()
{
    install_kick_handler();
    std::unique_lock lk(mu_);
    if (!all_vcpus([](VcpuRunState st) { return st == VcpuRunState::Created; }))
        return;
    for (auto& s : vcpus_) {
        s->state = VcpuRunState::Placing;
        s->thread = std::thread([this, slot = s.get()] { vcpu_loop(*slot); });
        pthread_setname_np(s->thread.native_handle(), fmt::format("vcpu{}", s->vcpu.id()).c_str());
    }
    // Every thread has pinned itself and set its policy (or failed) on return.
    cv_.wait(lk, [&] { return all_vcpus([](VcpuRunState st) { return st != VcpuRunState::Placing; }); });
}

void Machine::enter_node(VcpuSlot& s)
{
    const NodeConfig& node = cfg_.nodes[static_cast<size_t>(vcpu_node_.at(s.vcpu.id()))];
    VcpuThreadInfo info;
    info.tid = static_cast<int>(::gettid());
    // Pinned to the node's CPUs and under its policy, so what KVM allocates
    // on this thread's faults (page tables, rmaps) lands on the node too.
    if (!node.host_cpus.empty())
        numa::pin_current_thread(node.host_cpus);
    const numa::NodePolicy& policy = node.vcpu_thread_policy ? *node.vcpu_thread_policy : node.host_policy;
    if (policy.policy != numa::Policy::Default)
        numa::set_current_thread_policy(policy);
    info.affinity = numa::current_thread_cpus();
    info.mempolicy = numa::current_thread_policy();
    std::lock_guard lk(mu_);
    s.info = std::move(info);
    set_state(s, VcpuRunState::Running);
}

VcpuThreadInfo Machine::vcpu_thread_info(uint32_t i) const
{
    std::unique_lock lk(mu_);
    return vcpus_.at(i)->info;
}

void Machine::vcpu_loop(VcpuSlot& s)
{
    try {
        enter_node(s);
    } catch (const std::exception& e) {
        fail_vcpu(s.vcpu.id(), fmt::format("placing the vCPU thread on its node: {}", e.what()));
        std::lock_guard lk(mu_);
        set_state(s, VcpuRunState::Exited);
        return;
    }
    tl_run = s.vcpu.run_struct();
    kvm_run* run = s.vcpu.run_struct();
    for (;;) {
        if (pause_requested_.load(std::memory_order_acquire) && !stop_all_.load())
            park(s);
        if (stop_all_.load(std::memory_order_acquire))
            break;
        int rc = s.vcpu.run();
        if (rc == -EINTR || rc == -EAGAIN) {
            // Kicked (or asked to retry): clear the flag only now, after
            // KVM_RUN returned, so a kick is never lost; then recheck flags.
            set_immediate_exit(run, 0);
            s.kicks++;
            continue;
        }
        if (rc < 0) {
            fail_vcpu(s.vcpu.id(), SysError("KVM_RUN", -1, -rc).what());
            break;
        }
        s.exits++;
        if (handle_exit(s) == ExitAction::Stop)
            break;
    }
    tl_run = nullptr;
    std::lock_guard lk(mu_);
    set_state(s, VcpuRunState::Exited);
}

// The exits this VM handles itself or through the guest's handlers; any
// other exit stops the VM with its name.
const Machine::ExitEntry Machine::kExitTable[] = {
    {KVM_EXIT_MMIO, &Machine::exit_mmio},
    {KVM_EXIT_IO, &Machine::exit_io},
    {KVM_EXIT_DIRTY_RING_FULL, &Machine::exit_dirty_ring_full},
    {KVM_EXIT_HLT, &Machine::exit_hlt},
    {KVM_EXIT_SHUTDOWN, &Machine::exit_shutdown},
    {KVM_EXIT_SYSTEM_EVENT, &Machine::exit_system_event},
    {KVM_EXIT_INTERNAL_ERROR, &Machine::exit_internal_error},
    {KVM_EXIT_FAIL_ENTRY, &Machine::exit_fail_entry},
};

ExitAction Machine::handle_exit(VcpuSlot& s)
{
    const uint32_t reason = s.vcpu.run_struct()->exit_reason;
    for (const auto& e : kExitTable)
        if (e.reason == reason)
            return (this->*e.handle)(s);
    fail_vcpu(s.vcpu.id(), fmt::format("unexpected exit {} ({})", exit_reason_name(reason), reason));
    return ExitAction::Stop;
}

ExitAction Machine::exit_mmio(VcpuSlot& s)
{
    const kvm_run* run = s.vcpu.run_struct();
    if (run->mmio.is_write && run->mmio.len == 8)
        if (auto h = mmio_write_.find(run->mmio.phys_addr); h != mmio_write_.end()) {
            uint64_t v;
            std::memcpy(&v, run->mmio.data, 8);
            return h->second(s.vcpu.id(), v);
        }
    fail_vcpu(s.vcpu.id(), fmt::format("unexpected MMIO {} at {:#x} ({} bytes): the guest has no devices",
                                       run->mmio.is_write ? "write" : "read", run->mmio.phys_addr, run->mmio.len));
    return ExitAction::Stop;
}

ExitAction Machine::exit_io(VcpuSlot& s)
{
    const kvm_run* run = s.vcpu.run_struct();
    if (run->io.direction == KVM_EXIT_IO_OUT)
        if (auto h = port_out_.find(run->io.port); h != port_out_.end())
            return h->second(s.vcpu.id());
    fail_vcpu(s.vcpu.id(), fmt::format("unexpected port I/O: {} port {:#x} size {}", run->io.direction ? "out" : "in",
                                       run->io.port, run->io.size));
    return ExitAction::Stop;
}

ExitAction Machine::exit_dirty_ring_full(VcpuSlot& s)
{
    // The ring must be harvested and reset before this vCPU re-enters,
    // or KVM_RUN exits with DIRTY_RING_FULL again at once.
    std::function<void(uint32_t)> fn;
    {
        std::lock_guard lk(ring_full_mu_);
        fn = ring_full_;
    }
    if (fn) {
        fn(s.vcpu.id());
        return ExitAction::Continue;
    }
    fail_vcpu(s.vcpu.id(), "KVM_EXIT_DIRTY_RING_FULL with no dirty-ring harvester attached");
    return ExitAction::Stop;
}

ExitAction Machine::exit_hlt(VcpuSlot& s)
{
    fail_vcpu(s.vcpu.id(), "guest halted (KVM_EXIT_HLT) without reporting");
    return ExitAction::Stop;
}

ExitAction Machine::exit_shutdown(VcpuSlot& s)
{
    fail_vcpu(s.vcpu.id(), "guest shut down (KVM_EXIT_SHUTDOWN: triple fault)");
    return ExitAction::Stop;
}

ExitAction Machine::exit_system_event(VcpuSlot& s)
{
    fail_vcpu(s.vcpu.id(), fmt::format("guest system event type {}", s.vcpu.run_struct()->system_event.type));
    return ExitAction::Stop;
}

ExitAction Machine::exit_internal_error(VcpuSlot& s)
{
    const kvm_run* run = s.vcpu.run_struct();
    std::string data;
    for (uint32_t i = 0; i < run->internal.ndata && i < 16; i++)
        data += fmt::format(" {:#x}", run->internal.data[i]);
    fail_vcpu(s.vcpu.id(), fmt::format("KVM_EXIT_INTERNAL_ERROR suberror {}{}", run->internal.suberror,
                                       data.empty() ? "" : ", data:" + data));
    return ExitAction::Stop;
}

ExitAction Machine::exit_fail_entry(VcpuSlot& s)
{
    fail_vcpu(s.vcpu.id(), fmt::format("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {:#x}",
                                       s.vcpu.run_struct()->fail_entry.hardware_entry_failure_reason));
    return ExitAction::Stop;
}

void Machine::hold(uint32_t vcpu, const std::function<bool()>& until)
{
    VcpuSlot& s = *vcpus_.at(vcpu);
    std::unique_lock lk(mu_);
    set_state(s, VcpuRunState::Held);
    cv_.wait(lk, [&] { return until() || stop_all_.load() || pause_requested_.load(); });
    s.state = VcpuRunState::Running;
}

void Machine::wake_held(const std::function<void()>& change)
{
    std::lock_guard lk(mu_);
    if (change)
        change();
    cv_.notify_all();
}

bool Machine::wait_all_held(std::chrono::milliseconds timeout)
{
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] {
        return all_vcpus([](VcpuRunState st) { return st == VcpuRunState::Held || st == VcpuRunState::Exited; });
    });
}

void Machine::fail_vcpu(uint32_t vcpu, std::string reason, std::optional<VcpuFailure> detail)
{
    Vcpu& v = vcpus_.at(vcpu)->vcpu;
    VcpuFailure f = detail.value_or(VcpuFailure{});
    f.vcpu = vcpu;
    f.reason = fmt::format("vCPU {}: {}", vcpu, reason);
    try {
        f.register_dump = format_registers(v.regs(), v.sregs());
    } catch (const std::exception& e) {
        f.register_dump = fmt::format("(registers unavailable: {})", e.what());
    }
    spdlog::debug("{}", f.reason);
    // An unexpected exit stops the whole VM.
    std::lock_guard lk(mu_);
    if (!failure_)
        failure_ = f;
    stop_all_.store(true);
    kick_all_locked();
    cv_.notify_all();
}

std::optional<VcpuFailure> Machine::failure() const
{
    std::lock_guard lk(mu_);
    return failure_;
}

uint32_t Machine::finished_count() const
{
    std::lock_guard lk(mu_);
    uint32_t n = 0;
    for (const auto& s : vcpus_)
        n += s->state == VcpuRunState::Exited;
    return n;
}

void Machine::kick_all_locked()
{
    for (auto& s : vcpus_) {
        if (s->state == VcpuRunState::Exited || s->state == VcpuRunState::Created)
            continue;
        set_immediate_exit(s->vcpu.run_struct(), 1);
        pthread_kill(s->thread.native_handle(), kKickSignal);
    }
}

void Machine::park(VcpuSlot& s)
{
    std::unique_lock lk(mu_);
    set_state(s, VcpuRunState::Paused);
    cv_.wait(lk, [&] { return !pause_requested_.load() || stop_all_.load(); });
    s.state = VcpuRunState::Running;
}

void Machine::pause()
{
    std::unique_lock lk(mu_);
    pause_requested_.store(true, std::memory_order_release);
    cv_.notify_all();  // held vCPUs go and park
    kick_all_locked();
    cv_.wait(lk, [&] {
        return all_vcpus([](VcpuRunState st) {
            return st == VcpuRunState::Paused || st == VcpuRunState::Exited || st == VcpuRunState::Created;
        });
    });
}

void Machine::resume()
{
    std::lock_guard lk(mu_);
    pause_requested_.store(false, std::memory_order_release);
    cv_.notify_all();
}

bool Machine::wait_finished(std::chrono::milliseconds timeout)
{
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] {
        return all_vcpus([](VcpuRunState st) { return st == VcpuRunState::Exited || st == VcpuRunState::Created; });
    });
}

void Machine::kill()
{
    {
        std::lock_guard lk(mu_);
        stop_all_.store(true);
        cv_.notify_all();
        kick_all_locked();
    }
    for (auto& s : vcpus_) {
        if (!s->thread.joinable())
            continue;
        {
            // immediate_exit closes the race with a vCPU about to enter
            // KVM_RUN; re-kicking on a timeout is a backstop.
            std::unique_lock lk(mu_);
            while (!cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return s->state == VcpuRunState::Exited; }))
                kick_all_locked();
        }
        s->thread.join();
    }
}

void Machine::open_stats()
{
    if (vm_.cap(KVM_CAP_BINARY_STATS_FD) > 0)
        vm_stats_ = StatsReader(vm_.stats_fd());
    bool stats = vm_.cap(KVM_CAP_BINARY_STATS_FD) > 0;
    for (auto& s : vcpus_)
        if (stats)
            s->stats = StatsReader(s->vcpu.stats_fd());
}

std::string format_registers(const kvm_regs& r, const kvm_sregs& s)
{
    return fmt::format(
        "rip {:#018x} rsp {:#018x} rflags {:#010x}\n"
        "rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\n"
        "rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}\n"
        "r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}\n"
        "r13 {:#018x} r14 {:#018x} r15 {:#018x}\n"
        "cs {:#06x} (dpl {} l {}) ss {:#06x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
        r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14, r.r15, s.cs.selector, s.cs.dpl, s.cs.l, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer);
}

}  // namespace mvm
