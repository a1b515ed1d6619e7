// tests/kvm/dirty_intervals.hpp - the missed-page check shared by the dirty
// tracking tests (test_dirty.cpp) and the emulated-SVM-host tests: a guest
// runs while the tracker harvests at random intervals; every page the guest
// wrote in an interval (known from its mailbox and the keyed page order)
// must be in that interval's harvest.
#pragma once

#include <cstdint>

#include "guest/abi.h"
#include "memory/backing.hpp"
#include "vmm/dirty/tracker.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::test {

struct CheckResult {
    uint64_t harvests = 0, required = 0, misses = 0, first_miss_gpa = 0;
    uint64_t entries = 0, reset = 0, ring_full = 0, max_dirty = 0;
    uint64_t late = 0, never = 0;  // missed pages found in the next harvest / not
    bool entries_equal_reset_each_time = true;
};

// The guest (2 vCPUs) and the harvest intervals of one check.
struct IntervalCheck {
    uint64_t mem_bytes = 32ull << 20;
    BackingKind backing = BackingKind::Anon;
    uint32_t ring_bytes = 0;  // >0: the dirty ring's bytes per vCPU (Mode::Ring)
    uint32_t pattern = MVM_PATTERN_SEQ;
    uint32_t write_pct = 70;
    // Bounded so each interval's visits can be replayed quickly: 3M pages/s
    // per vCPU still dirties far more than a small ring holds per interval.
    uint64_t rate_pages_per_s = 3'000'000;
    int harvests = 25;
    uint32_t min_interval_ms = 2, interval_spread_ms = 15;  // each interval: min + [0, spread) ms
    uint32_t warmup_ms = 0;  // >0: the guest runs this long before logging is enabled (else enabled first)
};

CheckResult check_intervals(const Kvm& kvm, const dirty::TrackerOptions& to, const IntervalCheck& c);
CheckResult check_intervals(const Kvm& kvm, const dirty::TrackerOptions& to, uint32_t ring_bytes, uint32_t pattern,
                            uint32_t write_pct, int harvests);

}  // namespace mvm::test
