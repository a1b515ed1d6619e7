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
    std::vector<uint32_t> refused_msrs;

    nlohmann::json to_json() const;
    std::string to_table() const;
};

struct ReceiveReport {
    std::string status = "failed", error;
    uint64_t pages = 0, zero_pages = 0, bytes = 0;
    uint64_t pages_checked = 0, mismatches = 0;
    std::string stamp_summary;
    nlohmann::json to_json() const;
};

}  // namespace mvm::migration
