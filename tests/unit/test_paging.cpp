// Unit tests for vmm/x86/paging.hpp: the 4-level identity-map builder,
// exercised on a plain host buffer standing in for the guest's table pool.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "guest/abi.h"
#include "vmm/config.hpp"
#include "vmm/stress/guest_image.hpp"
#include "base/error.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/x86/paging.hpp"

using ::testing::HasSubstr;

namespace mvm::x86 {
namespace {

constexpr uint64_t k4K = 4096, k2M = 2ull << 20, k1G = 1ull << 30;
constexpr uint64_t kRW = kPteWrite, kUser = kPteUser, kUserRW = kPteUser | kPteWrite;

// A table pool at `pool_gpa` backed by a vector; host_of refuses GPAs outside
// it so a stray table write fails the test instead of corrupting memory.
struct Pool {
    uint64_t gpa;
    uint64_t pages;
    std::vector<uint8_t> mem;
    Pool(uint64_t gpa_, uint64_t pages_) : gpa(gpa_), pages(pages_), mem(pages_ * k4K, 0xcc) {}
    uint8_t* host_of(uint64_t a)
    {
        if (a < gpa || a + k4K > gpa + pages * k4K || a % k4K)
            throw std::out_of_range("table page outside the pool");
        return mem.data() + (a - gpa);
    }
    PageTableBuilder builder()
    {
        return PageTableBuilder(gpa, pages, [this](uint64_t a) { return host_of(a); });
    }
    uint64_t* table(uint64_t table_gpa) { return reinterpret_cast<uint64_t*>(host_of(table_gpa)); }
};

struct Walk {
    uint64_t flags, page_size, gpa;
};
Walk walk(const PageTableBuilder& pt, uint64_t gva)
{
    Walk w{0, 0, 0};
    w.flags = pt.lookup(gva, &w.page_size, &w.gpa);
    return w;
}

TEST(Paging, FreshBuilderHasOnlyAZeroedPml4)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    EXPECT_EQ(pt.cr3(), 0x10000u);
    EXPECT_EQ(pt.pages_used(), 1u);
    const uint64_t* pml4 = pool.table(pt.cr3());
    for (int i = 0; i < 512; i++)
        ASSERT_EQ(pml4[i], 0u) << "PML4 entry " << i << " not cleared";
    EXPECT_EQ(pt.lookup(0), 0u);
    EXPECT_EQ(pt.lookup(0x10000), 0u);
    EXPECT_EQ(pt.lookup(4 * k1G), 0u);
}

TEST(Paging, KernelPageIs4KAndSupervisorOnly)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(0x1000, k4K, 0);
    Walk w = walk(pt, 0x1234);
    EXPECT_EQ(w.flags, kPtePresent);
    EXPECT_EQ(w.page_size, k4K);
    EXPECT_EQ(w.gpa, 0x1234u);
    EXPECT_EQ(pt.lookup(0x1fff), kPtePresent);
    EXPECT_EQ(pt.lookup(0x0fff), 0u);
    EXPECT_EQ(pt.lookup(0x2000), 0u);
    EXPECT_EQ(pt.pages_used(), 4u);  // PML4, PDPT, PD, PT
}

TEST(Paging, FlagCombinations)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(0x1000, k4K, 0);
    pt.map(0x2000, k4K, kRW);
    pt.map(0x3000, k4K, kUser);
    pt.map(0x4000, k4K, kUserRW);
    EXPECT_EQ(pt.lookup(0x1000), kPtePresent);
    EXPECT_EQ(pt.lookup(0x2000), kPtePresent | kPteWrite);
    EXPECT_EQ(pt.lookup(0x3000), kPtePresent | kPteUser);
    EXPECT_EQ(pt.lookup(0x4000), kPtePresent | kPteWrite | kPteUser);
    EXPECT_EQ(pt.pages_used(), 4u);  // all four share one PT
}

TEST(Paging, UserBitOnlyWhereMappedUser)
{
    // A kernel page right next to a user page shares the PT (whose PDE must
    // then carry U=1); the kernel page must still come out supervisor-only.
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(0x5000, k4K, kRW);       // kernel
    pt.map(0x6000, k4K, kUserRW);   // user, same PT
    pt.map(0x7000, k4K, kRW);       // kernel again, after the user page
    EXPECT_EQ(pt.lookup(0x5000), kPtePresent | kPteWrite);
    EXPECT_EQ(pt.lookup(0x6000), kPtePresent | kPteWrite | kPteUser);
    EXPECT_EQ(pt.lookup(0x7000), kPtePresent | kPteWrite);
    EXPECT_EQ(pt.lookup(0x6fff) & kPteUser, kPteUser);
    EXPECT_EQ(pt.lookup(0x7000) & kPteUser, 0u);
    EXPECT_EQ(pt.lookup(0x4fff), 0u);
}

TEST(Paging, UpperLevelsCarryUserOnlyWhenSomethingBelowIsUser)
{
    Pool pool(0x10000, 16);
    PageTableBuilder pt = pool.builder();
    pt.map(0x1000, k4K, kRW);  // kernel-only: no level may have U=1
    const uint64_t* pml4 = pool.table(pt.cr3());
    EXPECT_EQ(pml4[0] & kPteUser, 0u);
    const uint64_t* pdpt = pool.table(pml4[0] & kPteAddrMask);
    EXPECT_EQ(pdpt[0] & kPteUser, 0u);
    const uint64_t* pd = pool.table(pdpt[0] & kPteAddrMask);
    EXPECT_EQ(pd[0] & kPteUser, 0u);
    EXPECT_FALSE(pd[0] & kPteHuge);

    pt.map(0x2000, k4K, kUser);  // now the whole path to 0x2000 needs U=1
    EXPECT_EQ(pml4[0] & kPteUser, kPteUser);
    EXPECT_EQ(pdpt[0] & kPteUser, kPteUser);
    EXPECT_EQ(pd[0] & kPteUser, kPteUser);
    const uint64_t* ptab = pool.table(pd[0] & kPteAddrMask);
    EXPECT_EQ(ptab[1] & kPteUser, 0u);  // 0x1000 leaf stays supervisor
    EXPECT_EQ(ptab[2] & kPteUser, kPteUser);
}

TEST(Paging, LookupAndsPermissionsOverAllLevels)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(0x3000, k4K, kUserRW);
    ASSERT_EQ(pt.lookup(0x3000), kPtePresent | kPteWrite | kPteUser);
    uint64_t* pml4 = pool.table(pt.cr3());
    uint64_t* pdpt = pool.table(pml4[0] & kPteAddrMask);
    pml4[0] &= ~kPteUser;  // clearing U at the top hides the leaf's U
    EXPECT_EQ(pt.lookup(0x3000), kPtePresent | kPteWrite);
    pml4[0] |= kPteUser;
    pdpt[0] &= ~kPteWrite;  // clearing W in the middle makes it read-only
    EXPECT_EQ(pt.lookup(0x3000), kPtePresent | kPteUser);
    pdpt[0] &= ~kPtePresent;  // a non-present middle level unmaps it
    EXPECT_EQ(pt.lookup(0x3000), 0u);
}

TEST(Paging, AlignedRangesUse2MPages)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(k2M, 2 * k2M, kRW);  // [2M, 6M)
    for (uint64_t gva : {k2M, k2M + 0x1234, 2 * k2M - 1, 2 * k2M, 3 * k2M - 8}) {
        Walk w = walk(pt, gva);
        EXPECT_EQ(w.flags, kPtePresent | kPteWrite) << std::hex << gva;
        EXPECT_EQ(w.page_size, k2M) << std::hex << gva;
        EXPECT_EQ(w.gpa, gva) << std::hex << gva;
    }
    EXPECT_EQ(pt.lookup(k2M - 1), 0u);
    EXPECT_EQ(pt.lookup(3 * k2M), 0u);
    EXPECT_EQ(pt.pages_used(), 3u) << "2 MiB pages need no page table";
    const uint64_t* pml4 = pool.table(pt.cr3());
    const uint64_t* pdpt = pool.table(pml4[0] & kPteAddrMask);
    const uint64_t* pd = pool.table(pdpt[0] & kPteAddrMask);
    EXPECT_TRUE(pd[1] & kPteHuge);
    EXPECT_EQ(pd[1] & kPteAddrMask, k2M);
}

TEST(Paging, UnalignedRangeUses4KAtHeadAndTail)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    // [2M - 4K, 6M + 8K): one 4K head page, two 2M pages, two 4K tail pages.
    pt.map(k2M - k4K, 2 * k2M + 3 * k4K, kUserRW);
    EXPECT_EQ(walk(pt, k2M - k4K).page_size, k4K);
    EXPECT_EQ(walk(pt, k2M).page_size, k2M);
    EXPECT_EQ(walk(pt, 2 * k2M).page_size, k2M);
    EXPECT_EQ(walk(pt, 3 * k2M).page_size, k4K);
    EXPECT_EQ(walk(pt, 3 * k2M + k4K).page_size, k4K);
    EXPECT_EQ(pt.lookup(3 * k2M + 2 * k4K), 0u);
    EXPECT_EQ(pt.lookup(k2M - 2 * k4K), 0u);
    for (uint64_t gva = k2M - k4K; gva < 3 * k2M + 2 * k4K; gva += k4K) {
        Walk w = walk(pt, gva + 8);
        ASSERT_EQ(w.flags, kPtePresent | kPteWrite | kPteUser) << std::hex << gva;
        ASSERT_EQ(w.gpa, gva + 8) << std::hex << gva;
    }
    EXPECT_EQ(pt.pages_used(), 5u);  // PML4, PDPT, PD, head PT, tail PT
}

TEST(Paging, RangeShorterThan2MAtAlignedAddressUses4K)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(k2M, k2M - k4K, kRW);
    EXPECT_EQ(walk(pt, k2M).page_size, k4K);
    EXPECT_EQ(walk(pt, 2 * k2M - 2 * k4K).page_size, k4K);
    EXPECT_EQ(pt.lookup(2 * k2M - k4K), 0u);
}

TEST(Paging, PartialPageSizeRoundsUpToAPage)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(0x1000, 100, kRW);
    EXPECT_EQ(pt.lookup(0x1000), kPtePresent | kPteWrite);
    EXPECT_EQ(pt.lookup(0x1fff), kPtePresent | kPteWrite);
    EXPECT_EQ(pt.lookup(0x2000), 0u);
}

TEST(Paging, ZeroSizeMapsNothing)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(0x1000, 0, kRW);
    EXPECT_EQ(pt.lookup(0x1000), 0u);
    EXPECT_EQ(pt.pages_used(), 1u);
}

TEST(Paging, MixedPermissionsInsideOne2MRegionStay4K)
{
    // A 2M-aligned region whose first page is kernel and the rest user: the
    // rest must not be promoted to a 2M page over the kernel page.
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(k2M, k4K, 0);
    pt.map(k2M + k4K, k2M - k4K, kUserRW);
    Walk first = walk(pt, k2M), rest = walk(pt, k2M + k4K), last = walk(pt, 2 * k2M - 1);
    EXPECT_EQ(first.flags, kPtePresent);
    EXPECT_EQ(first.page_size, k4K);
    EXPECT_EQ(rest.flags, kPtePresent | kPteWrite | kPteUser);
    EXPECT_EQ(rest.page_size, k4K);
    EXPECT_EQ(last.flags, kPtePresent | kPteWrite | kPteUser);
}

TEST(Paging, A2MPageNeverReplacesAnExistingPageTable)
{
    // The 4K kernel page at 2M+4K is mapped first; a later aligned 2M range
    // over it must go through the existing table, not drop it for a 2M page.
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(k2M + k4K, k4K, 0);
    pt.map(k2M, k2M, kUserRW);
    Walk w = walk(pt, k2M);
    EXPECT_EQ(w.page_size, k4K);
    EXPECT_EQ(w.flags, kPtePresent | kPteWrite | kPteUser);
    EXPECT_EQ(walk(pt, 2 * k2M - 1).page_size, k4K);
    EXPECT_EQ(pt.pages_used(), 4u);
}

TEST(Paging, FourKInsideExisting2MPageThrows)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(k2M, k2M, kRW);
    try {
        pt.map(k2M + k4K, k4K, kUser);
        FAIL() << "mapping a 4K page inside a 2M page was accepted";
    } catch (const Error& e) {
        EXPECT_THAT(e.what(), HasSubstr("0x201000"));
    }
    EXPECT_THROW(pt.map(k2M, k2M, kUserRW), Error);  // the same 2M page again
    EXPECT_EQ(pt.lookup(k2M + k4K), kPtePresent | kPteWrite) << "the 2M page must be untouched";
}

TEST(Paging, HighAddressesAndSeparatePml4Slots)
{
    Pool pool(0x10000, 16);
    PageTableBuilder pt = pool.builder();
    pt.map(4 * k1G, k1G, kUserRW);  // guest RAM at 4 GiB: all 2M pages, one PD
    EXPECT_EQ(pt.pages_used(), 3u);
    Walk w = walk(pt, 5 * k1G - 1);
    EXPECT_EQ(w.page_size, k2M);
    EXPECT_EQ(w.gpa, 5 * k1G - 1);
    EXPECT_EQ(pt.lookup(5 * k1G), 0u);
    EXPECT_EQ(pt.lookup(4 * k1G - 1), 0u);

    const uint64_t t512 = 512 * k1G;  // PML4 slot 1
    pt.map(t512, k2M, kRW);
    EXPECT_EQ(pt.pages_used(), 5u);  // + PDPT + PD
    EXPECT_EQ(walk(pt, t512 + 5).gpa, t512 + 5);
    EXPECT_EQ(pt.lookup(t512), kPtePresent | kPteWrite);
    EXPECT_EQ(pt.lookup(0), 0u);  // PML4 slot 0 offset 0 still unmapped

    const uint64_t top = (1ull << 47) - k2M;  // last 2M of the lower canonical half
    pt.map(top, k2M, kRW);
    EXPECT_EQ(walk(pt, top + k2M - 1).gpa, top + k2M - 1);
}

TEST(Paging, LookupWithoutOutParameters)
{
    Pool pool(0x10000, 8);
    PageTableBuilder pt = pool.builder();
    pt.map(0, k2M, kRW);
    pt.map(k2M, k4K, kRW);
    EXPECT_EQ(pt.lookup(0x100), kPtePresent | kPteWrite);
    EXPECT_EQ(pt.lookup(k2M), kPtePresent | kPteWrite);
}

TEST(Paging, PoolExhaustionThrows)
{
    Pool pool(0x10000, 3);  // room for PML4, PDPT and PD only
    PageTableBuilder pt = pool.builder();
    EXPECT_NO_THROW(pt.map(0, k2M, kRW));  // 2M page: no PT needed
    try {
        pt.map(k2M, k4K, kRW);  // needs a PT
        FAIL() << "the pool of 3 pages did not run out";
    } catch (const Error& e) {
        EXPECT_THAT(e.what(), HasSubstr("exhausted"));
    }
    EXPECT_EQ(pt.pages_used(), 3u);
}

TEST(Paging, PoolOfOnePageOnlyHoldsThePml4)
{
    Pool pool(0x10000, 1);
    PageTableBuilder pt = pool.builder();
    EXPECT_THROW(pt.map(0, k4K, kRW), Error);
    EXPECT_THROW(Pool(0x10000, 0).builder(), Error);
}

// Walks every page of [gpa, gpa+size) and counts the 4K leaves.
uint64_t count_4k_leaves(const PageTableBuilder& pt, uint64_t gpa, uint64_t size)
{
    uint64_t n = 0;
    for (uint64_t a = gpa & ~(k4K - 1); a < gpa + size;) {
        uint64_t ps = 0;
        EXPECT_NE(pt.lookup(a, &ps), 0u) << std::hex << a << " not mapped";
        if (ps == 0)
            return n;
        if (ps == k4K)
            n++;
        a = (a & ~(ps - 1)) + ps;
    }
    return n;
}

struct Range {
    uint64_t gpa, size, flags;
};

TEST(PagesNeeded, IsAnUpperBoundForSyntheticLayouts)
{
    const std::vector<std::vector<Range>> layouts = {
        // The shape plan_layout() produces: IDT, image (kernel + user part),
        // kernel area, boot params, user area, per-node RAM, doorbell.
        {{0x1000, k4K, 0},
         {0x100000, 0x3000, 0},
         {0x103000, 0x5000, kUser},
         {k2M, 0x52000, kRW},
         {k2M + 0x52000, 0x2000, kUser},
         {k2M + 0x54000, k2M - 0x54000, kUserRW},
         {4 * k1G, k1G, kUserRW},
         {5 * k1G, k1G + k2M, kUserRW},
         {MVM_DOORBELL_GPA, k4K, kUserRW}},
        // Misaligned everything: every range has a 4K head and tail.
        {{0x3000, 5 * k2M, kRW},
         {0x40000000 + 0x7000, 3 * k2M + k4K, kUserRW},
         {0x80000000 - k4K, 2 * k4K, kUser},
         {0x100000000 + k4K, 1, kRW}},
        // Many small ranges in different GiBs.
        {{0, k4K, 0}, {k1G, k4K, kRW}, {2 * k1G, k4K, kUser}, {3 * k1G, k4K, kUserRW}, {7 * k1G + k4K, k4K, kRW}},
        // Ranges that each straddle a 2M boundary: two page tables apiece.
        {{0 * 4 * k2M + k2M - k4K, 2 * k4K, kRW},
         {1 * 4 * k2M + k2M - k4K, 2 * k4K, kRW},
         {2 * 4 * k2M + k2M - k4K, 2 * k4K, kUser},
         {3 * 4 * k2M + k2M - k4K, 2 * k4K, kRW},
         {4 * 4 * k2M + k2M - k4K, 2 * k4K, kUserRW},
         {5 * 4 * k2M + k2M - k4K, 2 * k4K, kRW},
         {6 * 4 * k2M + k2M - k4K, 2 * k4K, kRW},
         {7 * 4 * k2M + k2M - k4K, 2 * k4K, kRW},
         {8 * 4 * k2M + k2M - k4K, 2 * k4K, kRW},
         {9 * 4 * k2M + k2M - k4K, 2 * k4K, kRW}},
        // Large RAM with non-1G-aligned node boundaries.
        {{0, 3 * k2M + 12 * k4K, kRW}, {4 * k1G, 3 * k1G + 6 * k2M, kUserRW}, {8 * k1G, 17 * k1G, kUserRW}},
    };
    for (size_t li = 0; li < layouts.size(); li++) {
        const auto& ranges = layouts[li];
        uint64_t top = 0;
        for (const Range& r : ranges)
            top = std::max(top, r.gpa + r.size);
        Pool pool(64ull << 30, 2048);  // pool far above the layout; big enough not to run out
        PageTableBuilder pt = pool.builder();
        for (const Range& r : ranges)
            pt.map(r.gpa, r.size, r.flags);
        uint64_t leaves_4k = 0;
        for (const Range& r : ranges)
            leaves_4k += count_4k_leaves(pt, r.gpa, r.size);
        uint64_t bound = PageTableBuilder::pages_needed(top, ranges.size(), leaves_4k);
        EXPECT_LE(pt.pages_used(), bound) << "layout " << li << ": " << leaves_4k << " 4K leaves";
        // And a pool of exactly that size is enough.
        Pool exact(64ull << 30, bound);
        PageTableBuilder pt2 = exact.builder();
        for (const Range& r : ranges)
            EXPECT_NO_THROW(pt2.map(r.gpa, r.size, r.flags)) << "layout " << li;
    }
}

TEST(PagesNeeded, GrowsWithEachArgument)
{
    const uint64_t base = PageTableBuilder::pages_needed(8 * k1G, 4, 100);
    EXPECT_GT(PageTableBuilder::pages_needed(16 * k1G, 4, 100), base);
    EXPECT_GT(PageTableBuilder::pages_needed(8 * k1G, 5, 100), base);
    EXPECT_GT(PageTableBuilder::pages_needed(8 * k1G, 4, 100 + 512), base);
    EXPECT_GE(PageTableBuilder::pages_needed(k2M, 1, 0), 3u);  // PML4 + PDPT + PD at least
    EXPECT_GE(PageTableBuilder::pages_needed(k2M, 1, 1), 4u);  // + one PT
    EXPECT_GE(PageTableBuilder::pages_needed(600 * k1G, 2, 0), 1u + 2u + 600u);
}

// Builds the tables exactly as the stress guest loader does, for layouts from
// plan_layout() and the real embedded guest image, in the pool plan_layout()
// sized. Catches a pool that is too small before a VM ever runs.
void map_like_load_guest(const GuestLayout& l, const mvm_image_header& hdr, PageTableBuilder& pt)
{
    pt.map(l.idt_gpa, k4K, 0);
    pt.map(MVM_IMAGE_GPA, hdr.user_start - MVM_IMAGE_GPA, 0);
    pt.map(hdr.user_start, hdr.image_end - hdr.user_start, kPteUser);
    pt.map(k2M, l.kernel_area_end - k2M, kPteWrite);
    pt.map(l.boot_params_gpa, l.boot_params_bytes, kPteUser);
    uint64_t user_rw = l.boot_params_gpa + l.boot_params_bytes;
    pt.map(user_rw, l.system_bytes - user_rw, kPteUser | kPteWrite);
    for (const auto& r : l.ram)
        pt.map(r.gpa, r.bytes, kPteUser | kPteWrite);
    pt.map(MVM_DOORBELL_GPA, k4K, kPteUser | kPteWrite);
}

MachineConfig multi_node_config(uint32_t vcpus, const std::vector<uint64_t>& node_mem)
{
    MachineConfig c;
    c.vcpus = vcpus;
    for (size_t i = 0; i < node_mem.size(); i++) {
        NodeConfig n;
        n.id = static_cast<uint32_t>(i);
        n.mem_bytes = node_mem[i];
        for (uint32_t v = static_cast<uint32_t>(i); v < vcpus; v += static_cast<uint32_t>(node_mem.size()))
            n.vcpus.push_back(v);
        c.nodes.push_back(n);
    }
    return c;
}

TEST(PagesNeeded, PlannedPoolFitsRealisticLayouts)
{
    const mvm_image_header& hdr = guest_image_header();
    ASSERT_GT(hdr.user_start, MVM_IMAGE_GPA);
    ASSERT_GE(hdr.image_end, hdr.user_start);
    const std::vector<MachineConfig> configs = {
        single_node_config(1, 256ull << 20),
        single_node_config(2, 1ull << 30),
        single_node_config(64, 4ull << 30),
        single_node_config(255, 2ull << 30),
        single_node_config(1024, 1ull << 30),
        multi_node_config(4, {512ull << 20, 512ull << 20}),
        multi_node_config(16, {1ull << 30, (1ull << 30) + (2ull << 20), 6ull << 20, 3ull << 30}),
        multi_node_config(300, {2ull << 20, 2ull << 20, 2ull << 20, 2ull << 20, 2ull << 20, 2ull << 20, 2ull << 20,
                                2ull << 20}),
    };
    for (size_t i = 0; i < configs.size(); i++) {
        const GuestLayout l = plan_layout(configs[i]);
        ASSERT_GT(l.pt_pool_pages, 0u);
        // The pool sits in the kernel area, below the kernel stacks.
        ASSERT_GE(l.pt_pool_gpa, k2M);
        ASSERT_LE(l.pt_pool_gpa + l.pt_pool_pages * k4K, l.kernel_area_end);
        Pool pool(l.pt_pool_gpa, l.pt_pool_pages);
        PageTableBuilder pt = pool.builder();
        ASSERT_NO_THROW(map_like_load_guest(l, hdr, pt)) << "config " << i << " (" << configs[i].vcpus << " vCPUs, "
                                                         << configs[i].nodes.size() << " nodes)";
        EXPECT_LE(pt.pages_used(), l.pt_pool_pages);

        // Spot-check the result the guest relies on.
        EXPECT_EQ(pt.lookup(l.idt_gpa), kPtePresent) << "IDT must be kernel read-only";
        EXPECT_EQ(pt.lookup(MVM_IMAGE_GPA), kPtePresent) << "kernel text must not be user-visible";
        EXPECT_EQ(pt.lookup(hdr.user_start), kPtePresent | kPteUser) << "user text: user, read-only";
        EXPECT_EQ(pt.lookup(l.pt_pool_gpa), kPtePresent | kPteWrite) << "page tables: kernel only";
        EXPECT_EQ(pt.lookup(l.kstack_top.back() - 8), kPtePresent | kPteWrite) << "kernel stacks: kernel only";
        EXPECT_EQ(pt.lookup(l.boot_params_gpa), kPtePresent | kPteUser) << "boot params: user read-only";
        EXPECT_EQ(pt.lookup(l.mailbox_gpa.front()), kPtePresent | kPteWrite | kPteUser);
        EXPECT_EQ(pt.lookup(l.ustack_top.back()), kPtePresent | kPteWrite | kPteUser);
        for (const auto& r : l.ram) {
            EXPECT_EQ(pt.lookup(r.gpa), kPtePresent | kPteWrite | kPteUser);
            EXPECT_EQ(pt.lookup(r.gpa + r.bytes - 1), kPtePresent | kPteWrite | kPteUser);
        }
        EXPECT_EQ(pt.lookup(MVM_DOORBELL_GPA), kPtePresent | kPteWrite | kPteUser);
        EXPECT_EQ(pt.lookup(MVM_FAULT_PF_ADDR), 0u) << "the deliberate #PF address must stay unmapped";
        EXPECT_EQ(pt.lookup(0), 0u) << "page 0 must stay unmapped";
    }
}

}  // namespace
}  // namespace mvm::x86
