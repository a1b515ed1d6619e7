// migration/report.hpp - what a migration and a receive report: the fields,
// the JSON the commands write and the sender's table.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "vmm/dirty/tracker.hpp"

namespace mvm::migration {

struct RoundReport {
    uint32_t round = 0;          // 0 is the bulk pass
    uint64_t pages = 0;          // sent this round
    uint64_t dirty_pages = 0;    // harvested for this round (0 for the bulk pass)
    double dirty_rate = 0;       // pages/s over the previous round
    uint64_t bytes = 0;
    double duration_s = 0;
    uint32_t throttle_pct = 0;   // auto-converge share in effect
    uint64_t dirty_limit = 0;    // per-vCPU cap in effect (dirty-limit)
    // What each row is and when its dirty pages accrued.
    std::string kind = "precopy";    // bulk | precopy | stop | interrupted (the round a failure cut short)
    double start_ms = 0;             // since the migration started
    double harvest_interval_s = 0;   // dirty_rate = dirty_pages / this (previous harvest -> this one)
    uint64_t tracked_pages = 0;      // pages of the guest's logged memory slots (the system slot aside)
    bool saturated = false;          // every one of them dirty: the true rate is >= dirty_rate
};

// The guest's own progress while migrating (pages written + read, all vCPUs).
struct ProgressPoint {
    double t_ms = 0;          // since the migration started
    double pages_per_s = 0;   // over the bin ending at t_ms
};
// The guest's progress series: sampled every kProgressSampleMs, reported in
// bins of at least kProgressBinMs (longer ones past ~400 points).
inline constexpr double kProgressSampleMs = 10, kProgressBinMs = 25;

// The downtime window (stop-and-copy to the destination running), part by
// part; the parts sum to at most downtime_ms (the rest is bookkeeping).
struct DowntimeSplit {
    double park_ms = 0;                    // the source's vCPUs parked at a batch boundary
    double final_harvest_ms = 0;           // the last dirty-log harvest
    double final_send_ms = 0;              // its pages, plus guest_memfd slots whole
    double vcpu_state_ms = 0;              // saving every vCPU's state at the source
    double restore_ms = 0;                 // handing it over until the destination runs (over TCP: incl. the wire)
    double destination_restore_ms = -1;    // of which the destination's own load-and-start (-1: not reported)
};

// What compression did to the pages' data (both sides report it).
struct CompressionFigures {
    std::string method = "none";  // none | zstd:LEVEL
    uint64_t data_bytes = 0;      // non-zero pages' data before compression
    uint64_t wire_bytes = 0;      // what it took on the wire
    double cpu_ms = 0;            // thread CPU time in zstd, all channels
    double ratio() const { return wire_bytes ? static_cast<double>(data_bytes) / static_cast<double>(wire_bytes) : 0; }
    nlohmann::json to_json() const;
};

// The destination's postcopy figures (postcopy.hpp defines them).
struct PostcopyDestinationFigures {
    static constexpr size_t kLatencyBuckets = 24;  // QEMU's postcopy-latency-dist: [2^N, 2^(N+1)) us
    uint64_t discarded_pages = 0;     // 4 KiB pages made missing at the switch (dirtied since sent)
    uint64_t placed_pages = 0;        // 4 KiB pages placed in postcopy (requested or pushed)
    uint64_t requested_pages = 0;     // of them asked for by a fault (4 KiB pages)
    uint64_t faults = 0;              // remote faults: a thread waited for a page that had to come
    uint64_t vcpu_faults = 0;         // of them by vCPU threads
    double blocktime_ms = 0;          // QEMU's postcopy-blocktime: every vCPU blocked at once
    std::vector<double> vcpu_blocktime_ms;     // postcopy-vcpu-blocktime
    double latency_ns = 0;            // postcopy-latency: mean remote fault latency
    std::vector<double> vcpu_latency_ns;       // postcopy-vcpu-latency (0: no fault)
    double non_vcpu_latency_ns = 0;   // postcopy-non-vcpu-latency (the VMM's own reads of guest memory)
    std::vector<uint64_t> latency_dist = std::vector<uint64_t>(kLatencyBuckets, 0);  // postcopy-latency-dist
    double max_latency_ms = 0;
    std::vector<double> vcpu_stall_ms;  // the guest's own view: longest no-progress gap per vCPU in postcopy
    double duration_ms = 0;           // the guest resumed there -> the last page placed
    std::string units;                // what a fault moves: "4 KiB", "4 KiB + 2 MiB (hugetlb2m)"
    std::vector<ProgressPoint> guest_progress;  // the guest there, all vCPUs; t_ms since it resumed there
    uint32_t pauses = 0;              // postcopy-paused by a cut (or migrate-pause), then recovered
    double paused_ms = 0;             // paused -> resumed again, summed over the pauses
    nlohmann::json to_json() const;
    static PostcopyDestinationFigures from_json(const nlohmann::json& j);
    std::string to_table() const;
};

// The source's side of a postcopy migration.
struct PostcopyReport {
    bool enabled = false;           // --postcopy (QEMU's postcopy-ram capability)
    bool started = false;           // the guest switched to the destination in postcopy
    bool preempt = false;           // requested pages on a connection of their own (postcopy-preempt)
    std::string trigger;            // why it started: "after N rounds", "dirty rate above the link", ...
    uint32_t after_rounds = 0;      // pre-copy rounds before it
    uint64_t discarded_pages = 0;   // pages the destination dropped at the switch (sent in postcopy)
    uint64_t requests = 0;          // QEMU's postcopy-requests: page requests received
    uint64_t requested_pages = 0;   // 4 KiB pages sent because of one
    uint64_t pushed_pages = 0;      // 4 KiB pages sent in the background
    uint64_t bytes = 0;             // QEMU's postcopy-bytes
    double duration_ms = 0;         // the destination resumed -> it had every page
    double resumed_ms = 0;          // since the migration started: the destination said it resumed
    uint32_t pauses = 0;            // postcopy-paused by a cut (or migrate-pause), then recovered
    double paused_ms = 0;           // paused -> pushing again, summed over the pauses
    uint64_t resent_pages = 0;      // sent before a cut but missing at the destination after it: sent again
    bool destination_reported = false;
    PostcopyDestinationFigures destination;
    nlohmann::json to_json() const;
};

struct MigrateReport {
    std::string status = "failed";  // completed | failed | cancelled
    std::string error;
    std::string phase;             // where it failed
    double total_ms = 0, setup_ms = 0, downtime_ms = 0, expected_downtime_ms = 0;
    uint64_t transferred_bytes = 0, remaining_bytes = 0, zero_pages = 0, pages = 0;
    double throughput = 0;          // bytes/s over pre-copy
    std::vector<RoundReport> rounds;
    std::vector<double> vcpu_stall_ms;  // longest no-progress gap per vCPU during pre-copy
    dirty::EnableReport enable;
    std::vector<std::pair<uint32_t, std::string>> untracked;
    // Verification
    bool verified = false;
    uint64_t switchover_pages_checked = 0, switchover_mismatches = 0;
    std::vector<uint64_t> switchover_mismatch_gpas;
    uint64_t pages_checked = 0, mismatches = 0;  // destination stamp check after resume
    std::string stamp_summary;
    bool destination_progressed = false;
    // Where the destination's memory landed, per node with a host policy
    // (migration/resume.hpp destination_placement); empty: none bound.
    nlohmann::json destination_placement = nlohmann::json::array();
    std::vector<uint32_t> refused_msrs;
    // ---- downtime split, verification after resume, the guest's view ----
    DowntimeSplit split;
    double verify_ms = 0;            // after resume: hashing the parked source and comparing (not in downtime_ms)
    double downtime_guest_ms = -1;   // longest vCPU gap across the switchover on the guest's migrated TSC
    std::string downtime_guest_note; // why it is missing, when it is
    // What each side is at the end. source: running | parked | resumed (after
    // the switchover, the destination's copy discarded); destination: none |
    // setting-up | receiving | running | checked | discarded | lost | aborted.
    std::string source_state, destination_state;
    std::string state_note;  // the same in words, with why

    // ---- timings, convergence, rates, the guest's progress, configuration ----
    // total_ms is QEMU's total-time: start -> destination running. These come after or apart.
    double post_run_ms = 0;           // destination running -> its stamp check reported
    double setup_destination_ms = 0;  // in-process: building the destination VM; TCP: connections + layout check
    double setup_tracking_ms = 0;     // dirty logging on (setup_ms = both + the rest)
    double max_downtime_ms = 0;       // the limit it ran with (--max-downtime)
    double stop_ms = 0;               // since start: the source began to park (the downtime window opens)
    bool converged = false;           // the dirty set fitted --max-downtime at the measured bandwidth
    std::string forced_by;            // when not converged: max-iterations | caller (stop forced from outside)
    double mbps = 0;                  // QEMU's mbps: transferred bits / (total - setup), in Mbit/s
    double pages_per_second = 0;      // QEMU's pages-per-second: pages / (total - setup)
    uint64_t untracked_bytes = 0;     // guest_memfd slots, sent whole at stop (part of expected downtime)
    uint32_t channels = 1;            // connections (TCP) or copy threads (in-process)
    uint64_t dirty_syncs = 0;         // dirty-log harvests (QEMU's dirty-sync-count)
    uint64_t precopy_bytes = 0;       // sent by the bulk pass and the pre-copy rounds (QEMU's precopy-bytes)
    uint64_t downtime_bytes = 0;      // sent by stop-and-copy (QEMU's downtime-bytes)
    CompressionFigures compression;
    PostcopyReport postcopy;
    bool guest_lost = false;          // postcopy broke off: neither side holds the whole guest (exit 7)
    std::vector<ProgressPoint> guest_progress;  // the source's guest from setup to park (kProgress*)
    nlohmann::json config;            // what it ran with (engines: config_echo()), echoed into the JSON

    nlohmann::json to_json() const;
    // with_cause false: a failure's cause is left for the caller's one line
    // (the CLI's stderr line); a completed migration always has its summary.
    std::string to_table(bool with_cause = true) const;
    // Failed before a page was sent (refused, setup): the report has no figures.
    bool nothing_migrated() const;
    std::string summary_line() const;
    void figures_to_json(nlohmann::json& j) const;
    void downtime_to_json(nlohmann::json& j) const;
    std::string downtime_to_table() const;
};

struct ReceiveReport {
    std::string status = "failed", error;
    uint64_t pages = 0, zero_pages = 0, bytes = 0;
    uint64_t pages_checked = 0, mismatches = 0;
    std::string stamp_summary;
    nlohmann::json placement = nlohmann::json::array();  // this side's, after the post-run (resume.hpp)
    // Timings, as this side saw them (ms).
    std::string failed_step;     // failed: where it stopped (header, memory, switchover, postcopy, verify, post-run)
    double total_ms = 0;         // first record to the end of the stamp check
    double memory_ms = 0;        // first page to the last CHANNEL_DONE (bulk, pre-copy and stop-and-copy)
    double switchover_ms = 0;    // the last CHANNEL_DONE to the guest running here (vCPU states + restore)
    double restore_ms = 0;       // loading the vCPU states and starting the guest
    double verify_ms = 0;        // comparing the source's digests, the guest running
    double post_run_ms = 0;      // the guest's run here and its stamp check
    double downtime_guest_ms = -1;  // the switchover on the guest's own TSC (-1: not measured)
    std::string downtime_guest_note;
    bool verified = false;
    uint64_t verify_pages_checked = 0, verify_mismatches = 0;
    std::vector<uint32_t> refused_msrs;
    uint32_t channels = 0;
    CompressionFigures compression;       // what PAGES_ZSTD frames carried, and decompressing them
    std::string guest = "never started";  // its state at the end
    // Who sent it: channel 0's address, its TLS identity ("" plain), "tls-psk",
    // "tls-x509", "none", or "file" (a restore: peer names the file), and the
    // connections dropped before it was admitted.
    std::string peer, peer_identity, security = "none";
    uint32_t dropped_connections = 0;
    bool postcopy = false;                 // the guest resumed here in postcopy
    double postcopy_ms = 0;                // resumed -> every page here
    PostcopyDestinationFigures postcopy_figures;
    bool guest_lost = false;               // postcopy broke off with pages missing here (exit 7)
    nlohmann::json to_json() const;
    std::string to_table() const;
    std::string failed_steps_line() const;
};

// MSR indices as the SDM writes them: "0x10".
std::vector<std::string> msr_names(const std::vector<uint32_t>& msrs);

}  // namespace mvm::migration
