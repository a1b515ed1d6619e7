// The numa-balancing report: the relations between variants, the table, the JSON.
#include <fmt/format.h>

#include "engines/numa_balancing.hpp"

namespace mvm::engines {

namespace {

// The figures compared between variants: how to read each, and its words.
struct Figure {
    const char* key;   // JSON name
    const char* what;  // "remote TLB flushes"
    int64_t (*get)(const BalancingVariant&);
};

const Figure kFigures[] = {
    {"remote_tlb_flush", "remote TLB flushes (remote_tlb_flush)",
     [](const BalancingVariant& v) { return v.vm_stat("remote_tlb_flush"); }},
    {"remote_tlb_flush_requests", "TLB flush requests (remote_tlb_flush_requests)",
     [](const BalancingVariant& v) { return v.vm_stat("remote_tlb_flush_requests"); }},
    {"pf_taken", "KVM page faults (pf_taken)", [](const BalancingVariant& v) { return v.vcpu_stat("pf_taken"); }},
    {"numa_pte_updates", "PTEs made PROT_NONE for hinting (numa_pte_updates, host-wide)",
     [](const BalancingVariant& v) { return v.hint("numa_pte_updates"); }},
    {"numa_hint_faults", "NUMA hinting faults (numa_hint_faults, host-wide)",
     [](const BalancingVariant& v) { return v.hint("numa_hint_faults"); }},
    {"numa_pages_migrated", "pages migrated (numa_pages_migrated, host-wide)",
     [](const BalancingVariant& v) { return v.hint("numa_pages_migrated"); }},
    {"pages_written", "pages written by the guest",
     [](const BalancingVariant& v) { return static_cast<int64_t>(v.pages_written()); }},
};

const BalancingVariant* find(const std::vector<BalancingVariant>& vs, bool on, bool bound)
{
    for (const auto& v : vs)
        if (v.balancing == on && v.bound == bound && v.run)
            return &v;
    return nullptr;
}

nlohmann::json figures_json(const BalancingVariant& v)
{
    nlohmann::json j;
    for (const auto& f : kFigures)
        j[f.key] = f.get(v);
    j["pf_fixed"] = v.vcpu_stat("pf_fixed");
    j["numa_hint_faults_local"] = v.hint("numa_hint_faults_local");
    j["max_stall_ms"] = v.max_stall_ms();
    j["watchdog_events"] = v.watchdog_events();
    j["mismatches"] = v.mismatches();
    return j;
}

}  // namespace

std::vector<std::string> balancing_relations(const std::vector<BalancingVariant>& vs)
{
    std::vector<std::string> out;
    for (bool bound : {false, true}) {
        const auto *on = find(vs, true, bound), *off = find(vs, false, bound);
        if (!on || !off)
            continue;
        const char* b = bound ? "bound" : "unbound";
        for (const auto& f : kFigures)
            out.push_back(fmt::format("balancing on, {}: {} {} vs {} with it off", b, f.get(*on), f.what, f.get(*off)));
        out.push_back(fmt::format("balancing on, {}: longest guest stall {:.1f} ms vs {:.1f} ms with it off", b,
                                  on->max_stall_ms(), off->max_stall_ms()));
    }
    const auto *bound = find(vs, true, true), *unbound = find(vs, true, false);
    if (bound && unbound)
        for (const auto& f : kFigures)
            out.push_back(fmt::format("balancing on: {} {} with memory bound vs {} unbound", f.get(*bound), f.what,
                                      f.get(*unbound)));
    return out;
}

nlohmann::json to_json(const NumaBalancingReport& r)
{
    nlohmann::json j;
    j["status"] = r.status();
    j["numa_balancing"] = {{"sysctl", r.sysctl_path}, {"before", r.setting_before}, {"after", r.setting_after},
                           {"written", r.sysctl_written}};
    j["host_nodes"] = r.host_nodes;
    j["scan"] = r.scan_notes;
    j["variants"] = nlohmann::json::array();
    for (const auto& v : r.variants) {
        nlohmann::json e = {{"variant", v.name()}, {"balancing", v.balancing}, {"bound", v.bound}};
        if (!v.skipped.empty())
            e["skipped"] = v.skipped;
        if (v.run) {
            e["policies"] = v.policies;
            e["figures"] = figures_json(v);
            e["vmstat"] = v.vmstat;
            e["vcpus_sum"] = v.vcpus_sum;
            e["run"] = to_json(*v.run);
        }
        j["variants"].push_back(std::move(e));
    }
    j["relations"] = r.relations;
    return j;
}

std::string to_table(const NumaBalancingReport& r)
{
    std::string o = fmt::format("minivmm numa-balancing: {} host NUMA node(s), {} was {}\n", r.host_nodes,
                                r.sysctl_path, r.setting_before);
    for (const auto& n : r.scan_notes)
        o += "  " + n + "\n";
    if (const BalancingVariant* first = !r.variants.empty() && r.variants[0].run ? &r.variants[0] : nullptr)
        o += fmt::format("guest: {} vCPUs, {} MiB {}, {:.1f} s per variant\n", first->run->nr_vcpus,
                         first->run->mem_bytes >> 20, first->run->backing, first->run->duration_s);
    o += fmt::format("\n{:<14} {:<16} {:>9} {:>9} {:>9} {:>9} {:>12} {:>9} {:>5} {:>10} {:>10} {:>9} {:>5}\n",
                     "variant", "memory policy", "tlb flush", "flush req", "pf_taken", "pf_fixed", "pages wrtn", "stall ms", "wd", "pte upd",
                     "hint flt", "migrated", "mism");
    for (const auto& v : r.variants) {
        if (!v.run) {
            o += fmt::format("{:<14} skipped: {}\n", v.name(), v.skipped);
            continue;
        }
        o += fmt::format("{:<14} {:<16} {:>9} {:>9} {:>9} {:>9} {:>12} {:>9.1f} {:>5} {:>10} {:>10} {:>9} {:>5}\n",
                         v.name(), v.policies, v.vm_stat("remote_tlb_flush"), v.vm_stat("remote_tlb_flush_requests"), v.vcpu_stat("pf_taken"),
                         v.vcpu_stat("pf_fixed"), v.pages_written(), v.max_stall_ms(), v.watchdog_events(),
                         v.hint("numa_pte_updates"), v.hint("numa_hint_faults"), v.hint("numa_pages_migrated"),
                         v.mismatches());
        if (v.run->failure)
            o += fmt::format("  FAILED: {}\n", v.run->failure->reason);
    }
    if (!r.relations.empty()) {
        o += "\n";
        for (const auto& l : r.relations)
            o += l + "\n";
    }
    if (!r.sysctl_written)
        o += fmt::format("\n{}: never written (every variant that ran wanted its {}); it is {}\n", r.sysctl_path,
                         r.setting_before, r.setting_after);
    else
        o += fmt::format("\n{} {}: {} (was {})\n", r.sysctl_path,
                         r.setting_after == r.setting_before ? "restored" : "NOT restored", r.setting_after,
                         r.setting_before);
    if (r.interrupted)
        o += "interrupted: stopped cleanly on signal\n";
    return o;
}

}  // namespace mvm::engines
