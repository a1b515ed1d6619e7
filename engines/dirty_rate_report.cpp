// The dirty-rate report: rates and saturation of a window, JSON, table.
#include <fmt/format.h>

#include "engines/dirty_rate.hpp"

namespace mvm::engines {

namespace {

double mib(double pages_per_s) { return pages_per_s * 4096 / (1 << 20); }

// What each per-vCPU field counts, for the JSON's `vcpu_columns` and the table's legend.
nlohmann::json vcpu_columns(RateMode mode)
{
    nlohmann::json c = {
        {"dirty_pages", "distinct pages of this vCPU's working set dirtied in the window (QEMU calc-dirty-rate counts "
                        "distinct pages too)"},
        {"dirty_rate_pages_per_s", "dirty_pages / period_s"},
        {"dirty_rate_mib_per_s", "dirty_rate_pages_per_s x 4 KiB"},
        {"working_set_pages", "pages this vCPU writes: the most dirty_pages can be"},
        {"saturated", "dirty_pages == working_set_pages: the true rate is >= dirty_rate"},
        {"guest_writes_per_s", "page writes the guest itself counted per second (a page rewritten counts again)"}};
    if (mode == RateMode::Ring) {
        c["ring_entries"] = "entries this vCPU's dirty ring received; a page counts again after every ring reset "
                            "(harvests every 50 ms), so entries exceed distinct pages";
        c["ring_entries_per_s"] = "ring_entries / period_s";
    }
    if (mode == RateMode::Sampling)
        c["dirty_pages"] = "estimated: share of this vCPU's sampled pages that changed x working_set_pages";
    return c;
}

nlohmann::json window_json(const RateWindow& w, RateMode mode)
{
    using nlohmann::json;
    json j;
    j["start_s"] = w.start_s;
    j["period_s"] = w.period_s;
    j["dirty_pages"] = w.dirty_pages;
    j["capacity_pages"] = w.capacity_pages;
    j["saturated"] = w.saturated;
    j["lower_bound"] = w.lower_bound;
    j["dirty_rate_pages_per_s"] = w.pages_per_s;
    j["dirty_rate_mib_per_s"] = w.mib_per_s;
    j["guest_writes_per_s"] = w.guest_writes_per_s;
    if (mode == RateMode::Sampling)
        j["sampling"] = {{"samples", w.samples}, {"changed", w.samples_changed}};
    j["vcpus"] = json::array();
    for (const auto& v : w.vcpus) {
        json c = {{"vcpu", v.vcpu},
                  {"dirty_pages", v.dirty_pages},
                  {"working_set_pages", v.working_set_pages},
                  {"saturated", v.saturated},
                  {"dirty_rate_pages_per_s", v.pages_per_s},
                  {"dirty_rate_mib_per_s", v.mib_per_s},
                  {"guest_writes_per_s", v.guest_writes_per_s}};
        if (mode == RateMode::Ring) {
            c["ring_entries"] = v.ring_entries;
            c["ring_entries_per_s"] = v.ring_entries_per_s;
        }
        j["vcpus"].push_back(c);
    }
    j["vnodes"] = json::array();
    for (const auto& n : w.vnodes)
        j["vnodes"].push_back({{"vnode", n.vnode},
                               {"dirty_pages", n.dirty_pages},
                               {"capacity_pages", n.pages},
                               {"saturated", n.saturated},
                               {"dirty_rate_pages_per_s", n.pages_per_s},
                               {"dirty_rate_mib_per_s", n.mib_per_s}});
    return j;
}

// "512.0 MiB/s" or ">= 512.0 MiB/s" when the window is a lower bound.
std::string rate_text(bool lower_bound, double mib_per_s)
{
    return fmt::format("{}{:.1f} MiB/s", lower_bound ? ">= " : "", mib_per_s);
}

std::string series_table(const RateResult& r)
{
    std::string o = fmt::format("time series, one window per --interval {:.3f} s (* = saturated: the true rate is >= "
                                "the figure):\n",
                                r.interval_s);
    o += fmt::format("{:>8} {:>8} {:>14} {:>16}", "start s", "len s", "dirty MiB/s", "guest writes/s");
    const bool each = r.total.vcpus.size() <= 8;
    if (each) {
        for (const auto& v : r.total.vcpus)
            o += fmt::format(" {:>12}", fmt::format("vCPU{} MiB/s", v.vcpu));
        for (const auto& n : r.total.vnodes)
            o += fmt::format(" {:>12}", fmt::format("node{} MiB/s", n.vnode));
    }
    o += "\n";
    for (const auto& w : r.series) {
        o += fmt::format("{:>8.3f} {:>8.3f} {:>13.1f}{} {:>16.0f}", w.start_s, w.period_s, w.mib_per_s,
                         w.saturated ? '*' : ' ', w.guest_writes_per_s);
        if (each) {
            for (const auto& v : w.vcpus)
                o += fmt::format(" {:>11.1f}{}", v.mib_per_s, v.saturated ? '*' : ' ');
            for (const auto& n : w.vnodes)
                o += fmt::format(" {:>11.1f}{}", n.mib_per_s, n.saturated ? '*' : ' ');
        }
        o += "\n";
    }
    return o;
}

}  // namespace

void finish_window(RateWindow& w)
{
    const double t = w.period_s > 0 ? w.period_s : 1;
    w.pages_per_s = static_cast<double>(w.dirty_pages) / t;
    w.mib_per_s = mib(w.pages_per_s);
    w.saturated = w.capacity_pages > 0 && w.dirty_pages >= w.capacity_pages;
    w.lower_bound = w.saturated;
    for (auto& v : w.vcpus) {
        v.pages_per_s = static_cast<double>(v.dirty_pages) / t;
        v.mib_per_s = mib(v.pages_per_s);
        v.ring_entries_per_s = static_cast<double>(v.ring_entries) / t;
        v.saturated = v.working_set_pages > 0 && v.dirty_pages >= v.working_set_pages;
        w.lower_bound |= v.saturated;
    }
    for (auto& n : w.vnodes) {
        n.pages_per_s = static_cast<double>(n.dirty_pages) / t;
        n.mib_per_s = mib(n.pages_per_s);
        n.saturated = n.pages > 0 && n.dirty_pages >= n.pages;
        w.lower_bound |= n.saturated;
    }
}

nlohmann::json to_json(const RateResult& r)
{
    nlohmann::json j = window_json(r.total, r.mode);
    j["status"] = "completed";  // a dirty-rate that fails reports an error instead
    j["mode"] = rate_mode_name(r.mode);
    j["harvest_s"] = r.harvest_s;
    j["vcpu_columns"] = vcpu_columns(r.mode);
    if (r.logging.measured)
        j["logging_cost"] = {{"baseline_s", r.logging.baseline_s},
                             {"guest_writes_per_s_unlogged", r.logging.unlogged_writes_per_s},
                             {"guest_writes_per_s_logged", r.logging.logged_writes_per_s},
                             {"vcpus_guest_writes_per_s_unlogged", r.logging.unlogged_vcpu},
                             {"slowdown", r.logging.slowdown}};
    j["interval_s"] = r.interval_s;
    j["series"] = nlohmann::json::array();
    for (const auto& w : r.series)
        j["series"].push_back(window_json(w, r.mode));
    j["note"] = r.note;
    return j;
}

std::string to_table(const RateResult& r)
{
    const RateWindow& w = r.total;
    std::string o = fmt::format("dirty rate ({}, {:.2f} s): {}, {:.0f} pages/s ({} distinct pages of {} the guest "
                                "writes)\n",
                                rate_mode_name(r.mode), w.period_s, rate_text(w.lower_bound, w.mib_per_s),
                                w.pages_per_s, w.dirty_pages, w.capacity_pages);
    if (w.saturated)
        o += fmt::format("SATURATED: every page the guest writes was dirty within the period, so the true rate is >= "
                         "{:.1f} MiB/s; use a shorter --period, or --interval for a time series\n",
                         w.mib_per_s);
    else if (w.lower_bound)
        o += "PARTLY SATURATED: a vCPU or node (marked *) had every page dirty, so the true rate is >= the figure\n";
    if (r.logging.measured)
        o += fmt::format("guest's own writes: {:.0f} pages/s with logging on, {:.0f} pages/s over a {:.2f} s baseline "
                         "with it off: logging slowed the guest {:.1f}x\n",
                         r.logging.logged_writes_per_s, r.logging.unlogged_writes_per_s, r.logging.baseline_s,
                         r.logging.slowdown);
    const bool ring = r.mode == RateMode::Ring;
    o += fmt::format("{:>5} {:>14} {:>12} {:>16}{} {:>18}\n", "vCPU", "dirty pages/s", "dirty MiB/s", "working set",
                     ring ? fmt::format(" {:>16}", "ring entries/s") : "", "guest writes/s");
    for (const auto& v : w.vcpus)
        o += fmt::format("{:>5} {:>13.0f}{} {:>12.1f} {:>16}{} {:>18.0f}\n", v.vcpu, v.pages_per_s,
                         v.saturated ? '*' : ' ', v.mib_per_s, v.working_set_pages,
                         ring ? fmt::format(" {:>16.0f}", v.ring_entries_per_s) : "", v.guest_writes_per_s);
    if (w.vnodes.size() > 1)
        for (const auto& n : w.vnodes)
            o += fmt::format("node {:>3}: {:.0f} pages/s{} ({}), {} of {} pages dirty\n", n.vnode, n.pages_per_s,
                             n.saturated ? '*' : ' ', rate_text(n.saturated, n.mib_per_s), n.dirty_pages, n.pages);
    o += "columns: dirty pages/s = distinct pages of the vCPU's working set dirtied per second (* = all of them: "
         "saturated);";
    o += ring ? " ring entries/s = entries its ring received (a page counts again after every reset);" : "";
    o += " guest writes/s = page writes the guest counted itself\n";
    if (!r.series.empty())
        o += series_table(r);
    if (r.mode != RateMode::Sampling)
        o += fmt::format("harvesting took {:.3f} ms in all\n", r.harvest_s * 1e3);
    o += r.note + "\n";
    return o;
}

}  // namespace mvm::engines
