// Unit tests for guest/abi.h: the pure functions the VMM and the guest must
// compute identically (per-pass permutation, write decision, stamps) and the
// mailbox layout.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <set>
#include <type_traits>
#include <vector>

#include "guest/abi.h"

namespace {

// One pass over a working set of n pages the way guest/workload.c walks it:
// visit i in [0, visits) is page mvm_perm_apply(i), skipped when >= n.
std::vector<uint64_t> random_pass(uint64_t seed, uint32_t vcpu, uint64_t gen, uint64_t n)
{
    const mvm_perm p = mvm_perm_for(seed, vcpu, gen, n);
    const uint64_t visits = mvm_visits_per_pass(MVM_PATTERN_RANDOM, n);
    std::vector<uint64_t> order;
    order.reserve(n);
    for (uint64_t i = 0; i < visits; i++) {
        uint64_t idx = mvm_perm_apply(&p, i);
        if (idx < n)
            order.push_back(idx);
    }
    return order;
}

TEST(GuestAbiPerm, Bits)
{
    EXPECT_EQ(mvm_perm_bits(1), 1u);
    EXPECT_EQ(mvm_perm_bits(2), 1u);
    EXPECT_EQ(mvm_perm_bits(3), 2u);
    EXPECT_EQ(mvm_perm_bits(4), 2u);
    EXPECT_EQ(mvm_perm_bits(5), 3u);
    EXPECT_EQ(mvm_perm_bits(1000), 10u);
    EXPECT_EQ(mvm_perm_bits(1024), 10u);
    EXPECT_EQ(mvm_perm_bits(1025), 11u);
    EXPECT_EQ(mvm_perm_bits(4096), 12u);
    EXPECT_EQ(mvm_perm_bits(65537), 17u);
    EXPECT_EQ(mvm_perm_bits(1ull << 40), 40u);
}

TEST(GuestAbiPerm, VisitsPerPass)
{
    EXPECT_EQ(mvm_visits_per_pass(MVM_PATTERN_SEQ, 1000), 1000u);
    EXPECT_EQ(mvm_visits_per_pass(MVM_PATTERN_SEQ, 1), 1u);
    EXPECT_EQ(mvm_visits_per_pass(MVM_PATTERN_RANDOM, 1000), 1024u);
    EXPECT_EQ(mvm_visits_per_pass(MVM_PATTERN_RANDOM, 4096), 4096u);
    EXPECT_EQ(mvm_visits_per_pass(MVM_PATTERN_RANDOM, 4097), 8192u);
    EXPECT_EQ(mvm_visits_per_pass(MVM_PATTERN_RANDOM, 1), 2u);
    // Cycle walking never needs more than twice the set size.
    for (uint64_t n : {1ull, 2ull, 3ull, 1000ull, 4096ull, 65537ull, 1ull << 30})
        EXPECT_LT(mvm_visits_per_pass(MVM_PATTERN_RANDOM, n), 2 * n + 1) << n;
}

TEST(GuestAbiPerm, BijectionOnPowerOfTwoDomain)
{
    for (uint64_t n : {1ull, 2ull, 3ull, 1000ull, 4096ull, 65537ull}) {
        for (uint64_t gen : {1ull, 2ull, 77ull}) {
            const mvm_perm p = mvm_perm_for(0x1234, 3, gen, n);
            const uint64_t domain = p.mask + 1;
            ASSERT_EQ(domain, 1ull << mvm_perm_bits(n));
            std::vector<uint8_t> hit(domain, 0);
            for (uint64_t i = 0; i < domain; i++) {
                uint64_t x = mvm_perm_apply(&p, i);
                ASSERT_LE(x, p.mask) << "n=" << n << " i=" << i;
                ASSERT_EQ(hit[x]++, 0) << "n=" << n << " gen=" << gen << ": " << x << " produced twice";
            }
        }
    }
}

TEST(GuestAbiPerm, EveryPageVisitedExactlyOncePerPass)
{
    for (uint64_t n : {1ull, 2ull, 3ull, 5ull, 1000ull, 4096ull, 4097ull, 65537ull}) {
        for (uint32_t vcpu : {0u, 1u, 63u}) {
            for (uint64_t gen : {1ull, 2ull, 3ull, 1000ull}) {
                std::vector<uint64_t> order = random_pass(42 + vcpu, vcpu, gen, n);
                ASSERT_EQ(order.size(), n) << "n=" << n << " vcpu=" << vcpu << " gen=" << gen;
                std::vector<uint8_t> seen(n, 0);
                for (uint64_t idx : order)
                    ASSERT_EQ(seen[idx]++, 0) << "n=" << n << " page " << idx << " visited twice";
            }
        }
    }
}

TEST(GuestAbiPerm, LargeSetIsStillAPermutation)
{
    const uint64_t n = (1ull << 20) + 3;  // bits = 21
    std::vector<uint64_t> order = random_pass(0xfeedface, 7, 5, n);
    ASSERT_EQ(order.size(), n);
    std::vector<uint8_t> seen(n, 0);
    for (uint64_t idx : order)
        ASSERT_EQ(seen[idx]++, 0) << idx;
}

TEST(GuestAbiPerm, Deterministic)
{
    // The VMM recomputes a pass's order from (seed, vcpu, generation) alone.
    EXPECT_EQ(random_pass(99, 2, 7, 1000), random_pass(99, 2, 7, 1000));
    const mvm_perm a = mvm_perm_for(99, 2, 7, 1000), b = mvm_perm_for(99, 2, 7, 1000);
    EXPECT_EQ(a.k1, b.k1);
    EXPECT_EQ(a.k2, b.k2);
    EXPECT_EQ(a.k3, b.k3);
    EXPECT_EQ(a.shift, b.shift);
    EXPECT_EQ(a.mask, 1023u);
    EXPECT_EQ(a.k1 & 1, 1u);  // odd multipliers are what make it bijective
    EXPECT_EQ(a.k2 & 1, 1u);
}

// Number of positions at which two orders agree (a random pair of
// permutations agrees in about one position on average).
size_t agreements(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b)
{
    size_t same = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); i++)
        same += a[i] == b[i];
    return same;
}

TEST(GuestAbiPerm, EachGenerationHasADifferentOrder)
{
    for (uint64_t n : {1000ull, 4096ull, 65537ull}) {
        std::vector<uint64_t> g1 = random_pass(7, 0, 1, n), g2 = random_pass(7, 0, 2, n), g3 = random_pass(7, 0, 3, n);
        EXPECT_NE(g1, g2) << n;
        EXPECT_NE(g2, g3) << n;
        EXPECT_LT(agreements(g1, g2), n / 20) << n;
        EXPECT_LT(agreements(g2, g3), n / 20) << n;
    }
}

TEST(GuestAbiPerm, EachVcpuAndSeedHasADifferentOrder)
{
    const uint64_t n = 4096;
    std::vector<uint64_t> base = random_pass(7, 0, 1, n);
    EXPECT_LT(agreements(base, random_pass(7, 1, 1, n)), n / 20);
    EXPECT_LT(agreements(base, random_pass(8, 0, 1, n)), n / 20);
}

TEST(GuestAbiPerm, RandomOrderIsNotSequential)
{
    const uint64_t n = 4096;
    std::vector<uint64_t> order = random_pass(1, 0, 1, n);
    size_t ascending_steps = 0;
    for (size_t i = 1; i < order.size(); i++)
        ascending_steps += order[i] == order[i - 1] + 1;
    EXPECT_LT(ascending_steps, n / 20);
}

TEST(GuestAbiWrites, ZeroAndHundredPercent)
{
    for (uint64_t idx = 0; idx < 10000; idx++) {
        ASSERT_EQ(mvm_writes(0, 123, 1, 1, idx), 0) << idx;
        ASSERT_EQ(mvm_writes(100, 123, 1, 1, idx), 1) << idx;
        ASSERT_EQ(mvm_writes(150, 123, 1, 1, idx), 1) << idx;  // clamps
    }
}

TEST(GuestAbiWrites, PercentagesAreRoughlyHonoured)
{
    struct Case {
        uint32_t pct;
        int lo, hi;  // out of 10000 pages
    } cases[] = {{50, 4000, 6000}, {10, 500, 1500}, {90, 8500, 9500}, {1, 30, 250}};
    for (const auto& c : cases) {
        for (uint64_t gen : {1ull, 2ull, 9ull}) {
            int writes = 0;
            for (uint64_t idx = 0; idx < 10000; idx++)
                writes += mvm_writes(c.pct, 0xabcdef, 3, gen, idx);
            EXPECT_GE(writes, c.lo) << c.pct << "% gen " << gen;
            EXPECT_LE(writes, c.hi) << c.pct << "% gen " << gen;
        }
    }
}

TEST(GuestAbiWrites, DecisionIsDeterministicButVariesByGeneration)
{
    int differ = 0;
    for (uint64_t idx = 0; idx < 10000; idx++) {
        ASSERT_EQ(mvm_writes(50, 5, 2, 4, idx), mvm_writes(50, 5, 2, 4, idx));
        differ += mvm_writes(50, 5, 2, 1, idx) != mvm_writes(50, 5, 2, 2, idx);
    }
    // Independent 50% decisions differ for about half the pages.
    EXPECT_GT(differ, 3000);
    EXPECT_LT(differ, 7000);
}

TEST(GuestAbiStamp, RoundTrip)
{
    struct Case {
        uint32_t vm, vcpu;
        uint64_t gen;
    } cases[] = {{1, 0, 0}, {1, 0, 1}, {0x5f, 1, 1}, {255, 7, 123456}, {2, 1023, 2}, {9, 0xffff, 0xffffffffull},
                 {42, 42, 1ull << 31}};
    for (const auto& c : cases) {
        uint64_t s = MVM_STAMP(c.vm, c.vcpu, c.gen);
        EXPECT_EQ(MVM_STAMP_VM(s), c.vm) << c.vm << "/" << c.vcpu << "/" << c.gen;
        EXPECT_EQ(MVM_STAMP_VCPU(s), c.vcpu) << c.vm << "/" << c.vcpu << "/" << c.gen;
        EXPECT_EQ(MVM_STAMP_GEN(s), c.gen) << c.vm << "/" << c.vcpu << "/" << c.gen;
        EXPECT_EQ(s >> 56, MVM_STAMP_TAG);
        EXPECT_NE(s, 0u);  // never confused with never-written memory
    }
}

TEST(GuestAbiStamp, FieldsDoNotBleedIntoEachOther)
{
    // Out-of-range inputs are truncated to their field, never spill into the
    // neighbouring one or the tag.
    uint64_t s = MVM_STAMP(0x1abu, 0x1ffffu, (1ull << 32) + 5);
    EXPECT_EQ(MVM_STAMP_VM(s), 0xabu);
    EXPECT_EQ(MVM_STAMP_VCPU(s), 0xffffu);
    EXPECT_EQ(MVM_STAMP_GEN(s), 5u);
    EXPECT_EQ(s >> 56, MVM_STAMP_TAG);
    EXPECT_NE(MVM_STAMP(1, 1, 2), MVM_STAMP(1, 2, 1));
    EXPECT_NE(MVM_STAMP(1, 0, 1), MVM_STAMP(1, 1, 1));
    EXPECT_NE(MVM_STAMP(1, 0, 1), MVM_STAMP(2, 0, 1));  // the same page work by another VM
}

// --fill random/ratio: qwords of a page are their own for every (stamp, page,
// qword), so no two pages, passes or VMs write the same bytes; and the bytes
// are spread (a compressor finds nothing: measured with zstd in docs/commands.md).
TEST(GuestAbiFill, RandomQwordsDifferByStampPageAndQword)
{
    std::set<uint64_t> seen;
    const uint64_t stamps[] = {MVM_STAMP(1, 0, 1), MVM_STAMP(1, 0, 2), MVM_STAMP(1, 1, 1), MVM_STAMP(2, 0, 1)};
    for (uint64_t stamp : stamps)
        for (uint64_t idx = 0; idx < 64; idx++) {
            const uint64_t key = mvm_fill_key(stamp, idx);
            for (uint64_t q = 1; q < 512; q++)
                ASSERT_TRUE(seen.insert(mvm_fill_random(key, q)).second) << stamp << "/" << idx << "/" << q;
        }
    // Byte values about uniform: each of 256 values near 1/256 of them.
    std::vector<uint64_t> count(256, 0);
    for (uint64_t v : seen)
        for (int b = 0; b < 8; b++)
            count[(v >> (8 * b)) & 0xff]++;
    const double mean = static_cast<double>(seen.size()) * 8 / 256;
    for (int b = 0; b < 256; b++) {
        EXPECT_GT(count[b], mean * 0.9) << b;
        EXPECT_LT(count[b], mean * 1.1) << b;
    }
}

TEST(GuestAbiFill, TouchNamesAreFills)
{
    EXPECT_EQ(MVM_TOUCH_QWORD, MVM_FILL_ZERO);
    EXPECT_EQ(MVM_TOUCH_PAGE, MVM_FILL_STAMP);
    EXPECT_EQ(sizeof(mvm_boot_params::fill), 4u);
    EXPECT_EQ(offsetof(mvm_boot_params, fill_qwords) + 4, offsetof(mvm_boot_params, vnode));
}

constexpr size_t line_of(size_t offset) { return offset / 64; }

TEST(GuestAbiMailbox, FitsInAPage)
{
    EXPECT_LE(sizeof(mvm_mailbox), 4096u);
    EXPECT_EQ(alignof(mvm_mailbox), 64u);
}

TEST(GuestAbiMailbox, HotProgressFieldsShareOneLine)
{
    EXPECT_EQ(offsetof(mvm_mailbox, generation), 0u);
    const size_t hot = line_of(offsetof(mvm_mailbox, generation));
    EXPECT_EQ(line_of(offsetof(mvm_mailbox, cursor)), hot);
    EXPECT_EQ(line_of(offsetof(mvm_mailbox, pages_written)), hot);
    EXPECT_EQ(line_of(offsetof(mvm_mailbox, pages_read)), hot);
    EXPECT_EQ(line_of(offsetof(mvm_mailbox, last_tsc)), hot);
    EXPECT_EQ(line_of(offsetof(mvm_mailbox, passes)), hot);
    EXPECT_EQ(line_of(offsetof(mvm_mailbox, read_sink)), hot);
    EXPECT_EQ(line_of(offsetof(mvm_mailbox, pad0) + sizeof(uint64_t) - 1), hot);
}

TEST(GuestAbiMailbox, ControlBlockIsOffTheGuestWrittenLines)
{
    const size_t control_fields[] = {
        offsetof(mvm_mailbox, stop),          offsetof(mvm_mailbox, rate_pages_per_s),
        offsetof(mvm_mailbox, tsc_per_page_q16), offsetof(mvm_mailbox, throttle_pct),
        offsetof(mvm_mailbox, control_seq),
    };
    const size_t hot = line_of(offsetof(mvm_mailbox, generation));
    // The last byte the guest writes: the end of the watchdog ring.
    const size_t guest_end = offsetof(mvm_mailbox, wd) + sizeof(mvm_mailbox::wd);
    const size_t last_guest_line = line_of(guest_end - 1);
    for (size_t off : control_fields) {
        EXPECT_NE(line_of(off), hot) << off;
        EXPECT_NE(line_of(off + 7), hot) << off;
        EXPECT_GT(line_of(off), last_guest_line) << "control field at " << off << " shares a line with guest-written data";
    }
    EXPECT_GT(offsetof(mvm_mailbox, stop), offsetof(mvm_mailbox, wd));
}

TEST(GuestAbiLayout, StructsHaveNoImplicitPadding)
{
    // abi.h promises explicit padding: the guest (freestanding C) and the VMM
    // (C++) must agree byte for byte.
    EXPECT_TRUE(std::has_unique_object_representations_v<mvm_image_header>);
    EXPECT_TRUE(std::has_unique_object_representations_v<mvm_segment>);
    EXPECT_TRUE(std::has_unique_object_representations_v<mvm_vnode>);
    EXPECT_TRUE(std::has_unique_object_representations_v<mvm_vcpu_params>);
    EXPECT_TRUE(std::has_unique_object_representations_v<mvm_wd_event>);
    EXPECT_TRUE(std::has_unique_object_representations_v<mvm_perm>);
    EXPECT_EQ(sizeof(mvm_vcpu_params) % 8, 0u);
    EXPECT_EQ(offsetof(mvm_boot_params, vcpu) % 8, 0u);
}

TEST(GuestAbiLayout, FixedAddressesAreConsistent)
{
    // Doorbell and fault address must not collide with the image or RAM.
    EXPECT_GE(MVM_DOORBELL_GPA, MVM_IMAGE_GPA + MVM_IMAGE_MAX);
    EXPECT_LT(MVM_DOORBELL_GPA + MVM_PAGE_SIZE, MVM_RAM_GPA + 1);
    EXPECT_EQ(MVM_DOORBELL_GPA % MVM_PAGE_SIZE, 0u);
    EXPECT_LT(MVM_FAULT_PF_ADDR, MVM_DOORBELL_GPA);
    EXPECT_GE(MVM_FAULT_PF_ADDR, MVM_IMAGE_GPA + MVM_IMAGE_MAX);
    EXPECT_EQ(1ull << MVM_PAGE_SHIFT, MVM_PAGE_SIZE);
}

}  // namespace
