// The dirty-log-perf report: the selftest's lines, the KVM stats windows
// (enable, each iteration, each harvest, disable) and where huge pages split.
#include <fmt/format.h>

#include "base/units.hpp"
#include "engines/dirty_log_perf.hpp"

namespace mvm::engines {

namespace {

int64_t delta(const StatDelta& d, const char* k)
{
    auto it = d.find(k);
    return it == d.end() ? 0 : it->second;
}

// "pages_4k +0 pages_2m +0 ... pf_fast +12" for the stats that exist.
std::string window_text(const StatsWindow& w)
{
    std::string s;
    for (const char* k : {"pages_4k", "pages_2m", "pages_1g"})
        if (w.vm.count(k))
            s += fmt::format(" {} {:+}", k, w.vm.at(k));
    for (const char* k : {"pf_taken", "pf_fixed", "pf_fast", "pf_spurious"})
        if (w.vcpus.count(k))
            s += fmt::format(" {} {:+}", k, w.vcpus.at(k));
    return s;
}

// How a window in which huge mappings went away split them.
std::string split_how(const StatsWindow& w)
{
    if (w.name == "enable")
        return "eager split when logging was enabled";
    if (w.first_clear)
        return "eager split at the first KVM_CLEAR_DIRTY_LOG";
    if (w.name.rfind("iteration", 0) == 0)
        return fmt::format("lazy split on the guest's write faults (pf_fixed {:+}, pf_fast {:+})",
                           delta(w.vcpus, "pf_fixed"), delta(w.vcpus, "pf_fast"));
    if (w.name.rfind("harvest", 0) == 0)
        return "split while the log was harvested";
    return "split";
}

}  // namespace

std::string page_table_summary(const PerfResult& r)
{
    if (r.windows.empty() || !r.windows.front().page_tables.available)
        return r.windows.empty() ? "not measured" : r.windows.front().page_tables.summary();
    std::string s;
    for (const auto& w : r.windows)
        if (std::any_of(w.page_tables.kib.begin(), w.page_tables.kib.end(), [](const auto& p) { return p.second != 0; }))
            s += fmt::format("{}{}: {}", s.empty() ? "" : "; ", w.name, w.page_tables.summary());
    return s.empty() ? "unchanged in every step" : s;
}

std::string split_expectation(const PerfResult& r)
{
    if (!r.eager.effective)
        return r.eager.note;
    const auto& o = r.opt;
    if (!o.ring_bytes && o.manual_protect && o.initially_set)
        return "eager split expected at the first KVM_CLEAR_DIRTY_LOG (manual protect + INITIALLY_SET: enabling "
               "write-protects nothing)";
    return "eager split expected when logging is enabled";
}

std::string split_summary(const PerfResult& r)
{
    const bool have = r.vm_stats_before.count("pages_2m") || r.vm_stats_before.count("pages_1g");
    if (!have)
        return "KVM reports no pages_2m/pages_1g stats here: splits cannot be seen";
    std::string s;
    for (const auto& w : r.windows) {
        const int64_t d2 = delta(w.vm, "pages_2m"), d1 = delta(w.vm, "pages_1g");
        if (d2 >= 0 && d1 >= 0)
            continue;
        s += fmt::format("{}{} ({}): pages_1g {:+} pages_2m {:+} pages_4k {:+}", s.empty() ? "" : "; ", w.name,
                         split_how(w), d1, d2, delta(w.vm, "pages_4k"));
    }
    if (!s.empty())
        return "huge mappings split in " + s;
    const uint64_t m2 = r.vm_stats_before.count("pages_2m") ? r.vm_stats_before.at("pages_2m") : 0;
    const uint64_t m1 = r.vm_stats_before.count("pages_1g") ? r.vm_stats_before.at("pages_1g") : 0;
    if (m2 == 0 && m1 == 0)
        return fmt::format("no huge mappings before logging (pages_2m 0, pages_1g 0): nothing to split{}",
                           r.eager.mmu == "shadow" ? " (the shadow MMU maps this guest with 4 KiB pages)" : "");
    return fmt::format("nothing split: pages_2m ({} before logging) and pages_1g ({}) went down in no window", m2,
                       m1);
}

std::string to_text(const PerfResult& r)
{
    const auto& o = r.opt;
    std::string s = fmt::format("minivmm dirty-log-perf: {} vCPUs x {}, {} iterations, write {}%, {} access, {} slot(s), "
                                "{} backing, {}\n",
                                o.vcpus, human_bytes(static_cast<double>(o.bytes_per_vcpu)), o.iterations, o.write_pct,
                                o.random ? "random" : "sequential", o.slots, backing_name(o.backing), r.mode);
    s += fmt::format("eager_page_split: {} (guest MMU: {}, {}): {}\n", r.eager.param.empty() ? "absent" : r.eager.param,
                     r.eager.mmu.empty() ? "?" : r.eager.mmu, r.eager.mmu_why, split_expectation(r));
    if (!r.eager_note.empty())
        s += r.eager_note + "\n";
    for (const auto& [slot, why] : r.untracked)
        s += fmt::format("slot {} not tracked: {}\n", slot, why);
    s += fmt::format("Populate memory time: {:.9f}s\n", r.populate_s);
    s += fmt::format("Pass before logging time: {:.9f}s\n", r.pass_before_s);
    s += fmt::format("Enabling dirty logging time: {:.9f}s (from {})\n", r.enable.wall_s, r.enable.enabled_from);
    for (const auto& st : r.enable.slots)
        s += fmt::format("  slot {} (vnode {}) enabled in {:.9f}s on CPU {}\n", st.slot, st.vnode, st.seconds, st.cpu);
    s += "\n";
    double get = 0, clear = 0;
    for (size_t i = 0; i < r.iterations.size(); i++) {
        const auto& it = r.iterations[i];
        s += fmt::format("Iteration {} dirty memory time: {:.9f}s\n", i + 1, it.dirty_s);
        s += fmt::format("Iteration {} get dirty log time: {:.9f}s\n", i + 1, it.get_s);
        s += fmt::format("Iteration {} clear dirty log time: {:.9f}s\n", i + 1, it.clear_s);
        s += fmt::format("Iteration {} dirty pages: {}{}\n", i + 1, it.dirty_pages,
                         it.ring_full_harvests ? fmt::format(" ({} ring-full harvests, {} entries, {} reset)",
                                                             it.ring_full_harvests, it.entries, it.reset)
                         : it.entries    ? fmt::format(" ({} entries, {} reset)", it.entries, it.reset)
                                         : "");
        get += it.get_s;
        clear += it.clear_s;
    }
    s += fmt::format("Disabling dirty logging time: {:.9f}s\n", r.disable.wall_s);
    const double n = static_cast<double>(std::max<size_t>(1, r.iterations.size()));
    s += fmt::format("Get dirty log over {} iterations took {:.9f}s. (Avg {:.9f}s/iteration)\n", r.iterations.size(),
                     get, get / n);
    s += fmt::format("Clear dirty log over {} iterations took {:.9f}s. (Avg {:.9f}s/iteration)\n", r.iterations.size(),
                     clear, clear / n);
    if (!r.iterations.empty() && r.pass_before_s > 0)
        s += fmt::format("First pass after enabling took {:.2f}x the pass before it ({:.6f}s vs {:.6f}s)\n",
                         r.iterations[0].dirty_s / r.pass_before_s, r.iterations[0].dirty_s, r.pass_before_s);
    s += "KVM stats per step (VM stats; vCPU stats summed):\n";
    for (const auto& w : r.windows)
        s += fmt::format("  {:<12}{} [{}]\n", w.name + ":", window_text(w), w.what);
    s += fmt::format("huge pages: {}\n", split_summary(r));
    s += fmt::format("KVM page tables (SecPageTables per host node): {}\n", page_table_summary(r));
    if (r.stamps)
        s += fmt::format("stamp check: {}\n", r.stamps->summary());
    if (r.failure)
        s += fmt::format("FAILED: {}\n", r.failure->reason);
    return s;
}

nlohmann::json to_json(const PerfResult& r)
{
    using nlohmann::json;
    const auto& o = r.opt;
    json j;
    j["config"] = {{"vcpus", o.vcpus},          {"bytes_per_vcpu", o.bytes_per_vcpu}, {"iterations", o.iterations},
                   {"write_pct", o.write_pct},  {"random", o.random},                 {"slots", o.slots},
                   {"backing", backing_name(o.backing)}, {"manual_protect", o.manual_protect},
                   {"initially_set", o.manual_protect && o.initially_set}, {"ring_bytes", o.ring_bytes},
                   {"clear_chunk_bytes", o.clear_chunk_bytes}, {"mode", r.mode}};
    j["eager_split"] = {{"eager_page_split", r.eager.param}, {"tdp_mmu", r.eager.tdp_mmu}, {"mmu", r.eager.mmu}, {"mmu_why", r.eager.mmu_why},
                        {"effective", r.eager.effective}, {"writable", r.eager.writable}, {"note", r.eager.note},
                        {"setting", r.eager_note}};
    j["populate_s"] = r.populate_s;
    j["pass_before_logging_s"] = r.pass_before_s;
    auto enable_json = [](const dirty::EnableReport& e) {
        json a = json::array();
        for (const auto& s : e.slots)
            a.push_back({{"slot", s.slot}, {"vnode", s.vnode}, {"seconds", s.seconds}, {"host_cpu", s.cpu}});
        return json{{"wall_s", e.wall_s}, {"slots", a}, {"enabled_from", e.enabled_from},
                    {"sec_page_tables", e.page_tables.json()}};
    };
    j["enable"] = enable_json(r.enable);
    j["disable"] = enable_json(r.disable);
    j["iterations"] = json::array();
    double get = 0, clear = 0;
    for (const auto& it : r.iterations) {
        j["iterations"].push_back({{"dirty_s", it.dirty_s},         {"get_s", it.get_s},
                                   {"clear_s", it.clear_s},         {"sync_s", it.sync_s},
                                   {"dirty_pages", it.dirty_pages}, {"ring_entries", it.entries},
                                   {"ring_reset", it.reset},        {"ring_full_harvests", it.ring_full_harvests},
                                   {"clear_calls", it.clear_calls}});
        get += it.get_s;
        clear += it.clear_s;
    }
    j["get_total_s"] = get;
    j["clear_total_s"] = clear;
    j["kvm_stats_before_logging"] = json::object();
    for (const char* k : {"pages_4k", "pages_2m", "pages_1g"})
        if (r.vm_stats_before.count(k))
            j["kvm_stats_before_logging"][k] = r.vm_stats_before.at(k);
    j["kvm_stats_windows"] = json::array();
    for (const auto& w : r.windows) {
        json vm = json::object(), vc = json::object();
        for (const auto& [k, v] : w.vm)
            vm[k] = v;
        for (const auto& [k, v] : w.vcpus)
            vc[k] = v;
        j["kvm_stats_windows"].push_back(
            {{"window", w.name}, {"what", w.what}, {"first_clear", w.first_clear}, {"vm", vm}, {"vcpus_sum", vc},
             {"sec_page_tables", w.page_tables.json()}});
    }
    j["huge_page_splits"] = split_summary(r);
    j["eager_split"]["expected"] = split_expectation(r);
    j["untracked_slots"] = json::array();
    for (const auto& [slot, why] : r.untracked)
        j["untracked_slots"].push_back({{"slot", slot}, {"why", why}});
    if (r.stamps)
        j["verify"] = {{"pages_checked", r.stamps->pages_checked}, {"mismatches", r.stamps->mismatches}};
    if (r.failure)
        j["failure"] = r.failure->reason;
    j["status"] = r.failure ? "failed" : "completed";
    return j;
}

}  // namespace mvm::engines
