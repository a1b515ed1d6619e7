#include "vmm/stress/stress_vm.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fmt/format.h>
#include <thread>
#include <unistd.h>

#include "base/error.hpp"
#include "vmm/stress/guest_image.hpp"
#include "vmm/stress/long_mode.hpp"
#include "vmm/x86/paging.hpp"

namespace mvm {

namespace {

constexpr uint64_t k4K = 4096, k2M = 2ull << 20;

const char* vector_name(int v)
{
    static const char* names[] = {"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS",
                                  "#NP", "#SS", "#GP", "#PF", "?",   "#MF", "#AC", "#MC", "#XM", "#VE", "#CP"};
    return v >= 0 && v < static_cast<int>(std::size(names)) ? names[v] : "?";
}

}  // namespace

namespace {

// Gives the VM a stamp tag of its own unless the caller chose one (a
// migration destination continues its source's): different for every VM of
// this process and, very likely, of other processes.
MachineConfig with_vm_tag(MachineConfig cfg)
{
    static std::atomic<uint32_t> next{0};
    if (cfg.workload.vm_tag == 0) {
        const uint32_t salt = static_cast<uint32_t>(getpid()) * 40503u;
        cfg.workload.vm_tag = (salt + next.fetch_add(1)) % 255 + 1;
    }
    return cfg;
}

}  // namespace

StressVm::StressVm(const Kvm& kvm, MachineConfig cfg) : StressVm(kvm, with_vm_tag(cfg), plan_layout(cfg)) {}

StressVm::StressVm(const Kvm& kvm, MachineConfig cfg, GuestLayout layout)
    : Machine(kvm, std::move(cfg), memory_plan(layout)), layout_(std::move(layout))
{
    static_assert(sizeof(mvm_mailbox) <= 4096);
    if (!tsc_khz())
        throw Unsupported("this host's KVM lacks KVM_CAP_GET_TSC_KHZ (needed to time the guest)");
    load_guest();
    attach_protocol();
}

MemoryPlan StressVm::memory_plan(const GuestLayout& layout)
{
    MemoryPlan p;
    p.system_bytes = layout.system_bytes;
    for (const auto& r : layout.ram)
        p.node_gpa.push_back(r.gpa);
    return p;
}

// Copies the image, builds page tables, descriptor tables and boot
// parameters, and points every vCPU at the kernel entry in 64-bit mode.
void StressVm::load_guest()
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
    const MachineConfig& cfg = config();
    auto* bp = reinterpret_cast<mvm_boot_params*>(host_ptr(layout_.boot_params_gpa, layout_.boot_params_bytes));
    write_boot_params(cfg, layout_, bp);
    const WorkloadConfig& w = cfg.workload;
    bp->tsc_khz = tsc_khz();
    bp->watchdog_threshold_tsc = static_cast<uint64_t>(w.watchdog_ms * static_cast<double>(tsc_khz()));
    for (uint32_t v = 0; v < cfg.vcpus; v++) {
        auto* mb = mailbox(v);
        std::memset(mb, 0, k4K);
        mb->magic = MVM_MAILBOX_MAGIC;
        mb->vcpu_id = v;
        mb->rate_pages_per_s = w.rate_pages_per_s;
        mb->tsc_per_page_q16 = w.rate_pages_per_s ? (tsc_khz() * 1000ull << 16) / w.rate_pages_per_s : 0;
        x86::write_gdt(host_ptr(layout_.gdt_gpa[v], x86::kGdtBytes), layout_.tss_gpa[v]);
        x86::write_tss(host_ptr(layout_.tss_gpa[v], x86::kTssBytes), layout_.kstack_top[v]);
    }
    set_vcpu_registers(pt.cr3());
    // The host keeps its own copy: the guest (or a migration stream) can
    // rewrite guest memory, and host code must not index by what it finds.
    const auto* raw = reinterpret_cast<const uint8_t*>(bp);
    boot_params_host_.assign(raw, raw + layout_.boot_params_bytes);
}

// Every vCPU in 64-bit mode at CPL0 at the kernel entry, its arguments in
// registers: boot parameters, its own parameters, mailbox, user stack, user entry.
void StressVm::set_vcpu_registers(uint64_t cr3)
{
    const auto& hdr = guest_image_header();
    for (uint32_t v = 0; v < vcpu_count(); v++) {
        Vcpu& vcpu = this->vcpu(v);
        kvm_sregs s = vcpu.sregs();
        x86::setup_long_mode_sregs(s, {layout_.gdt_gpa[v], layout_.tss_gpa[v], layout_.idt_gpa, hdr.nr_exceptions, cr3});
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
    }
}

void StressVm::attach_protocol()
{
    on_mmio_write(MVM_DOORBELL_GPA, [this](uint32_t vcpu, uint64_t v) { return on_doorbell(vcpu, v); });
    on_port_out(MVM_PORT_EXCEPTION, [this](uint32_t vcpu) { return on_exception(vcpu); });
}

ExitAction StressVm::on_doorbell(uint32_t vcpu, uint64_t value)
{
    const mvm_mailbox* mb = mailbox(vcpu);
    switch (value >> 32) {
    case MVM_DOORBELL_DONE:
        return ExitAction::Stop;  // the workload finished
    case MVM_DOORBELL_PARK:
        hold(vcpu, [mb] { return mb->park == 0 || mb->stop; });
        return ExitAction::Continue;
    case MVM_DOORBELL_GATE:
        // Held until its next pass may start (or it must stop or park);
        // the guest re-checks on return.
        hold(vcpu, [mb] { return mb->pass_gate == 0 || mb->passes + 1 <= mb->pass_gate || mb->stop; });
        return ExitAction::Continue;
    default:
        fail_vcpu(vcpu, fmt::format("unexpected MMIO write at {:#x} (8 bytes): the guest has no devices",
                                    static_cast<uint64_t>(MVM_DOORBELL_GPA)));
        return ExitAction::Stop;
    }
}

// The CPL0 exception stub reports vector, error code, rip, cr2 and cs in registers.
ExitAction StressVm::on_exception(uint32_t vcpu)
{
    kvm_regs r = this->vcpu(vcpu).regs();
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
    fail_vcpu(vcpu, reason, f);
    return ExitAction::Stop;
}

mvm_mailbox* StressVm::mailbox(uint32_t i) const
{
    return reinterpret_cast<mvm_mailbox*>(host_ptr(layout_.mailbox_gpa.at(i), k4K));
}

MailboxSnapshot StressVm::snapshot(uint32_t i) const { return read_mailbox(*mailbox(i)); }

const mvm_boot_params* StressVm::boot_params() const
{
    return reinterpret_cast<const mvm_boot_params*>(boot_params_host_.data());
}

void StressVm::adopt_guest_vm_tag()
{
    const auto* guest = reinterpret_cast<const mvm_boot_params*>(host_ptr(layout_.boot_params_gpa, sizeof(mvm_boot_params)));
    reinterpret_cast<mvm_boot_params*>(boot_params_host_.data())->vm_tag = guest->vm_tag;
}

std::string StressVm::guest_boot_params_difference() const
{
    return boot_params_difference(
        {host_ptr(layout_.boot_params_gpa, layout_.boot_params_bytes), layout_.boot_params_bytes}, boot_params_host_);
}

void StressVm::set_rate(uint32_t vcpu, uint64_t pages_per_s)
{
    mvm_mailbox* mb = mailbox(vcpu);
    mb->tsc_per_page_q16 = pages_per_s ? (tsc_khz() * 1000ull << 16) / pages_per_s : 0;
    mb->rate_pages_per_s = pages_per_s;
    mb->control_seq = mb->control_seq + 1;
}

void StressVm::set_throttle(uint32_t vcpu, uint32_t pct)
{
    mvm_mailbox* mb = mailbox(vcpu);
    mb->throttle_pct = std::min<uint32_t>(pct, 99);
    mb->control_seq = mb->control_seq + 1;
}

void StressVm::set_pass_gate(uint64_t gate)
{
    wake_held([&] {
        for (uint32_t i = 0; i < vcpu_count(); i++)
            mailbox(i)->pass_gate = gate;
    });
}

void StressVm::request_stop()
{
    wake_held([&] {
        for (uint32_t i = 0; i < vcpu_count(); i++)
            mailbox(i)->stop = 1;
    });
}

bool StressVm::park_guests(std::chrono::milliseconds timeout)
{
    wake_held([&] {
        for (uint32_t i = 0; i < vcpu_count(); i++)
            mailbox(i)->park = 1;
    });
    return wait_all_held(timeout);
}

void StressVm::unpark_guests()
{
    wake_held([&] {
        for (uint32_t i = 0; i < vcpu_count(); i++)
            mailbox(i)->park = 0;
    });
}

bool StressVm::wait_first_pass(std::chrono::milliseconds timeout)
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

}  // namespace mvm
