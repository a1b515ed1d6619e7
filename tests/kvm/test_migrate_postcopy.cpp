// Postcopy (issue 19), against the real KVM and userfaultfd: a guest that
// does not converge in pre-copy completes in postcopy with each tracker,
// in-process and over TCP, every page verified; faults are served on anon,
// shm and hugetlb2m memory (a huge page travels and lands whole); a
// connection cut in postcopy ends in exit 7 ("the guest is lost") on both
// sides, without a hang; what postcopy cannot take is refused in one line.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <numeric>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "base/units.hpp"
#include "kvm_test_util.hpp"
#include "memory/hugetlb.hpp"

using namespace mvm;
using mvm::test::CmdResult;
using mvm::test::free_port;
using mvm::test::Receiver;
using mvm::test::run_minivmm;
using clk = std::chrono::steady_clock;

namespace {

// Every vCPU writes all of its memory as fast as it can: at 64 MiB/s the
// dirty set never shrinks (saturated harvests), so pre-copy cannot converge.
constexpr const char* kVm = "--vcpus 2 --mem 32M";
constexpr const char* kLink = "--bandwidth 64M --warmup 0.2 --post-run 0.5";

double since_s(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }

nlohmann::json parse(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j;
}

// What a completed postcopy migration's report must say, whatever the path.
void expect_postcopy_completed(const nlohmann::json& j, bool expect_faults)
{
    ASSERT_EQ(j["status"], "completed") << j.dump(1);
    EXPECT_FALSE(j["converged"].get<bool>());
    EXPECT_EQ(j["forced_by"], "postcopy");
    EXPECT_FALSE(j["guest_lost"].get<bool>());
    const auto& p = j["postcopy"];
    ASSERT_TRUE(p["started"].get<bool>()) << p.dump(1);
    const uint64_t discarded = p["discarded_pages"];
    EXPECT_GT(discarded, 0u);
    // Every page the destination dropped came back, on request or pushed
    // (those in flight at a recovered cut twice).
    EXPECT_EQ(p["pages_sent_for_requests"].get<uint64_t>() + p["pushed_pages"].get<uint64_t>(),
              discarded + p["resent_pages"].get<uint64_t>())
        << p.dump(1);
    // Two figures, two names: the source's pages sent for requests, the
    // destination's pages asked for (some pushed before the ask came).
    EXPECT_FALSE(p.contains("requested_pages")) << p.dump(1);
    if (!p["destination"].is_null()) {
        EXPECT_GE(p["destination"]["requested_pages"].get<uint64_t>(), p["pages_sent_for_requests"].get<uint64_t>())
            << p.dump(1);
    }
    ASSERT_TRUE(p["destination"].is_object()) << p.dump(1);
    const auto& d = p["destination"];
    EXPECT_EQ(d["discarded_pages"], discarded);
    EXPECT_EQ(d["placed_pages"], discarded);
    const auto dist = d["latency_dist_us_log2"].get<std::vector<uint64_t>>();
    ASSERT_EQ(dist.size(), 24u);
    EXPECT_EQ(std::accumulate(dist.begin(), dist.end(), uint64_t{0}), d["faults"].get<uint64_t>());
    EXPECT_EQ(d["vcpu_blocktime_ms"].size(), 2u);
    EXPECT_EQ(d["vcpu_latency_ns"].size(), 2u);
    EXPECT_EQ(d["vcpu_stall_ms"].size(), 2u);
    if (expect_faults) {
        EXPECT_GT(p["requests"].get<uint64_t>(), 0u);
        EXPECT_GT(d["vcpu_faults"].get<uint64_t>(), 0u);
        EXPECT_GT(d["latency_ns"].get<double>(), 0);
        double blocked = 0;
        for (double b : d["vcpu_blocktime_ms"].get<std::vector<double>>())
            blocked += b;
        EXPECT_GT(blocked, 0);
        // No vCPU can be blocked longer than postcopy lasted; all at once is within each one's.
        for (double b : d["vcpu_blocktime_ms"].get<std::vector<double>>())
            EXPECT_LE(b, d["duration_ms"].get<double>() + 1);
        EXPECT_LE(d["blocktime_ms"].get<double>(), blocked);
    }
    // QEMU's byte split: pre-copy + stop-and-copy (none) + postcopy = all of it.
    EXPECT_EQ(j["downtime_bytes"], 0u);
    EXPECT_GT(p["bytes"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["precopy_bytes"].get<uint64_t>() + p["bytes"].get<uint64_t>(), j["transferred_bytes"].get<uint64_t>());
    // Verified: every page as it landed against the parked source, then the guest's stamps.
    EXPECT_TRUE(j["verify"]["enabled"].get<bool>());
    EXPECT_GT(j["verify"]["switchover_pages_checked"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["switchover_mismatches"], 0u);
    EXPECT_GT(j["verify"]["pages_checked"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["mismatches"], 0u);
    EXPECT_TRUE(j["verify"]["destination_progressed"].get<bool>());
}

struct Path {
    const char* to;
    const char* tracker;
};
std::ostream& operator<<(std::ostream& os, const Path& p) { return os << p.to << "_" << p.tracker; }

class MigratePostcopy : public ::testing::TestWithParam<Path> {};

// Pre-copy alone on this workload: it never converges (the reference the
// postcopy runs are measured against).
TEST(MigratePostcopyReference, PrecopyAloneDoesNotConverge)
{
    REQUIRE_KVM();
    const CmdResult r =
        run_minivmm(fmt::format("migrate --to inproc {} {} --max-iterations 3 --json -", kVm, kLink));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "completed");
    EXPECT_FALSE(j["converged"].get<bool>());
    EXPECT_EQ(j["forced_by"], "max-iterations");
    EXPECT_FALSE(j["postcopy"]["started"].get<bool>());
    EXPECT_GT(j["downtime_bytes"].get<uint64_t>(), 0u);  // the whole dirty set went while the guest was stopped
}

// The automatic trigger: the dirty rate stays at the link rate, so postcopy
// starts after two harvests, long before --max-iterations.
TEST_P(MigratePostcopy, NonConvergingGuestCompletesVerified)
{
    REQUIRE_KVM();
    const Path p = GetParam();
    const std::string common = fmt::format("{} --tracker {}{}", kVm, p.tracker,
                                           std::string(p.tracker) == "ring" ? " --ring 64K" : "");
    std::unique_ptr<Receiver> rx;
    std::string to = "inproc";
    if (std::string(p.to) == "tcp") {
        const uint16_t port = free_port();
        rx = std::make_unique<Receiver>(
            fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60 --json -", kVm, port));
        to = fmt::format("tcp:127.0.0.1:{}", port);
    }
    const CmdResult r = run_minivmm(fmt::format("migrate --to {} {} {} --postcopy --max-iterations 30 --json -", to,
                                                common, kLink));
    ASSERT_EQ(r.exit_code, 0) << r.err << (rx ? rx->output() : "");
    const auto j = parse(r.out);
    expect_postcopy_completed(j, true);
    EXPECT_NE(j["postcopy"]["trigger"].get<std::string>().find("link rate"), std::string::npos) << j["postcopy"];
    EXPECT_LT(j["postcopy"]["after_rounds"].get<uint32_t>(), 30u);
    if (rx) {
        ASSERT_EQ(rx->wait(), 0) << rx->output();
        const auto rj = parse(rx->result().out);
        EXPECT_EQ(rj["status"], "completed");
        ASSERT_TRUE(rj["postcopy"].is_object());
        EXPECT_EQ(rj["postcopy"]["placed_pages"], j["postcopy"]["discarded_pages"]);
        EXPECT_EQ(rj["postcopy"]["faults"], j["postcopy"]["destination"]["faults"]);
        EXPECT_EQ(rj["verify"]["mismatches"], 0u);
        EXPECT_FALSE(rj["guest_lost"].get<bool>());
    }
}

INSTANTIATE_TEST_SUITE_P(EachPathAndTracker, MigratePostcopy,
                         ::testing::Values(Path{"inproc", "bitmap"}, Path{"inproc", "ring"}, Path{"tcp", "bitmap"},
                                           Path{"tcp", "ring"}),
                         [](const auto& info) { return fmt::format("{}_{}", info.param.to, info.param.tracker); });

// --postcopy-preempt: one more connection carries only the requested pages
// (the receiver counts it among its channels), and faults are served there.
TEST(MigratePostcopyPreempt, RequestedPagesOnTheirOwnChannelCompleteVerified)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60 --json -", kVm, port));
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} {} --channels 1 --postcopy "
                                                "--postcopy-after 1 --postcopy-preempt --json -",
                                                port, kVm, kLink));
    ASSERT_EQ(r.exit_code, 0) << r.err << rx.output();
    const auto j = parse(r.out);
    expect_postcopy_completed(j, true);
    EXPECT_TRUE(j["postcopy"]["preempt"].get<bool>());
    EXPECT_GT(j["postcopy"]["pages_sent_for_requests"].get<uint64_t>(), 0u) << j["postcopy"];
    ASSERT_EQ(rx.wait(), 0) << rx.output();
    const auto rj = parse(rx.result().out);
    EXPECT_EQ(rj["channels"], 2u) << "the pages' channel and the preempt channel";
    EXPECT_EQ(rj["verify"]["mismatches"], 0u);
    EXPECT_EQ(rj["postcopy"]["placed_pages"], j["postcopy"]["discarded_pages"]);
}

// Over TCP, so the receiver's own placement runs: 4 KiB pages one by one,
// a hugetlb2m page only once all of its 512 pieces arrived.
class MigratePostcopyBacking : public ::testing::TestWithParam<const char*> {};

TEST_P(MigratePostcopyBacking, FaultsAreServed)
{
    REQUIRE_KVM();
    const std::string backing = GetParam();
    std::unique_ptr<HugetlbReservation> pool;
    if (backing == "hugetlb2m") {
        // Source and destination: 32 MiB each, plus the system slot's.
        pool = std::make_unique<HugetlbReservation>(2ull << 20, 40);
        if (!pool->ok())
            GTEST_SKIP() << "needs 40 free 2 MiB huge pages: " << pool->why_not();
    }
    const uint16_t port = free_port();
    const std::string vm = fmt::format("{} --backing {}", kVm, backing);
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60 --json -", vm, port));
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} {} --postcopy --postcopy-after 1 "
                                                "--json -",
                                                port, vm, kLink));
    ASSERT_EQ(r.exit_code, 0) << r.err << rx.output();
    const auto j = parse(r.out);
    expect_postcopy_completed(j, true);
    EXPECT_NE(j["postcopy"]["trigger"].get<std::string>().find("after 1 pre-copy round"), std::string::npos);
    const auto& d = j["postcopy"]["destination"];
    if (backing == "hugetlb2m") {
        EXPECT_NE(d["units"].get<std::string>().find("2 MiB"), std::string::npos) << d;
        // Whole huge pages: a fault on the guest's memory brings 512 pages
        // (the system slot's few are 4 KiB).
        EXPECT_GE(d["requested_pages"].get<uint64_t>(), 100 * d["faults"].get<uint64_t>()) << d;
    }
    ASSERT_EQ(rx.wait(), 0) << rx.output();
    EXPECT_EQ(parse(rx.result().out)["verify"]["mismatches"], 0u);
}

INSTANTIATE_TEST_SUITE_P(Backings, MigratePostcopyBacking, ::testing::Values("anon", "shm", "hugetlb2m"),
                         [](const auto& info) { return std::string(info.param); });

// A connection lost in postcopy: the destination lacks pages only the
// parked source has. Both sides say the guest is lost and exit 7, quickly.
TEST(MigratePostcopyCut, SenderLosesTheConnectionBothSidesExit7)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60 --json -", kVm, port));
    const auto t0 = clk::now();
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} {} --postcopy --postcopy-after 1 "
                                                "--json -",
                                                port, kVm, kLink),
                                    "env MINIVMM_TEST_FAIL_IN=postcopy");
    EXPECT_EQ(r.exit_code, kExitGuestLost) << r.err;
    EXPECT_NE(r.err.find("the guest is lost"), std::string::npos) << r.err;
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "failed");
    EXPECT_TRUE(j["guest_lost"].get<bool>());
    EXPECT_EQ(j["failed_phase"], "postcopy");
    EXPECT_EQ(j["source"]["state"], "parked");
    EXPECT_TRUE(j["postcopy"]["started"].get<bool>());
    EXPECT_EQ(rx.wait(), kExitGuestLost) << rx.output();
    EXPECT_LT(since_s(t0), 30) << "no hang";
    EXPECT_NE(rx.result().err.find("the guest is lost"), std::string::npos) << rx.output();
    const auto rj = parse(rx.result().out);
    EXPECT_TRUE(rj["guest_lost"].get<bool>());
    EXPECT_EQ(rj["status"], "failed");
    EXPECT_LT(rj["postcopy"]["placed_pages"].get<uint64_t>(), rj["postcopy"]["discarded_pages"].get<uint64_t>());
}

// The same cut with --postcopy-recover on both sides: both pause (the
// destination's guest runs on), the sender connects again, the receiver
// says what it still lacks (what was in flight at the cut among it), and
// the migration completes with every page checked.
TEST(MigratePostcopyCut, RecoverOnBothSidesCompletesWithEveryPage)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60 --postcopy-recover 30 --json -",
                            kVm, port));
    const auto t0 = clk::now();
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} {} --postcopy --postcopy-after 1 "
                                                "--postcopy-recover 30 --json -",
                                                port, kVm, kLink),
                                    "env MINIVMM_TEST_FAIL_IN=postcopy");
    ASSERT_EQ(r.exit_code, 0) << r.err << rx.output();
    EXPECT_LT(since_s(t0), 60) << "no hang";
    EXPECT_NE(r.err.find("postcopy paused"), std::string::npos) << r.err << rx.output();
    EXPECT_NE(r.err.find("postcopy recovered"), std::string::npos) << r.err;
    const auto j = parse(r.out);
    expect_postcopy_completed(j, false);
    EXPECT_EQ(j["postcopy"]["pauses"], 1u) << j["postcopy"];
    EXPECT_GT(j["postcopy"]["paused_ms"].get<double>(), 0) << j["postcopy"];
    EXPECT_FALSE(j["guest_lost"].get<bool>());
    ASSERT_EQ(rx.wait(), 0) << rx.output();
    const auto rj = parse(rx.result().out);
    EXPECT_EQ(rj["status"], "completed") << rx.output();
    EXPECT_EQ(rj["verify"]["mismatches"], 0u) << rj["verify"];
    EXPECT_EQ(rj["postcopy"]["pauses"], 1u) << rj["postcopy"];
    // Every page that had to come did, once each.
    EXPECT_EQ(rj["postcopy"]["placed_pages"], rj["postcopy"]["discarded_pages"]) << rj["postcopy"];
}

TEST(MigratePostcopyCut, ReceiverDiesSenderExits7)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60", kVm, port),
                "env MINIVMM_TEST_DIE_IN=postcopy");
    const auto t0 = clk::now();
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} {} --postcopy --postcopy-after 1 "
                                                "--json -",
                                                port, kVm, kLink));
    EXPECT_EQ(rx.wait(), 9) << rx.output();  // the hook's _exit(9): no goodbye
    EXPECT_EQ(r.exit_code, kExitGuestLost) << r.err;
    EXPECT_LT(since_s(t0), 30) << "no hang";
    const auto j = parse(r.out);
    EXPECT_TRUE(j["guest_lost"].get<bool>());
    EXPECT_EQ(j["destination_state"], "lost");
}

TEST(MigratePostcopyCut, InprocDestinationLostExit7)
{
    REQUIRE_KVM();
    const auto t0 = clk::now();
    const CmdResult r = run_minivmm(
        fmt::format("migrate --to inproc {} {} --postcopy --postcopy-after 1 --json -", kVm, kLink),
        "env MINIVMM_TEST_FAIL_IN=postcopy");
    EXPECT_EQ(r.exit_code, kExitGuestLost) << r.err;
    EXPECT_LT(since_s(t0), 30) << "no hang";
    const auto j = parse(r.out);
    EXPECT_TRUE(j["guest_lost"].get<bool>());
    EXPECT_FALSE(j["source"]["running"].get<bool>());
}

// What postcopy cannot take: one line naming the option, exit 2, before any migration.
TEST(MigratePostcopyRefusal, OneLineExit2)
{
    REQUIRE_KVM();
    struct Case {
        std::string args, want;
    } cases[] = {
        {"--backing gmem --postcopy", "guest_memfd"},
        {"--postcopy --to tcp:127.0.0.1:1 --tls-creds psk:/nonexistent", "--tls-creds"},
        {"--postcopy-after 2", "--postcopy-after: only with --postcopy"},
    };
    for (const auto& c : cases) {
        const std::string args = c.args.find("--to") == std::string::npos ? c.args + " --to inproc" : c.args;
        const CmdResult r = run_minivmm(fmt::format("migrate {} {}", kVm, args));
        EXPECT_EQ(r.exit_code, kExitUsage) << c.args << ": " << r.err;
        EXPECT_NE(r.err.find(c.want), std::string::npos) << c.args << ": " << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << ": " << r.err;
    }
}

}  // namespace
