// A signal pending in the thread inside KVM_RESET_DIRTY_RINGS loses dirty-ring
// entries silently on this host (docs/host-notes.md). minivmm blocks every
// signal around each reset; these tests storm the harvesting thread (and the
// vCPU threads, where ring-full resets run) with signals and check that a full
// pass written after the storm is wholly in the log, with each tracker. The
// unguarded reset is run too, and what it loses is reported as a finding
// about the host, not a failure of ours.
#include <gtest/gtest.h>

#include <cstdio>

#include "engines/ring_probe.hpp"
#include "kvm_test_util.hpp"

using namespace mvm;
using namespace mvm::engines;

namespace {

RingProbeOptions storm(dirty::Mode mode, bool guarded, bool kick_vcpus)
{
    RingProbeOptions o;
    o.mode = mode;
    o.guarded = guarded;
    o.kick_vcpus = kick_vcpus;
    o.storm_s = 1.0;
    return o;
}

// The probe, with the storm doubled (1, 2, 4, 8 s) until it covered more
// than 100 harvests and 100 handled signals: on a loaded host (CI boots two
// emulated hosts at once) a 1 s storm saw 13 harvests. Coverage is what is
// waited for; what the probe finds is not retried.
RingProbeResult covered_probe(const Kvm& kvm, RingProbeOptions o)
{
    RingProbeResult r;
    for (int attempt = 0; attempt < 4; attempt++, o.storm_s *= 2) {
        r = probe_reset_under_signals(kvm, o);
        if (!r.skipped.empty() || (r.harvests > 100 && r.signals_handled > 100))
            break;
        std::printf("storm of %.0f s covered %llu harvests, %llu signals handled: a longer one\n", o.storm_s,
                    static_cast<unsigned long long>(r.harvests), static_cast<unsigned long long>(r.signals_handled));
    }
    return r;
}

}  // namespace

struct GuardCase {
    dirty::Mode mode;
    bool kick_vcpus;
};

class ResetUnderSignals : public ::testing::TestWithParam<GuardCase> {};

TEST_P(ResetUnderSignals, NothingIsLostWithTheGuard)
{
    REQUIRE_KVM();
    RingProbeResult r = covered_probe(kvm, storm(GetParam().mode, true, GetParam().kick_vcpus));
    if (!r.skipped.empty())
        GTEST_SKIP() << r.skipped;
    std::printf("%s\n", r.summary().c_str());
    EXPECT_GT(r.harvests, 100u) << "the storm must cover many harvests";
    EXPECT_GT(r.signals_handled, 100u) << "signals must reach the harvesting thread";
    EXPECT_EQ(r.pages_checked, 2 * (16ull << 20) / 4096);
    EXPECT_EQ(r.unlogged, 0u) << r.summary();
}

INSTANTIATE_TEST_SUITE_P(Trackers, ResetUnderSignals,
                         ::testing::Values(GuardCase{dirty::Mode::Ring, false}, GuardCase{dirty::Mode::Ring, true},
                                           GuardCase{dirty::Mode::Bitmap, false}, GuardCase{dirty::Mode::Bitmap, true}),
                         [](const auto& info) {
                             return std::string(dirty::mode_name(info.param.mode)) +
                                    (info.param.kick_vcpus ? "_harvester_and_vcpus" : "_harvester");
                         });

// The bare KVM_RESET_DIRTY_RINGS under the same storm: on an affected host
// pages go unlogged. Reported, not asserted: it is the host's behaviour.
TEST(ResetUnderSignals, UnguardedResetIsAHostFinding)
{
    REQUIRE_KVM();
    RingProbeResult r = covered_probe(kvm, storm(dirty::Mode::Ring, false, false));
    if (!r.skipped.empty())
        GTEST_SKIP() << r.skipped;
    std::printf("host finding: %s%s\n", r.summary().c_str(),
                r.loses() ? " -> this host loses ring entries to signals pending at reset" : "");
    EXPECT_GT(r.harvests, 100u);
    EXPECT_GT(r.signals_handled, 100u);
    EXPECT_EQ(r.pages_checked, 2 * (16ull << 20) / 4096);
}

// `minivmm caps --probe-ring-reset S` runs both probes and reports them: the
// guarded one must lose nothing; the unguarded one is the host's answer.
TEST(ResetUnderSignals, CapsReportsTheProbe)
{
    REQUIRE_KVM();
    if (!dirty::min_dirty_ring_bytes(kvm))
        GTEST_SKIP() << "needs KVM_CAP_DIRTY_LOG_RING";
    auto r = mvm::test::run_minivmm("caps --json --probe-ring-reset 0.5");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    ASSERT_TRUE(j.contains("ring_reset_probe")) << r.out;
    const auto& g = j["ring_reset_probe"]["guarded"];
    const auto& u = j["ring_reset_probe"]["unguarded"];
    EXPECT_EQ(g["pages_checked"].get<uint64_t>(), 8192u);
    EXPECT_EQ(g["unlogged"].get<uint64_t>(), 0u);
    EXPECT_EQ(g["short_resets"].get<uint64_t>(), 0u) << "a blocked signal cannot cut a reset short";
    EXPECT_EQ(u["pages_checked"].get<uint64_t>(), 8192u);
    EXPECT_GT(u["signals_handled"].get<uint64_t>(), 0u);
    std::printf("caps probe, unguarded: %llu pages unlogged, %llu short resets\n",
                static_cast<unsigned long long>(u["unlogged"].get<uint64_t>()),
                static_cast<unsigned long long>(u["short_resets"].get<uint64_t>()));
}
