// migration/resume.hpp - the destination VM from the switchover on, the same
// for the in-process destination and `minivmm receive`: load the vCPU
// states, hand the VMM's controls back to this VMM, start the guest; measure
// the switchover as the guest saw it; later, after it ran a while, stop it
// and check its stamps.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "migration/stream.hpp"
#include "migration/vcpu_state.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

// No throttle, the configured rate, not parked, no pass gate: the source's
// VMM controls do not travel with the guest.
void reset_controls(StressVm& m);

struct Resumed {
    std::vector<uint32_t> refused_msrs;  // MSRs the destination would not load
    std::vector<uint64_t> progress;      // per vCPU, pages written + read at the resume
    std::vector<uint64_t> parks;         // per vCPU, the mailbox's parks count as migrated
    double restore_ms = 0;               // loading the states, resetting the controls, starting
};

// Loads `states` into `dst` (made, not started), resets its controls, starts
// it; `parked`: its vCPUs stay parked (a stopped guest) until unpark_guests().
Resumed resume(StressVm& dst, const std::vector<VcpuState>& states, bool parked = false);

// downtime_guest_ms: the longest gap, on the guest's (migrated) TSC, between
// a vCPU's last progress point before it parked at the source and its first
// step here. Waits up to `wait` for every vCPU that was parked to go on.
struct GuestGap {
    double max_ms = -1;  // -1: not measured (note says why)
    uint32_t vcpus = 0;  // vCPUs measured
    std::string note;
};
GuestGap guest_gap(const StressVm& dst, const Resumed& at, std::chrono::milliseconds wait);

struct AfterRun {
    ResultRecord result;          // ok: every vCPU progressed and the stamps check;
                                  // details: {"placement": destination_placement()}
    bool stamps_checked = false;  // false when the guest failed (result.text says how)
};

// Where each virtual node's memory landed on this host, judged against the
// node's policy as numa-check judges it (move_pages on every page): one entry
// per node with a host policy, {vnode, backing, policy, pages, on_policy_pct,
// pages_per_host_node, pages_not_present}. Empty when no node has one.
nlohmann::json destination_placement(const StressVm& dst);
// "vnode 0 (gmem, bind:0) 100.0% on policy; ..." ("" for an empty placement).
std::string placement_summary(const nlohmann::json& placement);

// Lets the resumed `dst` run post_run_s (and, for a vCPU that has not
// progressed by then, up to `progress_wait` more), stops it (killed after
// stop_wait) and checks its stamps.
AfterRun run_and_check(StressVm& dst, const Resumed& at, double post_run_s, std::chrono::milliseconds stop_wait,
                       std::chrono::milliseconds progress_wait = std::chrono::seconds(5));

}  // namespace mvm::migration
