#include "engines/run_report.hpp"

#include <algorithm>
#include <fmt/format.h>

#include "base/units.hpp"

namespace mvm::engines {

StatsBaseline read_stats(const StressVm& m)
{
    StatsBaseline b;
    b.vm = m.vm_stats();
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        b.vcpus.push_back(m.vcpu_stats(i));
    return b;
}

RunReport collect_report(const StressVm& m, const StatsBaseline& before, double duration_s)
{
    RunReport r;
    const auto& cfg = m.config();
    r.duration_s = duration_s;
    r.nr_vcpus = m.vcpu_count();
    for (const auto& n : cfg.nodes) {
        r.mem_bytes += n.mem_bytes;
        if (r.backing.find(backing_name(n.backing)) == std::string::npos)
            r.backing += (r.backing.empty() ? "" : ",") + std::string(backing_name(n.backing));
    }
    r.access = to_string(cfg.access);
    for (size_t i = 0; i < cfg.nodes.size(); i++) {
        const NodeConfig& n = cfg.nodes[i];
        std::vector<int> v(n.vcpus.begin(), n.vcpus.end());
        r.vnodes.push_back({n.id, m.layout().ram[i].gpa, n.mem_bytes, std::string(backing_name(n.backing)),
                            numa::to_string(n.host_policy), numa::format_cpu_list(v), numa::format_cpu_list(n.host_cpus),
                            n.prealloc});
    }
    r.pattern = cfg.workload.pattern == MVM_PATTERN_RANDOM ? "random" : "seq";
    r.fill = fill_name(cfg.workload);
    r.write_pct = cfg.workload.write_pct;
    r.watchdog_ms = cfg.workload.watchdog_ms;
    const double tsc_per_ms = static_cast<double>(m.tsc_khz());
    for (uint32_t i = 0; i < m.vcpu_count(); i++) {
        auto s = m.snapshot(i);
        VcpuReport v;
        v.id = i;
        v.vnode = m.vcpu_params(i).vnode;
        v.pages_written = s.pages_written;
        v.pages_read = s.pages_read;
        v.passes = s.passes;
        double run_ms = s.last_tsc > s.start_tsc ? static_cast<double>(s.last_tsc - s.start_tsc) / tsc_per_ms : 0;
        uint64_t touched = s.pages_written + s.pages_read;
        v.pages_per_s = run_ms > 0 ? static_cast<double>(touched) / run_ms * 1000 : 0;
        if (s.warm_tsc && s.last_tsc > s.warm_tsc) {
            double warm_ms = static_cast<double>(s.last_tsc - s.warm_tsc) / tsc_per_ms;
            v.warm_pages_per_s = static_cast<double>(s.pages_written - s.warm_pages) / warm_ms * 1000;
        }
        v.max_stall_ms = static_cast<double>(s.wd_max_gap_tsc) / tsc_per_ms;
        v.watchdog_events = s.wd_events;
        for (const auto& ev : watchdog_events(*m.mailbox(i), s.wd_events))
            v.events.push_back({static_cast<double>(ev.start_tsc - s.start_tsc) / tsc_per_ms,
                                static_cast<double>(ev.len_tsc) / tsc_per_ms});
        v.exits = m.exits(i);
        v.kicks = m.kicks(i);
        r.vcpus.push_back(v);
        if (i < before.vcpus.size())
            r.vcpu_stats.push_back(stat_delta(before.vcpus[i], m.vcpu_stats(i)));
    }
    r.vm_stats = stat_delta(before.vm, m.vm_stats());
    r.failure = m.failure();
    return r;
}

static nlohmann::json stats_json(const StatDelta& d)
{
    nlohmann::json j = nlohmann::json::object();
    for (const auto& [k, v] : d)
        j[k] = v;
    return j;
}

nlohmann::json to_json(const RunReport& r)
{
    nlohmann::json j;
    j["duration_s"] = r.duration_s;
    j["config"] = {{"vcpus", r.nr_vcpus}, {"mem_bytes", r.mem_bytes}, {"backing", r.backing}, {"pattern", r.pattern},
                   {"fill", r.fill},      {"write_pct", r.write_pct}, {"watchdog_ms", r.watchdog_ms},
                   {"access", r.access}};
    j["vnodes"] = nlohmann::json::array();
    for (const auto& n : r.vnodes)
        j["vnodes"].push_back({{"vnode", n.id},
                               {"gpa", n.gpa},
                               {"bytes", n.bytes},
                               {"backing", n.backing},
                               {"policy", n.policy},
                               {"vcpus", n.vcpus},
                               {"host_cpus", n.host_cpus},
                               {"prealloc", n.prealloc}});
    j["vcpus"] = nlohmann::json::array();
    for (const auto& v : r.vcpus) {
        nlohmann::json e = {{"vcpu", v.id},
                            {"vnode", v.vnode},
                            {"pages_written", v.pages_written},
                            {"pages_read", v.pages_read},
                            {"passes", v.passes},
                            {"pages_per_s", v.pages_per_s},
                            {"warm_pages_per_s", v.warm_pages_per_s},
                            {"max_stall_ms", v.max_stall_ms},
                            {"watchdog_events", v.watchdog_events},
                            // KVM_RUN returns to this VMM; KVM's own "exits" stat
                            // (kvm_stats) counts every VM exit, most handled in the kernel
                            {"userspace_exits", v.exits},
                            {"kicks", v.kicks}};
        e["events"] = nlohmann::json::array();
        for (const auto& ev : v.events)
            e["events"].push_back({{"at_ms", ev.at_ms}, {"len_ms", ev.len_ms}});
        j["vcpus"].push_back(e);
    }
    j["kvm_stats"]["vm"] = stats_json(r.vm_stats);
    j["kvm_stats"]["vcpus"] = nlohmann::json::array();
    for (size_t i = 0; i < r.vcpu_stats.size(); i++) {
        nlohmann::json s = stats_json(r.vcpu_stats[i]);
        s["vcpu"] = i;
        j["kvm_stats"]["vcpus"].push_back(std::move(s));
    }
    if (r.stamps)
        j["verify"] = {{"pages_checked", r.stamps->pages_checked},
                       {"mismatches", r.stamps->mismatches},
                       {"foreign", r.stamps->foreign}};
    if (r.failure)
        j["failure"] = {{"vcpu", r.failure->vcpu},
                        {"reason", r.failure->reason},
                        {"vector", r.failure->vector},
                        {"error_code", r.failure->error_code},
                        {"rip", r.failure->fault_rip},
                        {"cr2", r.failure->cr2},
                        {"registers", r.failure->register_dump}};
    j["status"] = r.failure ? "failed" : (r.interrupted ? "interrupted" : "completed");
    return j;
}

static std::string rate(double pages_per_s)
{
    return pages_per_s >= 1e6 ? fmt::format("{:.1f}M", pages_per_s / 1e6) : fmt::format("{:.0f}K", pages_per_s / 1e3);
}

std::string to_table(const RunReport& r)
{
    std::string out = fmt::format("minivmm run: {} vCPUs, {} {} memory, pattern {}, fill {}, write {}%, {:.2f} s\n\n",
                                  r.nr_vcpus, human_bytes(static_cast<double>(r.mem_bytes)), r.backing, r.pattern,
                                  r.fill, r.write_pct, r.duration_s);
    if (r.vnodes.size() > 1 || r.access != "local" || (!r.vnodes.empty() && r.vnodes[0].policy != "default"))
        for (const auto& n : r.vnodes)
            out += fmt::format("vnode {}: {} {} at GPA {:#x}, host policy {}, vCPUs {}, {}{}\n", n.id,
                               human_bytes(static_cast<double>(n.bytes)), n.backing, n.gpa, n.policy,
                               n.vcpus.empty() ? "none" : n.vcpus,
                               n.host_cpus.empty() ? "unpinned" : "pinned to host CPUs " + n.host_cpus,
                               n.prealloc ? ", preallocated" : "");
    if (r.access != "local")
        out += fmt::format("access: {} (vCPUs also work in the next node's memory)\n", r.access);
    if (out.back() == '\n' && out[out.size() - 2] != '\n')
        out += "\n";
    out += fmt::format("{:>5} {:>5} {:>14} {:>10} {:>12} {:>12} {:>14} {:>9}\n", "vCPU", "vnode", "pages written",
                       "passes", "pages/s", "warm pg/s", "max stall ms", "wd events");
    for (const auto& v : r.vcpus)
        out += fmt::format("{:>5} {:>5} {:>14} {:>10} {:>12} {:>12} {:>14.2f} {:>9}\n", v.id, v.vnode, v.pages_written,
                           v.passes, rate(v.pages_per_s), rate(v.warm_pages_per_s), v.max_stall_ms, v.watchdog_events);
    // Watchdog events: like "soft lockup - CPU#n stuck for Ns", newest few per vCPU.
    for (const auto& v : r.vcpus) {
        size_t shown = 0;
        for (auto it = v.events.rbegin(); it != v.events.rend() && shown < 3; ++it, ++shown)
            out += fmt::format("  watchdog: vCPU {} made no progress for {:.1f} ms at +{:.1f} ms (threshold {} ms)\n",
                               v.id, it->len_ms, it->at_ms, r.watchdog_ms);
    }

    // KVM stats deltas: the ones this tool's users ask about first.
    static const char* kVcpuKeys[] = {"exits",    "insn_emulation", "insn_emulation_fail", "mmio_exits", "io_exits",
                                      "pf_taken", "pf_fixed",       "pf_emulate",          "pf_spurious", "pf_fast",
                                      "pf_mmio_spte_created", "pf_guest", "halt_exits", "signal_exits"};
    static const char* kVmKeys[] = {"pages_4k", "pages_2m", "pages_1g", "mmu_shadow_zapped", "mmu_pte_write",
                                    "mmu_recycled", "mmu_cache_miss", "mmu_unsync", "remote_tlb_flush", "lpages"};
    out += "\nKVM stats (delta over the run)\n";
    out += fmt::format("{:<24}", "vCPU stat");
    for (const auto& v : r.vcpus)
        out += fmt::format(" {:>12}", fmt::format("vcpu{}", v.id));
    out += "\n";
    for (const char* k : kVcpuKeys) {
        bool present = false;
        for (const auto& d : r.vcpu_stats)
            present |= d.count(k) > 0;
        if (!present)
            continue;
        out += fmt::format("{:<24}", k);
        for (const auto& d : r.vcpu_stats) {
            auto it = d.find(k);
            out += fmt::format(" {:>12}", it == d.end() ? 0 : it->second);
        }
        out += "\n";
    }
    for (const char* k : kVmKeys)
        if (auto it = r.vm_stats.find(k); it != r.vm_stats.end())
            out += fmt::format("{:<24} {:>12}  (VM)\n", k, it->second);
    if (r.stamps)
        out += fmt::format("\nstamp check: {}\n", r.stamps->summary());
    if (r.failure)
        out += fmt::format("\nFAILED: {}\n{}\n", r.failure->reason, r.failure->register_dump);
    else if (r.interrupted)
        out += "\ninterrupted: stopped cleanly on signal\n";
    return out;
}

StatDelta sum_vcpu_stats(const std::vector<StatSnapshot>& before, const StressVm& m)
{
    StatDelta sum;
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        for (const auto& [k, v] : stat_delta(before[i], m.vcpu_stats(i)))
            sum[k] += v;
    return sum;
}

}  // namespace mvm::engines
