#include "vmm/stress/long_mode.hpp"

#include <cstring>

#include "guest/abi.h"

namespace mvm::x86 {

namespace {
void put64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

kvm_segment flat_segment(uint16_t selector, uint8_t type, bool code, uint8_t dpl)
{
    kvm_segment s{};
    s.base = 0;
    s.limit = 0xffffffff;
    s.selector = selector;
    s.type = type;
    s.present = 1;
    s.dpl = dpl;
    s.s = 1;
    s.g = 1;
    s.l = code ? 1 : 0;
    s.db = code ? 0 : 1;
    return s;
}
}  // namespace

void write_gdt(uint8_t* gdt, uint64_t tss_gpa)
{
    std::memset(gdt, 0, kGdtBytes);
    put64(gdt + MVM_SEL_KCODE, 0x00af9b000000ffffull);  // 64-bit code, DPL0
    put64(gdt + MVM_SEL_KDATA, 0x00cf93000000ffffull);  // data, DPL0
    put64(gdt + 0x18, 0x00cffb000000ffffull);           // 32-bit user code (SYSRET layout)
    put64(gdt + MVM_SEL_UDATA, 0x00cff3000000ffffull);  // data, DPL3
    put64(gdt + MVM_SEL_UCODE, 0x00affb000000ffffull);  // 64-bit code, DPL3
    // 64-bit available TSS: 16-byte system descriptor.
    uint64_t limit = kTssBytes - 1;
    uint64_t lo = (limit & 0xffff) | ((tss_gpa & 0xffffff) << 16) | (0x89ull << 40) | (((limit >> 16) & 0xf) << 48) |
                  (((tss_gpa >> 24) & 0xff) << 56);
    put64(gdt + MVM_SEL_TSS, lo);
    put64(gdt + MVM_SEL_TSS + 8, tss_gpa >> 32);
}

void write_tss(uint8_t* tss, uint64_t rsp0)
{
    std::memset(tss, 0, kTssBytes);
    put64(tss + 4, rsp0);
    uint16_t iomap = kTssBytes;  // no I/O bitmap: IOPL=3 decides
    std::memcpy(tss + 0x66, &iomap, 2);
}

void write_idt_gate(uint8_t* idt, unsigned vector, uint64_t h, unsigned dpl)
{
    uint8_t* e = idt + vector * kIdtEntryBytes;
    uint64_t type = 0x8e | (uint64_t{dpl & 3} << 5);  // present, interrupt gate
    uint64_t lo = (h & 0xffff) | (uint64_t{MVM_SEL_KCODE} << 16) | (type << 40) | (((h >> 16) & 0xffff) << 48);
    put64(e, lo);
    put64(e + 8, h >> 32);
}

void setup_long_mode_sregs(kvm_sregs& s, const LongModeTables& t)
{
    s.cs = flat_segment(MVM_SEL_KCODE, 0xb, true, 0);
    s.ds = s.es = s.fs = s.gs = s.ss = flat_segment(MVM_SEL_KDATA, 0x3, false, 0);
    s.tr = kvm_segment{};
    s.tr.base = t.tss_gpa;
    s.tr.limit = kTssBytes - 1;
    s.tr.selector = MVM_SEL_TSS;
    s.tr.type = 0xb;  // busy 64-bit TSS
    s.tr.present = 1;
    s.ldt = kvm_segment{};
    s.ldt.type = 0x2;
    s.ldt.unusable = 1;
    s.gdt.base = t.gdt_gpa;
    s.gdt.limit = kGdtBytes - 1;
    s.idt.base = t.idt_gpa;
    s.idt.limit = static_cast<uint16_t>(t.idt_entries * kIdtEntryBytes - 1);
    s.cr0 = kCr0Pe | kCr0Mp | kCr0Et | kCr0Ne | kCr0Wp | kCr0Am | kCr0Pg;
    s.cr3 = t.cr3;
    s.cr4 = kCr4Pae | kCr4Osfxsr | kCr4Osxmmexcpt;
    s.efer = kEferLme | kEferLma;
}

}  // namespace mvm::x86
