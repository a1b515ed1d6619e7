// --numa parsing, vNUMA planning and host-resource checks on supplied 2- and
// 4-node topologies: no KVM and no NUMA host needed.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "memory/hugetlb.hpp"
#include "cli/options.hpp"
#include "base/error.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/stress/vnuma.hpp"

using namespace mvm;
using mvm::numa::Policy;

namespace {

constexpr uint64_t kMiB = 1ull << 20, kGiB = 1ull << 30;

numa::Topology make_topology(int nodes, int cpus_per_node)
{
    numa::Topology t;
    for (int n = 0; n < nodes; n++) {
        numa::Node node;
        node.id = n;
        for (int c = 0; c < cpus_per_node; c++)
            node.cpus.push_back(n * cpus_per_node + c);
        node.mem_total_bytes = 16 * kGiB;
        node.mem_free_bytes = 15 * kGiB;
        t.nodes.push_back(node);
    }
    for (int i = 0; i < nodes; i++) {
        t.distance.emplace_back();
        for (int j = 0; j < nodes; j++)
            t.distance.back().push_back(i == j ? 10 : 20);
    }
    return t;
}

MachineConfig parse(const numa::Topology& topo, std::vector<std::string> numa, std::string vcpus = "",
                    std::string access = "local")
{
    cli::VmOptions o;
    o.numa = std::move(numa);
    if (!vcpus.empty()) {
        o.vcpus = vcpus;
        o.vcpus_given = true;
    }
    o.access = access;
    return o.parse(topo);
}

std::string usage_error(const numa::Topology& topo, std::vector<std::string> numa, std::string vcpus = "",
                        std::string access = "local")
{
    try {
        parse(topo, std::move(numa), vcpus, access);
    } catch (const UsageError& e) {
        return e.what();
    }
    return "(no error)";
}

// Boot parameters as the guest would get them, in a plain buffer.
struct Table {
    std::vector<uint8_t> buf;
    GuestLayout layout;
    const mvm_boot_params* bp() const { return reinterpret_cast<const mvm_boot_params*>(buf.data()); }
};

Table build_table(const MachineConfig& cfg)
{
    Table t;
    t.layout = plan_layout(cfg);
    t.buf.assign(t.layout.boot_params_bytes, 0);
    write_vnuma_table(cfg, t.layout, reinterpret_cast<mvm_boot_params*>(t.buf.data()));
    return t;
}

// Every page of every node belongs to exactly one vCPU.
void expect_exact_cover(const MachineConfig& cfg, const Table& t)
{
    std::vector<std::pair<uint64_t, uint64_t>> pieces;  // gpa, pages
    for (uint32_t v = 0; v < cfg.vcpus; v++) {
        const auto& vp = t.bp()->vcpu[v];
        uint64_t sum = 0;
        for (uint32_t k = 0; k < vp.nr_segments; k++) {
            pieces.emplace_back(vp.seg[k].gpa, vp.seg[k].pages);
            sum += vp.seg[k].pages;
        }
        EXPECT_EQ(sum, vp.total_pages) << "vCPU " << v;
    }
    std::sort(pieces.begin(), pieces.end());
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (const auto& r : t.layout.ram)
        ranges.emplace_back(r.gpa, r.bytes / 4096);
    // Merge adjacent pieces and compare to the node ranges.
    std::vector<std::pair<uint64_t, uint64_t>> merged;
    for (auto [g, p] : pieces) {
        ASSERT_GT(p, 0u);
        if (!merged.empty() && merged.back().first + merged.back().second * 4096 == g)
            merged.back().second += p;
        else {
            if (!merged.empty()) {
                ASSERT_LE(merged.back().first + merged.back().second * 4096, g) << "pieces overlap";
            }
            merged.emplace_back(g, p);
        }
    }
    EXPECT_EQ(merged, ranges);
}

// The virtual node whose GPA range holds `gpa`.
int vnode_of(const Table& t, uint64_t gpa)
{
    for (const auto& r : t.layout.ram)
        if (gpa >= r.gpa && gpa < r.gpa + r.bytes)
            return static_cast<int>(r.node);
    return -1;
}

}  // namespace

TEST(NumaOption, ParsesEveryKey)
{
    NodeConfig n = cli::parse_numa_option(
        "node=1,cpus=0-1,cpus=4,mem=512M,backing=hugetlb2m,host-nodes=0,host-nodes=2,policy=interleave,prealloc=on,"
        "host-cpus=3",
        0, BackingKind::Anon);
    EXPECT_EQ(n.id, 1u);
    EXPECT_EQ(n.vcpus, (std::vector<uint32_t>{0, 1, 4}));
    EXPECT_EQ(n.mem_bytes, 512 * kMiB);
    EXPECT_EQ(n.backing, BackingKind::Hugetlb2M);
    EXPECT_EQ(n.host_policy.policy, Policy::Interleave);
    EXPECT_EQ(n.host_policy.nodes, (std::vector<int>{0, 2}));
    EXPECT_TRUE(n.prealloc);
    EXPECT_EQ(n.host_cpus, (std::vector<int>{3}));
    EXPECT_TRUE(n.host_cpus_given);
    EXPECT_EQ(n.origin, "--numa node=1");
}

TEST(NumaOption, DefaultsHostNodesMeanBindAndBackingComesFromBackingOption)
{
    NodeConfig n = cli::parse_numa_option("mem=64M,host-nodes=1", 3, BackingKind::Thp);
    EXPECT_EQ(n.id, 3u);
    EXPECT_EQ(n.backing, BackingKind::Thp);
    EXPECT_EQ(n.host_policy.policy, Policy::Bind);
    EXPECT_FALSE(n.prealloc);
    NodeConfig d = cli::parse_numa_option("mem=64M", 0, BackingKind::Anon);
    EXPECT_EQ(d.host_policy.policy, Policy::Default);
    EXPECT_TRUE(d.vcpus.empty());
}

TEST(NumaOption, BadValuesNameTheKeyAndTheFix)
{
    struct Case {
        const char* value;
        const char* mention;
    } cases[] = {
        {"", "empty"},
        {"cpus=0", "mem= is missing"},
        {"mem=64M,colour=red", "unknown key 'colour'"},
        {"mem=64M,cpus=a-b", "cpus='a-b'"},
        {"mem=64M,cpus=3-1", "cpus='3-1'"},
        {"mem=64M,cpus=0,cpus=0", "lists a vCPU twice"},
        {"mem=64M,mem=32M", "mem= is given twice"},
        {"mem=lots", "mem"},
        {"mem=64M,backing=tmpfs", "backing='tmpfs'"},
        {"mem=64M,policy=firm", "policy='firm'"},
        {"mem=64M,policy=bind", "needs host-nodes="},
        {"mem=64M,prealloc=maybe", "not on or off"},
        {"mem=64M,node=99", "node"},
        {"mem=64M,,cpus=0", "not key=value"},
        {"mem=64M,cpus=2000", "out of range"},
    };
    for (const auto& c : cases) {
        try {
            cli::parse_numa_option(c.value, 1, BackingKind::Anon);
            ADD_FAILURE() << "no error for '" << c.value << "'";
        } catch (const UsageError& e) {
            std::string w = e.what();
            EXPECT_NE(w.find("--numa"), std::string::npos) << w;
            EXPECT_NE(w.find(c.mention), std::string::npos) << "'" << c.value << "': " << w;
        }
    }
}

TEST(NumaOption, AccessModes)
{
    EXPECT_EQ(cli::parse_access("local").mode, Access::Local);
    auto r = cli::parse_access("remote");
    EXPECT_EQ(r.mode, Access::Remote);
    EXPECT_EQ(r.remote_pct, 100u);
    auto m = cli::parse_access("mixed:30");
    EXPECT_EQ(m.mode, Access::Mixed);
    EXPECT_EQ(m.remote_pct, 30u);
    EXPECT_EQ(to_string(m), "mixed:30");
    EXPECT_THROW(cli::parse_access("mixed:130"), UsageError);
    EXPECT_THROW(cli::parse_access("mixed:"), UsageError);
    EXPECT_THROW(cli::parse_access("far"), UsageError);
}

// Two host nodes: each virtual node bound to its own, vCPUs pinned there.
TEST(VnumaPlan, TwoNodeTopologyPoliciesPinningAndTable)
{
    auto topo = make_topology(2, 4);
    MachineConfig cfg = parse(topo, {"node=0,cpus=0-1,mem=256M,host-nodes=0",
                                     "node=1,cpus=2-3,mem=128M,backing=hugetlb2m,host-nodes=1,policy=bind"});
    ASSERT_EQ(cfg.vcpus, 4u) << "vCPUs default to the highest cpus= + 1";
    ASSERT_EQ(cfg.nodes.size(), 2u);
    EXPECT_EQ(cfg.nodes[0].host_policy, (numa::NodePolicy{Policy::Bind, {0}}));
    EXPECT_EQ(cfg.nodes[1].host_policy, (numa::NodePolicy{Policy::Bind, {1}}));
    EXPECT_EQ(cfg.nodes[0].host_cpus, (std::vector<int>{0, 1, 2, 3}));
    EXPECT_EQ(cfg.nodes[1].host_cpus, (std::vector<int>{4, 5, 6, 7}));
    EXPECT_EQ(cfg.nodes[1].backing, BackingKind::Hugetlb2M);

    Table t = build_table(cfg);
    const auto* bp = t.bp();
    ASSERT_EQ(bp->nr_vnodes, 2u);
    EXPECT_EQ(bp->vnode[0].range[0].gpa, MVM_RAM_GPA);
    EXPECT_EQ(bp->vnode[0].range[0].pages, 256 * kMiB / 4096);
    EXPECT_EQ(bp->vnode[1].range[0].gpa % kGiB, 0u) << "each node starts 1 GiB aligned";
    EXPECT_GE(bp->vnode[1].range[0].gpa, MVM_RAM_GPA + 256 * kMiB);
    EXPECT_EQ(bp->vnode[1].range[0].pages, 128 * kMiB / 4096);
    EXPECT_EQ(bp->vnode[0].vcpu_mask[0], 0b0011u);
    EXPECT_EQ(bp->vnode[1].vcpu_mask[0], 0b1100u);
    for (uint32_t v = 0; v < 4; v++) {
        EXPECT_EQ(bp->vcpu[v].vnode, v / 2);
        ASSERT_EQ(bp->vcpu[v].nr_segments, 1u);
        EXPECT_EQ(vnode_of(t, bp->vcpu[v].seg[0].gpa), static_cast<int>(v / 2)) << "local access";
    }
    expect_exact_cover(cfg, t);
}

// Four host nodes, four virtual nodes with different policies and backings.
TEST(VnumaPlan, FourNodeTopologyEveryPolicy)
{
    auto topo = make_topology(4, 2);
    MachineConfig cfg = parse(topo, {"node=0,cpus=0-1,mem=64M,host-nodes=0",
                                     "node=1,cpus=2,mem=64M,host-nodes=1-2,policy=interleave,backing=shm",
                                     "node=2,cpus=3,mem=64M,host-nodes=3,policy=preferred,host-cpus=7",
                                     "node=3,cpus=4-5,mem=64M,backing=thp"});
    ASSERT_EQ(cfg.vcpus, 6u);
    EXPECT_EQ(cfg.nodes[0].host_policy, (numa::NodePolicy{Policy::Bind, {0}}));
    EXPECT_EQ(cfg.nodes[0].host_cpus, (std::vector<int>{0, 1}));
    EXPECT_EQ(cfg.nodes[1].host_policy, (numa::NodePolicy{Policy::Interleave, {1, 2}}));
    EXPECT_EQ(cfg.nodes[1].host_cpus, (std::vector<int>{2, 3, 4, 5})) << "pinned to the union of its nodes' CPUs";
    EXPECT_EQ(cfg.nodes[2].host_policy, (numa::NodePolicy{Policy::Preferred, {3}}));
    EXPECT_EQ(cfg.nodes[2].host_cpus, (std::vector<int>{7})) << "host-cpus= wins over the node's CPUs";
    EXPECT_EQ(cfg.nodes[3].host_policy.policy, Policy::Default);
    EXPECT_TRUE(cfg.nodes[3].host_cpus.empty()) << "no host nodes, no pinning";

    Table t = build_table(cfg);
    ASSERT_EQ(t.bp()->nr_vnodes, 4u);
    for (uint32_t i = 0; i < 4; i++) {
        EXPECT_EQ(t.bp()->vnode[i].id, i);
        EXPECT_EQ(t.bp()->vnode[i].range[0].gpa, t.layout.ram[i].gpa);
    }
    const uint32_t expect_vnode[] = {0, 0, 1, 2, 3, 3};
    for (uint32_t v = 0; v < 6; v++) {
        EXPECT_EQ(t.bp()->vcpu[v].vnode, expect_vnode[v]);
        EXPECT_EQ(vnode_of(t, t.bp()->vcpu[v].seg[0].gpa), static_cast<int>(expect_vnode[v]));
    }
    expect_exact_cover(cfg, t);
}

TEST(VnumaPlan, RemoteAccessWorksInTheNextNode)
{
    auto topo = make_topology(4, 2);
    std::vector<std::string> spec = {"cpus=0,mem=64M", "cpus=1,mem=64M", "cpus=2,mem=64M", "cpus=3,mem=64M"};
    MachineConfig cfg = parse(topo, spec, "", "remote");
    Table t = build_table(cfg);
    for (uint32_t v = 0; v < 4; v++) {
        const auto& vp = t.bp()->vcpu[v];
        ASSERT_EQ(vp.nr_segments, 1u);
        EXPECT_EQ(vp.vnode, v);
        EXPECT_EQ(vnode_of(t, vp.seg[0].gpa), static_cast<int>((v + 1) % 4)) << "vCPU " << v;
    }
    expect_exact_cover(cfg, t);
}

TEST(VnumaPlan, MixedAccessSplitsEachWorkingSet)
{
    auto topo = make_topology(2, 2);
    MachineConfig cfg = parse(topo, {"cpus=0-1,mem=64M", "cpus=2-3,mem=64M"}, "", "mixed:25");
    Table t = build_table(cfg);
    for (uint32_t v = 0; v < 4; v++) {
        const auto& vp = t.bp()->vcpu[v];
        uint64_t local = 0, remote = 0;
        for (uint32_t k = 0; k < vp.nr_segments; k++)
            (vnode_of(t, vp.seg[k].gpa) == static_cast<int>(vp.vnode) ? local : remote) += vp.seg[k].pages;
        EXPECT_EQ(vnode_of(t, vp.seg[0].gpa), static_cast<int>(vp.vnode)) << "local piece first";
        EXPECT_NEAR(static_cast<double>(remote) / static_cast<double>(local + remote), 0.25, 0.01) << "vCPU " << v;
    }
    expect_exact_cover(cfg, t);
}

TEST(VnumaPlan, MemoryOnlyNodeIsReachedAndCovered)
{
    auto topo = make_topology(2, 2);
    MachineConfig cfg = parse(topo, {"cpus=0-1,mem=64M,host-nodes=0", "cpus=2,mem=32M,host-nodes=1", "mem=16M"});
    Table t = build_table(cfg);
    EXPECT_EQ(t.bp()->vnode[2].vcpu_mask[0], 0u);
    bool reached = false;
    for (uint32_t v = 0; v < 3; v++)
        for (uint32_t k = 0; k < t.bp()->vcpu[v].nr_segments; k++)
            reached |= vnode_of(t, t.bp()->vcpu[v].seg[k].gpa) == 2;
    EXPECT_TRUE(reached);
    expect_exact_cover(cfg, t);
}

TEST(VnumaPlan, VcpusSplitOverNodesWhenNoCpusGiven)
{
    auto topo = make_topology(2, 2);
    MachineConfig cfg = parse(topo, {"mem=64M", "mem=64M"}, "4");
    EXPECT_EQ(cfg.nodes[0].vcpus, (std::vector<uint32_t>{0, 1}));
    EXPECT_EQ(cfg.nodes[1].vcpus, (std::vector<uint32_t>{2, 3}));
}

TEST(VnumaPlan, BadTopologyInputNamesTheNode)
{
    auto topo = make_topology(2, 2);
    EXPECT_NE(usage_error(topo, {"mem=64M,host-nodes=5"}).find("host node 5 does not exist"), std::string::npos);
    EXPECT_NE(usage_error(topo, {"cpus=0,mem=64M,host-cpus=9"}).find("host CPU 9 does not exist"), std::string::npos);
    EXPECT_NE(usage_error(topo, {"cpus=0-1,mem=64M", "cpus=1,mem=64M"}).find("must not overlap"), std::string::npos);
    EXPECT_NE(usage_error(topo, {"cpus=0,mem=3M,backing=hugetlb2m"}).find("not a multiple of the hugetlb2m page size"),
              std::string::npos);
    EXPECT_NE(usage_error(topo, {"cpus=0,mem=64M", "cpus=1,mem=64M"}, "3").find("vCPU 2 belongs to no virtual node"),
              std::string::npos);
    EXPECT_NE(usage_error(topo, {"node=0,cpus=0,mem=64M", "node=0,cpus=1,mem=64M"}).find("given twice"),
              std::string::npos);
    EXPECT_NE(usage_error(topo, {"cpus=0,mem=64M,policy=preferred,host-nodes=0-1"}).find("exactly one"),
              std::string::npos);
    EXPECT_NE(usage_error(topo, {"cpus=0-1,mem=64M"}, "", "remote").find("at least 2 virtual nodes"), std::string::npos);
    auto memless = topo;
    memless.nodes[1].mem_total_bytes = 0;
    EXPECT_NE(usage_error(memless, {"cpus=0,mem=64M,host-nodes=1"}).find("has no memory"), std::string::npos);
}

TEST(VnumaPlan, MemMustAgreeWithNumaSizes)
{
    auto topo = make_topology(2, 2);
    cli::VmOptions o;
    o.numa = {"mem=64M", "mem=64M"};
    o.mem = "256M";
    o.mem_given = true;
    try {
        o.parse(topo);
        ADD_FAILURE() << "no error";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("sum of the --numa mem="), std::string::npos) << e.what();
    }
    o.mem = "128M";
    EXPECT_NO_THROW(o.parse(topo));
}

TEST(HugetlbCheck, NamesMissingPagesAndTheSysfsFile)
{
    auto topo = make_topology(2, 2);
    MachineConfig cfg = parse(topo, {"cpus=0,mem=64M,backing=hugetlb2m,host-nodes=1", "cpus=1,mem=64M,backing=hugetlb2m"});
    HugetlbPool global{2 * kMiB, -1, 100, 100, 0, 0, "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"};
    HugetlbPool node1{2 * kMiB, 1, 10, 10, 0, 0, "/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"};
    std::string why = check_hugetlb_pools(cfg, {global, node1});
    EXPECT_NE(why.find("host node 1"), std::string::npos) << why;
    EXPECT_NE(why.find("22 missing"), std::string::npos) << why;  // 32 needed, 10 free
    EXPECT_NE(why.find(node1.nr_path), std::string::npos) << why;

    node1.free = node1.nr = 32;
    global.free = 50;  // 64 needed in all
    why = check_hugetlb_pools(cfg, {global, node1});
    EXPECT_NE(why.find("14 missing"), std::string::npos) << why;
    EXPECT_NE(why.find(global.nr_path), std::string::npos) << why;

    global.free = 64;
    global.resv = 1;  // reserved pages are not available
    EXPECT_NE(check_hugetlb_pools(cfg, {global, node1}).find("1 missing"), std::string::npos);
    global.resv = 0;
    EXPECT_EQ(check_hugetlb_pools(cfg, {global, node1}), "");

    MachineConfig gig = parse(topo, {"cpus=0-1,mem=1G,backing=hugetlb1g"});
    EXPECT_NE(check_hugetlb_pools(gig, {global}).find("does not offer"), std::string::npos);
}

TEST(GmemCheck, KernelWithoutGuestMemfdOrItsMmapGetsOneLine)
{
    EXPECT_EQ(check_gmem_support("--backing", 1, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED), "");
    std::string none = check_gmem_support("--numa node=1", 0, 0);
    EXPECT_NE(none.find("--numa node=1"), std::string::npos) << none;
    EXPECT_NE(none.find("KVM_CAP_GUEST_MEMFD"), std::string::npos) << none;
    EXPECT_NE(none.find("use another backing"), std::string::npos) << none;
    std::string nommap = check_gmem_support("--backing", 1, 0);
    EXPECT_NE(nommap.find("MMAP|INIT_SHARED"), std::string::npos) << nommap;
}
