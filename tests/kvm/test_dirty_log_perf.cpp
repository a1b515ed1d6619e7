// dirty-log-perf's KVM stats come in one window per step (enable, each
// iteration, each harvest, disable), so the window of the first
// KVM_CLEAR_DIRTY_LOG (where the TDP MMU splits eagerly in the default mode)
// is apart from the iterations, and the message says what the stats show.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engines/dirty_log_perf.hpp"
#include "kvm_test_util.hpp"

using mvm::test::run_minivmm;

namespace {

int64_t stat(const nlohmann::json& w, const char* group, const char* k)
{
    return w[group].contains(k) ? w[group][k].get<int64_t>() : 0;
}

// The message names the window where pages_2m went down, as a TDP-MMU host
// shows it (../shared/SVM-HOST.md, 64 MiB hugetlb2m, default mode): eager on,
// the split is at the first clear; off, during iteration 2's writes. No
// window moving means no split is claimed. (This host's shadow MMU maps 4K
// only, so the stats are made up here from what that host printed.)
TEST(DirtyLogPerfSplits, MessageFollowsTheWindowThatMoved)
{
    auto run = [](const char* moved, mvm::StatDelta vcpus) {
        mvm::engines::PerfResult r;
        r.vm_stats_before = {{"pages_4k", 0}, {"pages_2m", 32}, {"pages_1g", 0}};
        r.eager.effective = true;
        for (const char* n : {"enable", "iteration 1", "harvest 1", "iteration 2", "harvest 2", "disable"}) {
            mvm::engines::StatsWindow w;
            w.name = n;
            w.first_clear = w.name == "harvest 1";
            w.vm = {{"pages_4k", 0}, {"pages_2m", 0}, {"pages_1g", 0}};
            if (w.name == moved) {
                w.vm = {{"pages_4k", 16384}, {"pages_2m", -32}, {"pages_1g", 0}};
                w.vcpus = vcpus;
            }
            r.windows.push_back(w);
        }
        return mvm::engines::split_summary(r);
    };
    const std::string eager = run("harvest 1", {});
    EXPECT_NE(eager.find("harvest 1 (eager split at the first KVM_CLEAR_DIRTY_LOG): pages_1g +0 pages_2m -32 pages_4k "
                         "+16384"),
              std::string::npos)
        << eager;
    const std::string lazy = run("iteration 2", {{"pf_fixed", 32}, {"pf_fast", 16362}});
    EXPECT_NE(lazy.find("iteration 2 (lazy split on the guest's write faults (pf_fixed +32, pf_fast +16362))"),
              std::string::npos)
        << lazy;
    EXPECT_NE(run("enable", {}).find("eager split when logging was enabled"), std::string::npos);
    const std::string none = run("none", {});
    EXPECT_EQ(none.find("split in"), std::string::npos) << none;
    EXPECT_NE(none.find("nothing split: pages_2m (32 before logging)"), std::string::npos) << none;
}

TEST(DirtyLogPerf, KvmStatsPerStepAndAMessageByWhatTheyShow)
{
    REQUIRE_KVM();
    for (std::string extra : {"", " -g"}) {
        auto r = run_minivmm("dirty-log-perf -v 2 -b 16M -i 3 --json -" + extra);
        ASSERT_EQ(r.exit_code, 0) << extra << ": " << r.err;
        auto j = nlohmann::json::parse(r.out);
        EXPECT_EQ(j["config"]["machine"]["vcpus"], 2) << "the report says what it ran with";
        EXPECT_TRUE(j["config"]["host"].contains("kvm_module_params"));
        EXPECT_EQ(j["config"]["vcpus"], 2) << "next to its own options";
        const auto& w = j["kvm_stats_windows"];
        std::vector<std::string> names;
        for (const auto& x : w)
            names.push_back(x["window"]);
        EXPECT_EQ(names, (std::vector<std::string>{"enable", "iteration 1", "harvest 1", "iteration 2", "harvest 2",
                                                   "iteration 3", "harvest 3", "disable"}))
            << extra;
        ASSERT_EQ(w.size(), 8u);
        EXPECT_EQ(w[2]["first_clear"].get<bool>(), extra.empty()) << "harvest 1 holds the first clear in the default mode";
        for (size_t i = 0; i < w.size(); i++)
            EXPECT_EQ(w[i]["first_clear"].get<bool>(), extra.empty() && i == 2) << i;
        // 2 x 16 MiB = 8192 pages. Where the write-protect faults land tells
        // the windows apart: with INITIALLY_SET nothing is protected until the
        // first clear, so iteration 1 runs without faults and iteration 2
        // faults on every page; with -g, enabling protects and iteration 1 faults.
        const int64_t it1 = stat(w[1], "vcpus_sum", "pf_taken"), it2 = stat(w[3], "vcpus_sum", "pf_taken");
        EXPECT_GE(it2, 8000) << extra << ": " << w.dump();
        if (extra.empty())
            EXPECT_LT(it1, 800) << "INITIALLY_SET: iteration 1 writes unprotected pages: " << w.dump();
        else
            EXPECT_GE(it1, 8000) << "-g: enabling write-protects: " << w.dump();
        const std::string split = j["huge_page_splits"];
        bool moved = false;
        for (const auto& x : w)
            moved |= stat(x, "vm", "pages_2m") < 0 || stat(x, "vm", "pages_1g") < 0;
        EXPECT_EQ(split.find("split in") != std::string::npos, moved) << split;
        EXPECT_NE(r.err.find("huge pages: " + split), std::string::npos) << r.err;
        EXPECT_NE(r.err.find("  harvest 1:"), std::string::npos) << r.err;
        EXPECT_EQ(r.err.find("KVM stats over enable + iteration 1"), std::string::npos) << r.err;
        if (!moved)
            EXPECT_EQ(r.err.find("splits huge pages eagerly"), std::string::npos) << r.err;
    }
}

}  // namespace

namespace {

// selftest-compare repeats both tools, prints each ratio with its spread and
// says per row whether it compares like with like. The selftest is stood in
// for by a script printing its lines (building the real one needs
// linux-source and minutes); minivmm is the real binary.
TEST(SelftestCompare, RatiosWithSpreadAndWhatIsComparable)
{
    REQUIRE_KVM();
    const std::string dir = testing::TempDir() + "selftest-compare-" + std::to_string(::getpid());
    ASSERT_EQ(std::system(("mkdir -p " + dir).c_str()), 0);
    const std::string fake = dir + "/dirty_log_perf_test";
    {
        std::FILE* f = std::fopen(fake.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs("#!/bin/sh\n"
                   "echo 'Populate memory time: 0.400000000s'\n"
                   "echo 'Enabling dirty logging time: 0.000100000s'\n"
                   "echo 'Iteration 1 dirty memory time: 0.300000000s'\n"
                   "echo 'Iteration 2 dirty memory time: 0.300000000s'\n"
                   "echo 'Disabling dirty logging time: 0.000200000s'\n"
                   "echo 'Get dirty log over 2 iterations took 0.000020000s. (Avg 0.000010000s/iteration)'\n"
                   "echo 'Clear dirty log over 2 iterations took 0.000040000s. (Avg 0.000020000s/iteration)'\n",
                   f);
        std::fclose(f);
    }
    ASSERT_EQ(::chmod(fake.c_str(), 0755), 0);
    const std::string script = std::string(MINIVMM_FUZZ_DIR) + "/../../scripts/selftest-compare";
    const std::string json = dir + "/out.json";
    const std::string cmd = fmt::format("{} --repeat 3 --selftest {} --minivmm {} --json {} -v 1 -b 8M -i 2 2>&1",
                                        script, fake, MINIVMM_BINARY, json);
    std::string out;
    std::FILE* p = ::popen(cmd.c_str(), "r");
    ASSERT_TRUE(p);
    char buf[4096];
    while (size_t n = std::fread(buf, 1, sizeof buf, p))
        out.append(buf, n);
    ASSERT_EQ(::pclose(p), 0) << out;
    EXPECT_NE(out.find("median [min..max]"), std::string::npos) << out;
    EXPECT_NE(out.find("3 of each tool per mode"), std::string::npos) << out;
    const auto j = nlohmann::json::parse(mvm::test::read_file(json));
    bool saw_dirty = false;
    for (const auto& row : j["rows"]) {
        EXPECT_EQ(row["ratios"].size(), 3u) << row.dump();
        EXPECT_EQ(row["minivmm_s"].size(), 3u) << row.dump();
        const auto& st = row["ratio"];
        EXPECT_LE(st["min"].get<double>(), st["median"].get<double>());
        EXPECT_LE(st["median"].get<double>(), st["max"].get<double>());
        if (row["figure"] == "dirty" || row["figure"] == "populate") {
            saw_dirty = true;
            EXPECT_FALSE(row["comparable"].get<bool>()) << "the selftest's guest writes through the emulator here";
        }
    }
    EXPECT_TRUE(saw_dirty) << out;
    EXPECT_NE(out.find("no: the selftest's guest writes through KVM's emulator here"), std::string::npos) << out;
    // Bad input: one line naming the option, non-zero exit.
    for (const char* bad : {"--repeat 0", "--repeat x", "--selftest /nonexistent"}) {
        std::string err;
        std::FILE* q = ::popen(fmt::format("{} --minivmm {} {} 2>&1", script, MINIVMM_BINARY, bad).c_str(), "r");
        ASSERT_TRUE(q);
        while (size_t n = std::fread(buf, 1, sizeof buf, q))
            err.append(buf, n);
        EXPECT_NE(::pclose(q), 0) << bad;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << bad << ": " << err;
        EXPECT_NE(err.find(std::string(bad).substr(0, std::string(bad).find(' '))), std::string::npos) << err;
    }
    std::system(("rm -rf " + dir).c_str());
}

}  // namespace
