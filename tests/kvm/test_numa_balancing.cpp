// `minivmm numa-balancing`: the guest run with kernel NUMA balancing off/on x
// memory bound/unbound. The relations need two host NUMA nodes and a writable
// numa_balancing: `scripts/test svm` runs SvmTwoNodes.* inside the emulated
// two-node SVM host (scripts/svm-host --nodes 2). On our own one-node host the
// command runs the "off" variants only and never writes the sysctl.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engines/numa_balancing.hpp"
#include "kvm_test_util.hpp"
#include "numa/topology.hpp"

using mvm::test::run_minivmm;

namespace {

constexpr const char* kSysctl = "/proc/sys/kernel/numa_balancing";
constexpr const char* kScanDir = "/sys/kernel/debug/sched/numa_balancing";
// Two virtual nodes, each vCPU pinned to its own host node: the variants
// differ only in the memory policy (bind:0 bind:1 vs default default).
constexpr const char* kTwoNodeGuest =
    "--vcpus 2 --numa node=0,cpus=0,mem=32M,host-nodes=0 --numa node=1,cpus=1,mem=32M,host-nodes=1";

std::string read_word(const std::string& path)
{
    std::ifstream f(path);
    std::string w;
    f >> w;
    return w;
}

// The scan knobs the command shortens, as they read now ("" when absent).
std::string scan_knobs()
{
    std::string s;
    for (const char* k : {"scan_delay_ms", "scan_period_min_ms", "scan_period_max_ms"})
        s += read_word(fmt::format("{}/{}", kScanDir, k)) + " ";
    return s;
}

int host_nodes() { return static_cast<int>(mvm::numa::host_topology().nodes.size()); }

// Empty when the balancing variants can run here, else why not.
std::string why_no_balancing_host()
{
    if (int n = host_nodes(); n < 2)
        return fmt::format("needs 2 host NUMA nodes (this host has {}); run it on the emulated two-node host: "
                           "scripts/test svm (SvmTwoNodes.*)",
                           n);
    if (::access(kSysctl, W_OK) != 0)
        return fmt::format("{} is absent or not writable here", kSysctl);
    return "";
}

nlohmann::json parse_report(const mvm::test::CmdResult& r)
{
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << r.out << r.err;
    return j.is_discarded() ? nlohmann::json::object() : j;
}

const nlohmann::json& variant(const nlohmann::json& report, const std::string& name)
{
    static const nlohmann::json none = nlohmann::json::object();
    for (const auto& v : report["variants"])
        if (v["variant"] == name)
            return v;
    ADD_FAILURE() << "no variant '" << name << "' in " << report.dump();
    return none;
}

int64_t figure(const nlohmann::json& v, const char* key)
{
    return v.contains("figures") && v["figures"].contains(key) ? v["figures"][key].get<int64_t>() : -1;
}

}  // namespace

TEST(NumaBalancingCli, BadInputIsOneLineNamingTheOption)
{
    REQUIRE_KVM();
    const std::string before = read_word(kSysctl);
    const std::pair<const char*, const char*> cases[] = {
        {"--duration 0", "--duration"},        {"--duration soon", "--duration"},
        {"--scan-period 0", "--scan-period"},  {"--scan-period fast", "--scan-period"},
        {"--passes 2", "--passes"},            {"--json /nonexistent-dir/r.json", "--json"},
        {"--numa node=0,mem=1M,bogus=1", "bogus"},
    };
    for (const auto& [args, name] : cases) {
        auto r = run_minivmm(fmt::format("numa-balancing --vcpus 1 --mem 32M {}", args));
        EXPECT_EQ(r.exit_code, 2) << args << ": " << r.err;
        EXPECT_NE(r.err.find(name), std::string::npos) << args << ": " << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << ": one line: " << r.err;
        EXPECT_TRUE(r.out.empty()) << args << ": no report: " << r.out;
    }
    EXPECT_EQ(read_word(kSysctl), before) << "bad input never touches the sysctl";
}

// Our own host: one node (and numa_balancing=0). The "on" variants are
// skipped with the reason and the sysctl is never written; the "off" ones run.
TEST(NumaBalancingCli, OneNodeHostRunsTheOffVariantsOnly)
{
    REQUIRE_KVM();
    if (host_nodes() != 1)
        GTEST_SKIP() << "a one-node host's behaviour; this host has " << host_nodes() << " nodes";
    const std::string before = read_word(kSysctl);
    auto r = run_minivmm("numa-balancing --vcpus 1 --mem 32M --duration 0.5 --json -");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_report(r);
    EXPECT_EQ(j["status"], "partial") << j.dump();
    EXPECT_EQ(j["host_nodes"], 1);
    for (const char* name : {"on, unbound", "on, bound"}) {
        const auto& v = variant(j, name);
        EXPECT_NE(v.value("skipped", "").find("1 NUMA node"), std::string::npos) << name << ": " << v.dump();
        EXPECT_FALSE(v.contains("run")) << name;
    }
    for (const char* name : {"off, unbound", "off, bound"}) {
        const auto& v = variant(j, name);
        EXPECT_FALSE(v.contains("skipped")) << name << ": " << v.dump();
        EXPECT_EQ(figure(v, "mismatches"), 0) << name;
        EXPECT_GT(figure(v, "pages_written"), 0) << name;
    }
    EXPECT_EQ(variant(j, "off, bound")["policies"], "bind:0");
    EXPECT_EQ(variant(j, "off, unbound")["policies"], "default");
    EXPECT_TRUE(j["relations"].empty()) << "nothing to compare: " << j["relations"].dump();
    EXPECT_NE(r.err.find("skipped: the host has 1 NUMA node"), std::string::npos) << r.err;
    EXPECT_EQ(read_word(kSysctl), before);
    EXPECT_EQ(j["numa_balancing"]["after"], before);
    // It never wrote the sysctl, so it says so rather than "restored: 0 (was 0)".
    if (before == "0") {
        EXPECT_FALSE(j["numa_balancing"]["written"].get<bool>()) << j["numa_balancing"];
        EXPECT_NE(r.err.find("/proc/sys/kernel/numa_balancing: never written"), std::string::npos) << r.err;
        EXPECT_EQ(r.err.find("restored: 0 (was 0)"), std::string::npos) << r.err;
    }
}

// Measured in the emulated two-node host (6.12 and 6.1, THP-backed anon
// memory): with balancing on, the unbound guest's memory is scanned (PTEs
// made PROT_NONE), its hinting faults go through KVM's page-fault path, and
// the MMU notifiers zap it (remote TLB flushes); pages migrate. Bound with
// MPOL_BIND (no MPOL_F_NUMA_BALANCING) the kernel skips the VMA: no PTE
// updates, no flushes, the same KVM faults as with balancing off. (The vCPU
// threads also run under the bind policy, so the VMAs without a policy of
// their own, e.g. the guest's system memory, are skipped when they scan.)
TEST(SvmTwoNodes, NumaBalancingCostsTheUnboundGuestOnly)
{
    REQUIRE_KVM();
    if (auto why = why_no_balancing_host(); !why.empty())
        GTEST_SKIP() << why;
    const std::string before = read_word(kSysctl), knobs = scan_knobs();
    auto r = run_minivmm(fmt::format("numa-balancing {} --duration 2 --json -", kTwoNodeGuest));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_report(r);
    EXPECT_EQ(j["status"], "completed") << j.dump();
    const auto &off_u = variant(j, "off, unbound"), &on_u = variant(j, "on, unbound");
    const auto &off_b = variant(j, "off, bound"), &on_b = variant(j, "on, bound");
    for (const auto* v : {&off_u, &on_u, &off_b, &on_b}) {
        EXPECT_EQ(figure(*v, "mismatches"), 0) << v->dump();
        EXPECT_GT(figure(*v, "pages_written"), 0) << (*v)["variant"];
    }
    EXPECT_EQ(on_b["policies"], "bind:0 bind:1");
    EXPECT_EQ(on_u["policies"], "default default");
    // Unbound: balancing on scans the guest's memory, KVM refaults it and flushes.
    EXPECT_GT(figure(on_u, "numa_pte_updates"), figure(off_u, "numa_pte_updates")) << r.err;
    EXPECT_GT(figure(on_u, "remote_tlb_flush"), figure(off_u, "remote_tlb_flush")) << r.err;
    EXPECT_GT(figure(on_u, "remote_tlb_flush_requests"), figure(off_u, "remote_tlb_flush_requests")) << r.err;
    EXPECT_GT(figure(on_u, "pf_taken"), figure(off_u, "pf_taken")) << r.err;
    // Bound: the VMA is skipped, so balancing costs the guest far less than unbound.
    EXPECT_LT(figure(on_b, "numa_pte_updates"), figure(on_u, "numa_pte_updates")) << r.err;
    EXPECT_LT(figure(on_b, "remote_tlb_flush"), figure(on_u, "remote_tlb_flush")) << r.err;
    EXPECT_LT(figure(on_b, "pf_taken"), figure(on_u, "pf_taken")) << r.err;
    EXPECT_EQ(read_word(kSysctl), before) << "numa_balancing restored";
    EXPECT_EQ(scan_knobs(), knobs) << "scan delay/period restored";
    for (const auto& l : j["relations"])
        std::cout << l.get<std::string>() << "\n";
}

// Ctrl-C while a balancing-on variant runs: minivmm stops the guest cleanly,
// restores the sysctl (and the scan knobs) and exits 128 + SIGINT. The test
// sets numa_balancing=0 first so the "on" variant shows in the sysctl.
TEST(SvmTwoNodes, NumaBalancingRestoredOnCtrlC)
{
    REQUIRE_KVM();
    if (auto why = why_no_balancing_host(); !why.empty())
        GTEST_SKIP() << why;
    mvm::engines::KnobSetting off;
    ASSERT_EQ(off.set(kSysctl, "0"), "");
    const std::string knobs = scan_knobs();
    const std::string out = ::testing::TempDir() + "numa_balancing_ctrl_c.json";
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        const std::string cmd = fmt::format("exec {} numa-balancing {} --duration 3 --json {} >/dev/null 2>&1",
                                            MINIVMM_BINARY, kTwoNodeGuest, out);
        execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
        _exit(127);
    }
    bool saw_on = false;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!saw_on && std::chrono::steady_clock::now() < deadline) {
        saw_on = read_word(kSysctl) == "1";
        if (!saw_on)
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_TRUE(saw_on) << "an 'on' variant set numa_balancing=1";
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ::kill(pid, SIGINT);
    int st = 0;
    ASSERT_EQ(::waitpid(pid, &st, 0), pid);
    ASSERT_TRUE(WIFEXITED(st)) << "minivmm handled SIGINT";
    EXPECT_EQ(WEXITSTATUS(st), 128 + SIGINT);
    EXPECT_EQ(read_word(kSysctl), "0") << "numa_balancing restored after Ctrl-C";
    EXPECT_EQ(scan_knobs(), knobs) << "scan delay/period restored after Ctrl-C";
    std::ifstream f(out);
    auto j = nlohmann::json::parse(f, nullptr, false);
    ASSERT_FALSE(j.is_discarded());
    EXPECT_EQ(j["status"], "interrupted");
    EXPECT_EQ(j["numa_balancing"]["after"], "0");
    EXPECT_EQ(variant(j, "on, bound").value("skipped", ""), "interrupted before it started") << j.dump();
}
