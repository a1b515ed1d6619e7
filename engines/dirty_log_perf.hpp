// engines/dirty_log_perf.hpp - `minivmm dirty-log-perf`: the kernel's
// dirty_log_perf_test, with our natively running guest, so results can be
// laid side by side. Each vCPU dirties its own -b bytes once per iteration in
// lock-step (a pass gate in its mailbox); between iterations the dirty log is
// harvested (bitmap GET/CLEAR, or the rings).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "numa/page_tables.hpp"
#include "vmm/dirty/eager_split.hpp"
#include "vmm/dirty/tracker.hpp"
#include "vmm/kvm/stats.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::engines {

struct PerfOptions {
    uint32_t vcpus = 1;
    uint64_t bytes_per_vcpu = 1ull << 30;
    uint32_t iterations = 2;
    uint32_t write_pct = 100;
    bool random = false;
    uint32_t fill = 0;       // --fill (WorkloadConfig::fill)
    double fill_ratio = 0;   // ... ratio:R
    uint32_t slots = 1;
    BackingKind backing = BackingKind::Anon;
    bool manual_protect = true;  // -g turns it off
    bool initially_set = true;   // with manual protect, as the selftest does
    uint32_t ring_bytes = 0;     // > 0: dirty ring instead of the bitmap
    uint64_t clear_chunk_bytes = 0;
    std::optional<bool> eager_split;
    bool progress = false;
};

struct PerfIteration {
    double dirty_s = 0, get_s = 0, clear_s = 0, sync_s = 0;
    uint64_t dirty_pages = 0, entries = 0, reset = 0, ring_full_harvests = 0, clear_calls = 0;
};

// KVM stats moved over one step of the run.
struct StatsWindow {
    std::string name;   // "enable", "iteration N", "harvest N", "disable"
    std::string what;   // what ran in it, e.g. "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (the first clear)"
    bool first_clear = false;  // holds the run's first KVM_CLEAR_DIRTY_LOG
    StatDelta vm;       // VM stats (pages_4k, pages_2m, pages_1g ...)
    StatDelta vcpus;    // vCPU stats summed over vCPUs (pf_taken, pf_fixed, pf_fast ...)
    numa::NodeKibDelta page_tables;  // SecPageTables per host node: KVM's page tables made (+) or freed (-)
};

struct PerfResult {
    PerfOptions opt;
    MachineConfig machine;        // the VM it built from opt
    std::string mode;             // "bitmap (manual protect, initially set)" ...
    double populate_s = 0;        // first pass: faults every page in
    double pass_before_s = 0;     // a warm pass with logging off
    dirty::EnableReport enable, disable;
    std::vector<PerfIteration> iterations;
    StatSnapshot vm_stats_before;      // VM stats before logging goes on (absolute)
    std::vector<StatsWindow> windows;  // enable, then iteration N and harvest N for each N, then disable
    std::vector<std::pair<uint32_t, std::string>> untracked;
    dirty::EagerSplitInfo eager;
    std::string eager_note;
    std::optional<StampCheck> stamps;
    std::optional<VcpuFailure> failure;
};

PerfResult run_dirty_log_perf(const Kvm& kvm, const PerfOptions& opt);

// The selftest's lines ("Populate memory time: ...") then a summary.
std::string to_text(const PerfResult& r);
// Where huge-page mappings were split, by what the stats windows show
// (pages_2m/pages_1g going down), or that none were.
std::string split_summary(const PerfResult& r);
// Where KVM's page tables grew or shrank, per step and host node (SecPageTables).
std::string page_table_summary(const PerfResult& r);
// What eager splitting should do in this run's mode, from the host's parameters.
std::string split_expectation(const PerfResult& r);
nlohmann::json to_json(const PerfResult& r);

}  // namespace mvm::engines
