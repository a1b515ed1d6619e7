// Migration figures mean what their names say: total_ms is
// QEMU's total-time (start -> destination running) with verify and post-run
// apart; convergence forced by --max-iterations is reported as such; each
// round's dirty rate is over its own harvest interval, saturation flagged,
// the stop row filled; failures carry the true counts; the configuration is
// echoed; an unreachable destination is refused before the guest boots.
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"
#include "migration/migrate.hpp"
#include "vmm/stress/stress_vm.hpp"

using namespace mvm;
using namespace mvm::migration;
using mvm::test::free_port;
using mvm::test::Receiver;
using mvm::test::run_minivmm;

namespace {

constexpr uint64_t kMiB = 1ull << 20;
using clk = std::chrono::steady_clock;

double ms_since(clk::time_point t) { return std::chrono::duration<double, std::milli>(clk::now() - t).count(); }

double sum_round_ms(const MigrateReport& r)
{
    double s = 0;
    for (const auto& rr : r.rounds)
        s += rr.duration_s * 1e3;
    return s;
}

// scripts/plot-migration draws this report; a bad --out is one line, no traceback.
void expect_plot(const nlohmann::json& j)
{
    const std::string script = std::string(MINIVMM_FUZZ_DIR) + "/../../scripts/plot-migration";
    if (std::system("/usr/bin/python3 -c 'import matplotlib' 2>/dev/null") != 0) {
        fmt::print("plot-migration not tried: python3-matplotlib is missing\n");
        return;
    }
    const std::string in = fmt::format("/tmp/minivmm-plot-{}.json", ::getpid()), png = in + ".png";
    {
        std::FILE* f = std::fopen(in.c_str(), "w");
        ASSERT_TRUE(f);
        std::fputs(j.dump().c_str(), f);
        std::fclose(f);
    }
    EXPECT_EQ(std::system(fmt::format("{} {} --out {} >/dev/null", script, in, png).c_str()), 0);
    EXPECT_GT(mvm::test::read_file(png).size(), 10000u);
    const std::string err = in + ".err";
    EXPECT_NE(std::system(fmt::format("{} {} --out /nonexistent/dir/x.png 2>{}", script, in, err).c_str()), 0);
    const std::string msg = mvm::test::read_file(err);
    EXPECT_EQ(std::count(msg.begin(), msg.end(), '\n'), 1) << msg;
    EXPECT_NE(msg.find("--out"), std::string::npos) << msg;
    for (const auto& p : {in, png, err})
        std::remove(p.c_str());
}

}  // namespace

// One forced, bandwidth-capped in-process migration: the timing relations,
// the forced convergence, every round's rate over its own interval, the
// stop row, QEMU's mbps/pages-per-second, the progress series and the config.
TEST(MigrateFigures, TimingsConvergenceRoundsAndConfig)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 32 * kMiB);  // unlimited rate: it always dirties
    StressVm src(kvm, cfg);
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    src.wait_first_pass(std::chrono::seconds(60));
    MigrateOptions o;
    o.post_run_s = 0.3;
    o.max_downtime_ms = 0.001;  // never fits: stop-and-copy is forced by --max-iterations
    o.max_iterations = 3;
    o.bandwidth = 200 * kMiB;
    const auto t = clk::now();
    MigrateReport r = migrate(src, *tracker, o, nullptr);
    const double wall_ms = ms_since(t);
    ASSERT_EQ(r.status, "completed") << r.error;

    // total-time ends when the destination runs: post-run and the destination check come after it.
    EXPECT_GE(r.post_run_ms, 300.0);
    EXPECT_LE(r.total_ms + r.post_run_ms, wall_ms + 1.0);
    EXPECT_GE(r.total_ms + 1.0, r.setup_ms + sum_round_ms(r)) << "total >= setup + bulk + rounds + stop";
    EXPECT_GE(r.total_ms, r.downtime_ms);
    EXPECT_GT(r.verify_ms, 0.0) << "in-process: the page compare is timed";
    EXPECT_NEAR(r.setup_ms, r.setup_destination_ms + r.setup_tracking_ms, 20.0);
    EXPECT_GE(r.stop_ms + r.downtime_ms, r.total_ms - 1.0) << "the downtime window ends when the destination runs";

    EXPECT_FALSE(r.converged);
    EXPECT_EQ(r.forced_by, "max-iterations");
    EXPECT_NE(r.to_table().find("NOT converged: stop-and-copy forced by max-iterations"), std::string::npos)
        << r.to_table();
    EXPECT_EQ(r.to_table().find("migration completed\n"), std::string::npos);

    ASSERT_EQ(r.rounds.size(), 5u) << "bulk, 3 pre-copy rounds, stop";
    EXPECT_EQ(r.rounds.front().kind, "bulk");
    EXPECT_EQ(r.rounds.back().kind, "stop");
    double prev_end_ms = 0;
    for (size_t i = 1; i < r.rounds.size(); i++) {
        const RoundReport& rr = r.rounds[i];
        EXPECT_GT(rr.harvest_interval_s, 0.0) << i;
        EXPECT_NEAR(rr.dirty_rate, rr.dirty_pages / rr.harvest_interval_s, 1e-6 * rr.dirty_rate + 1e-9) << i;
        if (rr.saturated)
            EXPECT_GE(rr.dirty_pages, rr.tracked_pages) << i;
        EXPECT_GE(rr.start_ms + 1.0, prev_end_ms) << "rounds follow each other";
        prev_end_ms = rr.start_ms + rr.duration_s * 1e3;
    }
    const RoundReport& stop = r.rounds.back();
    EXPECT_GT(stop.dirty_pages, 0u) << "the stop row is filled (the guest dirties without a cap)";
    EXPECT_GT(stop.dirty_rate, 0.0);

    uint64_t bytes = 0, pages = 0;
    for (const auto& rr : r.rounds)
        bytes += rr.bytes, pages += rr.pages;
    EXPECT_EQ(r.transferred_bytes, bytes);
    EXPECT_EQ(r.pages, pages);
    const double transfer_s = (r.total_ms - r.setup_ms) / 1e3;
    EXPECT_NEAR(r.mbps, r.transferred_bytes * 8 / 1e6 / transfer_s, 1e-6 * r.mbps);
    EXPECT_NEAR(r.pages_per_second, r.pages / transfer_s, 1e-6 * r.pages_per_second);

    ASSERT_GE(r.guest_progress.size(), 5u);
    for (size_t i = 1; i < r.guest_progress.size(); i++)
        EXPECT_GT(r.guest_progress[i].t_ms, r.guest_progress[i - 1].t_ms);
    EXPECT_LE(r.guest_progress.back().t_ms, r.stop_ms + 20.0) << "sampled from setup to the park";

    auto j = r.to_json();
    EXPECT_EQ(j["config"]["tracker"], "bitmap");
    EXPECT_EQ(j["config"]["bandwidth_bytes_per_s"].get<uint64_t>(), 200 * kMiB);
    EXPECT_EQ(j["config"]["max_downtime_ms"].get<double>(), 0.001);
    EXPECT_EQ(j["config"]["channels"].get<uint32_t>(), 1u);
    EXPECT_EQ(j["config"]["machine"]["nodes"][0]["backing"], "anon");
    EXPECT_FALSE(j["config"]["host"]["kernel"].get<std::string>().empty());
    EXPECT_TRUE(j["config"]["host"]["kvm_module_params"].is_object());
    EXPECT_EQ(j["forced_by"], "max-iterations");
    src.kill();
    expect_plot(j);
}

// A guest rewriting all of its memory between harvests: the rate is a
// lower bound and says so.
TEST(MigrateFigures, SaturatedRoundsAreFlagged)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 8 * kMiB);
    StressVm src(kvm, cfg);  // unlimited rate: all 2048 pages rewritten every few ms
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    src.wait_first_pass(std::chrono::seconds(60));
    MigrateOptions o;
    o.post_run_s = 0.1;
    o.max_downtime_ms = 0.001;
    o.max_iterations = 3;
    o.bandwidth = 20 * kMiB;  // 8 MiB per round: 400 ms, ample time to rewrite everything
    MigrateReport r = migrate(src, *tracker, o, nullptr);
    ASSERT_EQ(r.status, "completed") << r.error;
    size_t saturated = 0;
    for (const auto& rr : r.rounds) {
        EXPECT_EQ(rr.tracked_pages, 8 * kMiB / 4096) << "the guest's slot, not the system slot";
        if (rr.saturated)  // every guest page, plus whatever of the system slot
            EXPECT_GE(rr.dirty_pages, rr.tracked_pages) << rr.round;
        EXPECT_FALSE(rr.kind == "bulk" && rr.saturated);
        saturated += rr.saturated;
    }
    EXPECT_GE(saturated, 1u);
    EXPECT_NE(r.to_table().find("saturated, >= "), std::string::npos) << r.to_table();
    src.kill();
}

// --post-run 0 (3 failures in 10 before): the destination is given the
// time it needs to show progress.
TEST(MigrateFigures, PostRunZeroCompletes)
{
    REQUIRE_KVM();
    for (int i = 0; i < 5; i++) {
        MachineConfig cfg = single_node_config(2, 16 * kMiB);
        cfg.workload.rate_pages_per_s = 50000;
        StressVm src(kvm, cfg);
        auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
        src.start();
        src.wait_first_pass(std::chrono::seconds(60));
        MigrateOptions o;
        o.post_run_s = 0;
        MigrateReport r = migrate(src, *tracker, o, nullptr);
        EXPECT_EQ(r.status, "completed") << "run " << i << ": " << r.error;
        EXPECT_TRUE(r.destination_progressed) << r.stamp_summary;
        EXPECT_EQ(r.mismatches, 0u) << r.stamp_summary;
        src.kill();
    }
}

// A failure after the switchover leaves the source parked (its guest runs
// at the destination) and the report says so instead of "kept running".
TEST(MigrateFigures, FailureAfterSwitchoverSaysTheSourceIsParked)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 16 * kMiB);
    cfg.workload.rate_pages_per_s = 50000;
    StressVm src(kvm, cfg);
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    src.wait_first_pass(std::chrono::seconds(60));
    MigrateOptions o;
    o.post_run_s = 0.1;
    o.max_downtime_ms = 1e9;
    Sender s(src, *tracker, o);
    s.setup();
    s.bulk();
    while (s.precopy_round()) {
    }
    s.stop_and_copy();
    s.switchover();
    s.fail("the destination went away after it resumed (test)");
    const MigrateReport& r = s.report();
    EXPECT_EQ(r.status, "failed");
    EXPECT_EQ(r.source_state, "parked");
    EXPECT_EQ(r.destination_state, "lost");
    EXPECT_NE(r.state_note.find("not resumed"), std::string::npos) << r.state_note;
    const uint64_t before = src.snapshot(0).pages_written;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(src.snapshot(0).pages_written, before) << "the source must not run the handed-over guest again";
    src.kill();
}

// --timeout is checked inside bulk; the interrupted bulk pass is labelled
// as such with what it really sent, and the rest counts as remaining.
TEST(MigrateFigures, TimeoutFiresInBulkWithTrueCounts)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 32 * kMiB);
    StressVm src(kvm, cfg);
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    src.wait_first_pass(std::chrono::seconds(60));
    MigrateOptions o;
    o.timeout_s = 0.5;
    o.bandwidth = 8 * kMiB;  // bulk would take 4 s
    MigrateReport r = migrate(src, *tracker, o, nullptr);
    EXPECT_EQ(r.status, "failed");
    EXPECT_EQ(r.phase, "bulk") << r.error;
    EXPECT_LT(r.total_ms, 2000.0) << "--timeout 0.5 fired after " << r.total_ms << " ms";
    ASSERT_EQ(r.rounds.size(), 1u);
    EXPECT_EQ(r.rounds[0].kind, "interrupted");
    EXPECT_GT(r.rounds[0].pages, 0u);
    EXPECT_LT(r.rounds[0].pages, 32 * kMiB / 4096);
    EXPECT_EQ(r.transferred_bytes, r.rounds[0].bytes);
    // Remaining is distinct pages (QEMU's ram_bytes_remaining()): the bulk
    // pages not sent yet, and pages dirtied since, each once; never more than
    // the guest has (it counted both, and printed 487 MiB for a 256 MiB guest).
    uint64_t guest_bytes = 0;  // every memslot (the system slot too): what the bulk pass sends
    for (const auto& reg : src.memslots().regions())
        guest_bytes += reg.size;
    EXPECT_GE(r.remaining_bytes, guest_bytes - r.rounds[0].pages * 4096);
    EXPECT_LE(r.remaining_bytes, guest_bytes);
    EXPECT_GT(r.throughput, 0.0);
    EXPECT_EQ(r.to_table().find("  stop "), std::string::npos) << r.to_table();
    src.kill();
}

// An unreachable destination is refused before the guest boots: one line, non-zero.
TEST(MigrateFigures, UnreachableDestinationIsOneLine)
{
    REQUIRE_KVM();
    const auto t = clk::now();
    auto r = run_minivmm("migrate --to tcp:127.0.0.1:1 --vcpus 2 --mem 64M --warmup 1");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find("tcp:127.0.0.1:1"), std::string::npos) << r.err;
    EXPECT_LT(ms_since(t), 1000.0) << "no guest was booted and warmed up for it";
}

// Cancelled over TCP mid pre-copy: the receiver reports the pages it got,
// and a probe-free sender's bulk counts match.
TEST(MigrateFigures, InterruptedReceiverReportsWhatItGot)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    const std::string json = fmt::format("/tmp/minivmm-recv-{}.json", port);
    Receiver recv(fmt::format("--vcpus 2 --mem 32M --listen tcp:127.0.0.1:{} --json {}", port, json));
    auto r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} --vcpus 2 --mem 32M --warmup 0.2 --bandwidth 64M "
                                     "--max-downtime 0.001ms --max-iterations 100000 --timeout 3 --json -",
                                     port));
    EXPECT_EQ(r.exit_code, 5) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << r.out;
    EXPECT_EQ(j["failed_phase"], "precopy") << j["error"];
    EXPECT_GE(j["transferred_bytes"].get<uint64_t>(), 32 * kMiB) << "the bulk pass went";
    EXPECT_NE(recv.wait(), 0) << recv.output();
    auto rj = nlohmann::json::parse(mvm::test::read_file(json), nullptr, false);
    std::remove(json.c_str());
    ASSERT_FALSE(rj.is_discarded()) << recv.output();
    EXPECT_GE(rj["pages"].get<uint64_t>(), 32 * kMiB / 4096) << rj.dump();
}

// The same through the command: after the switchover the source is reported
// parked (not "kept running"), its frozen memory checked, exit 5.
TEST(MigrateFigures, CommandSaysTheSourceIsParkedAfterTheSwitchover)
{
    REQUIRE_KVM();
    auto r = run_minivmm("migrate --to inproc --vcpus 2 --mem 32M --rate 50000 --warmup 0.2 --post-run 0.1 --json -",
                         "env MINIVMM_TEST_FAIL_IN=destination");
    EXPECT_EQ(r.exit_code, 5) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << r.out;
    EXPECT_EQ(j["failed_phase"], "destination");
    EXPECT_FALSE(j["source"]["running"].get<bool>());
    EXPECT_EQ(j["source"]["state"], "parked") << j["source"];
    EXPECT_EQ(j["source"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["destination_state"], "lost");
    EXPECT_EQ(r.err.find("kept running"), std::string::npos) << r.err;
}
