// The stall detector and the lockup report against the real KVM: a guest
// paused on purpose for a known time shows up as a stall of that length
// (within the sampling period and the pause latency), and the guest
// watchdog's events reach the report.
#include <gtest/gtest.h>

#include <chrono>
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
        // At least the time every vCPU was held; at most that plus the time
        // pause() took to park them, plus a sampling period on each side and
        // the resume wake-up.
        EXPECT_GE(longest, held_ms - 2.5) << "vCPU " << v;  // the stall is what the samples saw: up to a period or two short
        EXPECT_LE(longest, upper_ms + 2.0 + 10.0) << "vCPU " << v;
    }
    EXPECT_GT(sampler.ticks(), 400u) << "about 1 kHz over ~0.55 s";
    EXPECT_TRUE(sampler.samples().size() >= sampler.ticks() * 2);
    m.request_stop();
    m.wait_finished(std::chrono::seconds(10));
}

TEST(Lockup, WatchdogEventsAndTheDeliberatePauseReachTheReport)
{
    REQUIRE_KVM();
    char path[] = "/tmp/minivmm-timeline-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    auto r = run_minivmm(fmt::format("lockup --vcpus 4 --mem 64M --variants bitmap,ring --logging 0.5 --steady 0.2 "
                                     "--threshold-ms 30 --timeline {} --json -",
                                     path),
                         "env MINIVMM_TEST_PAUSE_MS=120");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    ASSERT_EQ(j["variants"].size(), 2u);
    for (const auto& v : j["variants"]) {
        EXPECT_GE(v["watchdog_events"].get<uint64_t>(), 4u) << "every vCPU's guest saw the 120 ms pause";
        EXPECT_GE(v["watchdog_longest_ms"].get<double>(), 115.0);
        EXPECT_GE(v["longest_stall_ms"].get<double>(), 115.0);
        EXPECT_EQ(v["vcpus_stalled"].get<uint32_t>(), 4u);
        // A vCPU inside a ring-full exit when the pause began has its stall
        // attributed to that exit.
        const auto& by = v["vcpus_stalled_by_phase"];
        EXPECT_GE(by.value("test-pause", 0u) + by.value("ring-full", 0u), 4u) << by.dump();
        EXPECT_GE(v["sampler_hz"].get<double>(), 900.0);
        EXPECT_NE(v["verdict"].get<std::string>().find("made no progress for > 30 ms"), std::string::npos);
        EXPECT_GT(v["enable_ms"].get<double>(), 0.0);
        EXPECT_GE(v["harvests"].get<uint64_t>(), 2u);
    }
    EXPECT_NE(r.err.find("variant"), std::string::npos) << "the table goes to stderr with --json -";
    FILE* f = fopen(path, "r");
    ASSERT_TRUE(f);
    char line[256];
    ASSERT_TRUE(fgets(line, sizeof(line), f));
    EXPECT_STREQ(line, "variant,t_ms,vcpu,pages,phase\n");
    size_t rows = 0;
    // Samples carry the phase they fell in. Enabling and the first harvest
    // take about a millisecond, which a 1 kHz sampler on a loaded host (or
    // under ASan) can miss; the logging phases around them it cannot.
    bool saw_enable = false;
    while (fgets(line, sizeof(line), f)) {
        rows++;
        for (const char* p : {",enable-logging", ",first-harvest", ",harvest", ",clear", ",copy", ",logging\n"})
            saw_enable |= std::string(line).find(p) != std::string::npos;
    }
    fclose(f);
    unlink(path);
    EXPECT_GT(rows, 4u * 500u) << "1 kHz x 4 vCPUs over the run";
    EXPECT_TRUE(saw_enable);
}
