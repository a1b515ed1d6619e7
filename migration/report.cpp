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
                               {"kind", r.kind},
                               {"start_ms", r.start_ms},
                               {"pages", r.pages},
                               {"dirty_pages", r.dirty_pages},
                               {"dirty_rate_pages_per_s", r.dirty_rate},
                               {"harvest_interval_ms", r.harvest_interval_s * 1e3},
                               {"tracked_pages", r.tracked_pages},
                               {"saturated", r.saturated},
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
    add_mig_a_fields(j);
    return j;
}

// mig-a (issue 14): timings apart from total-time, convergence, QEMU's rates, states, config.
void MigrateReport::add_mig_a_fields(nlohmann::json& j) const
{
    j["verify_ms"] = verify_ms;
    j["post_run_ms"] = post_run_ms;
    j["setup_destination_ms"] = setup_destination_ms;
    j["setup_tracking_ms"] = setup_tracking_ms;
    j["stop_ms"] = stop_ms;
    j["converged"] = converged;
    j["forced_by"] = forced_by.empty() ? nlohmann::json(nullptr) : nlohmann::json(forced_by);
    j["max_downtime_ms"] = max_downtime_ms;
    j["mbps"] = mbps;
    j["pages_per_second"] = pages_per_second;
    j["untracked_bytes"] = untracked_bytes;
    j["source_state"] = source_state;
    j["destination_state"] = destination_state;
    nlohmann::json gp = nlohmann::json::array();
    for (const auto& p : guest_progress)
        gp.push_back({p.t_ms, p.pages_per_s});
    j["guest_progress"] = {{"columns", {"t_ms", "pages_per_s"}}, {"points", gp}};
    if (!config.is_null())
        j["config"] = config;
}

// The first line of the table: the outcome, and whether pre-copy converged or was forced.
std::string MigrateReport::summary_line() const
{
    std::string o = "migration " + status;
    if (!error.empty())
        return o + fmt::format(" in {}: {}", phase, error);
    if (converged)
        return o + fmt::format(" (converged: the dirty set fitted --max-downtime {:g} ms)", max_downtime_ms);
    return o + fmt::format(", NOT converged: stop-and-copy forced by {} (downtime {:.1f} ms against --max-downtime "
                           "{:g} ms)",
                           forced_by.empty() ? "?" : forced_by, downtime_ms, max_downtime_ms);
}

std::string MigrateReport::to_table() const
{
    std::string o = summary_line() + "\n";
    o += fmt::format("total {:.1f} ms (start -> {}), setup {:.1f} ms (destination {:.1f} ms, logging "
                     "on {:.1f} ms), downtime {:.1f} ms (expected {:.1f} ms); verify {:.1f} ms, post-run {:.1f} ms\n",
                     total_ms, downtime_ms > 0 ? "destination running" : "failure", setup_ms, setup_destination_ms,
                     setup_tracking_ms, downtime_ms, expected_downtime_ms, verify_ms, post_run_ms);
    o += fmt::format("transferred {} ({} pages, {} zero), remaining {} {}, pre-copy throughput {}/s, {:.0f} Mbit/s "
                     "and {:.0f} pages/s over total - setup\n",
                     human_bytes(static_cast<double>(transferred_bytes)), pages, zero_pages,
                     error.empty() ? "at stop" : "when it failed", human_bytes(static_cast<double>(remaining_bytes)),
                     human_bytes(throughput), mbps, pages_per_second);
    o += fmt::format("{:>6} {:>10} {:>12} {:>22} {:>12} {:>10} {:>9} {:>12}\n", "round", "pages", "dirty pages",
                     "dirty pages/s", "bytes", "ms", "throttle", "dirty-limit");
    for (const auto& r : rounds) {
        std::string name = r.kind == "precopy" ? std::to_string(r.round)
                           : r.kind == "interrupted" ? fmt::format("{}(cut)", r.round)
                                                     : r.kind;
        std::string rate = r.saturated ? fmt::format("saturated, >= {:.0f}", r.dirty_rate) : fmt::format("{:.0f}", r.dirty_rate);
        if (r.kind == "bulk")
            rate = "-";
        o += fmt::format("{:>6} {:>10} {:>12} {:>22} {:>12} {:>10.1f} {:>8}% {:>12}\n", name, r.pages, r.dirty_pages,
                         rate, human_bytes(static_cast<double>(r.bytes)), r.duration_s * 1e3, r.throttle_pct,
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
    if (status == "completed")
        o += fmt::format("source: {}; destination: {}\n", source_state, destination_state);
    else
        o += fmt::format("destination: {}\n", destination_state);
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
