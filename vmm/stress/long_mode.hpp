// vmm/stress/long_mode.hpp - descriptor tables and the register state that puts
// a vCPU straight into 64-bit mode at CPL0, as firmware would leave it.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace mvm::x86 {

constexpr uint64_t kCr0Pe = 1ull << 0, kCr0Mp = 1ull << 1, kCr0Et = 1ull << 4, kCr0Ne = 1ull << 5,
                   kCr0Wp = 1ull << 16, kCr0Am = 1ull << 18, kCr0Pg = 1ull << 31;
constexpr uint64_t kCr4Pae = 1ull << 5, kCr4Osfxsr = 1ull << 9, kCr4Osxmmexcpt = 1ull << 10;
constexpr uint64_t kEferLme = 1ull << 8, kEferLma = 1ull << 10;
constexpr uint64_t kRflagsReserved = 1ull << 1, kRflagsIopl3 = 3ull << 12;

constexpr uint32_t kGdtBytes = 0x40;  // null, kcode, kdata, ucode32, udata, ucode64, tss(16)
constexpr uint32_t kTssBytes = 0x68;
constexpr uint32_t kIdtEntryBytes = 16;

// Writes the GDT (kGdtBytes) for a vCPU whose TSS is at tss_gpa.
void write_gdt(uint8_t* gdt, uint64_t tss_gpa);
// Writes a 64-bit TSS whose RSP0 (stack on entry from CPL3) is rsp0.
void write_tss(uint8_t* tss, uint64_t rsp0);
// Writes one 64-bit interrupt gate (kernel CS) for `vector` to `idt`.
void write_idt_gate(uint8_t* idt, unsigned vector, uint64_t handler, unsigned dpl = 0);

struct LongModeTables {
    uint64_t gdt_gpa, tss_gpa, idt_gpa;
    uint32_t idt_entries;
    uint64_t cr3;
};
// Long mode at CPL0 with flat segments and paging on.
void setup_long_mode_sregs(kvm_sregs& s, const LongModeTables& t);

}  // namespace mvm::x86
