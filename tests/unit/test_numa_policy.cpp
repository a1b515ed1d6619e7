// Policy parsing, validation and CPU planning against hand-built topologies.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "numa/policy.hpp"
#include "numa/topology.hpp"
#include "base/error.hpp"

using namespace mvm::numa;

namespace {

Topology make_topology(int nodes, int cpus_per_node) {
    Topology t;
    for (int n = 0; n < nodes; ++n) {
        Node node;
        node.id = n;
        for (int c = 0; c < cpus_per_node; ++c) node.cpus.push_back(n * cpus_per_node + c);
        node.mem_total_bytes = 1ull << 30;
        node.mem_free_bytes = 1ull << 29;
        t.nodes.push_back(node);
    }
    t.distance.assign(nodes, std::vector<int>(nodes, 20));
    for (int n = 0; n < nodes; ++n) t.distance[n][n] = 10;
    return t;
}

std::string usage_message(const NodePolicy& p, const Topology& t) {
    try {
        p.validate(t);
    } catch (const mvm::UsageError& e) {
        EXPECT_EQ(e.exit_code(), mvm::kExitUsage);
        return e.what();
    }
    return "";
}

}  // namespace

TEST(NumaPolicy, ParsePolicy) {
    EXPECT_EQ(parse_policy("default"), Policy::Default);
    EXPECT_EQ(parse_policy("bind"), Policy::Bind);
    EXPECT_EQ(parse_policy("preferred"), Policy::Preferred);
    EXPECT_EQ(parse_policy("interleave"), Policy::Interleave);
    EXPECT_FALSE(parse_policy("Bind").has_value());
    EXPECT_FALSE(parse_policy("").has_value());
    EXPECT_FALSE(parse_policy("local").has_value());
    for (Policy p : {Policy::Default, Policy::Bind, Policy::Preferred, Policy::Interleave})
        EXPECT_EQ(parse_policy(policy_name(p)), p);
}

TEST(NumaPolicy, ToString) {
    EXPECT_EQ(to_string(NodePolicy{Policy::Default, {}}), "default");
    EXPECT_EQ(to_string(NodePolicy{Policy::Interleave, {0, 1, 2}}), "interleave:0-2");
}

TEST(NumaPolicy, ValidateAcceptsExistingNodes) {
    Topology t2 = make_topology(2, 4);
    Topology t4 = make_topology(4, 2);
    EXPECT_NO_THROW((NodePolicy{Policy::Bind, {0, 1}}.validate(t2)));
    EXPECT_NO_THROW((NodePolicy{Policy::Interleave, {0, 1, 2, 3}}.validate(t4)));
    EXPECT_NO_THROW((NodePolicy{Policy::Preferred, {3}}.validate(t4)));
    EXPECT_NO_THROW((NodePolicy{Policy::Default, {}}.validate(t2)));
}

TEST(NumaPolicy, ValidateNamesMissingNode) {
    Topology t2 = make_topology(2, 4);
    std::string msg = usage_message(NodePolicy{Policy::Bind, {0, 3}}, t2);
    EXPECT_EQ(msg, "host node 3 does not exist (host nodes: 0-1); use host-nodes= within 0-1");

    Topology t1 = make_topology(1, 2);
    EXPECT_EQ(usage_message(NodePolicy{Policy::Interleave, {3}}, t1),
              "host node 3 does not exist (host nodes: 0); use host-nodes= within 0");

    Topology t4 = make_topology(4, 2);
    msg = usage_message(NodePolicy{Policy::Preferred, {7}}, t4);
    EXPECT_NE(msg.find("host node 7 does not exist"), std::string::npos) << msg;
    EXPECT_NE(msg.find("0-3"), std::string::npos) << msg;
}

TEST(NumaPolicy, ValidatePreferredTakesExactlyOneNode) {
    Topology t2 = make_topology(2, 4);
    std::string msg = usage_message(NodePolicy{Policy::Preferred, {0, 1}}, t2);
    EXPECT_NE(msg.find("exactly one"), std::string::npos) << msg;
    msg = usage_message(NodePolicy{Policy::Preferred, {}}, t2);
    EXPECT_NE(msg.find("exactly one"), std::string::npos) << msg;
}

TEST(NumaPolicy, ValidateNodeListShape) {
    Topology t4 = make_topology(4, 2);
    EXPECT_NE(usage_message(NodePolicy{Policy::Bind, {}}, t4).find("host-nodes="), std::string::npos);
    EXPECT_NE(usage_message(NodePolicy{Policy::Default, {1}}, t4).find("default"), std::string::npos);
}

TEST(NumaCpus, CpusForNodes) {
    Topology t2 = make_topology(2, 4);
    EXPECT_EQ(cpus_for_nodes(t2, {0}), (std::vector<int>{0, 1, 2, 3}));
    EXPECT_EQ(cpus_for_nodes(t2, {1}), (std::vector<int>{4, 5, 6, 7}));
    EXPECT_EQ(cpus_for_nodes(t2, {1, 0}), (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
    EXPECT_TRUE(cpus_for_nodes(t2, {}).empty());

    Topology t4 = make_topology(4, 2);
    EXPECT_EQ(cpus_for_nodes(t4, {3, 1, 3}), (std::vector<int>{2, 3, 6, 7}));
    EXPECT_THROW(cpus_for_nodes(t4, {4}), mvm::UsageError);
}

TEST(NumaCpus, CpusForNodesInterleavedIds) {
    // Node CPU lists need not be contiguous (e.g. SMT siblings on the other half).
    Topology t;
    t.nodes.push_back(Node{0, {0, 1, 4, 5}, 0, 0});
    t.nodes.push_back(Node{2, {2, 3, 6, 7}, 0, 0});
    EXPECT_EQ(cpus_for_nodes(t, {2}), (std::vector<int>{2, 3, 6, 7}));
    EXPECT_EQ(usage_message(NodePolicy{Policy::Bind, {1}}, t),
              "host node 1 does not exist (host nodes: 0,2); use host-nodes= within 0,2");
}

// Nodemasks are sized from the kernel's nr_node_ids (the possible node list),
// not a constant: get_mempolicy refuses a maxnode below it with EINVAL.
TEST(NumaNodemask, SizedFromTheKernelsPossibleNodes) {
    std::ifstream f("/sys/devices/system/node/possible");
    std::string list;
    if (f >> list) {
        auto ids = mvm::numa::parse_cpu_list(list);
        ASSERT_FALSE(ids.empty());
        EXPECT_EQ(mvm::numa::node_id_limit(), ids.back() + 1) << list;
    } else {
        EXPECT_GE(mvm::numa::node_id_limit(), 1);
    }
    for (const auto& n : mvm::numa::host_topology().nodes)
        EXPECT_LT(n.id, mvm::numa::node_id_limit());
    // The thread's policy reads back through a mask of that size.
    EXPECT_NO_THROW(mvm::numa::current_thread_policy());
    mvm::numa::ThreadPolicyScope scope({mvm::numa::Policy::Bind, {mvm::numa::host_topology().nodes[0].id}});
    EXPECT_EQ(mvm::numa::current_thread_policy().policy, mvm::numa::Policy::Bind);
}
