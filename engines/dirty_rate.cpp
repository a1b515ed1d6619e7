#include "engines/dirty_rate.hpp"

#include <chrono>
#include <fmt/format.h>
#include <functional>
#include <random>
#include <thread>

#include "base/error.hpp"

namespace mvm::engines {

namespace {

using clock = std::chrono::steady_clock;
double since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }

uint64_t hash_page(const uint8_t* p)
{
    // FNV-1a over 64-bit words: any change of a stamp changes the hash.
    uint64_t h = 0xcbf29ce484222325ull;
    const auto* w = reinterpret_cast<const volatile uint64_t*>(p);
    for (size_t i = 0; i < 4096 / 8; i++)
        h = (h ^ w[i]) * 0x100000001b3ull;
    return h;
}

// Starts the machine and waits until every vCPU finished its first pass, then `warmup_s` more.
void start_warm(StressVm& m, double warmup_s)
{
    m.start();
    if (!m.wait_first_pass(std::chrono::seconds(60))) {
        if (auto f = m.failure())
            throw Error(f->reason);
        throw Error("the guest did not finish its first pass within 60 s");
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(warmup_s));
}

// What each vCPU's guest counted as written so far.
std::vector<uint64_t> pages_written(const StressVm& m)
{
    std::vector<uint64_t> w(m.vcpu_count());
    for (uint32_t v = 0; v < m.vcpu_count(); v++)
        w[v] = m.snapshot(v).pages_written;
    return w;
}

// Sleeps in steps of up to 50 ms until the period since `t0` is over, calling
// `tick` after each step, with the progress line; throws on a vCPU failure.
void wait_period(const StressVm& m, const RateOptions& opt, clock::time_point t0, const std::function<void()>& tick)
{
    while (since(t0) < opt.period_s) {
        std::this_thread::sleep_for(std::chrono::milliseconds(std::min(50, static_cast<int>(opt.period_s * 1000))));
        if (tick)
            tick();
        if (opt.progress)
            fmt::print(stderr, "\r\033[Kmeasuring ({}): {:.1f}/{:.1f} s", rate_mode_name(opt.mode), since(t0), opt.period_s);
        if (auto f = m.failure())
            throw Error(f->reason);
    }
}

// The measured period's rates, total and per vCPU (`vcpu_pages` dirtied by
// each, `writes0`/`writes1` the guest's own counts at either end).
void compute_rates(RateResult& r, const std::vector<double>& vcpu_pages, const std::vector<uint64_t>& writes0,
                   const std::vector<uint64_t>& writes1)
{
    r.pages_per_s = static_cast<double>(r.dirty_pages) / r.period_s;
    r.mib_per_s = r.pages_per_s * 4096 / (1 << 20);
    for (uint32_t v = 0; v < vcpu_pages.size(); v++)
        r.vcpus.push_back({v, vcpu_pages[v] / r.period_s, vcpu_pages[v] / r.period_s * 4096 / (1 << 20),
                           static_cast<double>(writes1[v] - writes0[v]) / r.period_s});
}

// Asks the guest to stop; kills its vCPUs if they have not within 10 s.
void stop(StressVm& m)
{
    m.request_stop();
    if (!m.wait_finished(std::chrono::seconds(10)))
        m.kill();
}

// The harvests of one period folded into one: the union of their dirty
// bits, each vCPU's ring entries summed, the time they took added to `harvest_s`.
struct HarvestUnion {
    std::vector<uint64_t> per_vcpu;
    dirty::Harvest total;
    bool have_total = false;

    explicit HarvestUnion(uint32_t vcpus) : per_vcpu(vcpus, 0) {}
    void fold(dirty::Harvest h, double& harvest_s)
    {
        harvest_s += h.get_s + h.clear_s;
        for (uint32_t v = 0; v < per_vcpu.size() && v < h.per_vcpu.size(); v++)
            per_vcpu[v] += h.per_vcpu[v];
        if (!have_total) {
            total = std::move(h);
            have_total = true;
            return;
        }
        for (size_t i = 0; i < total.slots.size(); i++)
            for (size_t w = 0; w < total.slots[i].bits.size(); w++)
                total.slots[i].bits[w] |= h.slots[i].bits[w];
    }
};

// Distinct guest-memory pages in `total` (the system slot is the VMM's, not
// the workload's); in bitmap mode each is also counted for the vCPU whose
// working set holds it, in ring mode each vCPU gets the entries its ring received.
uint64_t count_dirty_pages(const StressVm& m, RateMode mode, const HarvestUnion& u, std::vector<double>& vcpu_pages)
{
    uint64_t dirty_pages = 0;
    for (const auto& s : u.total.slots) {
        if (s.vnode < 0)
            continue;
        for (uint64_t w : s.bits)
            dirty_pages += static_cast<uint64_t>(__builtin_popcountll(w));
        if (mode == RateMode::Bitmap)
            s.for_each([&](uint64_t page) {
                int o = owner_of_gpa(m, s.gpa + page * 4096);
                if (o >= 0)
                    vcpu_pages[static_cast<size_t>(o)] += 1;
            });
    }
    if (mode == RateMode::Ring)
        for (uint32_t v = 0; v < m.vcpu_count(); v++)
            vcpu_pages[v] = static_cast<double>(u.per_vcpu[v]);  // entries this vCPU pushed
    return dirty_pages;
}

// Ring or bitmap: the tracker's distinct dirty pages over the period (ring
// mode harvests every 50 ms so rings rarely fill).
RateResult measure_with_tracker(StressVm& m, const RateOptions& opt)
{
    RateResult r;
    r.mode = opt.mode;
    dirty::TrackerOptions to;
    to.mode = opt.mode == RateMode::Ring ? dirty::Mode::Ring : dirty::Mode::Bitmap;
    to.manual_protect = false;  // GET_DIRTY_LOG clears: one call per slot
    auto tracker = dirty::Tracker::create(m, to);
    start_warm(m, opt.warmup_s);
    tracker->enable();
    auto h0 = clock::now();
    tracker->harvest();  // start clean: everything before this moment is discarded
    r.harvest_s += since(h0);

    const std::vector<uint64_t> writes0 = pages_written(m);
    const auto t0 = clock::now();
    HarvestUnion u(m.vcpu_count());
    wait_period(m, opt, t0, [&] {
        if (opt.mode == RateMode::Ring && since(t0) < opt.period_s)
            u.fold(tracker->harvest(), r.harvest_s);
    });
    u.fold(tracker->harvest(), r.harvest_s);
    r.period_s = since(t0);
    const std::vector<uint64_t> writes1 = pages_written(m);
    if (opt.progress)
        fmt::print(stderr, "\r\033[K");

    std::vector<double> vcpu_pages(m.vcpu_count(), 0);
    r.dirty_pages = count_dirty_pages(m, opt.mode, u, vcpu_pages);
    r.note = opt.mode == RateMode::Ring ? "per-vCPU rates are the entries each vCPU's ring received"
                                        : "per-vCPU rates attribute each dirty page to the vCPU whose working set holds it";
    tracker->disable();
    compute_rates(r, vcpu_pages, writes0, writes1);
    stop(m);
    return r;
}

// A guest page hashed at the start of the period.
struct Sample {
    uint64_t gpa;
    const uint8_t* host;
    uint64_t hash;
    int owner;  // the vCPU whose working set holds it, or -1
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
            samples.push_back({gpa, host, 0, owner_of_gpa(m, gpa)});
        }
    }
    return samples;
}

// The samples whose hash changed, scaled to the guest's memory and to each
// vCPU's working set.
void judge_samples(RateResult& r, const StressVm& m, const std::vector<Sample>& samples, std::vector<double>& vcpu_pages)
{
    const uint32_t n = m.vcpu_count();
    uint64_t guest_bytes = 0;
    for (const auto& range : m.layout().ram)
        guest_bytes += range.bytes;
    std::vector<uint64_t> owned(n, 0), changed(n, 0);
    for (const auto& s : samples) {
        const bool c = hash_page(s.host) != s.hash;
        r.samples_changed += c;
        if (s.owner >= 0) {
            owned[static_cast<size_t>(s.owner)]++;
            changed[static_cast<size_t>(s.owner)] += c;
        }
    }
    r.samples = samples.size();
    r.dirty_pages = r.samples ? static_cast<uint64_t>(static_cast<double>(r.samples_changed) /
                                                      static_cast<double>(r.samples) *
                                                      static_cast<double>(guest_bytes / 4096))
                              : 0;
    for (uint32_t v = 0; v < n; v++)
        vcpu_pages[v] = owned[v] ? static_cast<double>(changed[v]) / static_cast<double>(owned[v]) *
                                       static_cast<double>(m.vcpu_params(v).total_pages)
                                 : 0;
    r.note = fmt::format("{} of {} sampled pages changed", r.samples_changed, r.samples);
}

// Sampling: hash a random sample of pages at either end of the period, no logging at all.
RateResult measure_by_sampling(StressVm& m, const RateOptions& opt)
{
    RateResult r;
    r.mode = opt.mode;
    start_warm(m, opt.warmup_s);
    std::vector<Sample> samples = pick_samples(m, opt.sample_pages_per_gib);

    const std::vector<uint64_t> writes0 = pages_written(m);
    const auto t0 = clock::now();
    for (auto& s : samples)
        s.hash = hash_page(s.host);
    wait_period(m, opt, t0, {});
    r.period_s = since(t0);
    const std::vector<uint64_t> writes1 = pages_written(m);
    if (opt.progress)
        fmt::print(stderr, "\r\033[K");

    std::vector<double> vcpu_pages(m.vcpu_count(), 0);
    judge_samples(r, m, samples, vcpu_pages);
    compute_rates(r, vcpu_pages, writes0, writes1);
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

nlohmann::json to_json(const RateResult& r)
{
    nlohmann::json j;
    j["mode"] = rate_mode_name(r.mode);
    j["period_s"] = r.period_s;
    j["dirty_pages"] = r.dirty_pages;
    j["dirty_rate_pages_per_s"] = r.pages_per_s;
    j["dirty_rate_mib_per_s"] = r.mib_per_s;
    j["harvest_s"] = r.harvest_s;
    if (r.mode == RateMode::Sampling)
        j["sampling"] = {{"samples", r.samples}, {"changed", r.samples_changed}};
    j["vcpus"] = nlohmann::json::array();
    for (const auto& v : r.vcpus)
        j["vcpus"].push_back({{"vcpu", v.vcpu},
                              {"dirty_rate_pages_per_s", v.pages_per_s},
                              {"dirty_rate_mib_per_s", v.mib_per_s},
                              {"guest_writes_per_s", v.guest_writes_per_s}});
    j["note"] = r.note;
    return j;
}

std::string to_table(const RateResult& r)
{
    std::string o = fmt::format("dirty rate ({}, {:.2f} s): {:.1f} MiB/s, {:.0f} pages/s ({} distinct pages)\n",
                                rate_mode_name(r.mode), r.period_s, r.mib_per_s, r.pages_per_s, r.dirty_pages);
    o += fmt::format("{:>5} {:>14} {:>12} {:>18}\n", "vCPU", "pages/s", "MiB/s", "guest writes/s");
    for (const auto& v : r.vcpus)
        o += fmt::format("{:>5} {:>14.0f} {:>12.1f} {:>18.0f}\n", v.vcpu, v.pages_per_s, v.mib_per_s, v.guest_writes_per_s);
    if (r.mode != RateMode::Sampling)
        o += fmt::format("harvesting took {:.3f} ms in all\n", r.harvest_s * 1e3);
    o += r.note + "\n";
    return o;
}

}  // namespace mvm::engines
