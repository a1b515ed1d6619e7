// Live migration against the real KVM: in-process and over loopback TCP,
// with each tracker, verified page by page and by the guest's stamps after
// resume; faults in every phase leave the source running with its stamps
// intact; corrupt, truncated and mismatched streams are refused.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cstdlib>

#include <atomic>
#include <functional>
#include <chrono>
#include <algorithm>
#include <sstream>
#include <stdexcept>
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

nlohmann::json parse(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j;
}

// The downtime window's parts (issue 14): they sum to at most downtime_ms;
// what the parts leave out is bookkeeping, less than the verification that
// used to sit in the window; the guest, parked throughout the final harvest
// and send, saw at least those on its own (migrated) TSC.
void expect_downtime_relations(const nlohmann::json& j)
{
    const auto& s = j["downtime_split"];
    const double down = j["downtime_ms"].get<double>();
    const double parts = s["park_ms"].get<double>() + s["final_harvest_ms"].get<double>() +
                         s["final_send_ms"].get<double>() + s["vcpu_state_ms"].get<double>() +
                         s["restore_ms"].get<double>();
    EXPECT_LE(parts, down + 1e-3) << s.dump();
    if (s.contains("destination_restore_ms"))
        EXPECT_LE(s["destination_restore_ms"].get<double>(), s["restore_ms"].get<double>() + 1e-3) << s.dump();
    const double verify = j["verify_ms"].get<double>();
    EXPECT_GT(verify, 0);
    EXPECT_LT(down - parts, verify) << "downtime_ms holds something besides its parts: " << j.dump();
    ASSERT_TRUE(j["downtime_guest_ms"].is_number()) << j.value("downtime_guest_note", "") << j.dump();
    const double guest = j["downtime_guest_ms"].get<double>();
    EXPECT_GE(guest, s["final_harvest_ms"].get<double>() + s["final_send_ms"].get<double>() - 0.5)
        << "the guest's TSC did not run on across the move: " << s.dump();
    EXPECT_LE(guest, down + 250) << s.dump();
    EXPECT_EQ(j["source_state"], "parked");
}

void expect_verified(const nlohmann::json& j, uint64_t pages)
{
    expect_downtime_relations(j);
    EXPECT_EQ(j["status"], "completed") << j.dump();
    EXPECT_EQ(j["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
    EXPECT_GT(j["verify"]["switchover_pages_checked"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["pages_checked"].get<uint64_t>(), pages);
    EXPECT_EQ(j["verify"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_TRUE(j["verify"]["destination_progressed"].get<bool>());
    for (const char* k : {"status", "total_ms", "setup_ms", "downtime_ms", "transferred_bytes", "rounds",
                          "throughput_bytes_per_s"})
        EXPECT_TRUE(j.contains(k)) << k;
    EXPECT_GE(j["rounds"].size(), 2u) << "a bulk pass and a stop-and-copy at least";
}

// A guest that dirties continuously (200k pages/s in all), migrated at a
// capped bandwidth so pre-copy needs rounds; after 4 it stops and copies.
const char* kGuest = "--vcpus 2 --mem 64M --rate 100000 --warmup 0.3 --post-run 0.5 --bandwidth 400M --max-iterations 4";

}  // namespace

class MigrateTracker : public ::testing::TestWithParam<std::string> {};

TEST_P(MigrateTracker, InProcessZeroMismatches)
{
    REQUIRE_KVM();
    auto r = run_minivmm(fmt::format("migrate --to inproc --tracker {} {} --max-downtime 5 --json -", GetParam(), kGuest));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse(r.out);
    expect_verified(j, 64 * kMiB / 4096);
    EXPECT_GE(j["rounds"].size(), 3u) << "the guest dirties during pre-copy: some rounds";
    // The table (on stderr with --json -) says each side's state once.
    size_t said = 0;
    for (size_t at = 0; (at = r.err.find("source: parked; destination:", at)) != std::string::npos; at++)
        said++;
    EXPECT_EQ(said, 1u) << r.err;
}

TEST_P(MigrateTracker, TcpLoopbackZeroMismatches)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver recv(fmt::format("--vcpus 2 --mem 64M --rate 100000 --post-run 0.5 --listen tcp:127.0.0.1:{} --json -", port));
    auto r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} --tracker {} {} --max-downtime 20 --json -", port,
                                     GetParam(), kGuest));
    ASSERT_EQ(r.exit_code, 0) << r.err << recv.output();
    const auto j = parse(r.out);
    expect_verified(j, 64 * kMiB / 4096);
    EXPECT_EQ(recv.wait(), 0) << recv.output();
    EXPECT_NE(recv.output().find("0 mismatches"), std::string::npos) << recv.output();
    // The receiver's own report: its timings, the guest's downtime as it
    // measured it (the figure the sender reports), the MSRs it refused (the
    // sender reports the same ones, in hex).
    const auto rj = parse(recv.result().out);
    for (const char* k : {"total_ms", "memory_ms", "switchover_ms", "restore_ms", "verify_ms", "post_run_ms"})
        EXPECT_TRUE(rj[k].is_number()) << k << ": " << rj.dump();
    EXPECT_LE(rj["restore_ms"].get<double>(), rj["switchover_ms"].get<double>() + 1e-3);
    EXPECT_GE(rj["post_run_ms"].get<double>(), 500);
    EXPECT_DOUBLE_EQ(rj["downtime_guest_ms"].get<double>(), j["downtime_guest_ms"].get<double>());
    EXPECT_EQ(rj["verify"]["switchover_pages_checked"], j["verify"]["switchover_pages_checked"]);
    EXPECT_EQ(rj["refused_msrs"], j.value("refused_msrs", nlohmann::json::array())) << "over TCP too";
    // One vocabulary: the receiver counts what arrived under the sender's (QEMU's) name.
    EXPECT_GT(rj["transferred_bytes"].get<uint64_t>(), 0u) << rj.dump();
    EXPECT_FALSE(rj.contains("bytes"));
    EXPECT_TRUE(rj["config"]["machine"].contains("nodes")) << "the receiver says what it ran with too";
    for (const auto& m : rj["refused_msrs"])
        EXPECT_EQ(m.get<std::string>().rfind("0x", 0), 0u) << m;
    EXPECT_EQ(rj["guest"], "stopped after its post-run check");
}

INSTANTIATE_TEST_SUITE_P(Trackers, MigrateTracker, ::testing::Values("bitmap", "ring"),
                         [](const auto& info) { return info.param; });

// Two virtual nodes, one of them guest_memfd (sent whole at stop-and-copy),
// one channel each.
TEST(Migrate, TwoNodesWithGuestMemfdOverTwoChannels)
{
    REQUIRE_GMEM();
    const uint16_t port = free_port();
    const std::string vm = "--numa cpus=0,mem=32M,host-nodes=0 --numa cpus=1,mem=32M,backing=gmem,host-nodes=0 "
                           "--rate 100000";
    Receiver recv(fmt::format("{} --post-run 0.5 --listen tcp:127.0.0.1:{}", vm, port));
    auto r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} --warmup 0.3 --max-downtime 50 --json -", port, vm));
    ASSERT_EQ(r.exit_code, 0) << r.err << recv.output();
    auto j = parse(r.out);
    expect_verified(j, 64 * kMiB / 4096);
    EXPECT_EQ(j["untracked_slots"].size(), 1u);
    // The guest_memfd node goes whole at stop-and-copy: the expected downtime counts it.
    EXPECT_EQ(j["untracked_bytes"].get<uint64_t>(), 32 * kMiB);
    EXPECT_GE(j["expected_downtime_ms"].get<double>() * 1.0001,
              32.0 * kMiB / j["throughput_bytes_per_s"].get<double>() * 1e3)
        << j.dump();
    EXPECT_EQ(recv.wait(), 0) << recv.output();
}

// The destination goes away in each phase: the source keeps running with
// its stamps intact, exit 5, one clear line.
class MigrateFault : public ::testing::TestWithParam<std::string> {};

TEST_P(MigrateFault, InProcessSourceSurvives)
{
    REQUIRE_KVM();
    auto r = run_minivmm(fmt::format("migrate --to inproc {} --max-downtime 5 --json -", kGuest),
                         "env MINIVMM_TEST_FAIL_IN=" + GetParam());
    EXPECT_EQ(r.exit_code, 5) << r.err;
    auto j = parse(r.out);
    EXPECT_EQ(j["status"], "failed");
    EXPECT_EQ(j["failed_phase"], GetParam());
    EXPECT_TRUE(j["source"]["running"].get<bool>()) << "the source guest must keep running";
    EXPECT_EQ(j["source"]["state"], "running") << j["source"].dump();
    EXPECT_EQ(j["source"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["source"]["pages_checked"].get<uint64_t>(), 64 * kMiB / 4096);
    EXPECT_NE(r.err.find("minivmm: migration failed in " + GetParam()), std::string::npos) << r.err;
}

TEST_P(MigrateFault, ReceiverKilledSourceSurvives)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver recv(fmt::format("--vcpus 2 --mem 64M --rate 100000 --listen tcp:127.0.0.1:{}", port),
                  "env MINIVMM_TEST_DIE_IN=" + GetParam());
    auto r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} --max-downtime 5 --json -",
                                     port, kGuest));
    EXPECT_EQ(recv.wait(), 9) << recv.output();
    EXPECT_EQ(r.exit_code, 5) << r.err;
    auto j = parse(r.out);
    EXPECT_EQ(j["status"], "failed");
    EXPECT_TRUE(j["source"]["running"].get<bool>());
    EXPECT_EQ(j["source"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["source"]["pages_checked"].get<uint64_t>(), 64 * kMiB / 4096);
}

INSTANTIATE_TEST_SUITE_P(Phases, MigrateFault, ::testing::Values("bulk", "precopy", "stop"),
                         [](const auto& info) { return info.param; });

// The layout matches but the guest does not: a receiver started with another
// --seed finds the stream's boot parameters differ from its own and refuses
// before restoring a vCPU; the source keeps running.
TEST(Migrate, ReceiverRefusesAGuestWithOtherBootParameters)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver recv(fmt::format("--vcpus 2 --mem 64M --rate 100000 --seed 2 --listen tcp:127.0.0.1:{}", port));
    auto r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} --max-downtime 5 --json -", port, kGuest));
    const int rc = recv.wait();
    EXPECT_GT(rc, 0) << recv.output();
    EXPECT_LT(rc, 128) << recv.output();
    EXPECT_NE(recv.output().find("guest boot parameter seed is 0x1, the host wrote 0x2"), std::string::npos)
        << recv.output();
    EXPECT_EQ(r.exit_code, 5) << r.err;
    EXPECT_NE(r.err.find("--seed"), std::string::npos) << r.err;
    auto j = parse(r.out);
    EXPECT_EQ(j["status"], "failed");
    EXPECT_TRUE(j["source"]["running"].get<bool>());
    EXPECT_EQ(j["source"]["mismatches"].get<uint64_t>(), 0u);
}

// The stream itself damaged on the wire: one bit flipped, or the connection
// cut, at a chosen byte of each phase. The receiver refuses (naming the
// record or the closed connection) and exits non-zero without a signal; the
// source exits 5 with one line and keeps running with its stamps intact.
struct StreamFaultCase {
    const char* spec;           // MINIVMM_TEST_STREAM_FAULT
    const char* receiver_says;  // in the receiver's error
    const char* extra = "";     // more migrate options (--compress zstd: PAGES_ZSTD frames)
};
std::ostream& operator<<(std::ostream& os, const StreamFaultCase& c) { return os << c.spec; }
class MigrateStreamFault : public ::testing::TestWithParam<StreamFaultCase> {};

TEST_P(MigrateStreamFault, ReceiverRefusesAndTheSourceSurvives)
{
    REQUIRE_KVM();
    const std::string spec = GetParam().spec;
    const std::string phase = spec.substr(spec.find(':') + 1, spec.rfind(':') - spec.find(':') - 1);
    const uint16_t port = free_port();
    Receiver recv(fmt::format("--vcpus 2 --mem 64M --rate 100000 --listen tcp:127.0.0.1:{}", port));
    auto r = run_minivmm(
        fmt::format("migrate --to tcp:127.0.0.1:{} {} --max-downtime 5 {} --json -", port, kGuest, GetParam().extra),
        "env MINIVMM_TEST_STREAM_FAULT=" + spec);
    const int rrc = recv.wait();
    const std::string rout = recv.output();
    EXPECT_GT(rrc, 0) << rout;
    EXPECT_LT(rrc, 128) << "the receiver must exit, not die of a signal: " << rout;
    EXPECT_NE(rout.find(GetParam().receiver_says), std::string::npos) << rout;
    EXPECT_NE(rout.find("minivmm: receive failed"), std::string::npos) << rout;
    EXPECT_EQ(r.exit_code, 5) << r.err;
    EXPECT_NE(r.err.find("minivmm: migration failed in " + phase), std::string::npos) << r.err;
    auto j = parse(r.out);
    EXPECT_EQ(j["status"], "failed");
    EXPECT_EQ(j["failed_phase"], phase);
    EXPECT_TRUE(j["source"]["running"].get<bool>()) << "the source guest must keep running";
    EXPECT_EQ(j["source"]["state"], "running") << j["source"].dump();
    EXPECT_EQ(j["source"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["source"]["pages_checked"].get<uint64_t>(), 64 * kMiB / 4096);
}

INSTANTIATE_TEST_SUITE_P(
    Offsets, MigrateStreamFault,
    ::testing::Values(StreamFaultCase{"flip:bulk:0", "unknown type"},  // the first PAGES record's type
                      StreamFaultCase{"flip:bulk:7", "claims"},        // its length: over the limit
                      StreamFaultCase{"flip:bulk:5000", "fails its checksum"},
                      StreamFaultCase{"cut:bulk:3000", "closed the connection"},
                      // The index is checked before any data is read: a GPA far outside memory.
                      StreamFaultCase{"flip:precopy:100", "outside every memslot"},
                      // Page data staged while the source runs: its checksum holds in transit.
                      StreamFaultCase{"flip:precopy:5000", "fails its checksum"},
                      StreamFaultCase{"cut:precopy:20", "closed the connection"},
                      // The length no longer fits the index.
                      StreamFaultCase{"flip:stop:4", "its index says"},
                      // Page data sent straight from the parked source's memory.
                      StreamFaultCase{"flip:stop:5000", "fails its checksum"},
                      StreamFaultCase{"cut:stop:1", "closed the connection"},
                      // Compressed frames: 16 bytes of head and 256 x 8 of index, then the zstd
                      // frame (a few KiB for this guest's mostly-zero pages): checked before zstd
                      // reads it, and a frame cut short inside it.
                      StreamFaultCase{"flip:bulk:2100", "fails its checksum", "--compress zstd"},
                      StreamFaultCase{"cut:bulk:2100", "closed the connection", "--compress zstd"}),
    [](const auto& info) {
        std::string n = std::string(info.param.spec) + (*info.param.extra ? "_zstd" : "");
        for (auto& c : n)
            if (c == ':')
                c = '_';
        return n;
    });

// After a failed attempt, the same source migrates.
TEST(Migrate, SecondAttemptAfterAFailureSucceeds)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 32 * kMiB);
    cfg.workload.rate_pages_per_s = 100000;
    StressVm src(kvm, cfg);
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    MigrateOptions o;
    o.post_run_s = 0.3;
    o.max_downtime_ms = 5;
    SenderHooks lose_destination_in_stop;
    lose_destination_in_stop.at_fault_point = [](const char* phase) {
        if (std::string(phase) == "stop")
            throw std::runtime_error("destination lost during stop (test hook)");
    };
    MigrateReport bad = migrate(src, *tracker, o, nullptr, lose_destination_in_stop);
    ASSERT_EQ(bad.status, "failed");
    EXPECT_FALSE(tracker->enabled()) << "dirty logging is turned off after a failure";
    for (const auto& r : src.memslots().regions())
        EXPECT_FALSE(r.flags & KVM_MEM_LOG_DIRTY_PAGES);
    const uint64_t before = src.snapshot(0).pages_written;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_GT(src.snapshot(0).pages_written, before) << "the source runs again";
    MigrateReport good = migrate(src, *tracker, o, nullptr);
    EXPECT_EQ(good.status, "completed") << good.error;
    EXPECT_EQ(good.switchover_mismatches, 0u);
    EXPECT_EQ(good.mismatches, 0u);
    EXPECT_GT(good.pages_checked, 0u);
    src.kill();
}

// The sender driven one phase at a time from outside, as a control socket
// would: its phase and rounds readable between steps, the downtime limit
// changed mid-flight, steps out of order refused.
TEST(Migrate, SenderCanBeDrivenPhaseByPhase)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 32 * kMiB);
    cfg.workload.rate_pages_per_s = 100000;
    StressVm src(kvm, cfg);
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    MigrateOptions o;
    o.post_run_s = 0;  // the destination is given the time it needs to show progress (issue 14: failed 3 in 10)
    o.max_downtime_ms = 0;  // converges only when a controller allows more
    o.max_iterations = 1000;
    Sender s(src, *tracker, o);
    EXPECT_EQ(s.phase(), Phase::Idle);
    EXPECT_THROW(s.bulk(), std::logic_error);
    s.setup();
    EXPECT_EQ(s.phase(), Phase::Setup);
    EXPECT_TRUE(tracker->enabled());
    s.bulk();
    EXPECT_EQ(s.phase(), Phase::Bulk);
    EXPECT_EQ(s.rounds(), 1u);
    const bool more = s.precopy_round();
    EXPECT_EQ(s.phase(), Phase::Precopy);
    EXPECT_EQ(s.rounds(), more ? 2u : 1u);
    s.set_max_downtime_ms(1e9);
    if (more) {
        EXPECT_FALSE(s.precopy_round()) << "any downtime is accepted now";
    }
    EXPECT_THROW(s.finish(), std::logic_error);
    s.stop_and_copy();
    EXPECT_EQ(s.phase(), Phase::Stop);
    s.switchover();
    EXPECT_FALSE(tracker->enabled());
    s.finish();
    EXPECT_EQ(s.phase(), Phase::Done);
    const MigrateReport& r = s.report();
    EXPECT_EQ(r.status, "completed") << r.error;
    EXPECT_TRUE(r.converged) << "pre-copy ended because the dirty set fitted the raised limit";
    EXPECT_TRUE(r.forced_by.empty()) << r.forced_by;
    EXPECT_EQ(r.rounds.size(), s.rounds());
    EXPECT_EQ(r.switchover_mismatches, 0u);
    EXPECT_EQ(r.mismatches, 0u) << r.stamp_summary;
    src.kill();
}

TEST(Migrate, SenderCancelledFromOutsideGivesTheSourceBack)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 32 * kMiB);
    StressVm src(kvm, cfg);
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    MigrateOptions o;
    o.post_run_s = 0.3;
    Sender s(src, *tracker, o);
    s.setup();
    s.bulk();
    s.cancel();
    try {
        s.precopy_round();
        ADD_FAILURE() << "a cancelled sender went on";
    } catch (const std::exception& e) {
        s.fail(e.what());
    }
    EXPECT_EQ(s.report().status, "cancelled");
    EXPECT_EQ(s.report().phase, "precopy");
    EXPECT_FALSE(tracker->enabled());
    const uint64_t before = src.snapshot(1).pages_written;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_GT(src.snapshot(1).pages_written, before) << "the source runs on";
    src.request_stop();
    src.wait_finished(std::chrono::seconds(10));
    EXPECT_TRUE(verify_stamps(src).ok());
}

TEST(Migrate, CtrlCCancelsAndTheSourceSurvives)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(2, 32 * kMiB);
    StressVm src(kvm, cfg);
    auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
    src.start();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    MigrateOptions o;
    o.max_downtime_ms = 0.001;  // never converges on its own
    o.max_iterations = 100000;
    o.bandwidth = 64 * kMiB;    // slow enough to be interrupted mid-way
    std::atomic<int> cancel{0};
    std::thread t([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(700));
        cancel = SIGINT;
    });
    MigrateReport r = migrate(src, *tracker, o, &cancel);
    t.join();
    EXPECT_EQ(r.status, "cancelled") << r.error;
    // The true counts: the cut-short round is not "stop", what went is counted.
    ASSERT_FALSE(r.rounds.empty());
    EXPECT_NE(r.rounds.back().kind, "stop");
    uint64_t bytes = 0;
    for (const auto& rr : r.rounds)
        bytes += rr.bytes;
    EXPECT_EQ(r.transferred_bytes, bytes);
    EXPECT_GT(r.transferred_bytes, 0u);
    EXPECT_GT(r.throughput, 0.0);
    EXPECT_GT(r.remaining_bytes, 0u) << "it never converged: pages were left";
    EXPECT_EQ(r.to_table().find("\n  stop "), std::string::npos) << r.to_table();
    const uint64_t before = src.snapshot(1).pages_written;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_GT(src.snapshot(1).pages_written, before);
    src.request_stop();
    src.wait_finished(std::chrono::seconds(10));
    EXPECT_TRUE(verify_stamps(src).ok());
}

TEST(Migrate, ThrottlesAreReportedPerRound)
{
    REQUIRE_KVM();
    for (const char* t : {"auto-converge", "dirty-limit:20000"}) {
        auto r = run_minivmm(fmt::format("migrate --to inproc --vcpus 2 --mem 64M --warmup 0.3 --post-run 0.3 "
                                         "--max-downtime 1 --bandwidth 200M --max-iterations 6 --throttle {} --json -",
                                         t));
        ASSERT_EQ(r.exit_code, 0) << t << ": " << r.err;
        auto j = parse(r.out);
        expect_verified(j, 64 * kMiB / 4096);
        bool throttled = false;
        for (const auto& round : j["rounds"])
            throttled |= round["throttle_pct"].get<uint32_t>() > 0 || round["dirty_limit_pages_per_s"].get<uint64_t>() > 0;
        EXPECT_TRUE(throttled) << t << ": " << j["rounds"].dump();
    }
}

// Streams that must be refused before (or while) memory is accepted.
TEST(MigrationStream, BadStreamsAreRefusedWithAClearError)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(1, 8 * kMiB);
    StressVm src(kvm, cfg);
    // A valid start: HEADER + one PAGES record.
    MemoryTransport sink({});
    RecordWriter w(sink);
    w.write(RecordType::Header, StreamHeader::of(src, 1).encode());
    std::vector<uint64_t> gpas = {MVM_RAM_GPA, MVM_RAM_GPA + 4096};
    w.write(RecordType::Pages, encode_pages(src, gpas).payload);
    const std::vector<uint8_t> good = sink.written();

    auto feed = [&](std::vector<uint8_t> bytes, const MachineConfig& c) {
        StressVm dst(kvm, c);
        std::vector<std::unique_ptr<Transport>> ch;
        ch.push_back(std::make_unique<MemoryTransport>(bytes));
        return receive_from(dst, std::move(ch), 0);
    };
    // Truncated anywhere: a clear error, never a crash.
    for (size_t cut : {size_t{3}, size_t{20}, good.size() / 2, good.size() - 1}) {
        auto r = feed(std::vector<uint8_t>(good.begin(), good.begin() + static_cast<long>(cut)), cfg);
        EXPECT_EQ(r.status, "failed");
        EXPECT_FALSE(r.error.empty()) << "cut at " << cut;
    }
    // A flipped bit: the checksum names the record.
    auto flipped = good;
    flipped[good.size() - 100] ^= 0x10;
    auto r = feed(flipped, cfg);
    EXPECT_NE(r.error.find("fails its checksum"), std::string::npos) << r.error;
    // A different layout: refused at the header, before any memory.
    MachineConfig other = single_node_config(1, 16 * kMiB);
    r = feed(good, other);
    EXPECT_NE(r.error.find("incompatible stream"), std::string::npos) << r.error;
    EXPECT_NE(r.error.find("same --mem/--numa"), std::string::npos) << r.error;
    // Not a minivmm stream at all.
    std::vector<uint8_t> junk(64, 0x41);
    r = feed(junk, cfg);
    EXPECT_EQ(r.status, "failed");
    EXPECT_FALSE(r.error.empty());
}

TEST(MigrationStream, RecordsRoundTrip)
{
    REQUIRE_KVM();
    StressVm m(kvm, single_node_config(2, 8 * kMiB));
    StreamHeader h = StreamHeader::of(m, 2);
    StreamHeader back = StreamHeader::decode(h.encode());
    EXPECT_EQ(back.slots, h.slots);
    EXPECT_EQ(back.nr_vcpus, 2u);
    EXPECT_EQ(h.incompatibility(back), "");
    VcpuState s = save_vcpu(kvm, m.vcpu(1));
    VcpuState s2 = VcpuState::parse(s.serialize());
    EXPECT_EQ(s2.id, 1u);
    EXPECT_EQ(s2.regs.rip, s.regs.rip);
    EXPECT_EQ(s2.msrs, s.msrs);
    EXPECT_GT(s.msrs.size(), 5u);
    EXPECT_EQ(s.msrs.back().first, 0x10u) << "TSC restored last";
    EXPECT_EQ(s2.tsc_khz, s.tsc_khz);
    EXPECT_EQ(s2.tsc_realtime_ns, s.tsc_realtime_ns);
    ResultRecord rr;
    rr.ok = 1;
    rr.text = "fine";
    rr.mismatched_gpas = {1, 2};
    rr.restore_ms = 1.5;
    rr.guest_gap_ms = 12.25;
    rr.refused_msrs = {0x4b564d06};
    rr.post_run_s = 0.75;
    rr.details = R"({"faults":3})";
    auto rr2 = ResultRecord::decode(rr.encode());
    EXPECT_EQ(rr2.post_run_s, 0.75);
    EXPECT_EQ(rr2.details, rr.details);
    EXPECT_EQ(rr2.text, "fine");
    EXPECT_EQ(rr2.mismatched_gpas.size(), 2u);
    EXPECT_EQ(rr2.restore_ms, 1.5);
    EXPECT_EQ(rr2.guest_gap_ms, 12.25);
    EXPECT_EQ(rr2.refused_msrs, rr.refused_msrs);
    // A RESULT without the tail (restore, guest gap, MSRs, post-run, details) still decodes.
    auto bare = rr.encode();
    bare.resize(bare.size() - 8 - 8 - 4 - 4 - 8 - 4 - rr.details.size());
    auto rr3 = ResultRecord::decode(bare);
    EXPECT_EQ(rr3.guest_gap_ms, -1);
    EXPECT_TRUE(rr3.refused_msrs.empty());
    EXPECT_EQ(rr3.post_run_s, -1);
}

// Two hosts: the destination in its own network namespace, reached over a
// veth pair that the test creates and removes; in plain TCP and with TLS
// (x509 credentials from scripts/make-tls-creds for the destination's
// address, the receiver admitting only the sender's certificate).
class MigrateVeth : public ::testing::TestWithParam<std::string> {};

TEST_P(MigrateVeth, ToAnotherNetworkNamespace)
{
    REQUIRE_KVM();
    std::string tls;
    std::string creds_dir;
    if (GetParam() == "tls") {
        char tmpl[] = "/tmp/minivmm-veth-tls-XXXXXX";
        ASSERT_NE(::mkdtemp(tmpl), nullptr);
        creds_dir = tmpl;
        ASSERT_EQ(std::system((std::string(MINIVMM_SOURCE_DIR) + "/scripts/make-tls-creds " + creds_dir +
                               "/c --server-name dst.test --server-ip 10.231.0.2 --client-cn src.test >/dev/null 2>&1")
                                  .c_str()),
                  0)
            << "scripts/make-tls-creds";
        tls = " --tls-creds x509:" + creds_dir + "/c";
    }
    const std::string ns = fmt::format("mvm-dst-{}", ::getpid());
    const std::string a = fmt::format("mvma{}", ::getpid() % 100000), b = fmt::format("mvmb{}", ::getpid() % 100000);
    auto sh = [](const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()); };
    if (sh("ip netns add " + ns) != 0)
        GTEST_SKIP() << "cannot create a network namespace here (needs CAP_SYS_ADMIN and iproute2): 'ip netns add' failed";
    struct Cleanup {
        std::function<void()> f;
        ~Cleanup() { f(); }
    } cleanup{[&] {
        sh("ip link del " + a);
        sh("ip netns del " + ns);
        if (!creds_dir.empty())
            sh("rm -rf " + creds_dir);
    }};
    ASSERT_EQ(sh(fmt::format("ip link add {} type veth peer name {}", a, b)), 0) << "veth pair";
    ASSERT_EQ(sh(fmt::format("ip link set {} netns {}", b, ns)), 0);
    ASSERT_EQ(sh(fmt::format("ip addr add 10.231.0.1/24 dev {} && ip link set {} up", a, a)), 0);
    ASSERT_EQ(sh(fmt::format("ip netns exec {} sh -c 'ip addr add 10.231.0.2/24 dev {} && ip link set {} up && "
                             "ip link set lo up'",
                             ns, b, b)),
              0);
    const uint16_t port = free_port();
    char path[] = "/tmp/minivmm-ns-XXXXXX";
    int fd = mkstemp(path);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        const std::string cmd =
            fmt::format("exec ip netns exec {} {} receive --vcpus 2 --mem 64M --rate 100000 --post-run 0.5 --listen "
                        "tcp:10.231.0.2:{} --json -{}",
                        ns, MINIVMM_BINARY, port, tls.empty() ? "" : tls + " --tls-authz 'CN=src.test,O=*'");
        execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
        _exit(127);
    }
    close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    auto r = run_minivmm(fmt::format("migrate --to tcp:10.231.0.2:{} {} --max-downtime 20 --json -{}", port, kGuest, tls));
    int st = 0;
    waitpid(pid, &st, 0);
    std::string recv_out;
    if (FILE* f = fopen(path, "r")) {
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
            recv_out.append(buf, n);
        fclose(f);
    }
    unlink(path);
    ASSERT_EQ(r.exit_code, 0) << r.err << recv_out;
    expect_verified(parse(r.out), 64 * kMiB / 4096);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << recv_out;
    const auto at = recv_out.find("{\n");
    ASSERT_NE(at, std::string::npos) << recv_out;
    const auto rj = nlohmann::json::parse(recv_out.substr(at, recv_out.rfind('}') - at + 1), nullptr, false);
    ASSERT_FALSE(rj.is_discarded()) << recv_out;
    EXPECT_EQ(rj["status"], "completed");
    EXPECT_EQ(rj["sender"]["peer"].get<std::string>().rfind("10.231.0.1:", 0), 0u) << rj["sender"];
    EXPECT_EQ(rj["sender"]["security"], GetParam() == "tls" ? "tls-x509" : "none");
    if (GetParam() == "tls")
        EXPECT_EQ(rj["sender"]["identity"], "CN=src.test,O=minivmm test");
}

INSTANTIATE_TEST_SUITE_P(PlainAndTls, MigrateVeth, ::testing::Values("plain", "tls"),
                         [](const auto& i) { return i.param; });

// migrate --to inproc makes a second VM of the same size in this process: a
// guest that fits the host once but not twice is refused up front (one line,
// exit 2, nothing allocated) instead of growing until the OOM killer comes.
TEST(Migrate, InprocRefusesAGuestThatFitsOnceButNotTwice)
{
    REQUIRE_KVM();
    uint64_t avail_kib = 0;
    {
        std::istringstream in(mvm::test::read_file("/proc/meminfo"));
        std::string key;
        uint64_t v = 0;
        std::string unit;
        while (in >> key >> v >> unit)
            if (key == "MemAvailable:")
                avail_kib = v;
    }
    if (avail_kib < (1u << 20))
        GTEST_SKIP() << "MemAvailable below 1 GiB: no guest size fits once with room to spare";
    const uint64_t mib = avail_kib * 7 / 10 / 1024;  // 70%: fits once, not twice
    auto r = run_minivmm(fmt::format("migrate --to inproc --vcpus 1 --mem {}M", mib));
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_NE(r.err.find("--to inproc: the source and its in-process destination need 2 x"), std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.out, "");
}
