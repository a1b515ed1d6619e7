#include "migration/report.hpp"
#include "migration/resume.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <string_view>
#include <utility>

#include "base/units.hpp"

namespace mvm::migration {

namespace {

std::string compression_line(const CompressionFigures& c, const char* verb)
{
    if (c.method == "none")
        return "";
    return fmt::format("compression {}: {} of page data in {} on the wire ({:.2f}x), {} {:.1f} ms of CPU ({:.0f} MiB/s "
                       "per core)\n",
                       c.method, human_bytes(static_cast<double>(c.data_bytes)),
                       human_bytes(static_cast<double>(c.wire_bytes)), c.ratio(), verb, c.cpu_ms,
                       c.cpu_ms > 0 ? static_cast<double>(c.data_bytes) / (1 << 20) / (c.cpu_ms / 1e3) : 0.0);
}

}  // namespace

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
    j["channels"] = channels;
    j["compression"] = compression.to_json();
    j["postcopy"] = postcopy.to_json();
    j["guest_lost"] = guest_lost;
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
    j["enabled_from"] = enable.enabled_from;
    j["enable_sec_page_tables"] = enable.page_tables.json();  // KVM page tables made per host node by enabling
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
    j["destination_placement"] = destination_placement;
    if (!refused_msrs.empty())
        j["refused_msrs"] = msr_names(refused_msrs);
    downtime_to_json(j);
    figures_to_json(j);
    return j;
}

// Timings apart from total-time, convergence, QEMU's rates, states, config.
void MigrateReport::figures_to_json(nlohmann::json& j) const
{
    j["post_run_ms"] = post_run_ms;
    j["setup_destination_ms"] = setup_destination_ms;
    j["setup_tracking_ms"] = setup_tracking_ms;
    j["stop_ms"] = stop_ms;
    j["converged"] = converged;
    j["forced_by"] = forced_by.empty() ? nlohmann::json(nullptr) : nlohmann::json(forced_by);
    j["max_downtime_ms"] = max_downtime_ms;
    j["mbps"] = mbps;
    j["pages_per_second"] = pages_per_second;
    j["dirty_syncs"] = dirty_syncs;
    j["precopy_bytes"] = precopy_bytes;
    j["downtime_bytes"] = downtime_bytes;
    j["untracked_bytes"] = untracked_bytes;
    nlohmann::json gp = nlohmann::json::array(), dp = nlohmann::json::array();
    for (const auto& p : guest_progress)
        gp.push_back({p.t_ms, p.pages_per_s});
    if (postcopy.destination_reported)  // the guest at the destination in postcopy, on the same clock
        for (const auto& p : postcopy.destination.guest_progress)
            dp.push_back({postcopy.resumed_ms + p.t_ms, p.pages_per_s});
    j["guest_progress"] = {{"columns", {"t_ms", "pages_per_s"}},
                           {"sampled_every_ms", kProgressSampleMs},
                           {"min_bin_ms", kProgressBinMs},
                           {"points", gp},
                           {"destination_points", dp}};
    if (!config.is_null())
        j["config"] = config;
}

// The first line of the table: the outcome, and whether pre-copy converged or was forced.
std::string MigrateReport::summary_line() const
{
    std::string o = "migration " + status;
    if (!error.empty())
        return o + fmt::format(" in {}: {}", phase, error) + (guest_lost ? " (the guest is lost)" : "");
    if (postcopy.started)
        return o + fmt::format(" in postcopy (switched after {} pre-copy round{}: {}; downtime {:.1f} ms, then {} "
                               "pages on demand or in the background over {:.1f} ms)",
                               postcopy.after_rounds, postcopy.after_rounds == 1 ? "" : "s", postcopy.trigger,
                               downtime_ms, postcopy.discarded_pages, postcopy.duration_ms);
    if (converged)
        return o + fmt::format(" (converged: the dirty set fitted --max-downtime {:g} ms)", max_downtime_ms);
    return o + fmt::format(", NOT converged: stop-and-copy forced by {} (downtime {:.1f} ms against --max-downtime "
                           "{:g} ms)",
                           forced_by.empty() ? "?" : forced_by, downtime_ms, max_downtime_ms);
}

// The downtime split, verify_ms, the guest's own downtime, each side's state.
void MigrateReport::downtime_to_json(nlohmann::json& j) const
{
    j["downtime_split"] = {{"park_ms", split.park_ms},
                           {"final_harvest_ms", split.final_harvest_ms},
                           {"final_send_ms", split.final_send_ms},
                           {"vcpu_state_ms", split.vcpu_state_ms},
                           {"restore_ms", split.restore_ms}};
    if (split.destination_restore_ms >= 0)
        j["downtime_split"]["destination_restore_ms"] = split.destination_restore_ms;
    j["verify_ms"] = verify_ms;
    j["downtime_guest_ms"] = downtime_guest_ms >= 0 ? nlohmann::json(downtime_guest_ms) : nlohmann::json(nullptr);
    if (!downtime_guest_note.empty())
        j["downtime_guest_note"] = downtime_guest_note;
    if (!source_state.empty())
        j["source_state"] = source_state;
    if (!destination_state.empty())
        j["destination_state"] = destination_state;
    if (!state_note.empty())
        j["state_note"] = state_note;
}

std::string MigrateReport::downtime_to_table() const
{
    if (downtime_ms <= 0)
        return {};
    std::string o = fmt::format("downtime {:.1f} ms: park {:.1f}, final harvest {:.1f}, final send {:.1f}, vCPU state "
                                "{:.1f}, restore {:.1f}",
                                downtime_ms, split.park_ms, split.final_harvest_ms, split.final_send_ms,
                                split.vcpu_state_ms, split.restore_ms);
    if (split.destination_restore_ms >= 0)
        o += fmt::format(" (destination's own {:.1f})", split.destination_restore_ms);
    o += fmt::format(" ms; guest's own view {}; verify after resume {:.1f} ms\n",
                     downtime_guest_ms >= 0 ? fmt::format("{:.1f} ms", downtime_guest_ms) : "not measured (" + downtime_guest_note + ")",
                     verify_ms);
    if (!refused_msrs.empty())
        o += fmt::format("MSRs the destination refused: {}\n", fmt::join(msr_names(refused_msrs), " "));
    return o;
}

std::vector<std::string> msr_names(const std::vector<uint32_t>& msrs)
{
    std::vector<std::string> out;
    for (uint32_t m : msrs)
        out.push_back(fmt::format("{:#x}", m));
    return out;
}

bool MigrateReport::nothing_migrated() const
{
    return status != "completed" && transferred_bytes == 0 && rounds.empty() && !postcopy.started;
}

std::string MigrateReport::to_table(bool with_cause) const
{
    std::string o = with_cause || error.empty() ? summary_line() + "\n" : std::string();
    if (nothing_migrated())  // a refusal or a failure in setup: no figures to show
        return o;
    o += fmt::format("total {:.1f} ms (start -> {}), setup {:.1f} ms (destination {:.1f} ms, logging "
                     "on {:.1f} ms), downtime {:.1f} ms (expected {:.1f} ms); verify {:.1f} ms, post-run {:.1f} ms\n",
                     total_ms,
                     postcopy.started && error.empty() ? "every page at the destination (postcopy)"
                     : downtime_ms > 0 && !guest_lost  ? "destination running"
                                                       : "failure",
                     setup_ms, setup_destination_ms,
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
        if (r.kind == "bulk" || r.kind == "postcopy")
            rate = "-";
        o += fmt::format("{:>6} {:>10} {:>12} {:>22} {:>12} {:>10.1f} {:>8}% {:>12}\n", name, r.pages, r.dirty_pages,
                         rate, human_bytes(static_cast<double>(r.bytes)), r.duration_s * 1e3, r.throttle_pct,
                         r.dirty_limit ? std::to_string(r.dirty_limit) : "-");
    }
    o += compression_line(compression, "compressing took");
    if (postcopy.started) {
        o += fmt::format("postcopy at the source: {} requests ({} pages sent for them), {} pages pushed in the "
                         "background, {} in postcopy; pre-copy {}, downtime {}\n",
                         postcopy.requests, postcopy.requested_pages, postcopy.pushed_pages,
                         human_bytes(static_cast<double>(postcopy.bytes)), human_bytes(static_cast<double>(precopy_bytes)),
                         human_bytes(static_cast<double>(downtime_bytes)));
        if (postcopy.destination_reported)
            o += postcopy.destination.to_table();
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
        o += fmt::format("source: {}; destination: {}{}\n", source_state, destination_state,
                         state_note.empty() ? "" : " (" + state_note + ")");
    else
        o += fmt::format("destination: {}\n", destination_state);
    if (verified)
        o += fmt::format("verify: switchover {} pages checked, {} mismatches; destination {}\n", switchover_pages_checked,
                         switchover_mismatches, stamp_summary);
    if (!destination_placement.empty())
        o += fmt::format("destination placement: {}\n", placement_summary(destination_placement));
    o += downtime_to_table();
    return o;
}

// ---- postcopy ------------------------------------------------------------------------

namespace {

nlohmann::json progress_json(const std::vector<ProgressPoint>& pts)
{
    nlohmann::json a = nlohmann::json::array();
    for (const auto& p : pts)
        a.push_back({p.t_ms, p.pages_per_s});
    return a;
}

}  // namespace

nlohmann::json PostcopyDestinationFigures::to_json() const
{
    return {{"discarded_pages", discarded_pages},
            {"placed_pages", placed_pages},
            {"requested_pages", requested_pages},
            {"faults", faults},
            {"vcpu_faults", vcpu_faults},
            {"blocktime_ms", blocktime_ms},
            {"vcpu_blocktime_ms", vcpu_blocktime_ms},
            {"latency_ns", latency_ns},
            {"vcpu_latency_ns", vcpu_latency_ns},
            {"non_vcpu_latency_ns", non_vcpu_latency_ns},
            {"latency_dist_us_log2", latency_dist},
            {"max_latency_ms", max_latency_ms},
            {"vcpu_stall_ms", vcpu_stall_ms},
            {"duration_ms", duration_ms},
            {"units", units},
            {"pauses", pauses},
            {"paused_ms", paused_ms},
            {"guest_progress", progress_json(guest_progress)}};
}

PostcopyDestinationFigures PostcopyDestinationFigures::from_json(const nlohmann::json& j)
{
    PostcopyDestinationFigures f;
    f.discarded_pages = j.value("discarded_pages", uint64_t{0});
    f.placed_pages = j.value("placed_pages", uint64_t{0});
    f.requested_pages = j.value("requested_pages", uint64_t{0});
    f.faults = j.value("faults", uint64_t{0});
    f.vcpu_faults = j.value("vcpu_faults", uint64_t{0});
    f.blocktime_ms = j.value("blocktime_ms", 0.0);
    f.vcpu_blocktime_ms = j.value("vcpu_blocktime_ms", std::vector<double>{});
    f.latency_ns = j.value("latency_ns", 0.0);
    f.vcpu_latency_ns = j.value("vcpu_latency_ns", std::vector<double>{});
    f.non_vcpu_latency_ns = j.value("non_vcpu_latency_ns", 0.0);
    f.latency_dist = j.value("latency_dist_us_log2", std::vector<uint64_t>(kLatencyBuckets, 0));
    f.max_latency_ms = j.value("max_latency_ms", 0.0);
    f.vcpu_stall_ms = j.value("vcpu_stall_ms", std::vector<double>{});
    f.duration_ms = j.value("duration_ms", 0.0);
    f.units = j.value("units", std::string{});
    f.pauses = j.value("pauses", uint32_t{0});
    f.paused_ms = j.value("paused_ms", 0.0);
    if (j.contains("guest_progress") && j["guest_progress"].is_array())
        for (const auto& p : j["guest_progress"])
            if (p.is_array() && p.size() == 2 && p[0].is_number() && p[1].is_number())
                f.guest_progress.push_back({p[0].get<double>(), p[1].get<double>()});
    return f;
}


std::string PostcopyDestinationFigures::to_table() const
{
    std::string o = fmt::format(
        "postcopy at the destination: {} pages discarded, {} placed ({} requested), {} remote faults ({} by vCPUs), "
        "{:.1f} ms until the last page; units {}\n",
        discarded_pages, placed_pages, requested_pages, faults, vcpu_faults, duration_ms, units);
    o += fmt::format("  blocktime (every vCPU blocked at once) {:.2f} ms; latency mean {:.1f} us, max {:.2f} ms, "
                     "non-vCPU {:.1f} us\n",
                     blocktime_ms, latency_ns / 1e3, max_latency_ms, non_vcpu_latency_ns / 1e3);
    o += "  per vCPU: blocked ms / mean latency us / longest stall the guest saw ms:";
    for (size_t v = 0; v < vcpu_blocktime_ms.size(); v++)
        o += fmt::format(" vcpu{} {:.1f}/{:.0f}/{}", v, vcpu_blocktime_ms[v],
                         v < vcpu_latency_ns.size() ? vcpu_latency_ns[v] / 1e3 : 0.0,
                         v < vcpu_stall_ms.size() ? fmt::format("{:.1f}", vcpu_stall_ms[v]) : "-");
    o += "\n  latency distribution (us: faults):";
    for (size_t b = 0; b < latency_dist.size(); b++)
        if (latency_dist[b])
            o += fmt::format(" [{},{}): {}", 1ull << b, 1ull << (b + 1), latency_dist[b]);
    o += "\n";
    return o;
}

nlohmann::json PostcopyReport::to_json() const
{
    nlohmann::json j = {{"enabled", enabled},
                        {"started", started},
                        {"preempt", preempt},
                        {"trigger", trigger},
                        {"after_rounds", after_rounds},
                        {"discarded_pages", discarded_pages},
                        {"requests", requests},
                        {"pages_sent_for_requests", requested_pages},  // the destination's requested_pages counts
                                                                      // pages asked for, some pushed before the ask
                        {"pushed_pages", pushed_pages},
                        {"bytes", bytes},
                        {"duration_ms", duration_ms},
                        {"resumed_ms", resumed_ms},
                        {"pauses", pauses},
                        {"paused_ms", paused_ms},
                        {"resent_pages", resent_pages}};
    j["destination"] = destination_reported ? destination.to_json() : nlohmann::json(nullptr);
    return j;
}

nlohmann::json CompressionFigures::to_json() const
{
    return {{"method", method},
            {"data_bytes", data_bytes},
            {"wire_bytes", wire_bytes},
            {"ratio", wire_bytes ? nlohmann::json(ratio()) : nlohmann::json(nullptr)},
            {"cpu_ms", cpu_ms}};
}


nlohmann::json ReceiveReport::to_json() const
{
    nlohmann::json j = {{"status", status},
                        {"error", error},
                        {"pages", pages},
                        {"zero_pages", zero_pages},
                        {"transferred_bytes", bytes},
                        {"verify", {{"pages_checked", pages_checked}, {"mismatches", mismatches}, {"summary", stamp_summary}}}};
    j["verify"]["enabled"] = verified;
    j["placement"] = placement;
    j["verify"]["switchover_pages_checked"] = verify_pages_checked;
    j["verify"]["switchover_mismatches"] = verify_mismatches;
    j["failed_step"] = failed_step.empty() ? nlohmann::json(nullptr) : nlohmann::json(failed_step);
    j["total_ms"] = total_ms;
    j["memory_ms"] = memory_ms;
    j["switchover_ms"] = switchover_ms;
    j["restore_ms"] = restore_ms;
    j["verify_ms"] = verify_ms;
    j["post_run_ms"] = post_run_ms;
    j["downtime_guest_ms"] = downtime_guest_ms >= 0 ? nlohmann::json(downtime_guest_ms) : nlohmann::json(nullptr);
    if (!downtime_guest_note.empty())
        j["downtime_guest_note"] = downtime_guest_note;
    j["refused_msrs"] = msr_names(refused_msrs);
    j["channels"] = channels;
    j["compression"] = compression.to_json();
    j["guest"] = guest;
    j["sender"] = {{"peer", peer}, {"identity", peer_identity}, {"security", security},
                   {"dropped_connections", dropped_connections}};
    j["postcopy"] = postcopy ? postcopy_figures.to_json() : nlohmann::json(nullptr);
    j["guest_lost"] = guest_lost;
    return j;
}

// A failed receive: the steps it went through, the one the failure cut
// short timed up to the failure, none after it.
std::string ReceiveReport::failed_steps_line() const
{
    const std::pair<const char*, double> steps[] = {{"memory", memory_ms},   {"switchover", switchover_ms},
                                                    {"postcopy", postcopy_ms}, {"verify", verify_ms},
                                                    {"post-run", post_run_ms}};
    std::string o;
    for (const auto& [name, ms] : steps) {
        if (failed_step == "header")
            break;
        if (name == std::string_view("postcopy") && !postcopy && failed_step != "postcopy")
            continue;
        o += fmt::format("{}{} {:.1f} ms{}", o.empty() ? "" : ", ", name, ms,
                         failed_step == name ? " (cut short by the failure)" : "");
        if (failed_step == name)
            break;
    }
    if (o.empty())
        o = "failed before any memory arrived";
    return o + fmt::format(", total {:.1f} ms\n", total_ms);
}

std::string ReceiveReport::to_table() const
{
    std::string o = fmt::format("receive {}: {} pages ({} zero, {}){}\n", status, pages, zero_pages,
                                human_bytes(static_cast<double>(bytes)), error.empty() ? "" : "; " + error);
    if (security == "file")
        o += fmt::format("restored from {}\n", peer);
    else if (!peer.empty())
        o += fmt::format("sender {} over {}{}{}\n", peer, security == "none" ? "plain TCP" : security,
                         peer_identity.empty() ? "" : fmt::format(" as '{}'", peer_identity),
                         dropped_connections ? fmt::format(", {} other connection{} dropped before it", dropped_connections,
                                                           dropped_connections == 1 ? "" : "s")
                                             : "");
    if (failed_step.empty())
        o += fmt::format("memory {:.1f} ms, switchover {:.1f} ms (restore {:.1f} ms), guest's own downtime {}, verify "
                         "{:.1f} ms ({} pages, {} differ), post-run {:.1f} ms, total {:.1f} ms\n",
                         memory_ms, switchover_ms, restore_ms,
                         downtime_guest_ms >= 0 ? fmt::format("{:.1f} ms", downtime_guest_ms) : "not measured",
                         verify_ms, verify_pages_checked, verify_mismatches, post_run_ms, total_ms);
    else
        o += failed_steps_line();
    if (!refused_msrs.empty())
        o += fmt::format("MSRs refused here: {}\n", fmt::join(msr_names(refused_msrs), " "));
    o += compression_line(compression, "decompressing took");
    if (postcopy)
        o += postcopy_figures.to_table();
    if (!stamp_summary.empty())
        o += fmt::format("destination stamp check: {}\n", stamp_summary);
    if (!placement.empty())
        o += fmt::format("placement here: {}\n", placement_summary(placement));
    o += fmt::format("guest here: {}\n", guest);
    return o;
}

}  // namespace mvm::migration
