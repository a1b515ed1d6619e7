#include "vmm/stress/layout.hpp"

#include <cstring>

#include "vmm/stress/vnuma.hpp"
#include "vmm/x86/paging.hpp"

namespace mvm {

// The VM layer's plain numbers are the guest's codes.
static_assert(kMaxVnodes == MVM_MAX_VNODES);
static_assert(WorkloadConfig{}.pattern == MVM_PATTERN_SEQ && WorkloadConfig{}.fill == MVM_FILL_ZERO &&
              WorkloadConfig{}.fault == MVM_FAULT_NONE);
// fill_name() and fill_qwords() (vmm/config.cpp) spell the fills as these numbers.
static_assert(MVM_FILL_ZERO == 0 && MVM_FILL_STAMP == 1 && MVM_FILL_RANDOM == 2 && MVM_FILL_RATIO == 3 &&
              MVM_PAGE_SIZE / 8 == 512);

namespace {

constexpr uint64_t k4K = 4096, k2M = 2ull << 20, k1G = 1ull << 30;
constexpr uint64_t kKstackBytes = 2 * k4K;
constexpr uint64_t kUstackBytes = 4 * k4K;

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace

GuestLayout plan_layout(const MachineConfig& cfg)
{
    GuestLayout l;
    const uint32_t n = cfg.vcpus;
    l.idt_gpa = 0x1000;
    uint64_t a = k2M;  // bump allocation from 2 MiB; the image owns [1M, 2M)
    for (uint32_t i = 0; i < n; i++) {
        l.gdt_gpa.push_back(a);
        l.tss_gpa.push_back(a + 0x800);
        a += k4K;
    }
    // Guest RAM: one range per virtual node from 4 GiB, each 1 GiB aligned so
    // 1 GiB host pages can back it.
    uint64_t ram = MVM_RAM_GPA;
    for (const auto& node : cfg.nodes) {
        ram = align_up(ram, k1G);
        l.ram.push_back({node.id, ram, node.mem_bytes});
        ram += node.mem_bytes;
    }
    l.pt_pool_gpa = a;
    // The system slot is mapped with 4 KiB pages (per-page U/S); bound it generously.
    uint64_t sys_estimate = a + n * (kKstackBytes + kUstackBytes + 2 * k4K) + 64 * k4K + k2M;
    l.pt_pool_pages = x86::PageTableBuilder::pages_needed(ram, cfg.nodes.size() + 3, sys_estimate / k4K) + 8;
    a += l.pt_pool_pages * k4K;
    for (uint32_t i = 0; i < n; i++) {
        a += kKstackBytes;
        l.kstack_top.push_back(a);
    }
    l.kernel_area_end = a;
    // Everything below is CPL3-visible.
    l.boot_params_gpa = a;
    l.boot_params_bytes = align_up(sizeof(mvm_boot_params) + n * sizeof(mvm_vcpu_params), k4K);
    a += l.boot_params_bytes;
    for (uint32_t i = 0; i < n; i++) {
        l.mailbox_gpa.push_back(a);
        a += k4K;
    }
    for (uint32_t i = 0; i < n; i++) {
        a += kUstackBytes;
        l.ustack_top.push_back(a - 8);  // SysV: rsp+8 is 16-byte aligned at function entry
    }
    l.system_bytes = align_up(a, k2M);
    return l;
}

void write_boot_params(const MachineConfig& cfg, const GuestLayout& layout, mvm_boot_params* bp)
{
    std::memset(bp, 0, layout.boot_params_bytes);
    bp->magic = MVM_BOOT_MAGIC;
    bp->abi_version = MVM_ABI_VERSION;
    bp->nr_vcpus = cfg.vcpus;
    const WorkloadConfig& w = cfg.workload;
    bp->pattern = w.pattern;
    bp->fill = w.fill;
    bp->fill_qwords = fill_qwords(w);
    bp->write_pct = w.write_pct;
    bp->max_passes = w.max_passes;
    bp->seed = w.seed;
    bp->vm_tag = w.vm_tag;
    write_vnuma_table(cfg, layout, bp);
    for (uint32_t v = 0; v < cfg.vcpus; v++) {
        mvm_vcpu_params& vp = bp->vcpu[v];
        vp.vcpu_id = v;
        vp.mailbox_gpa = layout.mailbox_gpa[v];
        vp.user_stack_top = layout.ustack_top[v];
        vp.fault = (static_cast<int>(v) == w.fault_vcpu) ? w.fault : static_cast<uint32_t>(MVM_FAULT_NONE);
    }
}

}  // namespace mvm
