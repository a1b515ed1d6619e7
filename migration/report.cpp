#include "migration/report.hpp"

#include <fmt/format.h>

#include "base/units.hpp"

namespace mvm::migration {

nlohmann::json MigrateReport::to_json() const
{
    using nlohmann::json;
    json j;
    j["status"] = status;
    if (!error.empty()) {
        j["error"] = error;
        j["failed_phase"] = phase;
    }
    j["total_ms"] = total_ms;
    j["setup_ms"] = setup_ms;
    j["downtime_ms"] = downtime_ms;
    j["expected_downtime_ms"] = expected_downtime_ms;
    j["transferred_bytes"] = transferred_bytes;
    j["remaining_bytes"] = remaining_bytes;
    j["zero_pages"] = zero_pages;
    j["pages"] = pages;
    j["throughput_bytes_per_s"] = throughput;
    j["rounds"] = json::array();
    for (const auto& r : rounds)
        j["rounds"].push_back({{"round", r.round},
                               {"pages", r.pages},
                               {"dirty_pages", r.dirty_pages},
                               {"dirty_rate_pages_per_s", r.dirty_rate},
                               {"bytes", r.bytes},
                               {"duration_ms", r.duration_s * 1e3},
                               {"throttle_pct", r.throttle_pct},
                               {"dirty_limit_pages_per_s", r.dirty_limit}});
    j["vcpu_stall_ms"] = vcpu_stall_ms;
    j["enable_ms"] = enable.wall_s * 1e3;
    j["untracked_slots"] = json::array();
    for (const auto& [s, why] : untracked)
        j["untracked_slots"].push_back({{"slot", s}, {"why", why}});
    j["verify"] = {{"enabled", verified},
                   {"switchover_pages_checked", switchover_pages_checked},
                   {"switchover_mismatches", switchover_mismatches},
                   {"switchover_mismatch_gpas", switchover_mismatch_gpas},
                   {"pages_checked", pages_checked},
                   {"mismatches", mismatches},
                   {"summary", stamp_summary},
                   {"destination_progressed", destination_progressed}};
    if (!refused_msrs.empty())
        j["refused_msrs"] = refused_msrs;
    return j;
}

std::string MigrateReport::to_table() const
{
    std::string o = fmt::format("migration {}{}\n", status, error.empty() ? "" : fmt::format(" in {}: {}", phase, error));
    o += fmt::format("total {:.1f} ms, setup {:.1f} ms (logging on in {:.1f} ms), downtime {:.1f} ms (expected {:.1f} "
                     "ms)\n",
                     total_ms, setup_ms, enable.wall_s * 1e3, downtime_ms, expected_downtime_ms);
    o += fmt::format("transferred {} ({} pages, {} zero), remaining at stop {} , throughput {}/s\n",
                     human_bytes(static_cast<double>(transferred_bytes)), pages, zero_pages,
                     human_bytes(static_cast<double>(remaining_bytes)), human_bytes(throughput));
    o += fmt::format("{:>6} {:>10} {:>12} {:>14} {:>12} {:>10} {:>9} {:>12}\n", "round", "pages", "dirty pages",
                     "dirty pages/s", "bytes", "ms", "throttle", "dirty-limit");
    for (size_t i = 0; i < rounds.size(); i++) {
        const auto& r = rounds[i];
        std::string name = i == 0 ? "bulk" : (i + 1 == rounds.size() && status != "failed" ? "stop" : std::to_string(r.round));
        o += fmt::format("{:>6} {:>10} {:>12} {:>14.0f} {:>12} {:>10.1f} {:>8}% {:>12}\n", name, r.pages, r.dirty_pages,
                         r.dirty_rate, human_bytes(static_cast<double>(r.bytes)), r.duration_s * 1e3, r.throttle_pct,
                         r.dirty_limit ? std::to_string(r.dirty_limit) : "-");
    }
    if (!vcpu_stall_ms.empty()) {
        o += "longest stall per vCPU during pre-copy (ms):";
        for (size_t i = 0; i < vcpu_stall_ms.size(); i++)
            o += fmt::format(" vcpu{} {:.1f}", i, vcpu_stall_ms[i]);
        o += "\n";
    }
    for (const auto& [s, why] : untracked)
        o += fmt::format("slot {} sent whole at stop-and-copy: {}\n", s, why);
    if (verified)
        o += fmt::format("verify: switchover {} pages checked, {} mismatches; destination {}\n", switchover_pages_checked,
                         switchover_mismatches, stamp_summary);
    return o;
}

nlohmann::json ReceiveReport::to_json() const
{
    return {{"status", status},         {"error", error},           {"pages", pages},
            {"zero_pages", zero_pages}, {"bytes", bytes},           {"verify", {{"pages_checked", pages_checked}, {"mismatches", mismatches}, {"summary", stamp_summary}}}};
}

}  // namespace mvm::migration
