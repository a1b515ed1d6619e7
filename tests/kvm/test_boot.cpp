// Boots the stress guest on the real /dev/kvm and checks what it did.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include <fmt/format.h>

#include "kvm_test_util.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "engines/run_report.hpp"
#include "engines/run.hpp"
#include "vmm/stress/workload.hpp"

using namespace mvm;
using namespace std::chrono_literals;

namespace {

MachineConfig small_config(uint32_t vcpus, uint64_t mem = 32ull << 20)
{
    MachineConfig c = single_node_config(vcpus, mem);
    return c;
}

void wait_for_passes(const StressVm& m, uint64_t passes, std::chrono::milliseconds timeout = 10s)
{
    auto end = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        bool all = true;
        for (uint32_t i = 0; i < m.vcpu_count(); i++)
            all &= m.snapshot(i).passes >= passes;
        if (all || m.failure() || std::chrono::steady_clock::now() > end)
            return;
        std::this_thread::sleep_for(5ms);
    }
}

}  // namespace

class BootTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(BootTest, MailboxCountersGrowAndStampsVerify)
{
    REQUIRE_KVM();
    const uint32_t n = GetParam();
    StressVm m(kvm, small_config(n));
    m.start();
    wait_for_passes(m, 3);
    ASSERT_FALSE(m.failure()) << m.failure()->reason;
    std::vector<MailboxSnapshot> first;
    for (uint32_t i = 0; i < n; i++)
        first.push_back(m.snapshot(i));
    // Each vCPU makes progress (within 2 s: on a loaded 2-CPU host, or under
    // TSan, a vCPU thread can wait for a CPU for tens of ms).
    for (uint32_t i = 0; i < n; i++) {
        for (int t = 0; t < 200 && m.snapshot(i).pages_written == first[i].pages_written; t++)
            std::this_thread::sleep_for(10ms);
        auto s = m.snapshot(i);
        EXPECT_GT(s.pages_written, first[i].pages_written) << "vCPU " << i << " made no progress";
        EXPECT_EQ(s.state, static_cast<uint32_t>(MVM_STATE_RUNNING));
    }
    m.pause();
    StampCheck c = verify_stamps(m);
    EXPECT_EQ(c.pages_checked, (32ull << 20) / 4096);
    EXPECT_TRUE(c.ok()) << c.summary();
    m.resume();
    m.request_stop();
    ASSERT_TRUE(m.wait_finished(5s));
    EXPECT_EQ(m.finished_count(), n);
    EXPECT_FALSE(m.failure());
    for (uint32_t i = 0; i < n; i++)
        EXPECT_EQ(m.snapshot(i).state, static_cast<uint32_t>(MVM_STATE_DONE));
}

INSTANTIATE_TEST_SUITE_P(Vcpus, BootTest, ::testing::Values(1u, 2u));

// A page that was not written as the mailbox says must be caught.
TEST(StampCheck, DetectsACorruptedPage)
{
    REQUIRE_KVM();
    MachineConfig c = small_config(1, 8ull << 20);
    c.workload.max_passes = 2;
    StressVm m(kvm, c);
    m.start();
    ASSERT_TRUE(m.wait_finished(10s));
    ASSERT_FALSE(m.failure());
    ASSERT_TRUE(verify_stamps(m).ok());
    uint64_t gpa = m.vcpu_params(0).seg[0].gpa + 17 * 4096;
    auto* p = reinterpret_cast<uint64_t*>(m.host_ptr(gpa, 8));
    *p = MVM_STAMP(m.vm_tag(), 0, 1);  // an older generation: a "lost" write
    StampCheck check = verify_stamps(m);
    EXPECT_EQ(check.mismatches, 1u);
    EXPECT_EQ(check.foreign, 0u);
    ASSERT_FALSE(check.first.empty());
    EXPECT_EQ(check.first[0].gpa, gpa);
    EXPECT_EQ(check.first[0].expected, MVM_STAMP(m.vm_tag(), 0, 2));
}

// Every VM stamps its pages with its own tag, so a page written by another
// guest is named as such rather than taken for a lost write.
TEST(StampCheck, NamesAForeignVmsWrite)
{
    REQUIRE_KVM();
    MachineConfig c = small_config(1, 4ull << 20);
    c.workload.max_passes = 2;
    StressVm a(kvm, c), b(kvm, c);
    ASSERT_NE(a.vm_tag(), b.vm_tag());
    ASSERT_NE(a.vm_tag(), 0u);
    a.start();
    ASSERT_TRUE(a.wait_finished(10s));
    ASSERT_TRUE(verify_stamps(a).ok());
    uint64_t gpa = a.vcpu_params(0).seg[0].gpa + 5 * 4096;
    auto* p = reinterpret_cast<uint64_t*>(a.host_ptr(gpa, 8));
    *p = MVM_STAMP(b.vm_tag(), 0, 2);  // the right vCPU and pass, but B's
    StampCheck check = verify_stamps(a);
    EXPECT_EQ(check.mismatches, 1u);
    EXPECT_EQ(check.foreign, 1u);
    EXPECT_NE(check.summary().find("another VM"), std::string::npos) << check.summary();
}

// A working set of one batch makes every park land at a pass boundary (the
// guest parks between batches): the state the old mailbox order got wrong
// (cursor full before passes was stored, read as the previous pass's cursor:
// every page "one generation ahead"). Parks many times, each at a boundary.
TEST(StampCheck, ParkedAtThePassBoundary)
{
    REQUIRE_KVM();
    // Random with 48 pages: 64 visits a pass, 16 of them beyond the set
    // (cycle walking); the pass must still end, counted, at its last visit.
    struct Case {
        uint32_t pattern;
        uint64_t pages;
    };
    for (Case k : {Case{MVM_PATTERN_SEQ, 64}, Case{MVM_PATTERN_RANDOM, 64}, Case{MVM_PATTERN_RANDOM, 48}}) {
        const uint32_t pattern = k.pattern;
        MachineConfig c = small_config(2, 4ull << 20);
        c.workload.pattern = pattern;
        c.workload.working_set_pages = k.pages;  // at most the guest's batch: one batch per pass
        StressVm m(kvm, c);
        m.start();
        ASSERT_TRUE(m.wait_first_pass(10s));
        for (int round = 0; round < 40; round++) {
            ASSERT_TRUE(m.park_guests(5s)) << "round " << round;
            for (uint32_t v = 0; v < m.vcpu_count(); v++) {
                auto s = m.snapshot(v);
                // Parked after a batch that was a whole pass: complete, cursor full.
                ASSERT_EQ(s.cursor, mvm_visits_per_pass(pattern, k.pages)) << "vCPU " << v << " round " << round;
                ASSERT_EQ(s.passes, s.generation) << "vCPU " << v << " round " << round;
            }
            StampCheck check = verify_stamps(m);
            ASSERT_TRUE(check.ok()) << "pattern " << pattern << " round " << round << ": " << check.summary();
            EXPECT_EQ(check.pages_checked, 2 * k.pages);
            m.unpark_guests();
            std::this_thread::sleep_for(1ms);
        }
        m.kill();
        EXPECT_FALSE(m.failure());
    }
}

struct PatternCase {
    uint32_t pattern, touch, write_pct;
};

class PatternTest : public ::testing::TestWithParam<PatternCase> {};

TEST_P(PatternTest, StampsVerifyWhilePausedMidPass)
{
    REQUIRE_KVM();
    MachineConfig c = small_config(2, 16ull << 20);
    c.workload.pattern = GetParam().pattern;
    c.workload.fill = GetParam().touch;
    c.workload.write_pct = GetParam().write_pct;
    c.workload.seed = 42;
    StressVm m(kvm, c);
    m.start();
    wait_for_passes(m, 2);
    for (int round = 0; round < 5; round++) {
        m.pause();
        StampCheck check = verify_stamps(m);
        EXPECT_TRUE(check.ok()) << "round " << round << ": " << check.summary();
        m.resume();
        std::this_thread::sleep_for(3ms);
    }
    m.kill();
    EXPECT_FALSE(m.failure());
}

INSTANTIATE_TEST_SUITE_P(Patterns, PatternTest,
                         ::testing::Values(PatternCase{MVM_PATTERN_SEQ, MVM_TOUCH_QWORD, 100},
                                           PatternCase{MVM_PATTERN_RANDOM, MVM_TOUCH_QWORD, 100},
                                           PatternCase{MVM_PATTERN_RANDOM, MVM_TOUCH_PAGE, 100},
                                           PatternCase{MVM_PATTERN_SEQ, MVM_TOUCH_PAGE, 50},
                                           PatternCase{MVM_PATTERN_RANDOM, MVM_TOUCH_QWORD, 30}));

struct FaultCase {
    uint32_t fault;
    int vector;
};

class GuestFaultTest : public ::testing::TestWithParam<FaultCase> {};

TEST_P(GuestFaultTest, ExceptionIsReportedWithItsVector)
{
    REQUIRE_KVM();
    MachineConfig c = small_config(2, 8ull << 20);
    c.workload.fault = GetParam().fault;
    c.workload.fault_vcpu = 1;
    StressVm m(kvm, c);
    m.start();
    ASSERT_TRUE(m.wait_finished(10s)) << "the VM did not stop after the guest faulted";
    auto f = m.failure();
    ASSERT_TRUE(f.has_value());
    EXPECT_EQ(f->vcpu, 1u);
    EXPECT_EQ(f->vector, GetParam().vector) << f->reason;
    EXPECT_NE(f->reason.find(fmt::format("vector {}", GetParam().vector)), std::string::npos) << f->reason;
    EXPECT_FALSE(f->register_dump.empty());
    if (GetParam().fault == MVM_FAULT_PF) {
        EXPECT_EQ(f->cr2, MVM_FAULT_PF_ADDR);
    }
}

INSTANTIATE_TEST_SUITE_P(Faults, GuestFaultTest,
                         ::testing::Values(FaultCase{MVM_FAULT_UD, 6}, FaultCase{MVM_FAULT_PF, 14},
                                           FaultCase{MVM_FAULT_DE, 0}, FaultCase{MVM_FAULT_GP, 13}));

TEST(PauseResume, AllVcpusParkAndProgressStopsThenResumes)
{
    REQUIRE_KVM();
    StressVm m(kvm, small_config(2));
    m.start();
    wait_for_passes(m, 1);
    m.pause();
    std::vector<uint64_t> at_pause;
    for (uint32_t i = 0; i < 2; i++)
        at_pause.push_back(m.snapshot(i).pages_written + m.snapshot(i).pages_read);
    std::this_thread::sleep_for(100ms);
    for (uint32_t i = 0; i < 2; i++) {
        // pages_written is published per batch; a parked vCPU publishes nothing.
        EXPECT_EQ(m.snapshot(i).pages_written + m.snapshot(i).pages_read, at_pause[i]) << "vCPU " << i << " ran while paused";
        EXPECT_GE(m.kicks(i), 1u);
    }
    m.resume();
    std::this_thread::sleep_for(100ms);
    for (uint32_t i = 0; i < 2; i++)
        EXPECT_GT(m.snapshot(i).pages_written, at_pause[i]) << "vCPU " << i << " did not resume";
    // The pause shows up as a stall in the guest's own watchdog (default 20 ms).
    for (uint32_t i = 0; i < 2; i++)
        EXPECT_GE(m.snapshot(i).wd_events, 1u);
    m.request_stop();
    EXPECT_TRUE(m.wait_finished(5s));
    EXPECT_FALSE(m.failure());
}

TEST(Run, ReportHasStatsAndNativeExecution)
{
    REQUIRE_KVM();
    // Two passes per vCPU, however long a busy machine takes (not 0.5 s,
    // which a loaded host may spend on the first pass's faults alone).
    MachineConfig c = small_config(2, 64ull << 20);
    c.workload.max_passes = 2;
    StressVm m(kvm, c);
    engines::RunOptions opt;
    opt.duration_s = 0;
    engines::RunReport r = engines::run_workload(m, opt);
    ASSERT_FALSE(r.failure) << r.failure->reason;
    ASSERT_TRUE(r.stamps.has_value());
    EXPECT_TRUE(r.stamps->ok()) << r.stamps->summary();
    ASSERT_EQ(r.vcpus.size(), 2u);
    ASSERT_EQ(r.vcpu_stats.size(), 2u);
    for (uint32_t i = 0; i < 2; i++) {
        EXPECT_EQ(r.vcpus[i].pages_written, 2u * 64 / 2 * 256);  // 2 passes over its 32 MiB
        EXPECT_EQ(r.vcpus[i].passes, 2u);
        // The workload runs natively: a handful of emulated instructions for
        // the whole run (entry, doorbell), not one per page or per pass.
        auto it = r.vcpu_stats[i].find("insn_emulation");
        if (it == r.vcpu_stats[i].end())
            GTEST_SKIP() << "this KVM has no insn_emulation stat";
        EXPECT_LT(static_cast<double>(it->second), 0.001 * static_cast<double>(r.vcpus[i].pages_written));
        EXPECT_LT(it->second, 100);
    }
    auto j = engines::to_json(r);
    for (const char* k : {"vcpu", "pages_written", "passes", "max_stall_ms", "watchdog_events"})
        EXPECT_TRUE(j["vcpus"][0].contains(k)) << k;
    EXPECT_TRUE(j["kvm_stats"].contains("vm"));
    EXPECT_EQ(j["kvm_stats"]["vcpus"].size(), 2u);
    EXPECT_GT(j["duration_s"].get<double>(), 0.0);
}

// --rate caps each vCPU's pages/s (the guest paces itself against the TSC).
// Only the upper bound is checked: a shared machine may run slower, never faster.
TEST(Workload, RateCapLimitsPagesPerSecond)
{
    REQUIRE_KVM();
    MachineConfig c = small_config(2, 16ull << 20);
    c.workload.rate_pages_per_s = 100000;
    StressVm m(kvm, c);
    engines::RunOptions opt;
    opt.duration_s = 0.5;
    engines::RunReport r = engines::run_workload(m, opt);
    ASSERT_FALSE(r.failure) << r.failure->reason;
    for (const auto& v : r.vcpus) {
        EXPECT_GT(v.pages_written, 0u);
        EXPECT_LT(v.pages_per_s, 100000 * 1.25) << "vCPU " << v.id << " exceeded its rate cap";
    }
    EXPECT_TRUE(r.stamps->ok()) << r.stamps->summary();
}
