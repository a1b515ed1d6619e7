// engines/ring_probe.hpp - does this host lose dirty-log entries when a signal
// is pending in the thread that harvests? Runs a small stress guest with
// logging on, harvests every 2 ms while another thread aims signals at the
// harvesting thread (and, optionally, kicks at the vCPU threads), then stops
// the signals, drains the log, lets every vCPU write its whole working set
// once more and harvests: a page that full pass wrote but the log does not
// hold was never re-protected, so it is lost to logging until logging is
// toggled ("permanently unlogged"). With the guard (KVM_RESET_DIRTY_RINGS with
// signals blocked, minivmm's default) nothing may be lost.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "vmm/dirty/tracker.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::engines {

struct RingProbeOptions {
    dirty::Mode mode = dirty::Mode::Ring;
    bool guarded = true;            // ring: reset with signals blocked
    double storm_s = 1.0;           // harvests under signals
    double harvest_ms = 2;
    uint32_t vcpus = 2;
    uint64_t bytes_per_vcpu = 16ull << 20;
    uint32_t ring_bytes = 256 << 10;
    bool kick_vcpus = false;        // also SIGUSR1 kicks at the vCPU threads (ring-full resets run there)
};

struct RingProbeResult {
    std::string skipped;            // why it did not run ("" when it ran)
    dirty::Mode mode = dirty::Mode::Ring;
    bool guarded = true;
    double storm_s = 0;
    uint64_t harvests = 0, entries = 0, reset = 0;   // entries collected vs what KVM_RESET_DIRTY_RINGS returned
    uint64_t short_resets = 0;      // harvests whose reset returned fewer than it collected (a signal cut it short)
    uint64_t signals_sent = 0, signals_handled = 0;
    uint64_t pages_checked = 0;     // written by the last full pass
    uint64_t unlogged = 0;          // ... and absent from the log
    std::vector<uint64_t> unlogged_gpas;  // the first few
    bool loses() const { return unlogged > 0; }
    std::string summary() const;    // one line
    nlohmann::json to_json() const;
};

RingProbeResult probe_reset_under_signals(const Kvm& kvm, const RingProbeOptions& opt);

}  // namespace mvm::engines
