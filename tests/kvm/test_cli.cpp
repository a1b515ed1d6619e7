// The minivmm binary as users meet it: signals, JSON (bad input and missing KVM:
// test_bad_input.cpp).
#include <gtest/gtest.h>

#include <filesystem>

#include <iostream>

#include <fmt/format.h>

#include <signal.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"

using mvm::test::run_minivmm;

// caps says which MMU maps guests, by the parameters it depends on: the TDP
// MMU only with kvm.tdp_mmu=Y and kvm_amd npt / kvm_intel ept on; eager
// splitting can take effect only there. The svm stage runs this with npt=1 and
// npt=0 (SvmHost / SvmShadow filters name it through Caps.*).
TEST(Caps, SaysWhichMmuRunsGuestsAndWhetherEagerSplitCanTakeEffect)
{
    REQUIRE_KVM();
    auto r = run_minivmm("caps --json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    auto yes = [](const char* path) {
        const std::string v = mvm::test::read_file(path);
        return !v.empty() && (v[0] == 'Y' || v[0] == '1');
    };
    const bool paging = yes("/sys/module/kvm_amd/parameters/npt") || yes("/sys/module/kvm_intel/parameters/ept");
    const bool tdp = yes("/sys/module/kvm/parameters/tdp_mmu") && paging;
    const auto& e = j["kvm"]["eager_page_split"];
    EXPECT_EQ(j["kvm"]["mmu"]["name"], tdp ? "tdp" : "shadow") << j["kvm"]["mmu"];
    EXPECT_EQ(e["effective"].get<bool>(), tdp && e["eager_page_split"] == "Y") << e;
    if (!tdp)
        EXPECT_FALSE(e["can_take_effect"].get<bool>()) << e;
    EXPECT_NE(r.err.find(tdp ? "guest MMU: TDP MMU" : "guest MMU: shadow MMU"), std::string::npos) << r.err;
    // One answer to "writable": the summary, the parameter table and the
    // file's mode agree (a 0444 file is read-only even though root passes
    // access(W_OK); caps once said writable there).
    for (const auto& p : j["kvm"]["module_params"])
        if (p["module"] == "kvm" && p["name"] == "eager_page_split") {
            EXPECT_EQ(e["writable"], p["writable"]) << e << p;
            struct stat st {};
            if (stat("/sys/module/kvm/parameters/eager_page_split", &st) == 0 && !(st.st_mode & S_IWUSR))
                EXPECT_FALSE(e["writable"].get<bool>()) << "mode 0444 is read-only: " << e;
        }
    std::cout << "caps: guest MMU " << j["kvm"]["mmu"]["name"].get<std::string>() << " ("
              << j["kvm"]["mmu"]["why"].get<std::string>() << "), eager split "
              << (e["can_take_effect"].get<bool>() ? "can take effect" : "cannot take effect") << "\n";
}

// The docs' statements about how a host maps huge pages come from caps' probe;
// a run on the same backing must see the same in its own KVM stats.
TEST(Caps, HugeMappingProbeAgreesWithARunsOwnStats)
{
    REQUIRE_KVM();
    auto c = run_minivmm("caps --json -");
    ASSERT_EQ(c.exit_code, 0) << c.err;
    const auto hm = nlohmann::json::parse(c.out)["kvm"]["huge_mappings"];
    EXPECT_NE(c.err.find("huge mappings (probe): "), std::string::npos) << c.err;
    if (hm["verdict"] == "unknown")
        GTEST_SKIP() << "caps cannot tell here: " << hm["why"].get<std::string>();
    const std::string backing = hm["backing"];
    auto r = run_minivmm("run --vcpus 1 --mem 8M --passes 1 --backing " + backing + " --json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto vm = nlohmann::json::parse(r.out)["kvm_stats"]["vm"];
    ASSERT_TRUE(vm.contains("pages_2m")) << vm;
    EXPECT_EQ(vm["pages_2m"].get<int64_t>() > 0, hm["verdict"] == "2M") << "caps: " << hm << "\nrun: " << vm;
    std::cout << "caps: huge mappings " << hm["verdict"].get<std::string>() << " on " << backing << "; run's pages_2m "
              << vm["pages_2m"] << "\n";
}

TEST(Cli, CapsJsonHasWhatTheToolUses)
{
    REQUIRE_KVM();
    auto r = run_minivmm("caps --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["kvm"]["api_version"], 12);
    EXPECT_GE(j["kvm"]["limits"]["max_vcpus"].get<int>(), 1);
    EXPECT_GE(j["kvm"]["limits"]["memslots"].get<int>(), 1);
    EXPECT_TRUE(j["kvm"]["capabilities"].is_array());
    EXPECT_TRUE(j["kvm"]["eager_page_split"].contains("tdp_mmu"));
    EXPECT_TRUE(j["hugetlb_pools"].is_array());
    EXPECT_FALSE(j["numa"]["nodes"].empty());
    EXPECT_TRUE(j["numa"].contains("numa_balancing"));
    // --json - is what every other command takes for stdout; the table goes to stderr then.
    auto dash = run_minivmm("caps --json -");
    ASSERT_EQ(dash.exit_code, 0) << dash.err;
    EXPECT_EQ(nlohmann::json::parse(dash.out)["kvm"]["api_version"], 12);
    EXPECT_NE(dash.err.find("hugetlb pools"), std::string::npos);
    auto t = run_minivmm("caps");
    EXPECT_NE(t.out.find("hugetlb pools"), std::string::npos);
    EXPECT_NE(t.out.find("KVM_CAP_DIRTY_LOG_RING_ACQ_REL"), std::string::npos);
}

// Every option that takes a value names its kind in --help (SIZE, MS,
// SECONDS, N, LIST, ...): none is left as CLI11's TEXT, and units are shown.
TEST(Cli, HelpNamesEveryValuesKindAndUnit)
{
    for (const char* cmd : {"caps", "run", "numa-check", "dirty-log-perf", "dirty-rate", "migrate", "receive", "lockup"}) {
        auto r = run_minivmm(fmt::format("{} --help", cmd));
        ASSERT_EQ(r.exit_code, 0) << cmd << ": " << r.err;
        EXPECT_EQ(r.out.find(" TEXT"), std::string::npos) << cmd << " --help:\n" << r.out;
    }
    auto m = run_minivmm("migrate --help");
    EXPECT_NE(m.out.find("--max-downtime MS"), std::string::npos) << m.out;
    EXPECT_NE(m.out.find("--bandwidth SIZE/s"), std::string::npos) << m.out;
    EXPECT_NE(m.out.find("--mem SIZE"), std::string::npos) << m.out;
    EXPECT_NE(m.out.find("--timeout SECONDS"), std::string::npos) << m.out;
}

TEST(Cli, RunJsonToStdoutHasTheDocumentedKeys)
{
    REQUIRE_KVM();
    auto r = run_minivmm("run --vcpus 2 --mem 32M --duration 0.5 --json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    ASSERT_EQ(j["vcpus"].size(), 2u);
    for (const char* k : {"vcpu", "pages_written", "passes", "max_stall_ms", "watchdog_events"})
        EXPECT_TRUE(j["vcpus"][1].contains(k)) << k;
    EXPECT_EQ(j["vcpus"][1]["vcpu"], 1);
    EXPECT_GT(j["vcpus"][0]["pages_written"].get<uint64_t>(), 0u);
    EXPECT_TRUE(j["kvm_stats"]["vm"].is_object());
    EXPECT_EQ(j["kvm_stats"]["vcpus"].size(), 2u);
    EXPECT_GT(j["duration_s"].get<double>(), 0.4);
    EXPECT_EQ(j["verify"]["mismatches"], 0);
    EXPECT_EQ(j["status"], "completed");
    EXPECT_NE(r.err.find("pages written"), std::string::npos) << "the table goes to stderr when JSON takes stdout";
    // One name per figure: the table's column is the JSON's vnode; exits to
    // this VMM are not KVM's "exits" stat (every VM exit, in kvm_stats).
    EXPECT_NE(r.err.find(" vCPU vnode "), std::string::npos) << r.err;
    EXPECT_FALSE(j["vcpus"][0].contains("exits")) << j["vcpus"][0].dump();
    EXPECT_LE(j["vcpus"][0]["userspace_exits"].get<uint64_t>(),
              j["kvm_stats"]["vcpus"][0].value("exits", j["vcpus"][0]["userspace_exits"].get<uint64_t>()));
    // What it ran with, as every report says it.
    EXPECT_EQ(j["config"]["machine"]["vcpus"], 2);
    EXPECT_EQ(j["config"]["machine"]["nodes"][0]["backing"], "anon");
    EXPECT_TRUE(j["config"]["host"]["kvm_module_params"].is_object());
    EXPECT_FALSE(j["config"]["host"]["kernel"].get<std::string>().empty());
}

namespace {

// Walks a report: no bare "id" anywhere (vcpu, vnode, node say which), every
// object in vcpus[] / vnodes[] names itself with vcpu / vnode.
void expect_vocabulary(const nlohmann::json& j, const std::string& where)
{
    if (j.is_object()) {
        for (const auto& [k, v] : j.items()) {
            EXPECT_NE(k, "id") << where;
            if ((k == "vcpus" || k == "vnodes") && v.is_array())
                for (const auto& e : v)
                    if (e.is_object())
                        EXPECT_TRUE(e.contains(k == "vcpus" ? "vcpu" : "vnode")) << where << "." << k << ": " << e.dump();
            expect_vocabulary(v, where + "." + k);
        }
    } else if (j.is_array()) {
        for (const auto& e : j)
            expect_vocabulary(e, where + "[]");
    }
}

}  // namespace

// One schema vocabulary across commands (docs/reports.md):
// status, config.machine and config.host in every report, ids named by what
// they are, the same words for the same things.
TEST(Cli, EveryReportSpeaksOneVocabulary)
{
    REQUIRE_KVM();
    const char* runs[] = {
        "run --vcpus 2 --mem 16M --duration 0.2 --json -",
        "numa-check --vcpus 2 --mem 16M --json -",
        "dirty-rate --vcpus 2 --mem 16M --period 0.2 --baseline 0 --json -",
        "dirty-log-perf -v 2 -b 8M -i 2 --json -",
        "lockup --vcpus 2 --mem 16M --variants bitmap --steady 0.1 --logging 0.2 --json -",
        "migrate --to inproc --vcpus 2 --mem 16M --warmup 0.1 --post-run 0 --json -",
    };
    for (const char* cmd : runs) {
        auto r = run_minivmm(cmd);
        ASSERT_EQ(r.exit_code, 0) << cmd << ": " << r.err;
        auto j = nlohmann::json::parse(r.out, nullptr, false);
        ASSERT_FALSE(j.is_discarded()) << cmd;
        EXPECT_EQ(j["status"], "completed") << cmd;
        EXPECT_TRUE(j["config"]["machine"].contains("nodes")) << cmd;
        EXPECT_TRUE(j["config"]["host"].contains("kvm_module_params")) << cmd;
        expect_vocabulary(j, cmd);
    }
}

TEST(Cli, GuestExceptionFailsTheRunWithTheVector)
{
    REQUIRE_KVM();
    auto r = run_minivmm("run --vcpus 2 --mem 16M --duration 5", "env MINIVMM_TEST_GUEST_FAULT=ud:1");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.out.find("vCPU 1: guest exception #UD (vector 6)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("rip 0x"), std::string::npos) << "register dump missing";
}

TEST(Cli, SigintStopsCleanlyAndStillReports)
{
    REQUIRE_KVM();
    int out[2];
    ASSERT_EQ(pipe(out), 0);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        dup2(out[1], 1);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 2);
        execl(MINIVMM_BINARY, "minivmm", "run", "--vcpus", "2", "--mem", "32M", "--duration", "60", nullptr);
        _exit(127);
    }
    close(out[1]);
    // Ready when its vCPU threads run (named vcpuN), not after a fixed sleep:
    // a busy machine may take longer to boot the guest than any guess.
    auto vcpus_running = [pid] {
        std::error_code ec;
        int n = 0;
        for (const auto& t : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid), ec))
            n += mvm::test::read_file(t.path().string() + "/comm").rfind("vcpu", 0) == 0;
        return n == 2;
    };
    const auto ready_by = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!vcpus_running() && std::chrono::steady_clock::now() < ready_by)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ASSERT_TRUE(vcpus_running()) << "minivmm run did not start its 2 vCPU threads within 30 s";
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // a few guest batches
    auto t0 = std::chrono::steady_clock::now();
    kill(pid, SIGINT);
    std::string text;
    char buf[4096];
    ssize_t n;
    while ((n = read(out[0], buf, sizeof buf)) > 0)
        text.append(buf, static_cast<size_t>(n));
    close(out[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    double stop_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(WIFEXITED(st)) << "killed by signal " << WTERMSIG(st);
    EXPECT_EQ(WEXITSTATUS(st), 128 + SIGINT);
    EXPECT_LT(stop_s, 10.0);
    EXPECT_NE(text.find("interrupted: stopped cleanly"), std::string::npos) << text;
    EXPECT_NE(text.find("0 mismatches"), std::string::npos) << text;
}
