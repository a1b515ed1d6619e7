// Unit tests for memory/memslot.hpp: MemoryRegion helpers and the
// MemslotRegistry's refusals and lookups. Host ranges are carved out of one
// real buffer so that pointer comparisons are well defined.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "memory/memslot.hpp"
#include "base/error.hpp"

using ::testing::AllOf;
using ::testing::HasSubstr;

namespace mvm {
namespace {

constexpr uint64_t k4K = 4096;
constexpr uint64_t kGiB = 1ull << 30;

class MemslotTest : public ::testing::Test {
protected:
    // 64 pages of host memory to hand out.
    std::vector<uint8_t> buf = std::vector<uint8_t>(64 * k4K);
    uint8_t* host(uint64_t page) { return buf.data() + page * k4K; }

    static MemoryRegion region(uint32_t slot, uint64_t gpa, uint64_t pages, uint8_t* host, std::string name)
    {
        MemoryRegion r;
        r.slot = slot;
        r.gpa = gpa;
        r.size = pages * k4K;
        r.host = host;
        r.name = std::move(name);
        return r;
    }

    // Expects add() to throw UsageError whose message names both regions.
    static void expect_refused(MemslotRegistry& reg, const MemoryRegion& r, const std::string& other,
                               const std::string& what)
    {
        size_t before = reg.regions().size();
        try {
            reg.add(r);
            ADD_FAILURE() << "add() accepted " << r.describe();
        } catch (const UsageError& e) {
            EXPECT_THAT(e.what(), AllOf(HasSubstr("'" + other + "'"), HasSubstr("'" + r.name + "'"), HasSubstr(what)));
            EXPECT_EQ(e.exit_code(), kExitUsage);
        }
        EXPECT_EQ(reg.regions().size(), before) << "a refused add() must not change the registry";
    }
};

TEST_F(MemslotTest, RegionHelpers)
{
    MemoryRegion r = region(1, 4 * kGiB, 16, host(0), "node0");
    EXPECT_EQ(r.gpa_end(), 4 * kGiB + 16 * k4K);
    EXPECT_EQ(r.pages(), 16u);
    EXPECT_TRUE(r.contains_gpa(4 * kGiB));
    EXPECT_TRUE(r.contains_gpa(r.gpa_end() - 1));
    EXPECT_FALSE(r.contains_gpa(r.gpa_end()));
    EXPECT_FALSE(r.contains_gpa(4 * kGiB - 1));
    EXPECT_FALSE(r.is_gmem());
    r.gmem_fd = 7;
    EXPECT_TRUE(r.is_gmem());
    r.gmem_fd = 0;  // fd 0 is a valid fd
    EXPECT_TRUE(r.is_gmem());
}

TEST_F(MemslotTest, DescribeNamesSlotNameRangeAndBacking)
{
    MemoryRegion r = region(1, 0x100000000, 0x10000, nullptr, "node0");
    std::string d = r.describe();
    EXPECT_THAT(d, HasSubstr("slot 1 'node0'"));
    EXPECT_THAT(d, HasSubstr("gpa [0x100000000, 0x110000000)"));
    EXPECT_THAT(d, HasSubstr("anon"));
}

TEST_F(MemslotTest, AddKeepsRegionsSortedByGpa)
{
    MemslotRegistry reg;
    reg.add(region(2, 5 * kGiB, 4, host(8), "node1"));
    reg.add(region(0, 0, 4, host(0), "system"));
    reg.add(region(1, 4 * kGiB, 4, host(4), "node0"));
    ASSERT_EQ(reg.regions().size(), 3u);
    EXPECT_EQ(reg.regions()[0].name, "system");
    EXPECT_EQ(reg.regions()[1].name, "node0");
    EXPECT_EQ(reg.regions()[2].name, "node1");
}

TEST_F(MemslotTest, AddReturnsTheStoredRegion)
{
    MemslotRegistry reg;
    MemoryRegion r = region(3, 0x200000, 2, host(0), "sys");
    r.vnode = 5;
    r.backing = BackingKind::Hugetlb2M;
    const MemoryRegion& stored = reg.add(r);
    EXPECT_EQ(stored.slot, 3u);
    EXPECT_EQ(stored.vnode, 5);
    EXPECT_EQ(stored.backing, BackingKind::Hugetlb2M);
    EXPECT_EQ(&stored, reg.by_slot(3));
}

TEST_F(MemslotTest, RefusesDuplicateSlot)
{
    MemslotRegistry reg;
    reg.add(region(1, 0, 4, host(0), "alpha"));
    expect_refused(reg, region(1, 1 * kGiB, 4, host(8), "beta"), "alpha", "duplicate memslot");
}

TEST_F(MemslotTest, RefusesGpaOverlap)
{
    MemslotRegistry reg;
    reg.add(region(1, 0x100000, 8, host(0), "alpha"));  // [0x100000, 0x108000)
    const std::string why = "overlapping guest-physical ranges";
    // Identical, head, tail, inside, around.
    expect_refused(reg, region(2, 0x100000, 8, host(16), "beta"), "alpha", why);
    expect_refused(reg, region(3, 0x0fe000, 4, host(16), "gamma"), "alpha", why);
    expect_refused(reg, region(4, 0x107000, 4, host(16), "delta"), "alpha", why);
    expect_refused(reg, region(5, 0x102000, 1, host(16), "epsilon"), "alpha", why);
    expect_refused(reg, region(6, 0x0f0000, 64, nullptr, "zeta"), "alpha", why);
}

TEST_F(MemslotTest, AdjacentGpaRangesAreFine)
{
    MemslotRegistry reg;
    reg.add(region(1, 0x100000, 8, host(0), "alpha"));
    EXPECT_NO_THROW(reg.add(region(2, 0x108000, 8, host(8), "after")));
    EXPECT_NO_THROW(reg.add(region(3, 0x0f8000, 8, host(16), "before")));
    EXPECT_EQ(reg.regions().size(), 3u);
}

TEST_F(MemslotTest, RefusesHostOverlap)
{
    MemslotRegistry reg;
    reg.add(region(1, 0, 8, host(8), "alpha"));  // host pages [8, 16)
    const std::string why = "overlapping host ranges";
    expect_refused(reg, region(2, kGiB, 8, host(8), "beta"), "alpha", why);
    expect_refused(reg, region(3, kGiB, 4, host(6), "gamma"), "alpha", why);
    expect_refused(reg, region(4, kGiB, 4, host(15), "delta"), "alpha", why);
    expect_refused(reg, region(5, kGiB, 1, host(10), "epsilon"), "alpha", why);
    expect_refused(reg, region(6, kGiB, 16, host(4), "zeta"), "alpha", why);
}

TEST_F(MemslotTest, AdjacentHostRangesAndNullHostsAreFine)
{
    MemslotRegistry reg;
    reg.add(region(1, 0, 8, host(8), "alpha"));
    EXPECT_NO_THROW(reg.add(region(2, kGiB, 8, host(16), "after")));
    EXPECT_NO_THROW(reg.add(region(3, 2 * kGiB, 8, host(0), "before")));
    // gmem-only slots may have no host mapping; two of them do not collide.
    EXPECT_NO_THROW(reg.add(region(4, 3 * kGiB, 8, nullptr, "gmem0")));
    EXPECT_NO_THROW(reg.add(region(5, 4 * kGiB, 8, nullptr, "gmem1")));
    EXPECT_EQ(reg.regions().size(), 5u);
}

TEST_F(MemslotTest, RefusesMoreThanMaxSlots)
{
    MemslotRegistry reg(2);
    EXPECT_EQ(reg.max_slots(), 2u);
    reg.add(region(0, 0, 1, host(0), "first"));
    reg.add(region(1, kGiB, 1, host(1), "second"));
    try {
        reg.add(region(2, 2 * kGiB, 1, host(2), "third"));
        FAIL() << "a third slot was accepted with max_slots 2";
    } catch (const UsageError& e) {
        EXPECT_THAT(e.what(), HasSubstr("'third'"));
        EXPECT_THAT(e.what(), HasSubstr("2 memslots"));
    }
    EXPECT_EQ(reg.regions().size(), 2u);
}

TEST_F(MemslotTest, RefusesEmptyOrMisalignedRegions)
{
    MemslotRegistry reg;
    MemoryRegion r = region(1, 0, 0, host(0), "empty");
    EXPECT_THROW(reg.add(r), UsageError);
    r = region(1, 0x800, 1, host(0), "misaligned-gpa");
    EXPECT_THROW(reg.add(r), UsageError);
    r = region(1, 0, 1, host(0), "misaligned-size");
    r.size = 6000;
    EXPECT_THROW(reg.add(r), UsageError);
    EXPECT_TRUE(reg.regions().empty());
}

// Three regions: system [0, 16K) at host page 0, node0 [4G, 4G+32K) at host
// page 16, node1 directly after node0 in GPA at host page 32 (GPA-adjacent but
// not host-adjacent), and a host-less gmem region at 8G.
class MemslotLookupTest : public MemslotTest {
protected:
    MemslotRegistry reg;
    void SetUp() override
    {
        reg.add(region(0, 0, 4, host(0), "system"));
        reg.add(region(1, 4 * kGiB, 8, host(16), "node0"));
        reg.add(region(2, 4 * kGiB + 8 * k4K, 8, host(32), "node1"));
        reg.add(region(3, 8 * kGiB, 8, nullptr, "gmem"));
    }
};

TEST_F(MemslotLookupTest, BySlot)
{
    ASSERT_NE(reg.by_slot(1), nullptr);
    EXPECT_EQ(reg.by_slot(1)->name, "node0");
    EXPECT_EQ(reg.by_slot(0)->name, "system");
    EXPECT_EQ(reg.by_slot(3)->name, "gmem");
    EXPECT_EQ(reg.by_slot(4), nullptr);
    EXPECT_EQ(reg.by_slot(0xffffffffu), nullptr);
}

TEST_F(MemslotLookupTest, ByGpaBoundaries)
{
    EXPECT_EQ(reg.by_gpa(0)->name, "system");
    EXPECT_EQ(reg.by_gpa(4 * k4K - 1)->name, "system");
    EXPECT_EQ(reg.by_gpa(4 * k4K), nullptr);  // gap after system
    EXPECT_EQ(reg.by_gpa(4 * kGiB - 1), nullptr);
    EXPECT_EQ(reg.by_gpa(4 * kGiB)->name, "node0");
    EXPECT_EQ(reg.by_gpa(4 * kGiB + 8 * k4K - 1)->name, "node0");
    EXPECT_EQ(reg.by_gpa(4 * kGiB + 8 * k4K)->name, "node1");
    EXPECT_EQ(reg.by_gpa(4 * kGiB + 16 * k4K - 1)->name, "node1");
    EXPECT_EQ(reg.by_gpa(4 * kGiB + 16 * k4K), nullptr);
    EXPECT_EQ(reg.by_gpa(8 * kGiB + 5)->name, "gmem");
    EXPECT_EQ(reg.by_gpa(8 * kGiB + 8 * k4K), nullptr);
    EXPECT_EQ(reg.by_gpa(~0ull), nullptr);
}

TEST_F(MemslotLookupTest, ByGpaOnEmptyRegistry)
{
    MemslotRegistry empty;
    EXPECT_EQ(empty.by_gpa(0), nullptr);
    EXPECT_EQ(empty.by_host(buf.data()), nullptr);
    EXPECT_EQ(empty.host_ptr(0), nullptr);
    EXPECT_EQ(empty.by_slot(0), nullptr);
}

TEST_F(MemslotLookupTest, ByHostBoundaries)
{
    EXPECT_EQ(reg.by_host(host(0))->name, "system");
    EXPECT_EQ(reg.by_host(host(4) - 1)->name, "system");
    EXPECT_EQ(reg.by_host(host(4)), nullptr);
    EXPECT_EQ(reg.by_host(host(16))->name, "node0");
    EXPECT_EQ(reg.by_host(host(24) - 1)->name, "node0");
    EXPECT_EQ(reg.by_host(host(24)), nullptr);
    EXPECT_EQ(reg.by_host(host(32))->name, "node1");
    EXPECT_EQ(reg.by_host(host(40) - 1)->name, "node1");
    EXPECT_EQ(reg.by_host(host(40)), nullptr);
    int unrelated = 0;
    EXPECT_EQ(reg.by_host(&unrelated), nullptr);
    EXPECT_EQ(reg.by_host(nullptr), nullptr);
}

TEST_F(MemslotLookupTest, HostPtrTranslates)
{
    EXPECT_EQ(reg.host_ptr(0), host(0));
    EXPECT_EQ(reg.host_ptr(0x1234), host(0) + 0x1234);
    EXPECT_EQ(reg.host_ptr(4 * kGiB + 3 * k4K + 8, 8), host(16) + 3 * k4K + 8);
    EXPECT_EQ(reg.host_ptr(4 * kGiB + 8 * k4K), host(32));
}

TEST_F(MemslotLookupTest, HostPtrRangeMustFitInOneRegion)
{
    // Exactly up to the end is fine; one byte more is not.
    EXPECT_EQ(reg.host_ptr(0, 4 * k4K), host(0));
    EXPECT_EQ(reg.host_ptr(0, 4 * k4K + 1), nullptr);
    EXPECT_EQ(reg.host_ptr(4 * k4K - 8, 8), host(4) - 8);
    EXPECT_EQ(reg.host_ptr(4 * k4K - 8, 9), nullptr);
    // Straddles node0 and node1: adjacent in GPA, but not contiguous on the host.
    EXPECT_EQ(reg.host_ptr(4 * kGiB + 8 * k4K - 8, 16), nullptr);
    EXPECT_EQ(reg.host_ptr(4 * kGiB, 16 * k4K), nullptr);
    // Whole regions.
    EXPECT_EQ(reg.host_ptr(4 * kGiB, 8 * k4K), host(16));
    EXPECT_EQ(reg.host_ptr(4 * kGiB + 8 * k4K, 8 * k4K), host(32));
}

TEST_F(MemslotLookupTest, HostPtrOutsideOrWithoutHostMapping)
{
    EXPECT_EQ(reg.host_ptr(4 * k4K), nullptr);            // gap
    EXPECT_EQ(reg.host_ptr(4 * kGiB - 1, 2), nullptr);    // starts in the gap
    EXPECT_EQ(reg.host_ptr(8 * kGiB), nullptr);           // gmem slot has no host mapping
    EXPECT_EQ(reg.host_ptr(16 * kGiB, 1), nullptr);       // above everything
}

// Regression: host_ptr once checked `gpa + len > r->gpa_end()`, which wraps
// for a huge len, so a range running off the end of the address space was
// reported as inside the region. nullptr unless [gpa, gpa+len) is inside one.
TEST_F(MemslotLookupTest, HostPtrHugeLengthDoesNotWrap)
{
    EXPECT_EQ(reg.host_ptr(0x1000, ~0ull), nullptr);
    EXPECT_EQ(reg.host_ptr(4 * kGiB + k4K, ~0ull - 100), nullptr);
}

// Regression: add() once accepted a region at the top of the address space
// whose gpa + size wraps into [0, ...), over the system slot (KVM would
// refuse it only later).
TEST_F(MemslotLookupTest, RefusesRegionThatWrapsAroundTheAddressSpace)
{
    MemoryRegion r = region(9, ~0ull - k4K + 1, 2, host(48), "wraps");  // [2^64 - 4K, 2^64 + 4K)
    EXPECT_THROW(reg.add(r), UsageError);
}

}  // namespace
}  // namespace mvm
