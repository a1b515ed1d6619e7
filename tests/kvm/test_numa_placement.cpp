// Memory policy and placement on the real host (no KVM needed).
#include <gtest/gtest.h>

#include <numa.h>
#include <numaif.h>
#include <sys/mman.h>

#include <cstring>
#include <thread>

#include "numa/placement.hpp"
#include "numa/policy.hpp"
#include "numa/topology.hpp"

using namespace mvm::numa;

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kLen = 64ull << 20;

struct Mapping {
    void* addr = MAP_FAILED;
    size_t len = 0;
    explicit Mapping(size_t l) : len(l) {
        addr = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    ~Mapping() {
        if (addr != MAP_FAILED) munmap(addr, len);
    }
    bool ok() const { return addr != MAP_FAILED; }
};

#define SKIP_WITHOUT_NUMA()                                                               \
    do {                                                                                  \
        if (numa_available() < 0) GTEST_SKIP() << "numa_available() < 0: no NUMA support"; \
    } while (0)

int thread_mode() {
    int mode = -1;
    unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
    EXPECT_EQ(get_mempolicy(&mode, mask, 1024, nullptr, 0), 0) << strerror(errno);
    return mode;
}

}  // namespace

TEST(NumaPlacement, BindThenTouchPlacesEveryPageOnNode0) {
    SKIP_WITHOUT_NUMA();
    Mapping m(kLen);
    ASSERT_TRUE(m.ok()) << strerror(errno);

    NodePolicy bind{Policy::Bind, {0}};
    bind.validate(host_topology());
    apply_to_range(m.addr, m.len, bind);
    EXPECT_EQ(query_range_policy(m.addr), bind);
    EXPECT_EQ(query_range_policy(static_cast<char*>(m.addr) + m.len - kPage), bind);

    std::memset(m.addr, 0x5a, m.len);

    Placement pl = query_placement(m.addr, m.len, kPage, {0});
    EXPECT_EQ(pl.pages_total, kLen / kPage);
    EXPECT_EQ(pl.pages_queried, kLen / kPage);
    EXPECT_FALSE(pl.sampled);
    EXPECT_EQ(pl.pages_not_present, 0u);
    ASSERT_EQ(pl.pages_per_node.size(), 1u);
    EXPECT_EQ(pl.pages_per_node.at(0), kLen / kPage);
    EXPECT_EQ(pl.first_unexpected_offset, ~uint64_t{0});
}

TEST(NumaPlacement, UnexpectedNodeReportsFirstOffset) {
    SKIP_WITHOUT_NUMA();
    Mapping m(16 * kPage);
    ASSERT_TRUE(m.ok());
    std::memset(m.addr, 1, m.len);
    Placement any = query_placement(m.addr, m.len, kPage);
    ASSERT_FALSE(any.pages_per_node.empty());
    int node = any.pages_per_node.begin()->first;
    EXPECT_EQ(any.first_unexpected_offset, ~uint64_t{0});  // no expectation, nothing unexpected
    // Expecting only another node makes page 0 the first unexpected one.
    Placement pl = query_placement(m.addr, m.len, kPage, {node + 1});
    EXPECT_EQ(pl.pages_per_node[node], any.pages_per_node[node]);
    EXPECT_EQ(pl.pages_not_present, 0u);
    EXPECT_EQ(pl.first_unexpected_offset, 0u);
}

TEST(NumaPlacement, UntouchedMappingIsNotPresent) {
    SKIP_WITHOUT_NUMA();
    Mapping m(kLen);
    ASSERT_TRUE(m.ok());
    Placement pl = query_placement(m.addr, m.len, kPage, {0});
    EXPECT_EQ(pl.pages_total, kLen / kPage);
    EXPECT_EQ(pl.pages_queried, kLen / kPage);
    EXPECT_EQ(pl.pages_not_present, kLen / kPage);
    EXPECT_TRUE(pl.pages_per_node.empty());
    EXPECT_EQ(pl.first_unexpected_offset, ~uint64_t{0});
}

TEST(NumaPlacement, SampledQuery) {
    SKIP_WITHOUT_NUMA();
    Mapping m(kLen);
    ASSERT_TRUE(m.ok());
    // Touch only the first half: a spread-out sample must see both halves.
    std::memset(m.addr, 1, m.len / 2);
    Placement pl = query_placement(m.addr, m.len, kPage, {0}, 100);
    EXPECT_TRUE(pl.sampled);
    EXPECT_LE(pl.pages_queried, 100u);
    EXPECT_GT(pl.pages_queried, 0u);
    EXPECT_EQ(pl.pages_total, kLen / kPage);
    uint64_t present = 0;
    for (const auto& [node, pages] : pl.pages_per_node) present += pages;
    EXPECT_EQ(present + pl.pages_not_present, pl.pages_queried);
    EXPECT_EQ(present, 50u);
    EXPECT_EQ(pl.pages_not_present, 50u);

    // A limit above the page count queries every page and is not "sampled".
    Placement all = query_placement(m.addr, 8 * kPage, kPage, {}, 100);
    EXPECT_FALSE(all.sampled);
    EXPECT_EQ(all.pages_queried, 8u);
}

TEST(NumaPolicy, ThreadPolicyScopeSetsAndRestores) {
    SKIP_WITHOUT_NUMA();
    // Run on a fresh thread so the test's own policy is a known default.
    std::thread t([] {
        ASSERT_EQ(thread_mode(), MPOL_DEFAULT);
        {
            ThreadPolicyScope scope(NodePolicy{Policy::Bind, {0}});
            EXPECT_EQ(thread_mode(), MPOL_BIND);
            EXPECT_EQ(current_thread_policy(), (NodePolicy{Policy::Bind, {0}}));
            {
                ThreadPolicyScope inner(NodePolicy{Policy::Interleave, {0}});
                EXPECT_EQ(thread_mode(), MPOL_INTERLEAVE);
            }
            EXPECT_EQ(thread_mode(), MPOL_BIND);
            EXPECT_EQ(current_thread_policy(), (NodePolicy{Policy::Bind, {0}}));
        }
        EXPECT_EQ(thread_mode(), MPOL_DEFAULT);
        EXPECT_EQ(current_thread_policy(), (NodePolicy{Policy::Default, {}}));
    });
    t.join();
}

TEST(NumaPolicy, PinCurrentThread) {
    std::vector<int> before = current_thread_cpus();
    ASSERT_FALSE(before.empty());
    std::vector<int> seen;
    std::thread t([&] {
        pin_current_thread({0});
        seen = current_thread_cpus();
    });
    t.join();
    EXPECT_EQ(seen, std::vector<int>{0});
    // Pinning the other thread did not change ours.
    EXPECT_EQ(current_thread_cpus(), before);
}
