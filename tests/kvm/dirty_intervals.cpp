// tests/kvm/dirty_intervals.cpp - see dirty_intervals.hpp.
#include "dirty_intervals.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <thread>

#include "vmm/stress/stress_vm.hpp"

namespace mvm::test {

using namespace mvm::dirty;

namespace {

// A vCPU's global visit count: (generation - 1) * visits per pass + cursor,
// read consistently. `upper` picks the reading of an ambiguous cursor (the
// previous pass's full cursor just after the generation moved) that counts
// more visits; otherwise the one that counts fewer.
uint64_t visit_count(const StressVm& m, uint32_t v, bool upper)
{
    const mvm_mailbox* mb = m.mailbox(v);
    const auto& vp = m.vcpu_params(v);
    const uint64_t visits = mvm_visits_per_pass(m.boot_params()->pattern, vp.total_pages);
    for (;;) {
        uint64_t g1 = mb->generation;
        uint64_t c = mb->cursor;
        uint64_t p = mb->passes;
        uint64_t g2 = mb->generation;
        if (g1 != g2)
            continue;
        if (g1 == 0)
            return 0;
        if (c == visits && p < g1 && !upper)
            c = 0;  // the cursor not yet reset for pass g1
        return (g1 - 1) * visits + c;
    }
}

// GPA written by visit number `n` of vCPU v, or 0 when that visit reads or is skipped.
uint64_t written_gpa(const StressVm& m, uint32_t v, uint64_t n)
{
    const mvm_boot_params* bp = m.boot_params();
    const auto& vp = m.vcpu_params(v);
    const uint64_t visits = mvm_visits_per_pass(bp->pattern, vp.total_pages);
    const uint64_t gen = n / visits + 1, i = n % visits;
    uint64_t idx = i;
    if (bp->pattern == MVM_PATTERN_RANDOM) {
        mvm_perm perm = mvm_perm_for(bp->seed, v, gen, vp.total_pages);
        idx = mvm_perm_apply(&perm, i);
        if (idx >= vp.total_pages)
            return 0;
    }
    if (!mvm_writes(bp->write_pct, bp->seed, v, gen, idx))
        return 0;
    for (uint32_t k = 0; k < vp.nr_segments; k++) {
        if (idx < vp.seg[k].pages)
            return vp.seg[k].gpa + idx * 4096;
        idx -= vp.seg[k].pages;
    }
    return 0;
}

}  // namespace

CheckResult check_intervals(const Kvm& kvm, const TrackerOptions& to, uint32_t ring_bytes, uint32_t pattern,
                            uint32_t write_pct, int harvests)
{
    IntervalCheck c;
    c.ring_bytes = ring_bytes;
    c.pattern = pattern;
    c.write_pct = write_pct;
    c.harvests = harvests;
    return check_intervals(kvm, to, c);
}

CheckResult check_intervals(const Kvm& kvm, const TrackerOptions& to, const IntervalCheck& c)
{
    MachineConfig cfg = single_node_config(2, c.mem_bytes, c.backing);
    cfg.workload.pattern = c.pattern;
    cfg.workload.write_pct = c.write_pct;
    cfg.workload.rate_pages_per_s = c.rate_pages_per_s;
    cfg.dirty_ring_bytes = c.ring_bytes;
    StressVm m(kvm, cfg);
    auto tracker = Tracker::create(m, to);
    if (c.warmup_ms) {
        // The guest maps its memory first (huge mappings where the backing
        // has them), so enabling write-protects, and may split, live mappings.
        m.start();
        std::this_thread::sleep_for(std::chrono::milliseconds(c.warmup_ms));
        tracker->enable();
    } else {
        tracker->enable();
        m.start();
    }
    std::mt19937 rng(7);
    std::vector<uint64_t> post(m.vcpu_count());
    for (uint32_t v = 0; v < m.vcpu_count(); v++)
        post[v] = visit_count(m, v, true);
    CheckResult r;
    std::vector<uint64_t> missed_prev;
    for (int k = 0; k < c.harvests; k++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(c.min_interval_ms + rng() % c.interval_spread_ms));
        std::vector<uint64_t> snap(m.vcpu_count());
        for (uint32_t v = 0; v < m.vcpu_count(); v++)
            snap[v] = visit_count(m, v, false);
        Harvest h = tracker->harvest();
        for (uint64_t g : missed_prev)
            (h.contains_gpa(g) ? r.late : r.never)++;
        missed_prev.clear();
        r.harvests++;
        r.entries += h.entries;
        r.reset += h.reset;
        r.ring_full += h.ring_full_harvests;
        r.max_dirty = std::max(r.max_dirty, h.dirty_pages);
        if (to.mode == Mode::Ring && h.entries != h.reset)
            r.entries_equal_reset_each_time = false;
        // Visits that began after the previous harvest ended and finished
        // before this one began: their writes must be in this harvest.
        for (uint32_t v = 0; v < m.vcpu_count(); v++) {
            for (uint64_t n = post[v] + 1; n < snap[v]; n++) {
                uint64_t gpa = written_gpa(m, v, n);
                if (!gpa)
                    continue;
                r.required++;
                if (!h.contains_gpa(gpa)) {
                    missed_prev.push_back(gpa);
                    if (!r.misses)
                        r.first_miss_gpa = gpa;
                    r.misses++;
                }
            }
            post[v] = visit_count(m, v, true);
        }
        if (m.failure())
            break;
    }
    EXPECT_FALSE(m.failure()) << m.failure()->reason;
    m.request_stop();
    m.wait_finished(std::chrono::seconds(10));
    return r;
}

}  // namespace mvm::test
