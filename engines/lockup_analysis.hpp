// engines/lockup_analysis.hpp - the pure part of `minivmm lockup`: the
// timeline's phases (contiguous: every moment belongs to exactly one), which
// phase a stall belongs to, per-phase stall distributions against the steady
// baseline, the harvest schedule, and the verdict. No KVM here: unit-tested.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "vmm/stress/sampler.hpp"

namespace mvm::engines {

struct PhaseSpan {
    std::string name;
    double start_ms = 0, end_ms = 0;
    int vcpu = -1;  // ring-full spans belong to one vCPU (an overlay on the global timeline)
};

// Builds the global timeline: each enter() closes the open phase at `t_ms`
// and opens `name` there, so phases are contiguous from the first enter()
// to close().
class PhaseTimeline {
public:
    void enter(const std::string& name, double t_ms);
    void close(double t_ms);
    const std::vector<PhaseSpan>& spans() const { return spans_; }

private:
    std::vector<PhaseSpan> spans_;
    bool open_ = false;
};

// Holes or overlaps between consecutive global spans (vcpu < 0), in order:
// empty when every moment from the first start to the last end belongs to
// exactly one phase.
std::vector<std::string> timeline_gaps(const std::vector<PhaseSpan>& phases);

// The phase a stall belongs to: a ring-full span of its own vCPU that it
// overlaps wins; otherwise the global phase it overlaps most; a stall that
// overlaps none (outside the timeline) gets the nearest phase in time.
// "" only when there are no global phases.
std::string phase_of(const Stall& s, const std::vector<PhaseSpan>& phases);

// Nearest-rank percentile (p in 0..100) of `v`; 0 for an empty `v`.
double percentile(std::vector<double> v, double p);

// One phase's stalls (all of its spans together) and their excess over the
// baseline phase ("steady").
struct PhaseStalls {
    std::string phase;
    double duration_ms = 0;     // the phase's spans summed (ring-full: per vCPU, summed)
    uint32_t count = 0;         // stalls attributed to the phase
    double per_vcpu_s = 0;      // count / (duration x vCPUs): comparable across phases of different length
    double p50_ms = 0, p99_ms = 0, max_ms = 0;  // over the phase's stalls (each stall once)
    uint32_t vcpus = 0;         // distinct vCPUs with a stall in the phase
    double excess_p99_ms = 0, excess_max_ms = 0;  // minus the baseline's (can be negative)
    bool beyond_baseline = false;  // max exceeds the baseline's max by more than the threshold
};

inline constexpr const char* kBaselinePhase = "steady";

// Per phase, in order of first appearance in `phases`; phases without stalls
// are listed too (count 0). Stalls must carry their phase.
std::vector<PhaseStalls> phase_stalls(const std::vector<Stall>& stalls, const std::vector<PhaseSpan>& phases,
                                      uint32_t vcpus, double threshold_ms);

// The harvest schedule: deadlines every period_ms from the start of the
// logging window; a harvest serves the deadline slot it starts in, slots it
// starts too late for are missed.
struct HarvestSchedule {
    double period_ms = 100;
    uint64_t expected = 0;  // deadline slots in the logging window
    uint64_t done = 0;      // slots a harvest served
    double late_max_ms = 0; // latest start after a served slot's deadline
    uint64_t missed() const { return expected > done ? expected - done : 0; }
    // Starved: no harvest ran, or more than one slot and more than 10% of
    // the slots were missed (one late slot, e.g. a first copy of all memory,
    // is not starvation).
    bool starved() const { return done == 0 || (missed() >= 2 && missed() * 10 > expected); }
};
// Slots in a window of `window_ms`: ceil(window / period), at least 1.
uint64_t harvest_slots(double window_ms, double period_ms);

struct VerdictInput {
    HarvestSchedule harvests;
    std::vector<PhaseStalls> phases;
    double threshold_ms = 20;
    uint32_t vcpus = 0;
    double rate_before = 0, rate_during = 0;  // guest pages/s: steady, logging
    double longest_ms = 0;
    int longest_vcpu = -1;
};

// The verdict: refused ("inconclusive: ...") when the harvester was starved;
// otherwise about the excess over the steady baseline, with the write-rate
// change during logging named as a slowdown.
std::string lockup_verdict(const VerdictInput& in);

}  // namespace mvm::engines
