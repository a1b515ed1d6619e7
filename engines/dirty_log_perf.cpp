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

// VM and per-vCPU stats at one moment; close() records the window since then.
struct StatMark {
    StatSnapshot vm;
    std::vector<StatSnapshot> vcpus;
    numa::NodeKib page_tables;

    static StatMark take(const StressVm& m)
    {
        StatMark k;
        k.page_tables = numa::secondary_page_tables();
        k.vm = m.vm_stats();
        for (uint32_t i = 0; i < m.vcpu_count(); i++)
            k.vcpus.push_back(m.vcpu_stats(i));
        return k;
    }
    void close(const StressVm& m, std::vector<StatsWindow>& out, std::string name, std::string what)
    {
        StatMark now = take(m);
        StatsWindow w{std::move(name), std::move(what), false, stat_delta(vm, now.vm), {}, now.page_tables - page_tables};
        for (size_t i = 0; i < vcpus.size(); i++)
            for (const auto& [k, v] : stat_delta(vcpus[i], now.vcpus[i]))
                w.vcpus[k] += v;
        out.push_back(std::move(w));
        *this = std::move(now);
    }
};

// What harvest `it` does in the tracker's mode.
std::string harvest_what(const dirty::TrackerOptions& to, uint32_t it)
{
    if (to.mode == dirty::Mode::Ring)
        return "collecting the dirty rings + KVM_RESET_DIRTY_RINGS";
    if (!to.manual_protect)
        return "KVM_GET_DIRTY_LOG (which clears and write-protects)";
    return it == 1 ? "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (the first clear)"
                   : "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG";
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
    cfg.workload.fill = opt.fill;
    cfg.workload.fill_ratio = opt.fill_ratio;
    cfg.slots_per_node = opt.slots;
    cfg.dirty_ring_bytes = opt.ring_bytes;
    StressVm m(kvm, cfg);
    r.machine = m.config();

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

        StatMark mark = StatMark::take(m);
        r.vm_stats_before = mark.vm;
        r.enable = tracker->enable();
        mark.close(m, r.windows, "enable", "KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES");
        const bool clears = to.mode == dirty::Mode::Bitmap && to.manual_protect;
        for (uint32_t it = 1; it <= opt.iterations; it++) {
            PerfIteration pi;
            pi.dirty_s = run_pass(m, 2 + it, opt.progress, fmt::format("iteration {}", it).c_str());
            mark.close(m, r.windows, fmt::format("iteration {}", it), "the guest's writes");
            dirty::Harvest h = tracker->harvest();
            mark.close(m, r.windows, fmt::format("harvest {}", it), harvest_what(to, it));
            r.windows.back().first_clear = clears && it == 1;
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
        mark.close(m, r.windows, "disable", "KVM_SET_USER_MEMORY_REGION without KVM_MEM_LOG_DIRTY_PAGES");
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

}  // namespace mvm::engines
