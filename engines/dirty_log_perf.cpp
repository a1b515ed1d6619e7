#include "engines/dirty_log_perf.hpp"
#include "engines/run_report.hpp"

#include <unistd.h>

#include <chrono>
#include <fmt/format.h>
#include <thread>

#include "vmm/dirty/eager_split.hpp"
#include "base/error.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "base/units.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::engines {

namespace {

using clock = std::chrono::steady_clock;
double since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }

// Opens pass `gate` and waits until every vCPU completed it.
double run_pass(StressVm& m, uint64_t gate, bool progress, const char* what)
{
    auto t0 = clock::now();
    m.set_pass_gate(gate);
    auto last = t0;
    for (;;) {
        bool done = true;
        uint64_t cursor_sum = 0, total = 0;
        for (uint32_t i = 0; i < m.vcpu_count(); i++) {
            auto s = m.snapshot(i);
            done &= s.passes >= gate;
            cursor_sum += s.passes >= gate ? m.vcpu_params(i).total_pages : std::min(s.cursor, m.vcpu_params(i).total_pages);
            total += m.vcpu_params(i).total_pages;
        }
        if (done)
            break;
        if (auto f = m.failure())
            throw Error(f->reason);
        if (progress && clock::now() - last > std::chrono::milliseconds(200)) {
            fmt::print(stderr, "\r\033[K{}: {:.0f}%", what, 100.0 * static_cast<double>(cursor_sum) / static_cast<double>(total));
            last = clock::now();
        }
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (progress)
        fmt::print(stderr, "\r\033[K");
    return since(t0);
}

}  // namespace

PerfResult run_dirty_log_perf(const Kvm& kvm, const PerfOptions& opt)
{
    PerfResult r;
    r.opt = opt;
    r.eager = dirty::eager_split_info();
    dirty::EagerSplitSetting eager(opt.eager_split);
    r.eager_note = eager.note();
    if (eager.changed())
        r.eager = dirty::eager_split_info();

    MachineConfig cfg = single_node_config(opt.vcpus, opt.bytes_per_vcpu * opt.vcpus, opt.backing);
    cfg.workload.write_pct = opt.write_pct;
    cfg.workload.pattern = opt.random ? MVM_PATTERN_RANDOM : MVM_PATTERN_SEQ;
    cfg.slots_per_node = opt.slots;
    cfg.dirty_ring_bytes = opt.ring_bytes;
    StressVm m(kvm, cfg);

    dirty::TrackerOptions to;
    to.mode = opt.ring_bytes ? dirty::Mode::Ring : dirty::Mode::Bitmap;
    to.manual_protect = opt.manual_protect;
    to.initially_set = opt.manual_protect && opt.initially_set;
    to.clear_chunk_bytes = opt.clear_chunk_bytes;
    auto tracker = dirty::Tracker::create(m, to);
    r.untracked = tracker->untracked_slots();
    r.mode = to.mode == dirty::Mode::Ring
                 ? fmt::format("ring ({} entries per vCPU)", opt.ring_bytes / sizeof(kvm_dirty_gfn))
                 : fmt::format("bitmap ({})", !to.manual_protect ? "GET_DIRTY_LOG clears"
                                              : to.initially_set ? "manual protect, initially set"
                                                                 : "manual protect");

    m.set_pass_gate(1);  // nothing runs past pass 1 until we say so
    m.start();
    try {
        r.populate_s = run_pass(m, 1, opt.progress, "populating");
        r.pass_before_s = run_pass(m, 2, opt.progress, "pass before logging");

        StatSnapshot vm0 = m.vm_stats();
        std::vector<StatSnapshot> vc0;
        for (uint32_t i = 0; i < m.vcpu_count(); i++)
            vc0.push_back(m.vcpu_stats(i));
        r.enable = tracker->enable();
        for (uint32_t it = 1; it <= opt.iterations; it++) {
            PerfIteration pi;
            pi.dirty_s = run_pass(m, 2 + it, opt.progress, fmt::format("iteration {}", it).c_str());
            if (it == 1) {
                r.vm_stats_enable_first = stat_delta(vm0, m.vm_stats());
                r.vcpu_stats_enable_first = sum_vcpu_stats(vc0, m);
            }
            dirty::Harvest h = tracker->harvest();
            pi.get_s = h.get_s;
            pi.clear_s = h.clear_s;
            pi.sync_s = h.sync_s;
            pi.dirty_pages = h.dirty_pages;
            pi.entries = h.entries;
            pi.reset = h.reset;
            pi.ring_full_harvests = h.ring_full_harvests;
            pi.clear_calls = h.clear_calls;
            r.iterations.push_back(pi);
        }
        r.disable = tracker->disable();
    } catch (...) {
        m.kill();
        throw;
    }
    m.request_stop();
    if (!m.wait_finished(std::chrono::seconds(10)))
        m.kill();
    r.failure = m.failure();
    if (!r.failure)
        r.stamps = verify_stamps(m);
    return r;
}

std::string to_text(const PerfResult& r)
{
    const auto& o = r.opt;
    std::string s = fmt::format("minivmm dirty-log-perf: {} vCPUs x {}, {} iterations, write {}%, {} access, {} slot(s), "
                                "{} backing, {}\n",
                                o.vcpus, human_bytes(static_cast<double>(o.bytes_per_vcpu)), o.iterations, o.write_pct,
                                o.random ? "random" : "sequential", o.slots, backing_name(o.backing), r.mode);
    s += fmt::format("eager_page_split: {} (tdp_mmu {}): {}\n", r.eager.param.empty() ? "absent" : r.eager.param,
                     r.eager.tdp_mmu.empty() ? "?" : r.eager.tdp_mmu, r.eager.note);
    if (!r.eager_note.empty())
        s += r.eager_note + "\n";
    for (const auto& [slot, why] : r.untracked)
        s += fmt::format("slot {} not tracked: {}\n", slot, why);
    s += fmt::format("Populate memory time: {:.9f}s\n", r.populate_s);
    s += fmt::format("Pass before logging time: {:.9f}s\n", r.pass_before_s);
    s += fmt::format("Enabling dirty logging time: {:.9f}s\n", r.enable.wall_s);
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
    s += "KVM stats over enable + iteration 1:";
    for (const char* k : {"pages_4k", "pages_2m", "pages_1g"})
        if (auto it = r.vm_stats_enable_first.find(k); it != r.vm_stats_enable_first.end())
            s += fmt::format(" {} {:+}", k, it->second);
    for (const char* k : {"pf_taken", "pf_fixed", "pf_fast", "pf_spurious"})
        if (auto it = r.vcpu_stats_enable_first.find(k); it != r.vcpu_stats_enable_first.end())
            s += fmt::format(" {} {:+}", k, it->second);
    s += "\n";
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
    j["eager_split"] = {{"eager_page_split", r.eager.param}, {"tdp_mmu", r.eager.tdp_mmu},
                        {"effective", r.eager.effective}, {"writable", r.eager.writable}, {"note", r.eager.note},
                        {"setting", r.eager_note}};
    j["populate_s"] = r.populate_s;
    j["pass_before_logging_s"] = r.pass_before_s;
    auto enable_json = [](const dirty::EnableReport& e) {
        json a = json::array();
        for (const auto& s : e.slots)
            a.push_back({{"slot", s.slot}, {"vnode", s.vnode}, {"seconds", s.seconds}, {"cpu", s.cpu}});
        return json{{"wall_s", e.wall_s}, {"slots", a}};
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
    json vm = json::object(), vc = json::object();
    for (const auto& [k, v] : r.vm_stats_enable_first)
        vm[k] = v;
    for (const auto& [k, v] : r.vcpu_stats_enable_first)
        vc[k] = v;
    j["kvm_stats_enable_first_iteration"] = {{"vm", vm}, {"vcpus_sum", vc}};
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
