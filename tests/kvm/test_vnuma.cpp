// vNUMA on the real host and KVM: numa-check on every backing (with a
// guest_memfd node next to it, or shm where this host has no guest_memfd), pinning and thread policies of vCPU threads,
// preallocation, remote access, and the bad-input rows of --numa. Tests that
// need hugetlb pages raise the pool and restore it.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"
#include "memory/hugetlb.hpp"
#include "numa/placement.hpp"
#include "numa/topology.hpp"
#include "cli/options.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "engines/run.hpp"

using namespace mvm;
using mvm::test::run_minivmm;

namespace {

constexpr uint64_t kMiB = 1ull << 20;

struct BackingCase {
    const char* backing;
    uint64_t mem_bytes;
};
std::ostream& operator<<(std::ostream& os, const BackingCase& c) { return os << c.backing; }

// Raises the hugetlb pool a backing needs for `bytes`; checks on destruction
// that the pool is back where it was.
class PoolGuard {
public:
    PoolGuard(const std::string& backing, uint64_t bytes)
    {
        page_ = backing == "hugetlb2m" ? 2 * kMiB : backing == "hugetlb1g" ? 1024 * kMiB : 0;
        if (!page_)
            return;
        before_ = hugetlb_pool(page_).nr;
        res_ = std::make_unique<HugetlbReservation>(page_, bytes / page_);
    }
    ~PoolGuard()
    {
        if (!page_)
            return;
        res_.reset();
        EXPECT_EQ(hugetlb_pool(page_).nr, before_) << "hugetlb pool of " << page_ << " bytes not restored";
    }
    // Empty when the pool is ready, else why it is not.
    std::string why_not() const { return res_ && !res_->ok() ? res_->why_not() : ""; }

private:
    uint64_t page_ = 0, before_ = 0;
    std::unique_ptr<HugetlbReservation> res_;
};

nlohmann::json parse_json(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j;
}

MachineConfig config_of(const Kvm& kvm, std::vector<std::string> numa, std::string access = "local")
{
    cli::VmOptions o;
    o.numa = std::move(numa);
    o.access = std::move(access);
    return o.to_config(kvm);
}

}  // namespace

class NumaCheckBacking : public ::testing::TestWithParam<BackingCase> {};

// The "Done when" of the vNUMA work: two virtual nodes on host node 0, one of
// the backing under test and one guest_memfd (shm where the host lacks it),
// all pages on node 0, exit 0.
TEST_P(NumaCheckBacking, TwoNodesAllOnPolicy)
{
    REQUIRE_KVM();
    const auto& c = GetParam();
    if (std::string(c.backing) == "gmem")
        if (auto why = test::why_no_gmem(kvm); !why.empty())
            GTEST_SKIP() << why;
    const char* second = test::gmem_or(kvm, "shm");
    PoolGuard pool(c.backing, c.mem_bytes);
    if (!pool.why_not().empty())
        GTEST_SKIP() << "cannot get " << c.backing << " pages: " << pool.why_not();
    auto r = run_minivmm(fmt::format("numa-check --numa node=0,cpus=0,mem={}M,backing={},host-nodes=0 "
                                     "--numa node=1,cpus=1,mem=64M,backing={},host-nodes=0,policy=bind --json -",
                                     c.mem_bytes / kMiB, c.backing, second));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_json(r.out);
    EXPECT_TRUE(j["ok"].get<bool>());
    ASSERT_EQ(j["vnodes"].size(), 2u);
    const uint64_t sizes[] = {c.mem_bytes, 64 * kMiB};
    const char* backings[] = {c.backing, second};
    for (size_t i = 0; i < 2; i++) {
        const auto& n = j["vnodes"][i];
        EXPECT_EQ(n["backing"], backings[i]);
        EXPECT_EQ(n["policy"], "bind:0");
        EXPECT_DOUBLE_EQ(n["on_policy_pct"].get<double>(), 100.0) << n.dump();
        EXPECT_EQ(n["pages_not_present"].get<uint64_t>(), 0u) << n.dump();
        EXPECT_EQ(n["bytes_per_host_node"]["0"].get<uint64_t>(), sizes[i]) << n.dump();
        EXPECT_FALSE(n["sampled"].get<bool>());
        // numastat's split: hugetlb pages are Huge, nothing else is; every page is one kind.
        const auto& k = n["kinds_per_host_node"]["0"];
        const bool hugetlb = std::string(backings[i]).starts_with("hugetlb");
        EXPECT_EQ(k["huge_bytes"].get<uint64_t>(), hugetlb ? sizes[i] : 0) << n.dump();
        EXPECT_EQ(k["huge_bytes"].get<uint64_t>() + k["thp_bytes"].get<uint64_t>() + k["base_bytes"].get<uint64_t>(),
                  sizes[i])
            << n.dump();
    }
    EXPECT_FALSE(j["host_nodes"]["estimated"].get<bool>());
    EXPECT_EQ(j["host_nodes"]["total"]["total_bytes"].get<uint64_t>(), sizes[0] + sizes[1]) << j["host_nodes"].dump();
    EXPECT_NE(r.err.find("as numastat -p splits it"), std::string::npos) << r.err;
    EXPECT_EQ(j["stamps"]["mismatches"].get<uint64_t>(), 0u);
    for (const auto& v : j["vcpus"]) {
        EXPECT_TRUE(v["ok"].get<bool>()) << v.dump();
        EXPECT_EQ(v["mempolicy"], "bind:0") << "vCPU threads run under their node's policy";
    }
    EXPECT_FALSE(j["numa_balancing"]["advice"].get<std::string>().empty());
}

INSTANTIATE_TEST_SUITE_P(EveryBacking, NumaCheckBacking,
                         ::testing::Values(BackingCase{"anon", 64 * kMiB}, BackingCase{"shm", 64 * kMiB},
                                           BackingCase{"thp", 64 * kMiB}, BackingCase{"hugetlb2m", 64 * kMiB},
                                           BackingCase{"hugetlb1g", 1024 * kMiB}, BackingCase{"gmem", 64 * kMiB}),
                         [](const auto& info) { return std::string(info.param.backing); });

class RunBacking : public ::testing::TestWithParam<BackingCase> {};

TEST_P(RunBacking, RunsAndEveryStampChecks)
{
    REQUIRE_KVM();
    const auto& c = GetParam();
    if (std::string(c.backing) == "gmem")
        if (auto why = test::why_no_gmem(kvm); !why.empty())
            GTEST_SKIP() << why;
    PoolGuard pool(c.backing, c.mem_bytes);
    if (!pool.why_not().empty())
        GTEST_SKIP() << "cannot get " << c.backing << " pages: " << pool.why_not();
    auto r = run_minivmm(fmt::format("run --vcpus 2 --mem {}M --backing {} --passes 2 --duration 0 --json -", c.mem_bytes / kMiB,
                                     c.backing));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_json(r.out);
    EXPECT_EQ(j["status"], "completed");
    EXPECT_EQ(j["config"]["backing"], c.backing);
    EXPECT_EQ(j["verify"]["pages_checked"].get<uint64_t>(), c.mem_bytes / 4096);
    EXPECT_EQ(j["verify"]["mismatches"].get<uint64_t>(), 0u);
    for (const auto& v : j["vcpus"])
        EXPECT_EQ(v["passes"].get<uint64_t>(), 2u) << "each vCPU stops after its 2 passes";
}

INSTANTIATE_TEST_SUITE_P(EveryBacking, RunBacking,
                         ::testing::Values(BackingCase{"anon", 64 * kMiB}, BackingCase{"shm", 64 * kMiB},
                                           BackingCase{"thp", 64 * kMiB}, BackingCase{"hugetlb2m", 64 * kMiB},
                                           BackingCase{"hugetlb1g", 1024 * kMiB}, BackingCase{"gmem", 64 * kMiB}),
                         [](const auto& info) { return std::string(info.param.backing); });

// Off-policy memory: exit 3 and the first offending GPA range named. A
// one-node host cannot misplace pages, so the test hook (an environment
// variable of this minivmm only) judges them against a node they cannot be on.
TEST(NumaCheck, OffPolicyPagesExit3NamingTheFirstGpaRange)
{
    REQUIRE_KVM();
    auto r = run_minivmm("numa-check --numa node=0,cpus=0,mem=32M,host-nodes=0 --numa node=1,cpus=1,mem=32M --json -",
                         "env MINIVMM_TEST_EXPECT_HOST_NODES=7");
    EXPECT_EQ(r.exit_code, 3) << r.err;
    EXPECT_NE(r.err.find("misplaced memory: vnode 0: GPA 0x100000000-0x101ffffff (32.0 MiB) is on host node 0"),
              std::string::npos)
        << r.err;
    auto j = parse_json(r.out);
    EXPECT_FALSE(j["ok"].get<bool>());
    EXPECT_DOUBLE_EQ(j["vnodes"][0]["on_policy_pct"].get<double>(), 0.0);
    EXPECT_EQ(j["vnodes"][0]["first_offending_range"]["gpa"].get<uint64_t>(), 0x100000000ull);
}

TEST(NumaCheck, SampledModeSaysItSampled)
{
    REQUIRE_KVM();
    auto r = run_minivmm("numa-check --mem 64M --sample 100 --json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_json(r.out);
    EXPECT_TRUE(j["sampled"].get<bool>());
    const auto& n = j["vnodes"][0];
    EXPECT_EQ(n["pages_queried"].get<uint64_t>(), 100u);
    EXPECT_NE(r.err.find("sampled"), std::string::npos) << "the table says so too";
    // 100 sampled pages are shown as shares and an estimate, never as 0.4 MiB "on n0".
    EXPECT_FALSE(n.contains("bytes_per_host_node")) << n.dump();
    EXPECT_DOUBLE_EQ(n["share_per_host_node_pct"]["0"].get<double>(), 100.0) << n.dump();
    EXPECT_EQ(n["estimated_bytes_per_host_node"]["0"].get<uint64_t>(), 64 * kMiB) << n.dump();
    EXPECT_NE(r.err.find("n0: 100.0%"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("n0: 0.4 MiB"), std::string::npos) << r.err;
    EXPECT_TRUE(j["host_nodes"]["estimated"].get<bool>());
    // What it ran with (every report's config.machine and config.host).
    EXPECT_EQ(j["config"]["machine"]["nodes"][0]["mem_bytes"].get<uint64_t>(), 64 * kMiB) << j["config"].dump();
    EXPECT_FALSE(j["config"]["host"]["kernel"].get<std::string>().empty());
    EXPECT_NE(r.err.find("estimated from the sample"), std::string::npos) << r.err;
}

TEST(NumaCheck, RemoteAccessTouchesEveryPageOfEveryNode)
{
    REQUIRE_KVM();
    auto r = run_minivmm(fmt::format("numa-check --access remote --numa cpus=0,mem=32M,host-nodes=0 "
                                     "--numa cpus=1,mem=32M,backing=shm,host-nodes=0 --numa mem=16M,backing={} --json -",
                                     test::gmem_or(kvm, "thp")));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_json(r.out);
    EXPECT_EQ(j["access"], "remote");
    for (const auto& n : j["vnodes"])
        EXPECT_EQ(n["pages_not_present"].get<uint64_t>(), 0u) << n.dump();
    EXPECT_EQ(j["stamps"]["mismatches"].get<uint64_t>(), 0u);
}

// The vCPU threads pin themselves to their node's CPUs and take its policy.
TEST(VnumaMachine, VcpuThreadsArePinnedAndUnderTheirNodePolicy)
{
    REQUIRE_KVM();
    auto allowed = numa::current_thread_cpus();
    const int cpu = allowed.back();
    MachineConfig cfg = config_of(kvm, {fmt::format("cpus=0,mem=16M,host-nodes=0,host-cpus={}", cpu),
                                        "cpus=1,mem=16M"});
    cfg.workload.max_passes = 1;
    StressVm m(kvm, cfg);
    m.start();
    auto pinned = m.vcpu_thread_info(0);
    auto free = m.vcpu_thread_info(1);
    EXPECT_EQ(pinned.affinity, std::vector<int>{cpu});
    EXPECT_EQ(pinned.mempolicy, (numa::NodePolicy{numa::Policy::Bind, {0}}));
    EXPECT_GT(pinned.tid, 0);
    EXPECT_EQ(free.affinity, allowed) << "an unbound node's vCPUs are not pinned";
    EXPECT_EQ(free.mempolicy.policy, numa::Policy::Default);
    EXPECT_TRUE(m.wait_finished(std::chrono::seconds(30)));
    EXPECT_FALSE(m.failure());
    EXPECT_EQ(numa::current_thread_cpus(), allowed) << "the VMM's own thread is left alone";
}

// prealloc=on: every page exists, on its node, before the guest runs.
TEST(VnumaMachine, PreallocPopulatesBeforeBootOnlyWhereAsked)
{
    REQUIRE_KVM();
    MachineConfig cfg = config_of(kvm, {"cpus=0,mem=32M,host-nodes=0,prealloc=on",
                                        fmt::format("cpus=1,mem=32M,backing={},host-nodes=0,prealloc=on",
                                                    test::gmem_or(kvm, "shm")),
                                        "mem=32M"});
    StressVm m(kvm, cfg);
    ASSERT_EQ(m.prealloc_results().size(), 2u);
    for (size_t i = 0; i < 3; i++) {
        const Backing& b = m.node_backing(i);
        auto pl = numa::query_placement(b.host(), b.size(), 4096, {0});
        if (i < 2) {
            EXPECT_EQ(pl.pages_not_present, 0u) << "node " << i;
            EXPECT_EQ(pl.pages_per_node[0], b.size() / 4096) << "node " << i;
        } else {
            EXPECT_EQ(pl.pages_not_present, b.size() / 4096) << "node 2 was not asked to prealloc";
        }
    }
    for (const auto& r : m.prealloc_results()) {
        EXPECT_EQ(r.bytes, 32 * kMiB);
        EXPECT_GT(r.seconds, 0);
    }
}

// mbind reached the backing before anything touched it, guest_memfd included
// where the host has it (thp in its place where not).
TEST(VnumaMachine, HostPolicyIsOnEveryBackingsMapping)
{
    REQUIRE_KVM();
    MachineConfig cfg = config_of(kvm, {"cpus=0,mem=16M,host-nodes=0",
                                        fmt::format("cpus=1,mem=16M,backing={},host-nodes=0", test::gmem_or(kvm, "thp")),
                                        "mem=16M,backing=shm,host-nodes=0,policy=preferred", "mem=16M"});
    StressVm m(kvm, cfg);
    EXPECT_EQ(numa::query_range_policy(m.node_backing(0).host()), (numa::NodePolicy{numa::Policy::Bind, {0}}));
    EXPECT_EQ(numa::query_range_policy(m.node_backing(1).host()), (numa::NodePolicy{numa::Policy::Bind, {0}}));
    EXPECT_EQ(numa::query_range_policy(m.node_backing(2).host()), (numa::NodePolicy{numa::Policy::Preferred, {0}}));
    EXPECT_EQ(numa::query_range_policy(m.node_backing(3).host()).policy, numa::Policy::Default);
    auto untouched = numa::query_placement(m.node_backing(0).host(), 16 * kMiB);
    EXPECT_EQ(untouched.pages_not_present, 16 * kMiB / 4096) << "policy first, pages later";
}

TEST(Caps, ShowsHugetlbPoolsWithUseAndSysfsFiles)
{
    REQUIRE_KVM();
    PoolGuard pool("hugetlb2m", 4 * kMiB);
    if (!pool.why_not().empty())
        GTEST_SKIP() << pool.why_not();
    auto r = run_minivmm("caps --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_json(r.out);
    bool found = false;
    for (const auto& p : j["hugetlb_pools"])
        if (p["page_bytes"].get<uint64_t>() == 2 * kMiB && p["node"].get<int>() == -1) {
            found = true;
            EXPECT_GE(p["free"].get<uint64_t>(), 2u);
            EXPECT_EQ(p["backing"], "hugetlb2m");
            EXPECT_NE(p["sysfs"].get<std::string>().find("nr_hugepages"), std::string::npos);
            EXPECT_TRUE(p.contains("in_use") && p.contains("resv"));
        }
    EXPECT_TRUE(found);
    auto t = run_minivmm("caps");
    EXPECT_NE(t.out.find("in use"), std::string::npos);
}
