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

#include "vmm/stress/guest_image.hpp"
#include "base/error.hpp"
#include "vmm/kvm/ioctl.hpp"
#include "base/units.hpp"
#include "vmm/stress/vnuma.hpp"
#include "vmm/stress/long_mode.hpp"
#include "vmm/x86/paging.hpp"

namespace mvm {

namespace {

constexpr uint64_t k4K = 4096, k2M = 2ull << 20, k1G = 1ull << 30;
constexpr uint64_t kKstackBytes = 2 * k4K;
constexpr uint64_t kUstackBytes = 4 * k4K;
constexpr int kKickSignal = SIGUSR1;

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

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

const char* vector_name(int v)
{
    static const char* names[] = {"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS",
                                  "#NP", "#SS", "#GP", "#PF", "?",   "#MF", "#AC", "#MC", "#XM", "#VE", "#CP"};
    return v >= 0 && v < static_cast<int>(std::size(names)) ? names[v] : "?";
}

}  // namespace

Machine::Machine(const Kvm& kvm, MachineConfig cfg)
    : kvm_(&kvm), cfg_(std::move(cfg)), layout_(plan_layout(cfg_)), vm_(kvm.create_vm()),
      slots_(static_cast<uint32_t>(std::max(1, vm_.cap(KVM_CAP_NR_MEMSLOTS))))
{
    static_assert(sizeof(mvm_mailbox) <= 4096);
    // Pausing kicks vCPUs out of KVM_RUN with a signal plus kvm_run.immediate_exit.
    kvm.require(KVM_CAP_IMMEDIATE_EXIT, "kicking vCPUs out of KVM_RUN to pause them");
    if (cfg_.dirty_ring_bytes)
        vm_.enable_dirty_ring(cfg_.dirty_ring_bytes, cfg_.dirty_ring_acq_rel);
    vcpu_node_.assign(cfg_.vcpus, 0);
    for (size_t i = 0; i < cfg_.nodes.size(); i++)
        for (uint32_t v : cfg_.nodes[i].vcpus)
            vcpu_node_.at(v) = static_cast<int>(i);
    create_memory();
    load_guest();
    open_stats();
}

Machine::~Machine() { kill(); }

void Machine::create_memory()
{
    backings_.push_back(Backing::create(BackingKind::Anon, layout_.system_bytes, {}, "system"));
    MemoryRegion sys;
    sys.slot = 0;
    sys.gpa = 0;
    sys.size = layout_.system_bytes;
    sys.host = backings_[0].host();
    sys.name = "system";
    slots_.add(sys);

    uint32_t next_slot = 1;
    for (size_t i = 0; i < cfg_.nodes.size(); i++) {
        const NodeConfig& node = cfg_.nodes[i];
        const auto& range = layout_.ram[i];
        backings_.push_back(
            Backing::create(node.backing, node.mem_bytes, [this](uint64_t size) { return create_guest_memfd(size); },
                            fmt::format("node{}-{}", node.id, backing_name(node.backing))));
        const Backing& b = backings_.back();
        // Before anything touches it: where its pages may come from. For
        // guest_memfd this sets the file's shared policy through our mmap.
        try {
            numa::apply_to_range(b.host(), b.size(), node.host_policy);
        } catch (const Error& e) {
            throw Error(fmt::format("{}: applying policy {} to {}: {}", node.origin, numa::to_string(node.host_policy),
                                    backing_name(node.backing), e.what()));
        }
        // The node's memory as slots_per_node memslots over one backing.
        const uint64_t page = b.page_size(), pages = node.mem_bytes / page, k = cfg_.slots_per_node;
        for (uint64_t j = 0; j < k; j++) {
            const uint64_t first = pages * j / k * page, last = pages * (j + 1) / k * page;
            MemoryRegion r;
            r.slot = next_slot++;
            r.gpa = range.gpa + first;
            r.size = last - first;
            r.host = b.host() + first;
            r.backing = node.backing;
            r.vnode = static_cast<int>(node.id);
            r.name = k == 1 ? fmt::format("node{}", node.id) : fmt::format("node{}.{}", node.id, j);
            if (node.backing == BackingKind::Gmem) {
                r.flags |= KVM_MEM_GUEST_MEMFD;
                r.gmem_fd = b.fd();
                r.gmem_offset = first;
            }
            slots_.add(r);
        }
    }
    for (const auto& r : slots_.regions())
        vm_.set_memory_region(region2_of(r));
    preallocate();
}

int Machine::create_guest_memfd(uint64_t size)
{
    const uint64_t want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    const uint64_t have = static_cast<uint64_t>(vm_.cap(KVM_CAP_GUEST_MEMFD_FLAGS));
    if (vm_.cap(KVM_CAP_GUEST_MEMFD) <= 0)
        throw Unsupported("backing gmem: this kernel's KVM lacks KVM_CAP_GUEST_MEMFD; use another --backing");
    if ((have & want) != want)
        throw Unsupported(fmt::format("backing gmem: guest_memfd flags here are {:#x}, need MMAP|INIT_SHARED "
                                      "({:#x}) to map it; use another --backing",
                                      have, want));
    return vm_.create_guest_memfd(size, want);
}

kvm_userspace_memory_region2 Machine::region2_of(const MemoryRegion& r)
{
    kvm_userspace_memory_region2 m{};
    m.slot = r.slot;
    m.flags = r.flags;
    m.guest_phys_addr = r.gpa;
    m.memory_size = r.size;
    m.userspace_addr = reinterpret_cast<uint64_t>(r.host);
    if (r.is_gmem()) {
        m.guest_memfd = static_cast<uint32_t>(r.gmem_fd);
        m.guest_memfd_offset = r.gmem_offset;
    }
    return m;
}

void Machine::set_slot_flags(uint32_t slot, uint32_t flags)
{
    kvm_userspace_memory_region2 m;
    {
        std::lock_guard lk(slots_mu_);
        const MemoryRegion* r = slots_.by_slot(slot);
        if (!r)
            throw Error(fmt::format("memslot {} does not exist", slot));
        MemoryRegion copy = *r;
        copy.flags = flags;
        m = region2_of(copy);
    }
    // KVM serialises memslot updates itself (slots_lock); the slow part (write-
    // protecting or splitting for dirty logging) runs on the calling thread.
    vm_.set_memory_region(m);
    std::lock_guard lk(slots_mu_);
    slots_.set_flags(slot, flags);
}

void Machine::set_rate(uint32_t vcpu, uint64_t pages_per_s)
{
    mvm_mailbox* mb = mailbox(vcpu);
    mb->tsc_per_page_q16 = pages_per_s ? (tsc_khz_ * 1000ull << 16) / pages_per_s : 0;
    mb->rate_pages_per_s = pages_per_s;
    mb->control_seq = mb->control_seq + 1;
}

void Machine::set_throttle(uint32_t vcpu, uint32_t pct)
{
    mvm_mailbox* mb = mailbox(vcpu);
    mb->throttle_pct = std::min<uint32_t>(pct, 99);
    mb->control_seq = mb->control_seq + 1;
}

bool Machine::wait_first_pass(std::chrono::milliseconds timeout)
{
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        bool warm = true;
        for (uint32_t i = 0; i < vcpu_count() && warm; i++)
            warm = snapshot(i).passes >= 1;
        if (warm)
            return true;
        if (failure() || std::chrono::steady_clock::now() > deadline)
            return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
}

bool Machine::park_guests(std::chrono::milliseconds timeout)
{
    std::unique_lock lk(mu_);
    for (uint32_t i = 0; i < vcpu_count(); i++)
        mailbox(i)->park = 1;
    return cv_.wait_for(lk, timeout, [&] {
        return std::all_of(vcpus_.begin(), vcpus_.end(), [](const auto& s) { return s->finished || s->held; });
    });
}

void Machine::unpark_guests()
{
    std::lock_guard lk(mu_);
    for (uint32_t i = 0; i < vcpu_count(); i++)
        mailbox(i)->park = 0;
    cv_.notify_all();
}

void Machine::set_pass_gate(uint64_t gate)
{
    std::lock_guard lk(mu_);
    for (uint32_t i = 0; i < vcpu_count(); i++)
        mailbox(i)->pass_gate = gate;
    cv_.notify_all();
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
                all &= vcpus_[i]->finished || vcpus_[i]->held || vcpus_[i]->kicks.load() != before[i] ||
                       !vcpus_[i]->thread.joinable() || pause_requested_.load();
        }
        if (all)
            return true;
        if (std::chrono::steady_clock::now() > deadline)
            return false;
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
}

void Machine::preallocate()
{
    std::vector<PreallocJob> jobs;
    for (size_t i = 0; i < cfg_.nodes.size(); i++) {
        const NodeConfig& node = cfg_.nodes[i];
        if (!node.prealloc)
            continue;
        const Backing& b = node_backing(i);
        PreallocJob j;
        j.name = fmt::format("node{}", node.id);
        j.addr = b.host();
        j.len = b.size();
        j.page_size = b.page_size();
        // The node's CPUs: its vCPUs' pinning, else those of its host nodes.
        j.cpus = node.host_cpus;
        j.policy = node.host_policy;
        jobs.push_back(std::move(j));
    }
    if (jobs.empty())
        return;
    uint64_t total = 0;
    for (const auto& j : jobs)
        total += j.len;
    const bool show = cfg_.show_progress && total >= (256ull << 20);
    prealloc_ = prealloc_parallel(jobs, [&](uint64_t done, uint64_t all) {
        if (show)
            fmt::print(stderr, "\r\033[Kprealloc: {} of {} ({:.0f}%) on {} thread(s)", human_bytes(done), human_bytes(all),
                       100.0 * static_cast<double>(done) / static_cast<double>(all), jobs.size());
    });
    if (show)
        fmt::print(stderr, "\r\033[K");
}

// Copies the image, builds page tables, descriptor tables and boot
// parameters, and creates the vCPUs in 64-bit mode at the kernel entry.
void Machine::load_guest()
{
    const auto& hdr = guest_image_header();
    auto img = guest_image();
    std::memcpy(host_ptr(MVM_IMAGE_GPA, img.size()), img.data(), img.size());

    // Page tables: identity map, U=1 only where CPL3 code may go.
    x86::PageTableBuilder pt(layout_.pt_pool_gpa, layout_.pt_pool_pages, [this](uint64_t gpa) { return host_ptr(gpa, k4K); });
    using namespace x86;
    pt.map(layout_.idt_gpa, k4K, 0);
    pt.map(MVM_IMAGE_GPA, hdr.user_start - MVM_IMAGE_GPA, 0);
    pt.map(hdr.user_start, hdr.image_end - hdr.user_start, kPteUser);
    pt.map(k2M, layout_.kernel_area_end - k2M, kPteWrite);
    pt.map(layout_.boot_params_gpa, layout_.boot_params_bytes, kPteUser);  // read-only for the guest
    uint64_t user_rw = layout_.boot_params_gpa + layout_.boot_params_bytes;
    pt.map(user_rw, layout_.system_bytes - user_rw, kPteUser | kPteWrite);
    for (const auto& r : layout_.ram)
        pt.map(r.gpa, r.bytes, kPteUser | kPteWrite);
    pt.map(MVM_DOORBELL_GPA, k4K, kPteUser | kPteWrite);  // no memslot: stores exit as MMIO

    uint8_t* idt = host_ptr(layout_.idt_gpa, k4K);
    std::memset(idt, 0, k4K);
    for (unsigned v = 0; v < hdr.nr_exceptions; v++) {
        uint64_t handler;
        std::memcpy(&handler, host_ptr(hdr.exc_table + v * 8, 8), 8);
        x86::write_idt_gate(idt, v, handler);
    }

    // Boot parameters, the vNUMA table and per-vCPU working sets (vnuma.hpp).
    auto* bp = reinterpret_cast<mvm_boot_params*>(host_ptr(layout_.boot_params_gpa, layout_.boot_params_bytes));
    write_boot_params(cfg_, layout_, bp);
    const WorkloadConfig& w = cfg_.workload;
    for (uint32_t v = 0; v < cfg_.vcpus; v++) {
        auto* mb = mailbox(v);
        std::memset(mb, 0, k4K);
        mb->magic = MVM_MAILBOX_MAGIC;
        mb->vcpu_id = v;
        x86::write_gdt(host_ptr(layout_.gdt_gpa[v], x86::kGdtBytes), layout_.tss_gpa[v]);
        x86::write_tss(host_ptr(layout_.tss_gpa[v], x86::kTssBytes), layout_.kstack_top[v]);
    }

    auto cpuid = kvm_->supported_cpuid();
    for (uint32_t v = 0; v < cfg_.vcpus; v++) {
        auto vcpu = vm_.create_vcpu(v);
        vcpu.set_cpuid(x86::cpuid_for_vcpu(cpuid, v));
        kvm_sregs s = vcpu.sregs();
        x86::setup_long_mode_sregs(s, {layout_.gdt_gpa[v], layout_.tss_gpa[v], layout_.idt_gpa, hdr.nr_exceptions, pt.cr3()});
        vcpu.set_sregs(s);
        kvm_regs r{};
        r.rip = hdr.kernel_entry;
        r.rsp = layout_.kstack_top[v];
        r.rflags = x86::kRflagsReserved;
        r.rdi = layout_.boot_params_gpa;
        r.rsi = layout_.boot_params_gpa + offsetof(mvm_boot_params, vcpu) + v * sizeof(mvm_vcpu_params);
        r.rdx = layout_.mailbox_gpa[v];
        r.rcx = layout_.ustack_top[v];
        r.r8 = hdr.user_entry;
        vcpu.set_regs(r);
        vcpus_.push_back(std::make_unique<VcpuSlot>(std::move(vcpu)));
    }
    if (kvm_->cap(KVM_CAP_GET_TSC_KHZ) > 0)
        tsc_khz_ = vcpus_[0]->vcpu.tsc_khz();
    if (!tsc_khz_)
        throw Unsupported("this host's KVM lacks KVM_CAP_GET_TSC_KHZ (needed to time the guest)");
    bp->tsc_khz = tsc_khz_;
    bp->watchdog_threshold_tsc = static_cast<uint64_t>(w.watchdog_ms * static_cast<double>(tsc_khz_));
    for (uint32_t v = 0; v < cfg_.vcpus; v++) {
        auto* mb = mailbox(v);
        mb->rate_pages_per_s = w.rate_pages_per_s;
        mb->tsc_per_page_q16 = w.rate_pages_per_s ? (tsc_khz_ * 1000ull << 16) / w.rate_pages_per_s : 0;
    }
    // The host keeps its own copy: the guest (or a migration stream) can
    // rewrite guest memory, and host code must not index by what it finds.
    const auto* raw = reinterpret_cast<const uint8_t*>(bp);
    boot_params_host_.assign(raw, raw + layout_.boot_params_bytes);
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

mvm_mailbox* Machine::mailbox(uint32_t i) const
{
    return reinterpret_cast<mvm_mailbox*>(host_ptr(layout_.mailbox_gpa.at(i), k4K));
}

const mvm_boot_params* Machine::boot_params() const
{
    return reinterpret_cast<const mvm_boot_params*>(boot_params_host_.data());
}

std::string Machine::guest_boot_params_difference() const
{
    return boot_params_difference(
        {host_ptr(layout_.boot_params_gpa, layout_.boot_params_bytes), layout_.boot_params_bytes}, boot_params_host_);
}

MailboxSnapshot Machine::snapshot(uint32_t i) const { return read_mailbox(*mailbox(i)); }

MailboxSnapshot read_mailbox(const mvm_mailbox& mb)
{
    const mvm_mailbox* m = &mb;
    MailboxSnapshot s{};
    s.generation = m->generation;
    s.cursor = m->cursor;
    s.pages_written = m->pages_written;
    s.pages_read = m->pages_read;
    s.passes = m->passes;
    s.last_tsc = m->last_tsc;
    s.start_tsc = m->start_tsc;
    s.warm_tsc = m->warm_tsc;
    s.warm_pages = m->warm_pages;
    s.wd_events = m->wd_events;
    s.wd_max_gap_tsc = m->wd_max_gap_tsc;
    s.state = m->state;
    return s;
}

void Machine::start()
{
    install_kick_handler();
    std::unique_lock lk(mu_);
    if (started_)
        return;
    started_ = true;
    for (auto& s : vcpus_) {
        live_++;
        s->thread = std::thread([this, slot = s.get()] { vcpu_loop(*slot); });
        pthread_setname_np(s->thread.native_handle(), fmt::format("vcpu{}", s->vcpu.id()).c_str());
    }
    // Every thread has pinned itself and set its policy (or failed) on return.
    cv_.wait(lk, [&] {
        return std::all_of(vcpus_.begin(), vcpus_.end(), [](const auto& s) { return s->ready; });
    });
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
    if (node.host_policy.policy != numa::Policy::Default)
        numa::set_current_thread_policy(node.host_policy);
    info.affinity = numa::current_thread_cpus();
    info.mempolicy = numa::current_thread_policy();
    std::lock_guard lk(mu_);
    s.info = std::move(info);
    s.ready = true;
    cv_.notify_all();
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
        {
            std::lock_guard lk(mu_);
            s.ready = true;
            cv_.notify_all();
        }
        fail(s, fmt::format("placing the vCPU thread on its node: {}", e.what()));
        std::lock_guard lk(mu_);
        s.finished = true;
        live_--;
        cv_.notify_all();
        return;
    }
    tl_run = s.vcpu.run_struct();
    kvm_run* run = s.vcpu.run_struct();
    for (;;) {
        if (pause_requested_.load(std::memory_order_acquire) && !stop_all_.load())
            park();
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
            fail(s, SysError("KVM_RUN", -1, -rc).what());
            break;
        }
        s.exits++;
        if (!handle_exit(s))
            break;
    }
    tl_run = nullptr;
    std::lock_guard lk(mu_);
    s.finished = true;
    live_--;
    cv_.notify_all();
}

bool Machine::handle_exit(VcpuSlot& s)
{
    kvm_run* run = s.vcpu.run_struct();
    switch (run->exit_reason) {
    case KVM_EXIT_MMIO:
        if (run->mmio.is_write && run->mmio.phys_addr == MVM_DOORBELL_GPA && run->mmio.len == 8) {
            uint64_t v;
            std::memcpy(&v, run->mmio.data, 8);
            if (v >> 32 == MVM_DOORBELL_DONE)
                return false;  // the workload finished
            if (v >> 32 == MVM_DOORBELL_PARK) {
                const mvm_mailbox* mb = mailbox(s.vcpu.id());
                std::unique_lock lk(mu_);
                s.held = true;
                cv_.notify_all();
                cv_.wait(lk, [&] { return mb->park == 0 || mb->stop || stop_all_.load() || pause_requested_.load(); });
                s.held = false;
                return true;
            }
            if (v >> 32 == MVM_DOORBELL_GATE) {
                // Hold the vCPU outside KVM_RUN until its next pass may start
                // (or it must stop or park); the guest re-checks on return.
                const mvm_mailbox* mb = mailbox(s.vcpu.id());
                std::unique_lock lk(mu_);
                s.held = true;
                cv_.notify_all();
                cv_.wait(lk, [&] {
                    return mb->pass_gate == 0 || mb->passes + 1 <= mb->pass_gate || mb->stop ||
                           stop_all_.load() || pause_requested_.load();
                });
                s.held = false;
                return true;
            }
        }
        fail(s, fmt::format("unexpected MMIO {} at {:#x} ({} bytes): the guest has no devices",
                            run->mmio.is_write ? "write" : "read", run->mmio.phys_addr, run->mmio.len));
        return false;
    case KVM_EXIT_IO:
        if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == MVM_PORT_EXCEPTION) {
            kvm_regs r = s.vcpu.regs();
            VcpuFailure f;
            f.vector = static_cast<int>(r.rdi);
            f.error_code = r.rsi;
            f.fault_rip = r.rdx;
            f.cr2 = r.rcx;
            std::string where = fmt::format("at rip {:#x} (cs {:#x}, CPL{})", f.fault_rip, r.r8, r.r8 & 3);
            std::string reason = fmt::format("guest exception {} (vector {}) error code {:#x} {}", vector_name(f.vector),
                                             f.vector, f.error_code, where);
            if (f.vector == 14)
                reason += fmt::format(", address {:#x}", f.cr2);
            fail(s, reason, f);
            return false;
        }
        fail(s, fmt::format("unexpected port I/O: {} port {:#x} size {}", run->io.direction ? "out" : "in",
                            run->io.port, run->io.size));
        return false;
    case KVM_EXIT_DIRTY_RING_FULL:
        // The ring must be harvested and reset before this vCPU re-enters,
        // or KVM_RUN exits with DIRTY_RING_FULL again at once.
        {
            std::function<void(uint32_t)> fn;
            {
                std::lock_guard lk(ring_full_mu_);
                fn = ring_full_;
            }
            if (fn) {
                fn(s.vcpu.id());
                return true;
            }
        }
        fail(s, "KVM_EXIT_DIRTY_RING_FULL with no dirty-ring harvester attached");
        return false;
    case KVM_EXIT_HLT:
        fail(s, "guest halted (KVM_EXIT_HLT) without reporting");
        return false;
    case KVM_EXIT_SHUTDOWN:
        fail(s, "guest shut down (KVM_EXIT_SHUTDOWN: triple fault)");
        return false;
    case KVM_EXIT_SYSTEM_EVENT:
        fail(s, fmt::format("guest system event type {}", run->system_event.type));
        return false;
    case KVM_EXIT_INTERNAL_ERROR: {
        std::string data;
        for (uint32_t i = 0; i < run->internal.ndata && i < 16; i++)
            data += fmt::format(" {:#x}", run->internal.data[i]);
        fail(s, fmt::format("KVM_EXIT_INTERNAL_ERROR suberror {}{}", run->internal.suberror,
                            data.empty() ? "" : ", data:" + data));
        return false;
    }
    case KVM_EXIT_FAIL_ENTRY:
        fail(s, fmt::format("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {:#x}",
                            run->fail_entry.hardware_entry_failure_reason));
        return false;
    default:
        fail(s, fmt::format("unexpected exit {} ({})", exit_reason_name(run->exit_reason), run->exit_reason));
        return false;
    }
}

void Machine::fail(VcpuSlot& s, std::string reason, std::optional<VcpuFailure> detail)
{
    VcpuFailure f = detail.value_or(VcpuFailure{});
    f.vcpu = s.vcpu.id();
    f.reason = fmt::format("vCPU {}: {}", s.vcpu.id(), reason);
    try {
        f.register_dump = format_registers(s.vcpu.regs(), s.vcpu.sregs());
    } catch (const std::exception& e) {
        f.register_dump = fmt::format("(registers unavailable: {})", e.what());
    }
    spdlog::debug("{}", f.reason);
    {
        std::lock_guard lk(mu_);
        if (!failure_)
            failure_ = f;
    }
    // An unexpected exit stops the whole VM.
    stop_all_.store(true);
    std::lock_guard lk(mu_);
    kick_all_locked();
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
        n += s->finished;
    return n;
}

void Machine::kick_all_locked()
{
    for (auto& s : vcpus_) {
        if (s->finished || !s->thread.joinable())
            continue;
        set_immediate_exit(s->vcpu.run_struct(), 1);
        pthread_kill(s->thread.native_handle(), kKickSignal);
    }
}

void Machine::park()
{
    std::unique_lock lk(mu_);
    parked_++;
    cv_.notify_all();
    cv_.wait(lk, [&] { return !pause_requested_.load() || stop_all_.load(); });
    parked_--;
}

void Machine::pause()
{
    std::unique_lock lk(mu_);
    pause_requested_.store(true, std::memory_order_release);
    cv_.notify_all();  // vCPUs held at the pass gate go and park
    kick_all_locked();
    cv_.wait(lk, [&] { return parked_ == live_; });
}

void Machine::resume()
{
    std::lock_guard lk(mu_);
    pause_requested_.store(false, std::memory_order_release);
    cv_.notify_all();
}

void Machine::request_stop()
{
    std::lock_guard lk(mu_);
    for (uint32_t i = 0; i < vcpu_count(); i++)
        mailbox(i)->stop = 1;
    cv_.notify_all();  // vCPUs held at the pass gate
}

bool Machine::wait_finished(std::chrono::milliseconds timeout)
{
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] { return live_ == 0; });
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
            while (!cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return s->finished; }))
                kick_all_locked();
        }
        s->thread.join();
    }
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
