// engines/lockup.hpp - `minivmm lockup`: reproduce "soft lockup while
// dirty logging" reports. For each variant, on a fresh VM: let the guest
// reach a steady rate, enable dirty logging, keep harvesting (and copying, as
// a migration would) for a while, disable; meanwhile sample every vCPU's
// progress at >= 1 kHz from the mailboxes and collect the guest watchdog's own
// events. The timeline's phases are contiguous; stalls are attributed to the
// phase they overlap most and compared with the steady baseline per phase.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engines/lockup_analysis.hpp"
#include "numa/page_tables.hpp"
#include "vmm/kvm/stats.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/stress/sampler.hpp"

namespace mvm::engines {

// bitmap | bitmap-initially-set | ring | per-node-parallel-enable | eager-split-on | eager-split-off
const std::vector<std::string>& lockup_variant_names();

struct LockupOptions {
    std::vector<std::string> variants = lockup_variant_names();
    double threshold_ms = 20;
    double steady_s = 0.5;       // measured before logging goes on
    double logging_s = 2.0;      // harvest cycles with logging on
    double harvest_ms = 100;
    uint64_t clear_chunk_bytes = 1ull << 20;  // bitmap-initially-set
    uint32_t ring_bytes = 64 << 10;           // ring
    bool keep_samples = true;
    bool progress = false;
    bool harvester_priority = true;            // SCHED_FIFO (or nice) for the harvesting thread
    const std::atomic<int>* stop = nullptr;    // non-zero: stop (Ctrl-C), report what was measured
};

// KVM's page-size stats and page tables over one step of the logging window:
// where huge mappings split (enable, the first harvest, later write faults).
struct StepStats {
    std::string step;                // "enable-logging", "first harvest", "rest of logging"
    StatDelta vm;                    // pages_4k / pages_2m / pages_1g ...
    numa::NodeKibDelta page_tables;  // SecPageTables per host node
};

struct VariantResult {
    std::string name;
    std::string skipped;  // why it did not run, when it did not
    double enable_ms = 0, disable_ms = 0;
    double longest_stall_ms = 0;
    int longest_vcpu = -1;
    std::string longest_phase;
    double p50_stall_ms = 0, p99_stall_ms = 0;  // over every stall (each counted once), 0 for none
    uint32_t stall_count = 0;
    uint32_t vcpus_stalled = 0;                 // with a stall over the threshold
    std::map<std::string, uint32_t> vcpus_stalled_by_phase;
    uint64_t watchdog_events = 0;
    double watchdog_longest_ms = 0;
    double rate_before = 0, rate_during = 0;    // guest writes, pages/s, all vCPUs
    uint64_t harvests = 0, dirty_pages = 0, ring_full = 0;
    HarvestSchedule schedule;                   // harvests expected vs done in the logging window
    std::string harvester_priority;             // what the harvesting thread ran with
    bool interrupted = false;                   // stopped by a signal before it finished
    std::vector<PhaseStalls> phase_stalls;      // per phase, against the steady baseline
    StatDelta vm_stats, vcpu_stats;
    std::vector<StepStats> steps;               // the logging window cut at enable and at the first harvest
    std::string enabled_from;                   // which thread(s) enabled logging
    std::vector<PhaseSpan> phases;
    std::vector<Stall> stalls;
    std::vector<ProgressSample> samples;
    double sampler_hz = 0;
    std::string verdict;
};

// Where the variant's huge mappings split, by step ("huge mappings split in
// enable-logging (pages_2m -32 ...)"), or that none did.
std::string split_steps_text(const VariantResult& v);
nlohmann::json steps_json(const VariantResult& v);

struct LockupReport {
    uint32_t vcpus = 0;
    uint64_t mem_bytes = 0;
    std::string backing;
    double threshold_ms = 0;
    bool interrupted = false;  // a signal stopped the run: variants holds what was measured
    std::vector<VariantResult> variants;

    nlohmann::json to_json() const;
    std::string to_table() const;
    // CSV: variant,t_ms,vcpu,pages,phase
    void write_timeline(const std::string& path) const;
};

// Something done once mid-logging, after the first harvest's copy, on the
// harvesting thread (tests pause every vCPU for a known time); its span goes
// in the timeline as `phase`.
struct MidLoggingAction {
    std::string phase;
    std::function<void(StressVm&)> run;
    std::function<void()> after_each_harvest;  // on the harvesting thread, counted as its own time
};

LockupReport run_lockup(const Kvm& kvm, const MachineConfig& cfg, const LockupOptions& opt,
                        const MidLoggingAction& action = {});

}  // namespace mvm::engines
