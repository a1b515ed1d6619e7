#include "engines/lockup.hpp"
#include "engines/run_report.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <fstream>
#include <set>
#include <thread>

#include "vmm/dirty/eager_split.hpp"
#include "vmm/dirty/tracker.hpp"
#include "base/error.hpp"
#include "base/units.hpp"

namespace mvm::engines {

namespace {

using clock = std::chrono::steady_clock;

double percentile(std::vector<double> v, double p)
{
    if (v.empty())
        return 0;
    std::sort(v.begin(), v.end());
    size_t i = static_cast<size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
    return v[std::min(i, v.size() - 1)];
}

uint64_t guest_writes(const StressVm& m)
{
    uint64_t s = 0;
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        s += m.snapshot(i).pages_written;
    return s;
}

// The phase a stall overlaps most; a ring-full span of its own vCPU wins.
std::string phase_of(const Stall& s, const std::vector<PhaseSpan>& phases)
{
    const double a = s.start_ms, b = s.start_ms + s.len_ms;
    std::string best = "steady";
    double best_overlap = 0;
    for (const auto& p : phases) {
        if (p.vcpu >= 0 && p.vcpu != static_cast<int>(s.vcpu))
            continue;
        const double o = std::min(b, p.end_ms) - std::max(a, p.start_ms);
        if (o <= 0)
            continue;
        if (p.vcpu >= 0)
            return p.name;
        if (o > best_overlap) {
            best_overlap = o;
            best = p.name;
        }
    }
    return best;
}

// What a variant asks of the tracker and of KVM's eager_page_split.
struct VariantSetup {
    dirty::TrackerOptions tracker;
    std::optional<bool> eager;  // eager_page_split for the variant's lifetime; nullopt: as it is
    std::string skipped;        // why the host cannot run the variant, when it cannot
};

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
    } else if (name == "eager-split-on" || name == "eager-split-off") {
        to.mode = dirty::Mode::Bitmap;
        to.manual_protect = false;
        s.eager = name == "eager-split-on";
        dirty::EagerSplitInfo info = dirty::eager_split_info();
        const std::string want = *s.eager ? "Y" : "N";
        if (info.param != want && !info.writable)
            s.skipped = info.path.empty() ? "no eager_page_split parameter on this host"
                                          : fmt::format("eager_page_split is {} and read-only here", info.param);
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
    std::mutex ring_full_mu;
    std::vector<PhaseSpan> ring_full;  // from the tracker's hook, on vCPU threads
    std::vector<uint64_t> wd0;         // each vCPU's watchdog event count at the start
    StatSnapshot vm0;                  // KVM stats when logging went on
    std::vector<StatSnapshot> vc0;

    double ms(clock::time_point t) const { return std::chrono::duration<double, std::milli>(t - origin).count(); }
    void span(const std::string& name, clock::time_point a, clock::time_point b)
    {
        v.phases.push_back({name, ms(a), ms(b), -1});
    }
};

// Starts the guest, waits until every vCPU is through its first pass (memory
// faulted in), then starts the sampler, the clock and the ring-full record.
void start_variant(VariantRun& run)
{
    StressVm& m = run.m;
    m.start();
    if (!m.wait_first_pass(std::chrono::minutes(5)))
        throw Error(m.failure() ? m.failure()->reason : "the guest did not finish its first pass within 5 minutes");
    run.sampler.start();
    run.origin = clock::now();
    run.tracker.set_ring_full_hook([&run](uint32_t vcpu, clock::time_point a, clock::time_point b) {
        std::lock_guard lk(run.ring_full_mu);
        run.ring_full.push_back({"ring-full", run.ms(a), run.ms(b), static_cast<int>(vcpu)});
    });
    run.wd0.resize(m.vcpu_count());
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        run.wd0[i] = m.snapshot(i).wd_events;
}

// Steady: the guest's write rate before logging goes on.
void steady_phase(VariantRun& run)
{
    const auto t = clock::now();
    const uint64_t w0 = guest_writes(run.m);
    std::this_thread::sleep_for(std::chrono::duration<double>(run.opt.steady_s));
    run.span("steady", t, clock::now());
    run.v.rate_before = static_cast<double>(guest_writes(run.m) - w0) / run.opt.steady_s;
}

// One harvest, its spans (the clear apart) and its counts.
dirty::Harvest harvest(VariantRun& run, bool first)
{
    const auto t = clock::now();
    dirty::Harvest h = run.tracker.harvest();
    const auto t_end = clock::now();
    const auto t_clear = t_end - std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(h.clear_s));
    run.span(first ? "first-harvest" : "harvest", t, t_clear);
    if (h.clear_s > 0)
        run.span("clear", t_clear, t_end);
    run.v.harvests++;
    run.v.dirty_pages += h.dirty_pages;
    run.v.ring_full += h.ring_full_harvests;
    return h;
}

// Copies what was harvested into `scratch` (round robin), as a migration would.
void copy_harvested(VariantRun& run, const dirty::Harvest& h, std::vector<uint8_t>& scratch)
{
    const auto t = clock::now();
    size_t off = 0;
    for (const auto& s : h.slots)
        s.for_each([&](uint64_t page) {
            std::memcpy(scratch.data() + off, run.m.host_ptr(s.gpa + page * 4096, 4096), 4096);
            off = (off + 4096) % scratch.size();
        });
    run.span("copy", t, clock::now());
}

// Logging: enable, then harvest, copy and wait for --logging seconds; the
// mid-logging action runs once, after the first copy.
void logging_phase(VariantRun& run, const MidLoggingAction& action)
{
    StressVm& m = run.m;
    run.vm0 = m.vm_stats();
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        run.vc0.push_back(m.vcpu_stats(i));
    const auto log0 = clock::now();
    const uint64_t w1 = guest_writes(m);
    auto t = clock::now();
    run.v.enable_ms = run.tracker.enable().wall_s * 1e3;
    run.span("enable-logging", t, clock::now());

    std::vector<uint8_t> scratch(64ull << 20);
    bool first = true, acted = false;
    while (std::chrono::duration<double>(clock::now() - log0).count() < run.opt.logging_s) {
        copy_harvested(run, harvest(run, first), scratch);
        first = false;
        if (action.run && !acted) {
            acted = true;
            t = clock::now();
            action.run(m);
            run.span(action.phase, t, clock::now());
        }
        t = clock::now();
        std::this_thread::sleep_until(t + std::chrono::duration<double, std::milli>(run.opt.harvest_ms));
        run.span("logging", t, clock::now());
        if (auto f = m.failure())
            throw Error(f->reason);
    }
    const double logging_s = std::chrono::duration<double>(clock::now() - log0).count();
    run.v.rate_during = static_cast<double>(guest_writes(m) - w1) / logging_s;
}

// Disable logging, take the KVM stats deltas, stop the sampler (50 ms later)
// and keep its samples; the ring-full spans join the phases.
void disable_phase(VariantRun& run)
{
    VariantResult& v = run.v;
    const auto t = clock::now();
    v.disable_ms = run.tracker.disable().wall_s * 1e3;
    run.span("disable-logging", t, clock::now());
    v.vm_stats = stat_delta(run.vm0, run.m.vm_stats());
    v.vcpu_stats = sum_vcpu_stats(run.vc0, run.m);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    run.sampler.stop();
    {
        std::lock_guard lk(run.ring_full_mu);
        v.phases.insert(v.phases.end(), run.ring_full.begin(), run.ring_full.end());
    }
    v.samples = run.sampler.samples();
    const double wall_s = run.sampler.wall_seconds();
    v.sampler_hz = wall_s > 0 ? static_cast<double>(run.sampler.ticks()) / wall_s : 0;
}

// The sampler's stalls, each attributed to a phase; the longest, the
// percentiles over each vCPU's longest, and how many vCPUs stalled per phase.
void attribute_stalls(VariantRun& run)
{
    VariantResult& v = run.v;
    v.stalls = run.sampler.stalls(run.opt.threshold_ms);
    std::vector<double> longest(run.m.vcpu_count(), 0);
    std::map<std::string, std::set<uint32_t>> by_phase;
    for (auto& s : v.stalls) {
        s.phase = phase_of(s, v.phases);
        longest[s.vcpu] = std::max(longest[s.vcpu], s.len_ms);
        by_phase[s.phase].insert(s.vcpu);
        if (s.len_ms > v.longest_stall_ms) {
            v.longest_stall_ms = s.len_ms;
            v.longest_vcpu = static_cast<int>(s.vcpu);
            v.longest_phase = s.phase;
        }
    }
    for (double l : longest)
        v.vcpus_stalled += l > 0;
    for (const auto& [p, set] : by_phase)
        v.vcpus_stalled_by_phase[p] = static_cast<uint32_t>(set.size());
    v.p50_stall_ms = percentile(longest, 50);
    v.p99_stall_ms = percentile(longest, 99);
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

// The verdict, in the words of a soft-lockup report.
std::string verdict(const VariantResult& v, uint32_t vcpus, double threshold_ms)
{
    if (v.stalls.empty())
        return fmt::format("no vCPU went without progress for > {:.0f} ms", threshold_ms);
    std::string worst_phase;
    uint32_t worst = 0;
    for (const auto& [p, n] : v.vcpus_stalled_by_phase)
        if (n > worst) {
            worst = n;
            worst_phase = p;
        }
    return fmt::format("{} of {} vCPUs made no progress for > {:.0f} ms during {}; longest {:.0f} ms on vCPU {} ({})",
                       worst, vcpus, threshold_ms, worst_phase, v.longest_stall_ms, v.longest_vcpu, v.longest_phase);
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
    logging_phase(run, action);
    disable_phase(run);
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
        if (opt.progress)
            fmt::print(stderr, "\r\033[Klockup: variant {} ...", name);
        r.variants.push_back(run_variant(kvm, cfg, name, opt, action));
    }
    if (opt.progress)
        fmt::print(stderr, "\r\033[K");
    return r;
}

nlohmann::json LockupReport::to_json() const
{
    using nlohmann::json;
    json j;
    j["vcpus"] = vcpus;
    j["mem_bytes"] = mem_bytes;
    j["backing"] = backing;
    j["threshold_ms"] = threshold_ms;
    j["variants"] = json::array();
    for (const auto& v : variants) {
        json s = json::array();
        for (const auto& st : v.stalls)
            s.push_back({{"vcpu", st.vcpu}, {"start_ms", st.start_ms}, {"len_ms", st.len_ms}, {"phase", st.phase}});
        json ph = json::array();
        for (const auto& p : v.phases)
            ph.push_back({{"name", p.name}, {"start_ms", p.start_ms}, {"end_ms", p.end_ms}, {"vcpu", p.vcpu}});
        json vm = json::object(), vc = json::object();
        for (const auto& [k, x] : v.vm_stats)
            vm[k] = x;
        for (const auto& [k, x] : v.vcpu_stats)
            vc[k] = x;
        j["variants"].push_back({{"name", v.name},
                                 {"skipped", v.skipped},
                                 {"enable_ms", v.enable_ms},
                                 {"disable_ms", v.disable_ms},
                                 {"longest_stall_ms", v.longest_stall_ms},
                                 {"longest_stall_vcpu", v.longest_vcpu},
                                 {"longest_stall_phase", v.longest_phase},
                                 {"p50_stall_ms", v.p50_stall_ms},
                                 {"p99_stall_ms", v.p99_stall_ms},
                                 {"vcpus_stalled", v.vcpus_stalled},
                                 {"vcpus_stalled_by_phase", v.vcpus_stalled_by_phase},
                                 {"watchdog_events", v.watchdog_events},
                                 {"watchdog_longest_ms", v.watchdog_longest_ms},
                                 {"dirty_rate_before_pages_per_s", v.rate_before},
                                 {"dirty_rate_during_pages_per_s", v.rate_during},
                                 {"harvests", v.harvests},
                                 {"dirty_pages", v.dirty_pages},
                                 {"ring_full_exits", v.ring_full},
                                 {"sampler_hz", v.sampler_hz},
                                 {"kvm_stats", {{"vm", vm}, {"vcpus_sum", vc}}},
                                 {"stalls", s},
                                 {"phases", ph},
                                 {"verdict", v.verdict}});
    }
    return j;
}

std::string LockupReport::to_table() const
{
    std::string o = fmt::format("minivmm lockup: {} vCPUs, {} {}, stall threshold {:.0f} ms\n\n", vcpus,
                                human_bytes(static_cast<double>(mem_bytes)), backing, threshold_ms);
    o += fmt::format("{:<26} {:>9} {:>16} {:>8} {:>8} {:>6} {:>12} {:>12} {:>9} {:>9}\n", "variant", "enable ms",
                     "longest stall", "p50 ms", "p99 ms", "wd ev", "rate before", "rate during", "pages_4k", "pf_fixed");
    for (const auto& v : variants) {
        if (!v.skipped.empty()) {
            o += fmt::format("{:<26} skipped: {}\n", v.name, v.skipped);
            continue;
        }
        auto stat = [](const StatDelta& d, const char* k) {
            auto it = d.find(k);
            return it == d.end() ? std::string("-") : fmt::format("{:+}", it->second);
        };
        o += fmt::format("{:<26} {:>9.2f} {:>16} {:>8.1f} {:>8.1f} {:>6} {:>12} {:>12} {:>9} {:>9}\n", v.name,
                         v.enable_ms,
                         v.longest_vcpu >= 0 ? fmt::format("{:.1f} (vCPU {})", v.longest_stall_ms, v.longest_vcpu) : "-",
                         v.p50_stall_ms, v.p99_stall_ms, v.watchdog_events,
                         fmt::format("{:.1f}M/s", v.rate_before / 1e6), fmt::format("{:.1f}M/s", v.rate_during / 1e6),
                         stat(v.vm_stats, "pages_4k"), stat(v.vcpu_stats, "pf_fixed"));
    }
    o += "\n";
    for (const auto& v : variants)
        if (v.skipped.empty())
            o += fmt::format("{}: {}\n", v.name, v.verdict);
    return o;
}

void LockupReport::write_timeline(const std::string& path) const
{
    std::ofstream f(path);
    if (!f)
        throw UsageError(fmt::format("--timeline: cannot write '{}': {}", path, errno_text(errno)));
    f << "variant,t_ms,vcpu,pages,phase\n";
    for (const auto& v : variants) {
        // Samples are in time order per tick; walk the global phases alongside.
        std::vector<const PhaseSpan*> global;
        for (const auto& p : v.phases)
            if (p.vcpu < 0)
                global.push_back(&p);
        size_t pi = 0;
        for (const auto& s : v.samples) {
            while (pi + 1 < global.size() && global[pi]->end_ms < s.t_ms)
                pi++;
            const char* phase = global.empty() || s.t_ms < global[pi]->start_ms || s.t_ms > global[pi]->end_ms
                                    ? "between"
                                    : global[pi]->name.c_str();
            f << v.name << ',' << fmt::format("{:.3f}", s.t_ms) << ',' << s.vcpu << ',' << s.pages << ',' << phase << '\n';
        }
    }
}

}  // namespace mvm::engines
