#include "engines/lockup.hpp"
#include "engines/run_report.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <fstream>
#include <set>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <thread>
#include <unistd.h>

#include "vmm/dirty/eager_split.hpp"
#include "vmm/dirty/tracker.hpp"
#include "base/error.hpp"
#include "base/units.hpp"

namespace mvm::engines {

namespace {

using clock = std::chrono::steady_clock;

uint64_t guest_writes(const StressVm& m)
{
    uint64_t s = 0;
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        s += m.snapshot(i).pages_written;
    return s;
}

// The harvesting thread's priority, as a VMM gives its migration thread:
// SCHED_FIFO (it preempts the vCPU threads, which run SCHED_OTHER), else nice
// -10, else as it is. Only this thread changes, and it gets its old policy
// and nice value back; nothing global is touched.
class HarvesterPriority {
public:
    explicit HarvesterPriority(bool want)
    {
        pthread_getschedparam(pthread_self(), &old_policy_, &old_param_);
        if (!want) {
            what_ = "normal (not requested)";
            return;
        }
        sched_param p{};
        p.sched_priority = 10;
        const int err = pthread_setschedparam(pthread_self(), SCHED_FIFO, &p);
        if (err == 0) {
            fifo_ = true;
            what_ = "SCHED_FIFO 10";
            return;
        }
        errno = 0;
        old_nice_ = getpriority(PRIO_PROCESS, static_cast<id_t>(gettid()));
        if (errno == 0 && setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), -10) == 0) {
            niced_ = true;
            what_ = fmt::format("nice -10 (SCHED_FIFO refused: {})", errno_text(err));
        } else {
            what_ = fmt::format("normal (SCHED_FIFO refused: {}; nice -10 refused)", errno_text(err));
        }
    }
    ~HarvesterPriority()
    {
        if (fifo_)
            pthread_setschedparam(pthread_self(), old_policy_, &old_param_);
        if (niced_)
            setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), old_nice_);
    }
    HarvesterPriority(const HarvesterPriority&) = delete;
    HarvesterPriority& operator=(const HarvesterPriority&) = delete;
    const std::string& what() const { return what_; }

private:
    int old_policy_ = SCHED_OTHER, old_nice_ = 0;
    sched_param old_param_{};
    bool fifo_ = false, niced_ = false;
    std::string what_;
};

// What a variant asks of the tracker and of KVM's eager_page_split.
struct VariantSetup {
    dirty::TrackerOptions tracker;
    std::optional<bool> eager;  // eager_page_split for the variant's lifetime; nullopt: as it is
    std::string skipped;        // why the host cannot run the variant, when it cannot
};

// Why an eager-split variant cannot differ from the other on this host, or "".
std::string eager_skip_reason(bool on)
{
    const dirty::EagerSplitInfo info = dirty::eager_split_info();
    if (info.path.empty())
        return "no eager_page_split parameter on this host";
    if (info.mmu != "tdp")
        return fmt::format("eager_page_split has no effect here: guests run on the shadow MMU ({}; upstream KVM splits "
                           "eagerly only with the TDP MMU)",
                           info.mmu_why.empty() ? "no tdp_mmu parameter" : info.mmu_why);
    if (info.param != (on ? "Y" : "N") && !info.writable)
        return fmt::format("eager_page_split is {} and read-only here", info.param);
    return "";
}

// The tracker options of variant `name` (and the ring size it puts in `cfg`);
// throws UsageError for an unknown variant.
VariantSetup variant_setup(const std::string& name, const LockupOptions& opt, MachineConfig& cfg)
{
    VariantSetup s;
    dirty::TrackerOptions& to = s.tracker;
    to.per_node_enable = false;  // one thread enables every slot, unless the variant says otherwise
    if (name == "bitmap") {
        to.mode = dirty::Mode::Bitmap;
        to.manual_protect = false;
    } else if (name == "bitmap-initially-set") {
        to.mode = dirty::Mode::Bitmap;
        to.manual_protect = true;
        to.initially_set = true;
        to.clear_chunk_bytes = opt.clear_chunk_bytes;
    } else if (name == "ring") {
        to.mode = dirty::Mode::Ring;
        cfg.dirty_ring_bytes = opt.ring_bytes;
    } else if (name == "per-node-parallel-enable") {
        to.mode = dirty::Mode::Bitmap;
        to.manual_protect = false;
        to.per_node_enable = true;
        if (cfg.nodes.size() < 2)
            s.skipped = "the VM has one virtual node: enabling per node in parallel is the bitmap variant (give --numa, one per virtual node)";
    } else if (name == "eager-split-on" || name == "eager-split-off") {
        to.mode = dirty::Mode::Bitmap;
        to.manual_protect = false;
        s.eager = name == "eager-split-on";
        s.skipped = eager_skip_reason(*s.eager);
    } else {
        throw UsageError(fmt::format("--variants: unknown variant '{}'", name));
    }
    return s;
}

// One variant's run on its own VM: what every phase reads and writes. Times
// in the result are ms since `origin`, when the sampler started.
struct VariantRun {
    const LockupOptions& opt;
    StressVm& m;
    dirty::Tracker& tracker;
    ProgressSampler& sampler;
    VariantResult& v;
    clock::time_point origin{};
    PhaseTimeline timeline;            // the global phases, contiguous
    std::mutex ring_full_mu;
    std::vector<PhaseSpan> ring_full;  // from the tracker's hook, on vCPU threads
    std::vector<uint64_t> wd0;         // each vCPU's watchdog event count at the start
    StatSnapshot vm0;                  // KVM stats when logging went on
    std::vector<StatSnapshot> vc0;
    StatSnapshot step_vm;              // VM stats and page tables where the current step began
    numa::NodeKib step_pt;
    bool logging_on = false;

    double ms(clock::time_point t) const { return std::chrono::duration<double, std::milli>(t - origin).count(); }
    void enter(const std::string& name, clock::time_point t) { timeline.enter(name, ms(t)); }
    bool stopped() const { return opt.stop && opt.stop->load(); }
    // Sleeps until `t` in short steps; false when a stop came first.
    bool sleep_until(clock::time_point t) const
    {
        while (!stopped()) {
            const auto now = clock::now();
            if (now >= t)
                return true;
            std::this_thread::sleep_for(std::min<clock::duration>(t - now, std::chrono::milliseconds(20)));
        }
        return false;
    }
};

// Starts the guest, waits until every vCPU is through its first pass (memory
// faulted in), then starts the sampler, the clock (the timeline's 0, where
// "steady" begins) and the ring-full record.
void start_variant(VariantRun& run)
{
    StressVm& m = run.m;
    m.start();
    if (!m.wait_first_pass(std::chrono::minutes(5)))
        throw Error(m.failure() ? m.failure()->reason : "the guest did not finish its first pass within 5 minutes");
    run.sampler.start();
    run.origin = clock::now();
    run.timeline.enter("steady", 0);
    run.tracker.set_ring_full_hook([&run](uint32_t vcpu, clock::time_point a, clock::time_point b) {
        std::lock_guard lk(run.ring_full_mu);
        run.ring_full.push_back({"ring-full", run.ms(a), run.ms(b), static_cast<int>(vcpu)});
    });
    run.wd0.resize(m.vcpu_count());
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        run.wd0[i] = m.snapshot(i).wd_events;
}

// Steady: the guest's write rate before logging goes on (the baseline).
void steady_phase(VariantRun& run)
{
    const auto t = clock::now();
    const uint64_t w0 = guest_writes(run.m);
    run.sleep_until(t + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(run.opt.steady_s)));
    const double s = std::chrono::duration<double>(clock::now() - t).count();
    run.v.rate_before = s > 0 ? static_cast<double>(guest_writes(run.m) - w0) / s : 0;
}

// One harvest, its phases (the clear apart) and its counts.
dirty::Harvest harvest(VariantRun& run, bool first)
{
    const auto t = clock::now();
    run.enter(first ? "first-harvest" : "harvest", t);
    dirty::Harvest h = run.tracker.harvest();
    const auto t_end = clock::now();
    const auto t_clear = t_end - std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(h.clear_s));
    if (h.clear_s > 0 && t_clear > t)
        run.enter("clear", t_clear);
    run.v.harvests++;
    run.v.dirty_pages += h.dirty_pages;
    run.v.ring_full += h.ring_full_harvests;
    return h;
}

// Copies what was harvested into `scratch` (round robin), as a migration would.
void copy_harvested(VariantRun& run, const dirty::Harvest& h, std::vector<uint8_t>& scratch)
{
    run.enter("copy", clock::now());
    size_t off = 0;
    for (const auto& s : h.slots)
        s.for_each([&](uint64_t page) {
            std::memcpy(scratch.data() + off, run.m.host_ptr(s.gpa + page * 4096, 4096), 4096);
            off = (off + 4096) % scratch.size();
        });
}

// Ends the current step of the logging window: what KVM's page-size stats
// and page tables did in it.
void close_step(VariantRun& run, const char* name)
{
    StatSnapshot vm = run.m.vm_stats();
    numa::NodeKib pt = numa::secondary_page_tables();
    run.v.steps.push_back({name, stat_delta(run.step_vm, vm), pt - run.step_pt});
    run.step_vm = std::move(vm);
    run.step_pt = std::move(pt);
}

// Logging: enable, then a harvest (and copy) in every --harvest-ms slot of
// the --logging window that starts after enabling; a harvest that starts too
// late for its slot leaves the slots it skipped missed. Between harvests the
// phase is "logging" (logging on, harvester idle). The mid-logging action
// runs once, after the first copy; the window is extended by its length.
void logging_phase(VariantRun& run, const MidLoggingAction& action)
{
    StressVm& m = run.m;
    HarvestSchedule& hs = run.v.schedule;
    run.vm0 = m.vm_stats();
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        run.vc0.push_back(m.vcpu_stats(i));
    std::vector<uint8_t> scratch(64ull << 20);  // zeroed here, before the logging window
    const uint64_t w1 = guest_writes(m);
    const auto log0 = clock::now();
    run.enter("enable-logging", log0);
    run.step_vm = run.vm0;
    run.step_pt = numa::secondary_page_tables();
    const dirty::EnableReport enabled = run.tracker.enable();
    run.v.enable_ms = enabled.wall_s * 1e3;
    run.v.enabled_from = enabled.enabled_from;
    close_step(run, "enable-logging");
    run.logging_on = true;
    const auto period = std::chrono::duration_cast<clock::duration>(std::chrono::duration<double, std::milli>(run.opt.harvest_ms));
    auto base = clock::now(), wake = base;
    auto end = base + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(run.opt.logging_s));
    hs.period_ms = run.opt.harvest_ms;
    hs.expected = harvest_slots(run.opt.logging_s * 1e3, run.opt.harvest_ms);
    bool acted = false;
    for (int64_t slot = 0;; slot++) {
        const auto now = clock::now();
        if (now >= end || run.stopped())
            break;
        slot = std::max<int64_t>(slot, (now - base) / period);  // the slot this harvest serves
        hs.late_max_ms = std::max(hs.late_max_ms, std::chrono::duration<double, std::milli>(now - wake).count());
        copy_harvested(run, harvest(run, hs.done == 0), scratch);
        if (++hs.done == 1)
            close_step(run, "first harvest");
        if (action.after_each_harvest)
            action.after_each_harvest();
        if (action.run && !acted) {
            acted = true;
            const auto a = clock::now();
            run.enter(action.phase, a);
            action.run(m);
            base += clock::now() - a;
            end += clock::now() - a;
        }
        run.enter("logging", clock::now());
        wake = std::min(base + (slot + 1) * period, end);
        if (!run.sleep_until(wake))
            break;
        if (auto f = m.failure())
            throw Error(f->reason);
    }
    const double logging_s = std::chrono::duration<double>(clock::now() - log0).count();
    run.v.rate_during = static_cast<double>(guest_writes(m) - w1) / logging_s;
}

// Disable logging (if it went on), take the KVM stats deltas, stop the
// sampler (50 ms later: phase "after-logging") and keep its samples; the
// ring-full spans join the phases.
void disable_phase(VariantRun& run)
{
    VariantResult& v = run.v;
    if (run.logging_on) {
        close_step(run, "rest of logging");
        run.enter("disable-logging", clock::now());
        v.disable_ms = run.tracker.disable().wall_s * 1e3;
        v.vm_stats = stat_delta(run.vm0, run.m.vm_stats());
        v.vcpu_stats = sum_vcpu_stats(run.vc0, run.m);
        run.enter("after-logging", clock::now());
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    run.sampler.stop();
    run.timeline.close(std::max(run.ms(clock::now()), run.sampler.wall_seconds() * 1e3));
    v.phases = run.timeline.spans();
    {
        std::lock_guard lk(run.ring_full_mu);
        v.phases.insert(v.phases.end(), run.ring_full.begin(), run.ring_full.end());
    }
    v.samples = run.sampler.samples();
    const double wall_s = run.sampler.wall_seconds();
    v.sampler_hz = wall_s > 0 ? static_cast<double>(run.sampler.ticks()) / wall_s : 0;
}

// The sampler's stalls, each attributed to a phase; the longest, the
// per-stall percentiles, how many vCPUs stalled per phase, and per phase the
// distribution against the steady baseline.
void attribute_stalls(VariantRun& run)
{
    VariantResult& v = run.v;
    v.stalls = run.sampler.stalls(run.opt.threshold_ms);
    std::vector<bool> stalled(run.m.vcpu_count(), false);
    std::map<std::string, std::set<uint32_t>> by_phase;
    std::vector<double> lens;
    for (auto& s : v.stalls) {
        s.phase = phase_of(s, v.phases);
        stalled[s.vcpu] = true;
        lens.push_back(s.len_ms);
        by_phase[s.phase].insert(s.vcpu);
        if (s.len_ms > v.longest_stall_ms) {
            v.longest_stall_ms = s.len_ms;
            v.longest_vcpu = static_cast<int>(s.vcpu);
            v.longest_phase = s.phase;
        }
    }
    v.stall_count = static_cast<uint32_t>(v.stalls.size());
    v.vcpus_stalled = static_cast<uint32_t>(std::count(stalled.begin(), stalled.end(), true));
    for (const auto& [p, set] : by_phase)
        v.vcpus_stalled_by_phase[p] = static_cast<uint32_t>(set.size());
    v.p50_stall_ms = percentile(lens, 50);
    v.p99_stall_ms = percentile(lens, 99);
    v.phase_stalls = phase_stalls(v.stalls, v.phases, run.m.vcpu_count(), run.opt.threshold_ms);
}

// The guest watchdog's own events since the variant started.
void count_watchdog_events(VariantRun& run)
{
    StressVm& m = run.m;
    for (uint32_t i = 0; i < m.vcpu_count(); i++) {
        auto s = m.snapshot(i);
        run.v.watchdog_events += s.wd_events - run.wd0[i];
        for (const auto& ev : watchdog_events(*m.mailbox(i), s.wd_events, run.wd0[i]))
            run.v.watchdog_longest_ms = std::max(run.v.watchdog_longest_ms,
                                                 static_cast<double>(ev.len_tsc) / static_cast<double>(m.tsc_khz()));
    }
}

std::string verdict(const VariantResult& v, uint32_t vcpus, double threshold_ms)
{
    VerdictInput in;
    in.harvests = v.schedule;
    in.phases = v.phase_stalls;
    in.threshold_ms = threshold_ms;
    in.vcpus = vcpus;
    in.rate_before = v.rate_before;
    in.rate_during = v.rate_during;
    in.longest_ms = v.longest_stall_ms;
    in.longest_vcpu = v.longest_vcpu;
    if (v.interrupted)
        return fmt::format("interrupted before the variant finished: no verdict ({} of {} harvests ran)", v.schedule.done,
                           v.schedule.expected);
    return lockup_verdict(in);
}

VariantResult run_variant(const Kvm& kvm, MachineConfig cfg, const std::string& name, const LockupOptions& opt,
                          const MidLoggingAction& action)
{
    VariantResult v;
    v.name = name;
    const VariantSetup setup = variant_setup(name, opt, cfg);
    if (!setup.skipped.empty()) {
        v.skipped = setup.skipped;
        return v;
    }
    dirty::EagerSplitSetting eager_setting(setup.eager);
    StressVm m(kvm, cfg);
    auto tracker = dirty::Tracker::create(m, setup.tracker);
    ProgressSampler sampler(m, 1000, opt.keep_samples);
    VariantRun run{opt, m, *tracker, sampler, v};
    start_variant(run);
    steady_phase(run);
    {
        HarvesterPriority prio(opt.harvester_priority);
        v.harvester_priority = prio.what();
        if (!run.stopped())
            logging_phase(run, action);
        disable_phase(run);
    }
    v.interrupted = run.stopped();
    attribute_stalls(run);
    count_watchdog_events(run);
    v.verdict = verdict(v, m.vcpu_count(), opt.threshold_ms);
    m.request_stop();
    if (!m.wait_finished(std::chrono::seconds(10)))
        m.kill();
    return v;
}

}  // namespace

const std::vector<std::string>& lockup_variant_names()
{
    static const std::vector<std::string> names = {"bitmap",         "bitmap-initially-set", "ring", "per-node-parallel-enable",
                                                   "eager-split-on", "eager-split-off"};
    return names;
}

LockupReport run_lockup(const Kvm& kvm, const MachineConfig& cfg, const LockupOptions& opt,
                        const MidLoggingAction& action)
{
    LockupReport r;
    r.vcpus = cfg.vcpus;
    for (const auto& n : cfg.nodes) {
        r.mem_bytes += n.mem_bytes;
        if (r.backing.find(backing_name(n.backing)) == std::string::npos)
            r.backing += (r.backing.empty() ? "" : ",") + std::string(backing_name(n.backing));
    }
    r.threshold_ms = opt.threshold_ms;
    for (const auto& name : opt.variants) {
        if (opt.stop && opt.stop->load()) {
            r.interrupted = true;
            break;
        }
        if (opt.progress)
            fmt::print(stderr, "\r\033[Klockup: variant {} ...", name);
        r.variants.push_back(run_variant(kvm, cfg, name, opt, action));
        r.interrupted |= r.variants.back().interrupted;
    }
    if (opt.progress)
        fmt::print(stderr, "\r\033[K");
    return r;
}

}  // namespace mvm::engines
