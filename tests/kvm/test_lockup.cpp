// The stall detector and the lockup report against the real KVM: a guest
// paused on purpose for a known time shows up as a stall of that length
// (within the sampling period and the pause latency), and the guest
// watchdog's events reach the report.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <tuple>
#include <unistd.h>
#include <sys/wait.h>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/stress/sampler.hpp"

using namespace mvm;
using mvm::test::run_minivmm;

TEST(StallDetector, DeliberatePauseIsMeasuredWithinTheSamplingPeriod)
{
    REQUIRE_KVM();
    StressVm m(kvm, single_node_config(2, 16ull << 20));
    m.start();
    ProgressSampler sampler(m, 1000);
    sampler.start();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const auto t0 = std::chrono::steady_clock::now();
    m.pause();  // every vCPU parked outside KVM_RUN on return
    const auto t1 = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    const auto t2 = std::chrono::steady_clock::now();
    m.resume();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    sampler.stop();
    const double held_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    const double upper_ms = std::chrono::duration<double, std::milli>(t2 - t0).count();
    auto stalls = sampler.stalls(50);
    for (uint32_t v = 0; v < 2; v++) {
        double longest = 0;
        for (const auto& s : stalls)
            if (s.vcpu == v)
                longest = std::max(longest, s.len_ms);
        // The samples' own view: the held counter value, the first and last
        // tick that read it, and the ticks on either side of them. A stall is
        // measured from the first tick that saw the held value to the last
        // one, so it is the time held short by at most the sampler's real
        // spacing at each end (a sampler preempted on a busy host ticks late;
        // that shortens the stall it sees, it never lengthens it).
        std::vector<const ProgressSample*> mine;
        for (const auto& s : sampler.samples())
            if (s.vcpu == v)
                mine.push_back(&s);
        size_t first = mine.size(), last = 0;
        for (size_t i = 0; i < mine.size(); i++) {
            if (i > 0 && mine[i]->pages == mine[i - 1]->pages) {
                // the longest run of equal readings is the pause
                size_t j = i;
                while (j + 1 < mine.size() && mine[j + 1]->pages == mine[i]->pages)
                    j++;
                if (first == mine.size() || mine[j]->t_ms - mine[i - 1]->t_ms > mine[last]->t_ms - mine[first]->t_ms) {
                    first = i - 1;
                    last = j;
                }
                i = j;
            }
        }
        ASSERT_LT(first, mine.size()) << "vCPU " << v << ": no two equal readings in " << mine.size() << " samples";
        ASSERT_GT(first, 0u) << "vCPU " << v << ": held from the first sample";
        ASSERT_LT(last + 1, mine.size()) << "vCPU " << v << ": never moved again after the pause";
        const double seen_ms = mine[last]->t_ms - mine[first]->t_ms;
        const double slack_ms = (mine[first]->t_ms - mine[first - 1]->t_ms) + (mine[last + 1]->t_ms - mine[last]->t_ms);
        EXPECT_NEAR(longest, seen_ms, 1e-6) << "vCPU " << v << ": the detector reports what its samples saw";
        EXPECT_GE(longest, held_ms - slack_ms - 0.05)
            << "vCPU " << v << ": held " << held_ms << " ms, sampler spacing at the ends " << slack_ms << " ms";
        // At most the time held plus the time pause() took to park them, a
        // sampling period on each side and the resume wake-up.
        EXPECT_LE(longest, upper_ms + 2.0 + 10.0) << "vCPU " << v;
    }
    EXPECT_GT(sampler.ticks(), 400u) << "about 1 kHz over ~0.55 s";
    EXPECT_TRUE(sampler.samples().size() >= sampler.ticks() * 2);
    m.request_stop();
    m.wait_finished(std::chrono::seconds(10));
}

// The phases cover the run: sorted, contiguous, from 0 to past every stall.
static void expect_contiguous_phases(const nlohmann::json& v)
{
    double prev_end = 0;
    std::string prev = "(start)";
    double last_end = 0;
    for (const auto& p : v["phases"]) {
        if (p["vcpu"].get<int>() >= 0)
            continue;
        EXPECT_EQ(p["start_ms"].get<double>(), prev_end) << prev << " -> " << p["name"];
        prev_end = last_end = p["end_ms"].get<double>();
        prev = p["name"].get<std::string>();
    }
    EXPECT_EQ(v["phases"][0]["name"], "steady");
    EXPECT_EQ(prev, "after-logging");
    for (const auto& s : v["stalls"]) {
        EXPECT_LE(s["start_ms"].get<double>() + s["len_ms"].get<double>(), last_end + 1.0);
        if (s["phase"] == "steady") {  // a steady stall begins before logging goes on
            EXPECT_LT(s["start_ms"].get<double>(), v["phases"][1]["start_ms"].get<double>()) << s.dump();
        }
    }
}

TEST(Lockup, WatchdogEventsAndTheDeliberatePauseReachTheReport)
{
    REQUIRE_KVM();
    char path[] = "/tmp/minivmm-timeline-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    // 6 vCPUs on a 2-CPU host: the harvester still gets every slot (SCHED_FIFO).
    auto r = run_minivmm(fmt::format("lockup --vcpus 6 --mem 64M --variants bitmap,ring --logging 0.5 --steady 0.2 "
                                     "--threshold-ms 30 --timeline {} --json -",
                                     path),
                         "env MINIVMM_TEST_PAUSE_MS=250");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    ASSERT_EQ(j["variants"].size(), 2u);
    EXPECT_FALSE(j["interrupted"].get<bool>());
    // Two instruments with one threshold: the table says how each counts.
    EXPECT_NE(r.err.find("stalls: the sampler's, gaps over 30 ms"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("wd ev: the guest's own watchdog, gaps over 30 ms"), std::string::npos) << r.err;
    for (const auto& v : j["variants"]) {
        EXPECT_GE(v["watchdog_events"].get<uint64_t>(), 6u) << "every vCPU's guest saw the 250 ms pause";
        EXPECT_GE(v["watchdog_longest_ms"].get<double>(), 245.0);
        EXPECT_GE(v["longest_stall_ms"].get<double>(), 245.0);
        EXPECT_EQ(v["vcpus_stalled"].get<uint32_t>(), 6u);
        // A vCPU inside a ring-full exit when the pause began has its stall
        // attributed to that exit.
        const auto& by = v["vcpus_stalled_by_phase"];
        EXPECT_GE(by.value("test-pause", 0u) + by.value("ring-full", 0u), 6u) << by.dump();
        EXPECT_GE(v["sampler_hz"].get<double>(), 900.0);
        EXPECT_GT(v["enable_ms"].get<double>(), 0.0);
        // Harvests: 5 slots of 100 ms in the 0.5 s window (the pause's time is added to it).
        EXPECT_EQ(v["harvests_expected"].get<uint64_t>(), 5u);
        // On time here (a sanitizer's slower copy may cost a slot, not 10% of them).
        EXPECT_LE(v["harvests"].get<uint64_t>(), v["harvests_expected"].get<uint64_t>());
        EXPECT_GE(v["harvests"].get<uint64_t>() + 1, v["harvests_expected"].get<uint64_t>()) << v["harvester_priority"];
        EXPECT_FALSE(v["harvester_starved"].get<bool>());
        if (geteuid() == 0) {
            EXPECT_EQ(v["harvester_priority"], "SCHED_FIFO 10");
        }
        expect_contiguous_phases(v);
        // The pause's stalls against the steady baseline: beyond it when their
        // max exceeds steady's by more than the threshold, and the verdict
        // names a phase exactly when one is beyond.
        double steady_max = -1;
        bool pause_seen = false, any_beyond = false;
        for (const auto& p : v["phase_stalls"])
            if (p["phase"] == "steady")
                steady_max = p["max_ms"].get<double>();
        EXPECT_GE(steady_max, 0.0) << "the baseline is always listed";
        for (const auto& p : v["phase_stalls"]) {
            const double max = p["max_ms"].get<double>();
            EXPECT_DOUBLE_EQ(p["excess_max_ms"].get<double>(), max - steady_max) << p.dump();
            EXPECT_EQ(p["beyond_baseline"].get<bool>(), p["phase"] != "steady" && p["stalls"].get<int>() > 0 &&
                                                            max - steady_max > 30.0)
                << p.dump();
            any_beyond |= p["beyond_baseline"].get<bool>();
            if (p["phase"] == "test-pause") {
                pause_seen = true;
                EXPECT_GE(max, 245.0);
                EXPECT_GE(p["p50_ms"].get<double>(), 200.0);
                EXPECT_TRUE(p["beyond_baseline"].get<bool>() || steady_max > 200.0) << "steady max " << steady_max;
            }
        }
        if (by.value("ring-full", 0u) == 0) {
            EXPECT_TRUE(pause_seen) << v["phase_stalls"].dump();
        }
        const std::string verdict = v["verdict"];
        EXPECT_EQ(verdict.find(any_beyond ? "stalls beyond the steady baseline during " : "no stall beyond the steady"),
                  0u)
            << verdict;
        EXPECT_NE(verdict.find("M pages/s while logging"), std::string::npos) << verdict;
        EXPECT_NEAR(v["write_slowdown_x"].get<double>(),
                    v["dirty_rate_before_pages_per_s"].get<double>() / v["dirty_rate_during_pages_per_s"].get<double>(),
                    1e-6 * v["write_slowdown_x"].get<double>());
        EXPECT_GT(v["write_slowdown_x"].get<double>(), 1.0) << "logging slows the guest's writes (write-protect faults)";
    }
    EXPECT_NE(r.err.find("pages_2m"), std::string::npos) << "the table shows huge-page deltas";
    EXPECT_NE(r.err.find("pages_1g"), std::string::npos);
    EXPECT_NE(r.err.find("(baseline)"), std::string::npos) << r.err;
    FILE* f = fopen(path, "r");
    ASSERT_TRUE(f);
    char line[256];
    ASSERT_TRUE(fgets(line, sizeof(line), f));
    EXPECT_STREQ(line, "variant,t_ms,vcpu,pages,phase\n");
    size_t rows = 0, between = 0;
    // Samples carry the phase they fell in. Enabling and the first harvest
    // take about a millisecond, which a 1 kHz sampler on a loaded host (or
    // under ASan) can miss; the logging phases around them it cannot.
    bool saw_enable = false;
    while (fgets(line, sizeof(line), f)) {
        rows++;
        for (const char* p : {",enable-logging", ",first-harvest", ",harvest", ",clear", ",copy", ",logging\n"})
            saw_enable |= std::string(line).find(p) != std::string::npos;
        between += std::string(line).find(",between") != std::string::npos;
    }
    fclose(f);
    unlink(path);
    EXPECT_GT(rows, 6u * 500u) << "1 kHz x 6 vCPUs over the run";
    EXPECT_TRUE(saw_enable);
    EXPECT_EQ(between, 0u) << "every sample belongs to a named phase";
}

TEST(Lockup, StarvedHarvesterMakesTheVerdictInconclusive)
{
    REQUIRE_KVM();
    // The harvester sleeps 250 ms after each harvest: of 5 slots of 100 ms it serves 2.
    auto r = run_minivmm("lockup --vcpus 2 --mem 16M --variants bitmap --logging 0.5 --steady 0.1 --json -",
                         "env MINIVMM_TEST_HARVEST_DELAY_MS=250");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["config"]["machine"]["vcpus"], 2) << "the report says what it ran with";
    EXPECT_TRUE(j["config"]["host"].contains("kvm_module_params"));
    auto v = j["variants"][0];
    EXPECT_EQ(v["harvests_expected"].get<uint64_t>(), 5u);
    EXPECT_LE(v["harvests"].get<uint64_t>(), 3u);
    EXPECT_GE(v["harvests"].get<uint64_t>(), 1u);
    EXPECT_TRUE(v["harvester_starved"].get<bool>());
    EXPECT_EQ(v["verdict"].get<std::string>().find("inconclusive: harvester starved (ran "), 0u) << v["verdict"];
    EXPECT_NE(r.err.find("inconclusive: harvester starved"), std::string::npos) << r.err;
}

TEST(Lockup, VariantsThatCannotDifferHereAreSkippedWithTheReason)
{
    REQUIRE_KVM();
    auto r = run_minivmm("lockup --vcpus 2 --mem 16M --variants per-node-parallel-enable,eager-split-on,eager-split-off "
                         "--json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    ASSERT_EQ(j["variants"].size(), 3u);
    EXPECT_NE(j["variants"][0]["skipped"].get<std::string>().find("one virtual node"), std::string::npos)
        << j["variants"][0]["skipped"];
    // The fix it names is an option lockup has (--numa; there is no --nodes).
    EXPECT_NE(j["variants"][0]["skipped"].get<std::string>().find("give --numa"), std::string::npos)
        << j["variants"][0]["skipped"];
    const std::string tdp = mvm::test::read_file("/sys/module/kvm/parameters/tdp_mmu");
    for (int i : {1, 2}) {
        const std::string why = j["variants"][i]["skipped"];
        if (tdp.rfind("N", 0) == 0) {  // our hosts: the shadow MMU, where eager splitting does nothing
            EXPECT_NE(why.find("tdp_mmu=N"), std::string::npos) << why;
        }
        if (!why.empty()) {
            EXPECT_EQ(j["variants"][i]["harvests"].get<uint64_t>(), 0u);
        }
    }
    EXPECT_NE(r.err.find("skipped: the VM has one virtual node"), std::string::npos) << r.err;
}

TEST(Lockup, CtrlCPrintsThePartialReportAndWritesTheJson)
{
    REQUIRE_KVM();
    char path[] = "/tmp/minivmm-lockup-json-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    // SIGINT 1.5 s in, inside the 30 s logging window of the first variant.
    auto r = run_minivmm(fmt::format("lockup --vcpus 2 --mem 16M --variants bitmap,ring --steady 0.1 --logging 30 "
                                     "--json {}",
                                     path),
                         "timeout --preserve-status -s INT 1.5");
    const std::string text = mvm::test::read_file(path);
    unlink(path);
    EXPECT_EQ(r.exit_code, 130) << r.out << r.err;
    EXPECT_NE(r.out.find("interrupted: partial report"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("interrupted: stopped cleanly"), std::string::npos) << r.out;
    ASSERT_FALSE(text.empty()) << "the JSON is written";
    auto j = nlohmann::json::parse(text);
    EXPECT_TRUE(j["interrupted"].get<bool>());
    ASSERT_EQ(j["variants"].size(), 1u) << "the second variant never started";
    EXPECT_TRUE(j["variants"][0]["interrupted"].get<bool>());
    EXPECT_EQ(j["variants"][0]["verdict"].get<std::string>().find("interrupted"), 0u) << j["variants"][0]["verdict"];
}

// scripts/plot-timeline: a bad --out is one line, not a traceback; a small
// timeline with its report gives the per-variant picture and the variants chart.
TEST(PlotTimeline, BadOutIsOneLineAndASmallRunPlots)
{
    if (std::system("/usr/bin/python3 -c 'import matplotlib, numpy' 2>/dev/null") != 0)
        GTEST_SKIP() << "no python3-matplotlib (scripts/setup installs it)";
    const std::string script = std::string(MINIVMM_FUZZ_DIR) + "/../../scripts/plot-timeline";
    char dir[] = "/tmp/minivmm-plot-XXXXXX";
    ASSERT_TRUE(mkdtemp(dir));
    const std::string d = dir;
    {
        FILE* f = fopen((d + "/t.csv").c_str(), "w");
        fprintf(f, "variant,t_ms,vcpu,pages,phase\n");
        for (int t = 1; t <= 300; t++)
            for (int v = 0; v < 2; v++)
                fprintf(f, "bitmap,%d.000,%d,%d,%s\n", t, v, (v == 1 && t > 150 && t < 250) ? 150 * 50 : t * 50,
                        t < 100 ? "steady" : "logging");
        fclose(f);
        f = fopen((d + "/r.json").c_str(), "w");
        fprintf(f, R"({"vcpus":2,"mem_bytes":16777216,"backing":"anon","threshold_ms":20,"variants":[)"
                   R"({"name":"bitmap","skipped":"","verdict":"v","harvests":2,"harvests_expected":2,)"
                   R"("harvester_starved":false,"phases":[{"name":"steady","start_ms":0,"end_ms":100,"vcpu":-1},)"
                   R"({"name":"logging","start_ms":100,"end_ms":300,"vcpu":-1}],)"
                   R"("stalls":[{"vcpu":1,"start_ms":150,"len_ms":100,"phase":"logging"}]},)"
                   R"({"name":"eager-split-on","skipped":"tdp_mmu=N","stalls":[],"phases":[]}]})");
        fclose(f);
    }
    auto run = [&](const std::string& args) {
        const std::string err = d + "/err";
        const int st = std::system(("cd " + d + " && " + script + " " + args + " >/dev/null 2>" + err).c_str());
        return std::make_pair(WEXITSTATUS(st), mvm::test::read_file(err));
    };
    auto [rc, err] = run("t.csv --json r.json --out missing/dir/x");
    EXPECT_NE(rc, 0);
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_EQ(err.find("Traceback"), std::string::npos) << err;
    EXPECT_NE(err.find("--out missing/dir/x"), std::string::npos) << err;
    std::tie(rc, err) = run("t.csv --json r.json --out " + d + "/p");
    EXPECT_EQ(rc, 0) << err;
    for (const char* png : {"/p-bitmap.png", "/p-variants.png"})
        EXPECT_FALSE(mvm::test::read_file(d + png).empty()) << png;
    std::system(("rm -rf " + d).c_str());
}
