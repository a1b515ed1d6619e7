#include "vmm/x86/paging.hpp"

#include <cstring>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm::x86 {

namespace {
constexpr uint64_t k4K = 4096, k2M = 2ull << 20;
unsigned index(uint64_t gva, int level) { return (gva >> (12 + 9 * level)) & 511; }
}  // namespace

PageTableBuilder::PageTableBuilder(uint64_t pool_gpa, uint64_t pool_pages, std::function<uint8_t*(uint64_t)> host_of)
    : pool_gpa_(pool_gpa), pool_end_(pool_gpa + pool_pages * k4K), next_(pool_gpa), host_of_(std::move(host_of))
{
    pml4_ = alloc();
}

uint64_t PageTableBuilder::alloc()
{
    if (next_ >= pool_end_)
        throw Error(fmt::format("guest page-table pool of {} pages is exhausted", (pool_end_ - pool_gpa_) / k4K));
    uint64_t gpa = next_;
    next_ += k4K;
    std::memset(host_of_(gpa), 0, k4K);
    return gpa;
}

uint64_t* PageTableBuilder::next_level(uint64_t* entry, uint64_t flags)
{
    if (!(*entry & kPtePresent))
        *entry = alloc() | kPtePresent | kPteWrite | kPteAccessed;
    // Permissions are the AND over all levels: upper levels carry U=1 when
    // anything below is user-accessible (CPL3 runs natively only then).
    *entry |= flags & kPteUser;
    return table(*entry & kPteAddrMask);
}

void PageTableBuilder::map(uint64_t gpa, uint64_t size, uint64_t flags)
{
    const uint64_t leaf = kPtePresent | kPteAccessed | kPteDirty | flags;
    uint64_t a = gpa, end = gpa + size;
    while (a < end) {
        uint64_t* pdpt = next_level(&table(pml4_)[index(a, 3)], flags);
        uint64_t* pd = next_level(&pdpt[index(a, 2)], flags);
        uint64_t* pde = &pd[index(a, 1)];
        if (a % k2M == 0 && end - a >= k2M && !(*pde & kPtePresent)) {
            *pde = a | leaf | kPteHuge;
            a += k2M;
            continue;
        }
        if (*pde & kPteHuge)
            throw Error(fmt::format("guest mapping of {:#x} overlaps a 2 MiB page", a));
        uint64_t* pt = next_level(pde, flags);
        pt[index(a, 0)] = a | leaf;
        a += k4K;
    }
}

uint64_t PageTableBuilder::lookup(uint64_t gva, uint64_t* page_size, uint64_t* gpa) const
{
    uint64_t eff = kPteWrite | kPteUser;
    uint64_t t = pml4_;
    for (int level = 3; level >= 0; level--) {
        uint64_t e = table(t)[index(gva, level)];
        if (!(e & kPtePresent))
            return 0;
        eff &= e | ~(kPteWrite | kPteUser);
        if (level == 1 && (e & kPteHuge)) {
            if (page_size)
                *page_size = k2M;
            if (gpa)
                *gpa = (e & kPteAddrMask & ~(k2M - 1)) | (gva & (k2M - 1));
            return kPtePresent | (eff & (kPteWrite | kPteUser));
        }
        t = e & kPteAddrMask;
        if (level == 0) {
            if (page_size)
                *page_size = k4K;
            if (gpa)
                *gpa = t | (gva & (k4K - 1));
            return kPtePresent | (eff & (kPteWrite | kPteUser));
        }
    }
    return 0;
}

uint64_t PageTableBuilder::pages_needed(uint64_t top_gpa, uint64_t ranges, uint64_t pages_4k)
{
    const uint64_t gib = 1ull << 30;
    uint64_t pdpts = (top_gpa + 512 * gib - 1) / (512 * gib);
    uint64_t pds = (top_gpa + gib - 1) / gib;
    // Each range may need a 4K table at its head and tail; 4K-mapped pages need their own tables.
    uint64_t pts = 2 * ranges + (pages_4k + 511) / 512;
    return 1 + pdpts + pds + pts;
}

}  // namespace mvm::x86
