#include "engines/numa_check.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <fmt/format.h>
#include <fstream>
#include <map>

#include "base/error.hpp"
#include "vmm/dirty/eager_split.hpp"
#include "engines/run.hpp"
#include "base/units.hpp"

namespace mvm::engines {

namespace {

std::string read_sysctl(const char* path)
{
    std::ifstream f(path);
    std::string v;
    if (!(f >> v))
        return "unavailable";
    return v;
}

std::vector<int> expected_nodes(const numa::NodePolicy& p)
{
    return p.policy == numa::Policy::Default ? std::vector<int>{} : p.nodes;
}

std::string list_or(const std::vector<int>& v, const char* empty)
{
    return v.empty() ? empty : numa::format_cpu_list(v);
}

}  // namespace

bool NumaCheckReport::placement_ok() const
{
    return std::all_of(nodes.begin(), nodes.end(), [](const auto& n) { return !n.bad_range; });
}

bool NumaCheckReport::affinity_ok() const
{
    return std::all_of(vcpus.begin(), vcpus.end(), [](const auto& v) { return v.ok; });
}

std::string NumaCheckReport::first_offender() const
{
    for (const auto& n : nodes)
        if (n.bad_range)
            return fmt::format("vnode {}: GPA {:#x}-{:#x} ({}) is {}, policy {}", n.vnode, n.bad_range->first,
                               n.bad_range->first + n.bad_range->second - 1, human_bytes(n.bad_range->second),
                               n.bad_reason, n.policy);
    return {};
}

std::string numa_balancing_advice(const std::string& setting, const MachineConfig& cfg)
{
    if (setting == "unavailable")
        return "kernel without NUMA balancing: nothing moves guest pages behind the policies' back";
    if (setting == "0")
        return "off: nothing migrates guest pages; placement stays where the policies put it (what VM hosts want)";
    bool all_bound = std::all_of(cfg.nodes.begin(), cfg.nodes.end(),
                                 [](const NodeConfig& n) { return n.host_policy.policy == numa::Policy::Bind; });
    if (all_bound)
        return "on, but every node is bound (MPOL_BIND): balancing will not move these pages, yet its hinting faults "
               "still unmap guest memory and make vCPUs refault; on VM hosts prefer sysctl kernel.numa_balancing=0";
    return "on: it will migrate this VM's unbound pages, and every hinting fault is an MMU-notifier invalidation the "
           "vCPUs refault on; bind each node (host-nodes=N,policy=bind) and pin vCPUs, or disable it with "
           "sysctl kernel.numa_balancing=0";
}

std::vector<int> policy_nodes(const NodeConfig& node) { return expected_nodes(node.host_policy); }

namespace {

// Where vCPU `v`'s thread may run and where it does, read while it exists.
VcpuPlacementReport vcpu_placement(const StressVm& m, uint32_t v)
{
    VcpuThreadInfo info = m.vcpu_thread_info(v);
    VcpuPlacementReport vr;
    vr.vcpu = v;
    vr.vnode = m.vcpu_params(v).vnode;
    vr.tid = info.tid;
    try {
        vr.affinity = numa::task_cpus(info.tid);
    } catch (const std::exception&) {
        vr.affinity = info.affinity;  // the thread already ended
    }
    for (const auto& n : m.config().nodes)
        if (n.id == vr.vnode)
            vr.expected = n.host_cpus;
    vr.mempolicy = numa::to_string(info.mempolicy);
    vr.ok = vr.expected.empty() || vr.affinity == vr.expected;
    return vr;
}

// The share of queried pages on an expected host node, and the first range
// that is not (misplaced before absent, whichever comes first).
void judge_placement(NodePlacementReport& nr)
{
    const auto& pl = nr.placement;
    nr.on_policy_pct = numa::on_policy_pct(pl, nr.expected_nodes);
    if (pl.first_unexpected_offset != ~uint64_t{0} &&
        (pl.first_not_present_offset == ~uint64_t{0} || pl.first_unexpected_offset < pl.first_not_present_offset)) {
        nr.bad_range = {nr.gpa + pl.first_unexpected_offset, pl.first_unexpected_len};
        nr.bad_reason = fmt::format("on host node {}", pl.first_unexpected_node);
    } else if (pl.first_not_present_offset != ~uint64_t{0}) {
        nr.bad_range = {nr.gpa + pl.first_not_present_offset, pl.first_not_present_len};
        nr.bad_reason = "not present (never faulted in)";
    }
}

// Where virtual node `i`'s memory is, queried with move_pages.
NodePlacementReport node_placement(const StressVm& m, size_t i, const NumaCheckOptions& opt, const PlacementJudge& judge)
{
    const NodeConfig& node = m.config().nodes[i];
    const Backing& b = m.node_backing(i);
    NodePlacementReport nr;
    nr.vnode = node.id;
    nr.backing = backing_name(node.backing);
    nr.policy = numa::to_string(node.host_policy);
    nr.gpa = m.layout().ram[i].gpa;
    nr.bytes = b.size();
    nr.query_page_bytes = b.page_size();
    nr.expected_nodes = judge(node);
    for (const auto& p : m.prealloc_results())
        if (p.name == fmt::format("node{}", node.id))
            nr.prealloc_s = p.seconds;
    b.map_for_query();
    nr.placement = numa::query_placement(b.host(), b.size(), nr.query_page_bytes, nr.expected_nodes, opt.sample_pages,
                                           /*split_kinds=*/true);
    judge_placement(nr);
    return nr;
}


// Queried pages as a share of all queried pages of the node, in %.
double share_pct(const NodePlacementReport& n, uint64_t pages)
{
    return n.placement.pages_queried ? 100.0 * static_cast<double>(pages) / n.placement.pages_queried : 0.0;
}

// Bytes that `pages` queried pages stand for: exact when every page was
// queried, else the node's size times their share (an estimate).
uint64_t placed_bytes(const NodePlacementReport& n, uint64_t pages)
{
    if (!n.placement.sampled)
        return pages * n.query_page_bytes;
    return n.placement.pages_queried ? static_cast<uint64_t>(static_cast<double>(n.bytes) * pages /
                                                             n.placement.pages_queried)
                                     : 0;
}

struct KindBytes {
    uint64_t huge = 0, thp = 0, base = 0;
    uint64_t total() const { return huge + thp + base; }
};

// numastat -p's view: per host node, huge (hugetlb), THP and base-page bytes
// of every virtual node together.
std::map<int, KindBytes> host_node_totals(const NumaCheckReport& r)
{
    std::map<int, KindBytes> t;
    for (const auto& n : r.nodes)
        for (const auto& [hn, k] : n.placement.kinds_per_node) {
            t[hn].huge += placed_bytes(n, k.huge);
            t[hn].thp += placed_bytes(n, k.thp);
            t[hn].base += placed_bytes(n, k.small);
        }
    return t;
}

std::string kinds_error(const NumaCheckReport& r)
{
    for (const auto& n : r.nodes)
        if (!n.placement.kinds_error.empty())
            return n.placement.kinds_error;
    return "";
}

nlohmann::json host_node_totals_json(const NumaCheckReport& r)
{
    nlohmann::json j = {{"estimated", r.sampled}};
    if (auto why = kinds_error(r); !why.empty())
        j["error"] = why;
    nlohmann::json per = nlohmann::json::object();
    KindBytes all;
    for (const auto& [hn, k] : host_node_totals(r)) {
        per[std::to_string(hn)] = {
            {"huge_bytes", k.huge}, {"thp_bytes", k.thp}, {"base_bytes", k.base}, {"total_bytes", k.total()}};
        all.huge += k.huge, all.thp += k.thp, all.base += k.base;
    }
    j["per_host_node"] = per;
    j["total"] = {{"huge_bytes", all.huge}, {"thp_bytes", all.thp}, {"base_bytes", all.base}, {"total_bytes", all.total()}};
    return j;
}

// Rows huge / THP / 4K / total, one column per host node and a total column.
std::string host_node_table(const NumaCheckReport& r)
{
    if (r.nodes.empty())
        return "";
    if (auto why = kinds_error(r); !why.empty())
        return fmt::format("\nper host node by page kind: unavailable ({})\n", why);
    const auto t = host_node_totals(r);
    std::string o = fmt::format("\nper host node by page kind, as numastat -p splits it (MiB{}):\n{:<12}",
                                r.sampled ? "; estimated from the sample" : "", "");
    for (const auto& [hn, k] : t)
        o += fmt::format(" {:>10}", fmt::format("Node {}", hn));
    o += fmt::format(" {:>10}\n", "Total");
    auto row = [&](const char* name, uint64_t KindBytes::*field) {
        uint64_t sum = 0;
        o += fmt::format("{:<12}", name);
        for (const auto& [hn, k] : t) {
            const uint64_t v = field ? k.*field : k.total();
            sum += v;
            o += fmt::format(" {:>10.1f}", static_cast<double>(v) / (1 << 20));
        }
        o += fmt::format(" {:>10.1f}\n", static_cast<double>(sum) / (1 << 20));
    };
    row("Huge", &KindBytes::huge);
    row("THP", &KindBytes::thp);
    row("4K", &KindBytes::base);
    row("Total", nullptr);
    return o;
}

}  // namespace

void check_enable_logging(const std::string& v)
{
    if (v.empty() || v == "per-node" || v == "unbound")
        return;
    if (v.rfind("host-node:", 0) == 0) {
        const std::string n = v.substr(10);
        if (!n.empty() && n.size() < 4 && n.find_first_not_of("0123456789") == std::string::npos) {
            if (!numa::host_topology().node(std::stoi(n)))
                throw UsageError(fmt::format("--enable-logging: host node {} does not exist on this host (see `minivmm "
                                             "caps`)",
                                             n));
            return;
        }
    }
    throw UsageError(fmt::format("--enable-logging: '{}' is not per-node, unbound or host-node:N", v));
}

namespace {

// Enables dirty logging once (bitmap, GET clears: an eager split happens at
// enable) from where `opt` says, measures, and disables it again.
LoggingEnableCheck logging_enable_check(StressVm& m, const NumaCheckOptions& opt)
{
    LoggingEnableCheck c;
    c.requested = opt.enable_logging;
    dirty::EagerSplitSetting eager(opt.eager_split);
    c.eager_note = eager.note();
    const dirty::EagerSplitInfo info = dirty::eager_split_info();
    c.eager_effective = info.effective;
    if (c.eager_note.empty())
        c.eager_note = fmt::format("eager_page_split={}: {}", info.param.empty() ? "absent" : info.param, info.note);
    dirty::TrackerOptions to;
    to.mode = dirty::Mode::Bitmap;
    to.manual_protect = false;
    to.per_node_enable = opt.enable_logging == "per-node";
    if (opt.enable_logging.rfind("host-node:", 0) == 0)
        to.enable_host_node = std::stoi(opt.enable_logging.substr(10));
    auto tracker = dirty::Tracker::create(m, to);
    c.untracked = tracker->untracked_slots();
    const StatSnapshot vm0 = m.vm_stats();
    const dirty::EnableReport e = tracker->enable();
    c.vm = stat_delta(vm0, m.vm_stats());
    c.from = e.enabled_from;
    c.slots = e.slots;
    c.page_tables = e.page_tables;
    tracker->disable();
    return c;
}

}  // namespace

NumaCheckReport numa_check(StressVm& m, const NumaCheckOptions& opt, const PlacementJudge& judge)
{
    using clock = std::chrono::steady_clock;
    const MachineConfig& cfg = m.config();
    NumaCheckReport r;
    r.access = to_string(cfg.access);
    r.numa_balancing = read_sysctl("/proc/sys/kernel/numa_balancing");
    r.advice = numa_balancing_advice(r.numa_balancing, cfg);

    // One pass over every page (the caller set max_passes = 1, write 100%).
    RunOptions ro;
    ro.duration_s = 0;
    ro.progress = opt.progress;
    ro.verify = true;
    // Affinity is read while the vCPU threads still exist.
    ro.on_tick = [&](double) {
        if (r.vcpus.empty())
            for (uint32_t v = 0; v < m.vcpu_count(); v++)
                r.vcpus.push_back(vcpu_placement(m, v));
    };
    const numa::NodeKib pt0 = numa::secondary_page_tables();
    m.start();
    ro.on_tick(0);
    auto t0 = clock::now();
    RunReport run = run_workload(m, ro);
    r.touch_s = std::chrono::duration<double>(clock::now() - t0).count();
    r.touch_page_tables = numa::secondary_page_tables() - pt0;
    r.stamps = run.stamps;
    r.failure = run.failure;
    r.interrupted = run.interrupted;
    if (r.failure || r.interrupted)
        return r;

    auto c0 = clock::now();
    for (size_t i = 0; i < cfg.nodes.size(); i++) {
        NodePlacementReport nr = node_placement(m, i, opt, judge);
        r.sampled |= nr.placement.sampled;
        r.checked_bytes += nr.placement.pages_queried * nr.query_page_bytes;
        r.nodes.push_back(std::move(nr));
    }
    r.check_s = std::chrono::duration<double>(clock::now() - c0).count();
    if (!opt.enable_logging.empty())
        r.logging = logging_enable_check(m, opt);
    return r;
}

namespace {

int64_t stat_or_0(const StatDelta& d, const char* k)
{
    auto it = d.find(k);
    return it == d.end() ? 0 : it->second;
}

nlohmann::json untracked_json(const std::vector<std::pair<uint32_t, std::string>>& untracked)
{
    nlohmann::json j = nlohmann::json::array();
    for (const auto& [slot, why] : untracked)
        j.push_back({{"slot", slot}, {"why", why}});
    return j;
}

nlohmann::json logging_json(const LoggingEnableCheck& c)
{
    nlohmann::json slots = nlohmann::json::array();
    for (const auto& s : c.slots)
        slots.push_back({{"slot", s.slot}, {"vnode", s.vnode}, {"host_cpu", s.cpu}, {"seconds", s.seconds}});
    nlohmann::json vm = nlohmann::json::object();
    for (const char* k : {"pages_4k", "pages_2m", "pages_1g"})
        if (c.vm.count(k))
            vm[k] = c.vm.at(k);
    return {{"requested", c.requested},     {"enabled_from", c.from}, {"eager_split", c.eager_note},
            {"eager_effective", c.eager_effective}, {"slots", slots}, {"vm", vm},
            {"sec_page_tables", c.page_tables.json()}, {"untracked_slots", untracked_json(c.untracked)}};
}

std::string logging_text(const LoggingEnableCheck& c)
{
    std::string cpus;
    for (const auto& s : c.slots)
        if (s.vnode >= 0)
            cpus += fmt::format("{}vnode {} on CPU {}", cpus.empty() ? "" : ", ", s.vnode, s.cpu);
    std::string out = fmt::format("dirty logging enabled from {}{}; {}\n  over the enable: pages_2m {:+} pages_1g {:+} "
                                  "pages_4k {:+}; KVM page tables (SecPageTables) {}\n",
                                  c.from, cpus.empty() ? "" : " (" + cpus + ")", c.eager_note,
                                  stat_or_0(c.vm, "pages_2m"), stat_or_0(c.vm, "pages_1g"), stat_or_0(c.vm, "pages_4k"),
                                  c.page_tables.summary());
    for (const auto& [slot, why] : c.untracked)
        out += fmt::format("  slot {} not logged: {}\n", slot, why);
    return out;
}

}  // namespace

nlohmann::json to_json(const NumaCheckReport& r)
{
    using nlohmann::json;
    json j;
    j["status"] = r.failure ? "failed" : r.interrupted ? "interrupted" : "completed";
    j["ok"] = r.placement_ok() && !r.failure && !r.interrupted;
    j["placement_ok"] = r.placement_ok();
    j["affinity_ok"] = r.affinity_ok();
    j["access"] = r.access;
    j["numa_balancing"] = {{"setting", r.numa_balancing}, {"advice", r.advice}};
    j["touch_s"] = r.touch_s;
    j["check_s"] = r.check_s;
    j["checked_bytes"] = r.checked_bytes;
    j["sampled"] = r.sampled;
    j["check_gib_per_s"] = r.check_s > 0 ? static_cast<double>(r.checked_bytes) / (1ull << 30) / r.check_s : 0;
    json nodes = json::array();
    for (const auto& n : r.nodes) {
        json pages = json::object(), share = json::object(), bytes = json::object(), kinds = json::object();
        for (const auto& [hn, count] : n.placement.pages_per_node) {
            const std::string key = std::to_string(hn);
            pages[key] = count;
            share[key] = share_pct(n, count);
            bytes[key] = placed_bytes(n, count);
        }
        for (const auto& [hn, k] : n.placement.kinds_per_node)
            kinds[std::to_string(hn)] = {{"huge_bytes", placed_bytes(n, k.huge)},
                                         {"thp_bytes", placed_bytes(n, k.thp)},
                                         {"base_bytes", placed_bytes(n, k.small)}};
        json jn = {{"vnode", n.vnode},
                   {"backing", n.backing},
                   {"policy", n.policy},
                   {"gpa", n.gpa},
                   {"bytes", n.bytes},
                   {"expected_host_nodes", n.expected_nodes},
                   {"pages_per_host_node", pages},
                   {"share_per_host_node_pct", share},
                   {n.placement.sampled ? "estimated_bytes_per_host_node" : "bytes_per_host_node", bytes},
                   {"kinds_per_host_node", kinds},
                   {"pages_queried", n.placement.pages_queried},
                   {"pages_total", n.placement.pages_total},
                   {"page_bytes", n.query_page_bytes},
                   {"pages_not_present", n.placement.pages_not_present},
                   {"sampled", n.placement.sampled},
                   {"on_policy_pct", n.on_policy_pct}};
        if (n.bad_range)
            jn["first_offending_range"] = {{"gpa", n.bad_range->first}, {"bytes", n.bad_range->second}, {"why", n.bad_reason}};
        if (n.prealloc_s)
            jn["prealloc_s"] = *n.prealloc_s;
        nodes.push_back(jn);
    }
    j["vnodes"] = nodes;
    j["host_nodes"] = host_node_totals_json(r);
    json vcpus = json::array();
    for (const auto& v : r.vcpus)
        vcpus.push_back({{"vcpu", v.vcpu},
                         {"vnode", v.vnode},
                         {"tid", v.tid},
                         {"affinity", numa::format_cpu_list(v.affinity)},
                         {"expected", list_or(v.expected, "any")},
                         {"mempolicy", v.mempolicy},
                         {"ok", v.ok}});
    j["vcpus"] = vcpus;
    j["touch_sec_page_tables"] = r.touch_page_tables.json();
    if (r.logging)
        j["logging_enable"] = logging_json(*r.logging);
    if (r.stamps)
        j["stamps"] = {{"pages_checked", r.stamps->pages_checked}, {"mismatches", r.stamps->mismatches}};
    if (r.failure)
        j["failure"] = r.failure->reason;
    if (!r.placement_ok())
        j["first_offender"] = r.first_offender();
    return j;
}

std::string to_table(const NumaCheckReport& r)
{
    std::string o;
    o += fmt::format("{:>5}  {:<10} {:<14} {:>10}  {:<28} {:>10}  {:>8}\n", "vnode", "backing", "policy", "size",
                     "on host nodes", "on policy", "prealloc");
    for (const auto& n : r.nodes) {
        std::string where;
        for (const auto& [hn, pages] : n.placement.pages_per_node)
            where += n.placement.sampled
                         ? fmt::format("{}n{}: {:.1f}% (~{})", where.empty() ? "" : ", ", hn, share_pct(n, pages),
                                       human_bytes(placed_bytes(n, pages)))
                         : fmt::format("{}n{}: {:.1f} MiB", where.empty() ? "" : ", ", hn,
                                       static_cast<double>(placed_bytes(n, pages)) / (1 << 20));
        if (n.placement.pages_not_present)
            where += fmt::format("{}absent: {:.1f} MiB", where.empty() ? "" : ", ",
                                 static_cast<double>(n.placement.pages_not_present * n.query_page_bytes) / (1 << 20));
        o += fmt::format("{:>5}  {:<10} {:<14} {:>10}  {:<28} {:>9.2f}%  {:>8}\n", n.vnode, n.backing, n.policy,
                         human_bytes(n.bytes), where.empty() ? "-" : where, n.on_policy_pct,
                         n.prealloc_s ? fmt::format("{:.2f}s", *n.prealloc_s) : "-");
    }
    if (r.sampled)
        o += "  (sampled: shares of the queried pages; ~ marks the estimate of the node's bytes; see pages_queried in --json)\n";
    o += host_node_table(r);
    o += fmt::format("\n{:>5}  {:>5}  {:>8}  {:<12} {:<12} {:<14} {}\n", "vCPU", "vnode", "tid", "affinity", "expected",
                     "mempolicy", "");
    for (const auto& v : r.vcpus)
        o += fmt::format("{:>5}  {:>5}  {:>8}  {:<12} {:<12} {:<14} {}\n", v.vcpu, v.vnode, v.tid,
                         numa::format_cpu_list(v.affinity), list_or(v.expected, "any (unpinned)"), v.mempolicy,
                         v.ok ? "ok" : "WRONG");
    o += fmt::format("\naccess: {}\nnuma_balancing: {} - {}\n", r.access, r.numa_balancing, r.advice);
    const double gib = static_cast<double>(r.checked_bytes) / (1ull << 30);
    o += fmt::format("{} {} in {:.3f} s ({:.1f} GiB/s) after a {:.2f} s guest pass over all memory\n",
                     r.sampled ? "queried a sample of" : "checked", human_bytes(r.checked_bytes), r.check_s, r.check_s > 0 ? gib / r.check_s : 0.0, r.touch_s);
    o += fmt::format("KVM page tables made during that pass (SecPageTables, the vCPU threads' faults): {}\n",
                     r.touch_page_tables.summary());
    if (r.logging)
        o += logging_text(*r.logging);
    if (r.stamps)
        o += fmt::format("stamp check: {} pages checked, {} mismatches\n", r.stamps->pages_checked, r.stamps->mismatches);
    if (r.failure)
        o += fmt::format("FAILED: {}\n", r.failure->reason);
    else if (r.interrupted)
        o += "interrupted before every page was touched; nothing checked\n";
    else if (r.placement_ok())
        o += "result: every page is where its policy says\n";
    else
        o += fmt::format("result: MISPLACED - first offender: {}\n", r.first_offender());
    if (!r.affinity_ok())
        o += "warning: some vCPU threads are not on their node's CPUs\n";
    return o;
}

}  // namespace mvm::engines
