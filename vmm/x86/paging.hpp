// vmm/x86/paging.hpp - builds x86-64 4-level page tables in guest memory, as
// a hardware VMM must before entering long mode. Identity maps (GVA == GPA);
// 2 MiB pages where a range allows, 4 KiB elsewhere.
#pragma once

#include <cstdint>
#include <functional>

namespace mvm::x86 {

constexpr uint64_t kPtePresent = 1ull << 0;
constexpr uint64_t kPteWrite = 1ull << 1;
constexpr uint64_t kPteUser = 1ull << 2;
constexpr uint64_t kPteAccessed = 1ull << 5;
constexpr uint64_t kPteDirty = 1ull << 6;
constexpr uint64_t kPteHuge = 1ull << 7;
constexpr uint64_t kPteAddrMask = 0x000ffffffffff000ull;

class PageTableBuilder {
public:
    // Table pages are taken from [pool_gpa, pool_gpa + pool_pages * 4K);
    // `host_of` turns a GPA inside the pool into a host pointer.
    PageTableBuilder(uint64_t pool_gpa, uint64_t pool_pages, std::function<uint8_t*(uint64_t)> host_of);

    uint64_t cr3() const { return pml4_; }
    // Identity-map [gpa, gpa + size) with `flags` (kPteWrite | kPteUser ...).
    void map(uint64_t gpa, uint64_t size, uint64_t flags);
    // Walks the tables like the MMU: the PTE flags that apply to `gva`, or 0
    // if it is not mapped. *page_size gets 4K or 2M.
    uint64_t lookup(uint64_t gva, uint64_t* page_size = nullptr, uint64_t* gpa = nullptr) const;
    uint64_t pages_used() const { return (next_ - pool_gpa_) >> 12; }

    // Upper bound of table pages needed to map `bytes` split into `ranges`
    // ranges below `top_gpa`.
    static uint64_t pages_needed(uint64_t top_gpa, uint64_t ranges, uint64_t pages_4k);

private:
    uint64_t alloc();
    uint64_t* table(uint64_t gpa) const { return reinterpret_cast<uint64_t*>(host_of_(gpa)); }
    uint64_t* next_level(uint64_t* entry, uint64_t flags);

    uint64_t pool_gpa_, pool_end_, next_;
    std::function<uint8_t*(uint64_t)> host_of_;
    uint64_t pml4_;
};

}  // namespace mvm::x86
