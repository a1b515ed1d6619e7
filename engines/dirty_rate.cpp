#include "engines/dirty_rate.hpp"

#include <chrono>
#include <fmt/format.h>
#include <functional>
#include <map>
#include <random>
#include <thread>

#include "base/error.hpp"

namespace mvm::engines {

namespace {

using clock = std::chrono::steady_clock;
double since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }
double between(clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

uint64_t hash_page(const uint8_t* p)
{
    // FNV-1a over 64-bit words: any change of a stamp changes the hash.
    uint64_t h = 0xcbf29ce484222325ull;
    const auto* w = reinterpret_cast<const volatile uint64_t*>(p);
    for (size_t i = 0; i < 4096 / 8; i++)
        h = (h ^ w[i]) * 0x100000001b3ull;
    return h;
}

// What each vCPU's guest counted as written so far.
std::vector<uint64_t> pages_written(const StressVm& m)
{
    std::vector<uint64_t> w(m.vcpu_count());
    for (uint32_t v = 0; v < m.vcpu_count(); v++)
        w[v] = m.snapshot(v).pages_written;
    return w;
}

// A point in time with the guest's own write counts then.
struct Mark {
    clock::time_point t;
    std::vector<uint64_t> writes;
    static Mark now(const StressVm& m)
    {
        Mark k{clock::now(), pages_written(m)};
        return k;
    }
};

// Sleeps in steps of up to 50 ms (or `step_s`) until `len_s` since `t0` is
// over, calling `tick` after each step, with the progress line; throws on a
// vCPU failure.
void wait_for(const StressVm& m, const RateOptions& opt, const char* what, clock::time_point t0, double len_s,
              double step_s, const std::function<void()>& tick)
{
    const auto step = std::chrono::duration<double>(std::min({0.05, len_s, step_s > 0 ? step_s : 0.05}));
    while (since(t0) < len_s) {
        std::this_thread::sleep_for(std::min(step, std::chrono::duration<double>(len_s - since(t0))));
        if (tick)
            tick();
        if (opt.progress)
            fmt::print(stderr, "\r\033[K{} ({}): {:.1f}/{:.1f} s", what, rate_mode_name(opt.mode), since(t0), len_s);
        if (opt.cancel && opt.cancel->load())
            throw Error("cancelled");
        if (auto f = m.failure())
            throw Error(f->reason);
    }
    if (opt.progress)
        fmt::print(stderr, "\r\033[K");
}

// Starts the machine and waits until every vCPU finished its first pass, then `warmup_s` more.
void start_warm(StressVm& m, const RateOptions& opt)
{
    m.start();
    if (!m.wait_first_pass(std::chrono::seconds(60))) {
        if (auto f = m.failure())
            throw Error(f->reason);
        throw Error("the guest did not finish its first pass within 60 s");
    }
    wait_for(m, opt, "warming up", clock::now(), opt.warmup_s, 0, {});
}

// The guest's own write rate over `opt.baseline_s` with logging still off.
void measure_baseline(StressVm& m, const RateOptions& opt, LoggingCost& c)
{
    if (opt.baseline_s <= 0)
        return;
    const Mark a = Mark::now(m);
    wait_for(m, opt, "baseline, logging off", a.t, opt.baseline_s, 0, {});
    const Mark b = Mark::now(m);
    c.measured = true;
    c.baseline_s = between(a.t, b.t);
    for (uint32_t v = 0; v < m.vcpu_count(); v++) {
        c.unlogged_vcpu.push_back(static_cast<double>(b.writes[v] - a.writes[v]) / c.baseline_s);
        c.unlogged_writes_per_s += c.unlogged_vcpu.back();
    }
}

// Asks the guest to stop; kills its vCPUs if they have not within 10 s.
void stop(StressVm& m)
{
    m.request_stop();
    if (!m.wait_finished(std::chrono::seconds(10)))
        m.kill();
}

// A window's skeleton: each vCPU with its working set, each vnode with the
// working-set pages it holds, the guest's write rates between the marks.
RateWindow open_window(const StressVm& m, const Mark& a, const Mark& b, clock::time_point origin)
{
    RateWindow w;
    w.start_s = between(origin, a.t);
    w.period_s = between(a.t, b.t);
    std::map<uint32_t, uint64_t> node_cap;
    for (const auto& r : m.layout().ram)
        node_cap[r.node] = 0;
    for (uint32_t v = 0; v < m.vcpu_count(); v++) {
        const auto& vp = m.vcpu_params(v);
        VcpuRate c;
        c.vcpu = v;
        c.working_set_pages = vp.total_pages;
        c.guest_writes_per_s = static_cast<double>(b.writes[v] - a.writes[v]) / w.period_s;
        w.guest_writes_per_s += c.guest_writes_per_s;
        w.vcpus.push_back(c);
        w.capacity_pages += vp.total_pages;
        for (uint32_t k = 0; k < vp.nr_segments; k++)
            for (const auto& r : m.layout().ram) {
                const uint64_t lo = std::max(vp.seg[k].gpa, r.gpa);
                const uint64_t hi = std::min(vp.seg[k].gpa + vp.seg[k].pages * 4096, r.gpa + r.bytes);
                if (hi > lo)
                    node_cap[r.node] += (hi - lo) / 4096;
            }
    }
    for (const auto& [node, cap] : node_cap)
        w.vnodes.push_back({node, 0, cap});
    return w;
}

VnodeRate* vnode_of(RateWindow& w, int node)
{
    for (auto& n : w.vnodes)
        if (static_cast<int>(n.vnode) == node)
            return &n;
    return nullptr;
}

// The harvests of one window folded into one: the union of their dirty
// bits, each vCPU's ring entries summed, the time they took added to `harvest_s`.
struct HarvestUnion {
    std::vector<uint64_t> per_vcpu;
    dirty::Harvest total;
    bool have_total = false;

    explicit HarvestUnion(uint32_t vcpus) : per_vcpu(vcpus, 0) {}
    void merge_bits(const dirty::Harvest& h)
    {
        if (!have_total) {
            total = h;
            have_total = true;
            return;
        }
        for (size_t i = 0; i < total.slots.size(); i++)
            for (size_t w = 0; w < total.slots[i].bits.size(); w++)
                total.slots[i].bits[w] |= h.slots[i].bits[w];
    }
    void fold(const dirty::Harvest& h)
    {
        for (uint32_t v = 0; v < per_vcpu.size() && v < h.per_vcpu.size(); v++)
            per_vcpu[v] += h.per_vcpu[v];
        merge_bits(h);
    }
    void fold(const HarvestUnion& u)
    {
        for (uint32_t v = 0; v < per_vcpu.size(); v++)
            per_vcpu[v] += u.per_vcpu[v];
        if (u.have_total)
            merge_bits(u.total);
    }
};

// Counts a window's distinct dirty pages from its harvests: in all, per vnode
// (by slot), per vCPU (each page to the vCPU whose working set holds it; the
// system slot is the VMM's, not the workload's); ring entries per vCPU.
void count_union(const StressVm& m, const HarvestUnion& u, RateWindow& w)
{
    for (const auto& s : u.total.slots) {
        if (s.vnode < 0)
            continue;
        uint64_t n = 0;
        for (uint64_t b : s.bits)
            n += static_cast<uint64_t>(__builtin_popcountll(b));
        w.dirty_pages += n;
        if (VnodeRate* node = vnode_of(w, s.vnode))
            node->dirty_pages += n;
        s.for_each([&](uint64_t page) {
            int o = owner_of_gpa(m, s.gpa + page * 4096);
            if (o >= 0)
                w.vcpus[static_cast<size_t>(o)].dirty_pages++;
        });
    }
    for (uint32_t v = 0; v < w.vcpus.size() && v < u.per_vcpu.size(); v++)
        w.vcpus[v].ring_entries = u.per_vcpu[v];
    finish_window(w);
}

// Ring or bitmap: the tracker's distinct dirty pages over the period, and over
// each --interval window (ring mode harvests every 50 ms so rings rarely fill).
RateResult measure_with_tracker(StressVm& m, const RateOptions& opt)
{
    RateResult r;
    r.mode = opt.mode;
    r.interval_s = opt.interval_s;
    dirty::TrackerOptions to;
    to.mode = opt.mode == RateMode::Ring ? dirty::Mode::Ring : dirty::Mode::Bitmap;
    to.manual_protect = false;  // GET_DIRTY_LOG clears: one call per slot
    std::unique_ptr<dirty::Tracker> own;
    if (!opt.tracker)
        own = dirty::Tracker::create(m, to);
    dirty::Tracker* tracker = opt.tracker ? opt.tracker : own.get();
    if (tracker->mode() != to.mode)
        throw UsageError(fmt::format("the machine's tracker logs with the {}, not the {}", dirty::mode_name(tracker->mode()),
                                     dirty::mode_name(to.mode)));
    if (!opt.running) {
        start_warm(m, opt);
        measure_baseline(m, opt, r.logging);
    }
    struct Off {  // the machine's tracker is left as it was found, whatever happens
        dirty::Tracker* t;
        ~Off()
        {
            try {
                if (t->enabled())
                    t->disable();
            } catch (...) {
            }
        }
    } off{tracker};
    tracker->enable();
    auto harvest = [&] {
        dirty::Harvest h = tracker->harvest();
        r.harvest_s += h.get_s + h.clear_s;
        return h;
    };
    harvest();  // start clean: everything before this moment is discarded

    const Mark start = Mark::now(m);
    Mark win = start;
    HarvestUnion all(m.vcpu_count()), cur(m.vcpu_count());
    auto close = [&] {
        cur.fold(harvest());
        const Mark end = Mark::now(m);
        if (opt.interval_s > 0) {
            RateWindow w = open_window(m, win, end, start.t);
            count_union(m, cur, w);
            r.series.push_back(std::move(w));
        }
        all.fold(cur);
        cur = HarvestUnion(m.vcpu_count());
        win = end;
    };
    wait_for(m, opt, "measuring", start.t, opt.period_s, opt.interval_s, [&] {
        if (since(start.t) >= opt.period_s)
            return;
        if (opt.interval_s > 0 && since(win.t) >= opt.interval_s)
            close();
        else if (opt.mode == RateMode::Ring)
            cur.fold(harvest());
    });
    close();
    tracker->disable();
    r.total = open_window(m, start, win, start.t);
    count_union(m, all, r.total);
    if (r.logging.measured) {
        r.logging.logged_writes_per_s = r.total.guest_writes_per_s;
        r.logging.slowdown = r.logging.logged_writes_per_s > 0
                                 ? r.logging.unlogged_writes_per_s / r.logging.logged_writes_per_s
                                 : 0;
    }
    r.note = opt.mode == RateMode::Ring
                 ? "per-vCPU pages: distinct dirty pages of its working set; ring entries: what its ring received "
                   "(a page counts again after every reset, so entries can exceed distinct pages)"
                 : "per-vCPU pages: distinct dirty pages of its working set";
    if (!opt.running)
        stop(m);
    return r;
}

// A guest page hashed at the start of the period and of the current window.
struct Sample {
    const uint8_t* host;
    uint64_t hash_period, hash_window;
    int owner;  // the vCPU whose working set holds it, or -1
    uint32_t node;
};

// Random guest pages of every node, `per_gib` per GiB (at least one per node).
std::vector<Sample> pick_samples(const StressVm& m, uint64_t per_gib)
{
    std::vector<Sample> samples;
    std::mt19937_64 rng(0x5eed);
    for (const auto& range : m.layout().ram) {
        const uint64_t pages = range.bytes / 4096;
        const uint64_t want = std::max<uint64_t>(1, per_gib * range.bytes >> 30);
        for (uint64_t i = 0; i < want; i++) {
            uint64_t gpa = range.gpa + (rng() % pages) * 4096;
            const uint8_t* host = m.host_ptr(gpa, 4096);
            if (!host)
                continue;  // guest_memfd without a host mapping of ours: cannot be read here
            samples.push_back({host, 0, 0, owner_of_gpa(m, gpa), range.node});
        }
    }
    return samples;
}

double scaled(uint64_t changed, uint64_t of, uint64_t pages)
{
    return of ? static_cast<double>(changed) / static_cast<double>(of) * static_cast<double>(pages) : 0;
}

// The samples whose hash changed since the period's (or the window's) start,
// scaled to each vCPU's working set and each node's pages.
void judge_samples(std::vector<Sample>& samples, bool whole_period, RateWindow& w)
{
    std::vector<uint64_t> owned(w.vcpus.size(), 0), changed(w.vcpus.size(), 0);
    std::map<uint32_t, std::pair<uint64_t, uint64_t>> node;  // sampled, changed
    for (auto& s : samples) {
        const uint64_t h = hash_page(s.host);
        const bool c = h != (whole_period ? s.hash_period : s.hash_window);
        s.hash_window = h;
        w.samples++;
        w.samples_changed += c;
        node[s.node].first++;
        node[s.node].second += c;
        if (s.owner >= 0) {
            owned[static_cast<size_t>(s.owner)]++;
            changed[static_cast<size_t>(s.owner)] += c;
        }
    }
    w.dirty_pages = static_cast<uint64_t>(scaled(w.samples_changed, w.samples, w.capacity_pages));
    for (size_t v = 0; v < w.vcpus.size(); v++)
        w.vcpus[v].dirty_pages = static_cast<uint64_t>(scaled(changed[v], owned[v], w.vcpus[v].working_set_pages));
    for (auto& n : w.vnodes)
        n.dirty_pages = static_cast<uint64_t>(scaled(node[n.vnode].second, node[n.vnode].first, n.pages));
    finish_window(w);
    if (w.samples && w.samples_changed == w.samples)
        w.saturated = w.lower_bound = true;
}

// Sampling: hash a random sample of pages at either end of the period (and of
// each --interval window), no logging at all.
RateResult measure_by_sampling(StressVm& m, const RateOptions& opt)
{
    RateResult r;
    r.mode = opt.mode;
    r.interval_s = opt.interval_s;
    if (!opt.running)
        start_warm(m, opt);
    std::vector<Sample> samples = pick_samples(m, opt.sample_pages_per_gib);

    const Mark start = Mark::now(m);
    for (auto& s : samples)
        s.hash_period = s.hash_window = hash_page(s.host);
    Mark win = start;
    wait_for(m, opt, "measuring", start.t, opt.period_s, opt.interval_s, [&] {
        if (opt.interval_s <= 0 || since(win.t) < opt.interval_s || since(start.t) >= opt.period_s)
            return;
        const Mark end = Mark::now(m);
        RateWindow w = open_window(m, win, end, start.t);
        judge_samples(samples, false, w);
        r.series.push_back(std::move(w));
        win = end;
    });
    const Mark end = Mark::now(m);
    if (opt.interval_s > 0) {
        RateWindow w = open_window(m, win, end, start.t);
        judge_samples(samples, false, w);
        r.series.push_back(std::move(w));
    }
    r.total = open_window(m, start, end, start.t);
    judge_samples(samples, true, r.total);
    r.note = fmt::format("{} of {} sampled pages changed; sampling does no logging, so the guest's rate is the "
                         "unlogged one",
                         r.total.samples_changed, r.total.samples);
    if (!opt.running)
        stop(m);
    return r;
}

}  // namespace

const char* rate_mode_name(RateMode m)
{
    switch (m) {
    case RateMode::Ring: return "ring";
    case RateMode::Bitmap: return "bitmap";
    case RateMode::Sampling: return "sampling";
    }
    return "?";
}

RateResult measure_dirty_rate(StressVm& m, const RateOptions& opt)
{
    return opt.mode == RateMode::Sampling ? measure_by_sampling(m, opt) : measure_with_tracker(m, opt);
}

}  // namespace mvm::engines
