// What only a host with two NUMA nodes and the TDP MMU shows: virtual nodes
// really on different host nodes, and KVM's own page tables (SecPageTables)
// landing on the node of the thread that made KVM allocate them. `scripts/test
// svm` runs these in the two-node emulated SVM host (scripts/svm-host --nodes
// 2); elsewhere they skip, saying why.
#include <gtest/gtest.h>

#include <unistd.h>

#include <iostream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"
#include "svm_test_util.hpp"
#include "memory/hugetlb.hpp"

using mvm::test::run_minivmm;
using namespace mvm::test::svm;

namespace {

struct NodePools {
    mvm::HugetlbReservation n0{2ull << 20, 24, 0}, n1{2ull << 20, 24, 1};
    bool ok() const { return n0.ok() && n1.ok(); }
    std::string why_not() const { return n0.ok() ? n1.why_not() : n0.why_not(); }
};

// Empty when this host has two nodes, the TDP MMU with eager_page_split ours
// to set, and 2M pages on both nodes (held by `pools`), else why not.
std::string why_not_split_on_two_nodes(const NodePools& pools)
{
    if (auto why = why_not_two_nodes(); !why.empty())
        return why;
    if (auto why = mvm::test::svm::why_no_tdp_mmu(); !why.empty())
        return why;
    return pools.ok() ? "" : "cannot get 2M pages on both nodes: " + pools.why_not();
}

}  // namespace

// numa-check with vnode N bound to host node N: every page on its node, the
// vCPU threads pinned there, and the page tables made by the vCPUs' first
// faults counted. A judge that expects host node 1 for everything (a
// deliberately wrong binding for vnode 0) takes the exit-3 path naming the
// first offending range.
TEST(SvmTwoNodes, NumaCheckPutsEachVirtualNodeOnItsHostNode)
{
    REQUIRE_KVM();
    if (auto why = why_not_two_nodes(); !why.empty())
        GTEST_SKIP() << why;
    auto j = numa_check(two_vnodes(64, "anon"));
    ASSERT_EQ(j["vnodes"].size(), 2u) << j.dump();
    for (int n : {0, 1}) {
        const auto& v = j["vnodes"][n];
        EXPECT_DOUBLE_EQ(v["on_policy_pct"].get<double>(), 100.0) << v;
        EXPECT_EQ(v["pages_per_host_node"][std::to_string(n)], v["pages_total"]) << v;
        EXPECT_TRUE(j["vcpus"][n]["ok"].get<bool>()) << j["vcpus"][n];
    }
    // Which vCPU makes a shared upper-level table first varies: the total only.
    EXPECT_GT(j["touch_sec_page_tables"]["total_kib"].get<int64_t>(), 0) << j["touch_sec_page_tables"];
    EXPECT_EQ(j["stamps"]["mismatches"], 0);
    std::cout << fmt::format("numa-check: vnode 0 100% on host node 0, vnode 1 100% on host node 1; page tables of "
                             "the first faults: n0 {:+} KiB, n1 {:+} KiB\n",
                             node_kib(j["touch_sec_page_tables"], 0), node_kib(j["touch_sec_page_tables"], 1));

    auto wrong = run_minivmm("numa-check " + two_vnodes(64, "anon"), "env MINIVMM_TEST_EXPECT_HOST_NODES=1");
    EXPECT_EQ(wrong.exit_code, 3) << wrong.err;
    EXPECT_NE(wrong.err.find("misplaced memory: vnode 0"), std::string::npos) << wrong.err;
    EXPECT_NE(wrong.err.find("is on host node 0"), std::string::npos) << wrong.err;
    std::cout << "wrong binding: exit " << wrong.exit_code << ", "
              << wrong.err.substr(wrong.err.rfind("minivmm: misplaced")) << std::flush;
}

// The question of the "NUMA-aware eager page splitting" thread, measured:
// with eager splitting at enable (bitmap, GET clears), the 4 KiB page tables
// of the split land on the node of the thread that enabled logging, not on the
// node of the memory they map. One thread on host node 0 enabling both
// vnodes' slots puts them all on node 0, one on node 1 all on node 1; the
// per-node threads put each vnode's on its own node.
TEST(SvmTwoNodes, PageTablesFollowTheEnablingThreadsNode)
{
    REQUIRE_KVM();
    NodePools pools;
    if (auto why = why_not_split_on_two_nodes(pools); !why.empty())
        GTEST_SKIP() << why;
    // 2 x 32 MiB of hugetlb2m: 32 huge mappings, one 4 KiB page table each when split.
    constexpr int64_t kSplitKib = 32 * 4;
    auto run = [&](const std::string& from) {
        auto j = numa_check(two_vnodes(32, "hugetlb2m") + " --enable-logging " + from + " --eager-split on");
        const auto& le = j["logging_enable"];
        EXPECT_LE(le["vm"]["pages_2m"].get<int64_t>(), -32) << from << ": every 2M mapping splits at enable: " << le;
        EXPECT_EQ(j["stamps"]["mismatches"], 0);
        std::cout << fmt::format("enable from {:<12} ({}): pages_2m {:+}, KVM page tables n0 {:+} KiB, n1 {:+} KiB\n",
                                 from, le["enabled_from"].get<std::string>(), le["vm"]["pages_2m"].get<int64_t>(),
                                 node_kib(le["sec_page_tables"], 0), node_kib(le["sec_page_tables"], 1));
        return le["sec_page_tables"];
    };
    for (int n : {0, 1}) {
        auto pt = run(fmt::format("host-node:{}", n));
        EXPECT_GE(node_kib(pt, n), kSplitKib * 3 / 4) << "the split's page tables on the enabling thread's node " << n
                                                      << ": " << pt;
        EXPECT_LT(node_kib(pt, 1 - n), kSplitKib / 4) << "and not on the other node: " << pt;
    }
    auto per_node = run("per-node");
    for (int n : {0, 1})
        EXPECT_GE(node_kib(per_node, n), kSplitKib / 2 * 3 / 4) << "per-node threads: vnode " << n
                                                                << "'s page tables on host node " << n << ": " << per_node;
    run("unbound");  // reported only: where it lands depends on where this thread happens to run
}

// lockup's eager-split variants are real here: with eager_page_split on, the
// huge mappings go at enable-logging; off, most go under the guest's writes
// after enabling (the guest runs during enable, so a few may already); the per-node parallel enable grows both
// nodes' page tables. Relations only (the stall figures under TCG mean nothing).
TEST(SvmTwoNodes, LockupEagerSplitVariantsSplitWhereTheySay)
{
    REQUIRE_KVM();
    NodePools pools;
    if (auto why = why_not_split_on_two_nodes(pools); !why.empty())
        GTEST_SKIP() << why;
    const std::string before = mvm::test::read_file("/sys/module/kvm/parameters/eager_page_split");
    auto r = run_minivmm("lockup " + two_vnodes(32, "hugetlb2m") +
                         " --variants eager-split-on,eager-split-off,per-node-parallel-enable --steady 0.3 --logging 1 "
                         "--json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    ASSERT_EQ(j["variants"].size(), 3u);
    auto step = [](const nlohmann::json& v, const char* name) {
        for (const auto& s : v["logging_steps"])
            if (s["step"] == name)
                return s;
        ADD_FAILURE() << "no step " << name << " in " << v["logging_steps"];
        return nlohmann::json::object();
    };
    auto pages_2m = [](const nlohmann::json& s) { return s["vm"].value("pages_2m", int64_t{0}); };
    const auto &on = j["variants"][0], &off = j["variants"][1], &per = j["variants"][2];
    for (const auto& v : {on, off, per})
        EXPECT_EQ(v["skipped"], "") << v["name"];
    EXPECT_LE(pages_2m(step(on, "enable-logging")), -32) << on["logging_steps"];
    // Off: enabling splits nothing itself; the vCPUs keep writing while it
    // runs, so a few of their write faults may split already in that step.
    EXPECT_GT(pages_2m(step(off, "enable-logging")), -16) << off["logging_steps"];
    // How many regions the guest reaches in the window depends on its speed under the emulator: one at least.
    EXPECT_LT(pages_2m(step(off, "first harvest")) + pages_2m(step(off, "rest of logging")), 0)
        << "eager split off: the guest's writes split while logging: " << off["logging_steps"];
    if (before.rfind("Y", 0) == 0) {  // the per-node variant leaves eager_page_split as it is
        const auto per_pt = step(per, "enable-logging")["sec_page_tables"];
        EXPECT_LE(pages_2m(step(per, "enable-logging")), -32) << per["logging_steps"];
        EXPECT_GT(node_kib(per_pt, 0), 0) << per_pt;
        EXPECT_GT(node_kib(per_pt, 1), 0) << per_pt;
    }
    EXPECT_EQ(mvm::test::read_file("/sys/module/kvm/parameters/eager_page_split"), before) << "restored";
    for (const auto& v : {on, off, per})
        std::cout << fmt::format("lockup {}: {}\n", v["name"].get<std::string>(), v["huge_page_splits"].get<std::string>());
}
