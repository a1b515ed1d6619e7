// The pure part of `minivmm lockup`: contiguous phases, stall attribution,
// per-stall percentiles, per-phase distributions against the steady
// baseline, the harvest schedule and the verdict.
#include <gtest/gtest.h>

#include "engines/lockup_analysis.hpp"

using namespace mvm;
using namespace mvm::engines;

namespace {

// steady 0-500, enable 500-501, first-harvest 501-505, copy 505-510,
// logging 510-2500, disable 2500-2502, after-logging 2502-2552.
std::vector<PhaseSpan> sample_timeline()
{
    PhaseTimeline t;
    t.enter("steady", 0);
    t.enter("enable-logging", 500);
    t.enter("first-harvest", 501);
    t.enter("copy", 505);
    t.enter("logging", 510);
    t.enter("disable-logging", 2500);
    t.enter("after-logging", 2502);
    t.close(2552);
    return t.spans();
}

Stall stall(uint32_t vcpu, double start, double len, const std::vector<PhaseSpan>& ph)
{
    Stall s{vcpu, start, len, {}};
    s.phase = phase_of(s, ph);
    return s;
}

}  // namespace

TEST(LockupPhases, TimelineIsContiguousAndGapsAreFound)
{
    auto ph = sample_timeline();
    EXPECT_TRUE(timeline_gaps(ph).empty());
    EXPECT_EQ(ph.front().start_ms, 0);
    EXPECT_EQ(ph.back().end_ms, 2552);
    ph[4].start_ms = 512;  // a hole between copy and logging
    EXPECT_EQ(timeline_gaps(ph).size(), 1u);
}

TEST(LockupPhases, AStallAfterSteadyIsNotSteady)
{
    const auto ph = sample_timeline();
    // The old attribution called anything outside a recorded span "steady".
    EXPECT_EQ(stall(0, 1200, 300, ph).phase, "logging");
    EXPECT_EQ(stall(0, 100, 50, ph).phase, "steady");
    EXPECT_EQ(stall(0, 480, 40, ph).phase, "steady") << "overlaps steady most (20 ms) of its 40 ms";
    EXPECT_EQ(stall(0, 2501, 30, ph).phase, "after-logging");
    EXPECT_EQ(stall(0, 2600, 30, ph).phase, "after-logging") << "outside the timeline: the nearest phase";
    // A ring-full span of the stall's own vCPU wins; another vCPU's does not.
    auto with_ring = ph;
    with_ring.push_back({"ring-full", 1000, 1010, 3});
    EXPECT_EQ(stall(3, 995, 40, with_ring).phase, "ring-full");
    EXPECT_EQ(stall(2, 995, 40, with_ring).phase, "logging");
}

TEST(LockupPhases, PercentileIsPerValueNearestRank)
{
    EXPECT_EQ(percentile({}, 99), 0);
    std::vector<double> v;
    for (int i = 1; i <= 200; i++)
        v.push_back(i);
    EXPECT_EQ(percentile(v, 50), 100);
    EXPECT_EQ(percentile(v, 99), 198) << "p99 of 200 values is not their max";
    EXPECT_EQ(percentile(v, 100), 200);
    EXPECT_EQ(percentile({5}, 99), 5);
}

TEST(LockupPhases, PerPhaseDistributionAndExcessOverSteady)
{
    const auto ph = sample_timeline();
    std::vector<Stall> st;
    for (uint32_t v = 0; v < 4; v++)
        st.push_back(stall(v, 100 + v, 30 + v, ph));  // scheduler stalls in steady: 30-33 ms
    for (uint32_t v = 0; v < 4; v++)
        st.push_back(stall(v, 1000, 200 + v * 10, ph));  // logging: 200-230 ms
    st.push_back(stall(1, 2000, 35, ph));
    const auto ps = phase_stalls(st, ph, 4, 20);
    ASSERT_EQ(ps.size(), 7u) << "every phase is listed, with stalls or not";
    const PhaseStalls* steady = nullptr;
    const PhaseStalls* logging = nullptr;
    for (const auto& p : ps) {
        if (p.phase == "steady")
            steady = &p;
        if (p.phase == "logging")
            logging = &p;
    }
    ASSERT_TRUE(steady && logging);
    EXPECT_EQ(steady->count, 4u);
    EXPECT_DOUBLE_EQ(steady->max_ms, 33);
    EXPECT_DOUBLE_EQ(steady->duration_ms, 500);
    EXPECT_DOUBLE_EQ(steady->per_vcpu_s, 4 / (0.5 * 4));
    EXPECT_FALSE(steady->beyond_baseline);
    EXPECT_EQ(logging->count, 5u);
    EXPECT_EQ(logging->vcpus, 4u);
    EXPECT_DOUBLE_EQ(logging->max_ms, 230);
    EXPECT_DOUBLE_EQ(logging->p50_ms, 210);
    EXPECT_DOUBLE_EQ(logging->excess_max_ms, 230 - 33);
    EXPECT_TRUE(logging->beyond_baseline);
}

TEST(LockupPhases, StallsNoWorseThanSteadyAreNotBlamedOnLogging)
{
    const auto ph = sample_timeline();
    std::vector<Stall> st = {stall(0, 100, 60, ph), stall(1, 1500, 70, ph), stall(2, 1800, 45, ph)};
    VerdictInput in;
    in.phases = phase_stalls(st, ph, 4, 20);
    in.harvests = {100, 20, 20, 1.0};
    in.vcpus = 4;
    in.rate_before = 60.3e6;
    in.rate_during = 0.3e6;
    const std::string v = lockup_verdict(in);
    EXPECT_EQ(v.find("no stall beyond the steady baseline"), 0u) << v;
    EXPECT_NE(v.find("slowdown"), std::string::npos) << "the write-rate drop is named as what it is: " << v;
    EXPECT_NE(v.find("60.30 -> 0.30"), std::string::npos) << v;
}

TEST(LockupPhases, StarvedHarvesterRefusesAVerdict)
{
    HarvestSchedule h{100, 20, 17, 250};
    EXPECT_TRUE(h.starved());
    h.done = 18;
    EXPECT_FALSE(h.starved());
    EXPECT_FALSE((HarvestSchedule{100, 5, 4, 150}).starved()) << "one late slot is not starvation";
    EXPECT_TRUE((HarvestSchedule{100, 5, 3, 250}).starved());
    EXPECT_TRUE((HarvestSchedule{100, 1, 0, 0}).starved());
    EXPECT_TRUE((HarvestSchedule{100, 20, 0, 0}).starved()) << "harvests: 0 is never a dirty-logging run";
    VerdictInput in;
    in.harvests = {100, 20, 0, 0};
    in.vcpus = 32;
    const auto ph = sample_timeline();
    in.phases = phase_stalls({stall(0, 1000, 500, ph)}, ph, 32, 20);
    EXPECT_EQ(lockup_verdict(in).find("inconclusive: harvester starved (ran 0 of 20"), 0u) << lockup_verdict(in);
    EXPECT_EQ(harvest_slots(2000, 100), 20u);
    EXPECT_EQ(harvest_slots(2050, 100), 21u);
    EXPECT_EQ(harvest_slots(50, 100), 1u);
}

TEST(LockupPhases, VerdictNamesThePhaseBeyondTheBaseline)
{
    const auto ph = sample_timeline();
    std::vector<Stall> st = {stall(0, 100, 40, ph), stall(1, 501, 300, ph), stall(2, 502, 310, ph)};
    VerdictInput in;
    in.phases = phase_stalls(st, ph, 4, 20);
    in.harvests = {100, 20, 20, 1.0};
    in.vcpus = 4;
    in.longest_ms = 310;
    in.longest_vcpu = 2;
    const std::string v = lockup_verdict(in);
    EXPECT_EQ(v.find("stalls beyond the steady baseline during logging: 2 of 4 vCPUs"), 0u) << v;
    EXPECT_NE(v.find("+270 ms"), std::string::npos) << v;
}
