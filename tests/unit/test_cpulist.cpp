// Unit tests for numa/topology.hpp: CPU list parsing/formatting and the
// Topology helpers on hand-built multi-node topologies.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sched.h>

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "numa/topology.hpp"

using ::testing::ElementsAre;
using ::testing::HasSubstr;

namespace mvm::numa {
namespace {

TEST(ParseCpuList, Example)
{
    EXPECT_THAT(parse_cpu_list("0-3,8,10-11"), ElementsAre(0, 1, 2, 3, 8, 10, 11));
}

TEST(ParseCpuList, SingleCpusAndRanges)
{
    EXPECT_THAT(parse_cpu_list("0"), ElementsAre(0));
    EXPECT_THAT(parse_cpu_list("5"), ElementsAre(5));
    EXPECT_THAT(parse_cpu_list("2-2"), ElementsAre(2));
    EXPECT_THAT(parse_cpu_list("6-9"), ElementsAre(6, 7, 8, 9));
    EXPECT_THAT(parse_cpu_list("1,3,5"), ElementsAre(1, 3, 5));
    EXPECT_EQ(parse_cpu_list("0-127").size(), 128u);
}

TEST(ParseCpuList, SortsAndDeduplicates)
{
    EXPECT_THAT(parse_cpu_list("8,0-2"), ElementsAre(0, 1, 2, 8));
    EXPECT_THAT(parse_cpu_list("3,1,2"), ElementsAre(1, 2, 3));
    EXPECT_THAT(parse_cpu_list("1,1,0-2,2"), ElementsAre(0, 1, 2));
    EXPECT_THAT(parse_cpu_list("0-5,2-7"), ElementsAre(0, 1, 2, 3, 4, 5, 6, 7));
}

TEST(ParseCpuList, RejectsBadSyntax)
{
    for (const char* bad : {"", "a", "x1", "1-", "-1", "+1", "1,,2", ",1", "1-2-3", "1 2", " 1", "1;2", "1-a", "0x3",
                            "1.5", "--1", "99999999999"}) {
        EXPECT_THROW(parse_cpu_list(bad), std::invalid_argument) << "'" << bad << "'";
    }
}

TEST(ParseCpuList, RejectsBackwardsRanges)
{
    try {
        parse_cpu_list("0-1,7-3");
        FAIL() << "a backwards range was accepted";
    } catch (const std::invalid_argument& e) {
        EXPECT_THAT(e.what(), HasSubstr("7-3"));
        EXPECT_THAT(e.what(), HasSubstr("backwards"));
    }
    EXPECT_THROW(parse_cpu_list("1-0"), std::invalid_argument);
}

TEST(ParseCpuList, ErrorNamesTheInput)
{
    try {
        parse_cpu_list("0-3,x");
        FAIL();
    } catch (const std::invalid_argument& e) {
        EXPECT_THAT(e.what(), HasSubstr("0-3,x"));
    }
}

TEST(FormatCpuList, CollapsesRuns)
{
    EXPECT_EQ(format_cpu_list({}), "");
    EXPECT_EQ(format_cpu_list({5}), "5");
    EXPECT_EQ(format_cpu_list({1, 2}), "1-2");
    EXPECT_EQ(format_cpu_list({0, 2, 4}), "0,2,4");
    EXPECT_EQ(format_cpu_list({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
    EXPECT_EQ(format_cpu_list({0, 1, 2, 3, 4, 5, 6, 7}), "0-7");
    EXPECT_EQ(format_cpu_list({3, 5, 6, 7, 100}), "3,5-7,100");
}

TEST(FormatCpuList, RoundTrip)
{
    for (const char* s : {"0", "0-3,8,10-11", "1,3,5,7", "0-63", "2-3,6-7,10-11,14-15", "0,2-4,6,100-101"}) {
        EXPECT_EQ(format_cpu_list(parse_cpu_list(s)), s);
    }
    // And the other way: a parsed list survives format + parse.
    std::vector<int> cpus = {0, 1, 2, 5, 9, 10, 11, 12, 40};
    EXPECT_EQ(parse_cpu_list(format_cpu_list(cpus)), cpus);
}

// Two nodes: 0 holds CPUs 0-3, 1 holds CPUs 4-7.
Topology two_nodes()
{
    Topology t;
    t.nodes.push_back({0, {0, 1, 2, 3}, 8ull << 30, 6ull << 30});
    t.nodes.push_back({1, {4, 5, 6, 7}, 8ull << 30, 7ull << 30});
    t.distance = {{10, 21}, {21, 10}};
    return t;
}

// Four nodes with sparse ids and interleaved CPUs (as on SMT hosts where
// siblings are numbered far apart), and one memory-only node.
Topology four_nodes()
{
    Topology t;
    t.nodes.push_back({0, {0, 4, 8, 12}, 4ull << 30, 1ull << 30});
    t.nodes.push_back({1, {1, 5, 9, 13}, 4ull << 30, 1ull << 30});
    t.nodes.push_back({4, {2, 6, 10, 14, 3, 7}, 4ull << 30, 1ull << 30});
    t.nodes.push_back({7, {}, 16ull << 30, 16ull << 30});  // CXL-style memory-only node
    t.distance = {{10, 16, 22, 30}, {16, 10, 22, 30}, {22, 22, 10, 30}, {30, 30, 30, 10}};
    return t;
}

TEST(Topology, NodeById)
{
    Topology t = two_nodes();
    ASSERT_NE(t.node(0), nullptr);
    ASSERT_NE(t.node(1), nullptr);
    EXPECT_THAT(t.node(1)->cpus, ElementsAre(4, 5, 6, 7));
    EXPECT_EQ(t.node(1)->mem_free_bytes, 7ull << 30);
    EXPECT_EQ(t.node(2), nullptr);
    EXPECT_EQ(t.node(-1), nullptr);
}

TEST(Topology, NodeByIdUsesIdsNotIndexes)
{
    Topology t = four_nodes();
    EXPECT_EQ(t.node(4)->id, 4);
    EXPECT_THAT(t.node(4)->cpus, ElementsAre(2, 6, 10, 14, 3, 7));
    EXPECT_EQ(t.node(7)->id, 7);
    EXPECT_TRUE(t.node(7)->cpus.empty());
    EXPECT_EQ(t.node(2), nullptr);  // index 2 exists, id 2 does not
    EXPECT_EQ(t.node(3), nullptr);
}

TEST(Topology, HasCpu)
{
    Topology t = two_nodes();
    for (int c = 0; c < 8; c++)
        EXPECT_TRUE(t.has_cpu(c)) << c;
    EXPECT_FALSE(t.has_cpu(8));
    EXPECT_FALSE(t.has_cpu(-1));
    Topology f = four_nodes();
    EXPECT_TRUE(f.has_cpu(14));
    EXPECT_FALSE(f.has_cpu(11));  // not in any node
    EXPECT_FALSE(f.has_cpu(15));
}

TEST(Topology, NodeOfCpu)
{
    Topology t = two_nodes();
    EXPECT_EQ(t.node_of_cpu(0), 0);
    EXPECT_EQ(t.node_of_cpu(3), 0);
    EXPECT_EQ(t.node_of_cpu(4), 1);
    EXPECT_EQ(t.node_of_cpu(7), 1);
    EXPECT_EQ(t.node_of_cpu(8), -1);
    Topology f = four_nodes();
    EXPECT_EQ(f.node_of_cpu(0), 0);
    EXPECT_EQ(f.node_of_cpu(13), 1);
    EXPECT_EQ(f.node_of_cpu(3), 4);   // returns the id, not the index (2)
    EXPECT_EQ(f.node_of_cpu(14), 4);
    EXPECT_EQ(f.node_of_cpu(11), -1);
}

TEST(Topology, AllCpusIsSortedUnion)
{
    EXPECT_THAT(two_nodes().all_cpus(), ElementsAre(0, 1, 2, 3, 4, 5, 6, 7));
    EXPECT_THAT(four_nodes().all_cpus(), ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14));
    EXPECT_TRUE(Topology{}.all_cpus().empty());
}

TEST(Topology, EmptyTopology)
{
    Topology t;
    EXPECT_EQ(t.node(0), nullptr);
    EXPECT_FALSE(t.has_cpu(0));
    EXPECT_EQ(t.node_of_cpu(0), -1);
}

TEST(Topology, FormatOfNodeCpus)
{
    Topology f = four_nodes();
    std::vector<int> cpus = f.node(4)->cpus;
    std::sort(cpus.begin(), cpus.end());
    EXPECT_EQ(format_cpu_list(cpus), "2-3,6-7,10,14");
    EXPECT_EQ(format_cpu_list(f.all_cpus()), "0-10,12-14");
}

// The real host: whatever it is, it must be self-consistent.
TEST(HostTopology, IsConsistent)
{
    Topology t = host_topology();
    ASSERT_FALSE(t.nodes.empty());
    ASSERT_EQ(t.distance.size(), t.nodes.size());
    std::set<int> ids;
    for (size_t i = 0; i < t.nodes.size(); i++) {
        EXPECT_TRUE(ids.insert(t.nodes[i].id).second) << "node id " << t.nodes[i].id << " twice";
        ASSERT_EQ(t.distance[i].size(), t.nodes.size());
        EXPECT_EQ(t.distance[i][i], 10) << "local distance of node " << t.nodes[i].id;
        EXPECT_LE(t.nodes[i].mem_free_bytes, t.nodes[i].mem_total_bytes);
    }
    EXPECT_FALSE(t.all_cpus().empty());
    int cpu = sched_getcpu();
    ASSERT_GE(cpu, 0);
    EXPECT_TRUE(t.has_cpu(cpu)) << "the CPU this test runs on (" << cpu << ") is in no node";
}

}  // namespace
}  // namespace mvm::numa

// Regression: a range up to INT_MAX once looped until memory ran out (and
// overflowed int at the end). CPU numbers are bounded.
TEST(CpuList, HugeRangeIsRefusedNotExpanded)
{
    EXPECT_THROW(mvm::numa::parse_cpu_list("0-2147483647"), std::invalid_argument);
    EXPECT_THROW(mvm::numa::parse_cpu_list("70000"), std::invalid_argument);
    EXPECT_EQ(mvm::numa::parse_cpu_list("65535").size(), 1u);
}
