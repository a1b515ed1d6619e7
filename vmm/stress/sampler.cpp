#include "vmm/stress/sampler.hpp"

#include <algorithm>
#include <map>

#include <time.h>

namespace mvm {

ProgressSampler::ProgressSampler(const StressVm& m, uint32_t period_us, bool keep_samples)
    : m_(m), period_us_(period_us ? period_us : 1000), keep_(keep_samples)
{
}

ProgressSampler::~ProgressSampler() { stop(); }

double ProgressSampler::now_ms() const
{
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
}

void ProgressSampler::start()
{
    t0_ = std::chrono::steady_clock::now();
    stop_ = false;
    thread_ = std::thread([this] { loop(); });
    pthread_setname_np(thread_.native_handle(), "sampler");
}

void ProgressSampler::stop()
{
    if (thread_.joinable()) {
        stop_ = true;
        thread_.join();
    }
}

void ProgressSampler::loop()
{
    const uint32_t n = m_.vcpu_count();
    std::vector<uint64_t> last(n, ~0ull);
    std::vector<double> moved_at(n, 0);
    std::vector<bool> done(n, false);
    timespec c0{}, c1{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    timespec next{};
    clock_gettime(CLOCK_MONOTONIC, &next);
    if (keep_)
        samples_.reserve(static_cast<size_t>(n) * 8192);
    double prev_t = 0;  // the previous tick: the last time we saw no change
    while (!stop_.load(std::memory_order_relaxed)) {
        // Absolute deadlines: the rate does not drift with the work per tick.
        next.tv_nsec += static_cast<long>(period_us_) * 1000;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, nullptr);
        const double t = now_ms();
        for (uint32_t i = 0; i < n; i++) {
            const mvm_mailbox* mb = m_.mailbox(i);
            const uint64_t p = mb->pages_written + mb->pages_read;
            if (last[i] == ~0ull) {
                last[i] = p;
                moved_at[i] = t;
            } else if (p != last[i]) {
                // Observed without progress from moved_at to the previous tick
                // (if this thread itself was preempted, that window is short:
                // a late sampler does not make a stalled guest).
                if (prev_t - moved_at[i] > period_us_ * 2e-3)
                    gaps_.push_back({i, moved_at[i], prev_t - moved_at[i], {}});
                last[i] = p;
                moved_at[i] = t;
            }
            // The state sits on a colder line: read it only while no progress shows.
            if (p == last[i] && moved_at[i] != t && (done[i] = mb->state == MVM_STATE_DONE))
                moved_at[i] = t;
            if (keep_)
                samples_.push_back({t, i, p});
        }
        ticks_++;
        prev_t = t;
    }
    // Stalls still open at the end count up to now.
    const double t = now_ms();
    for (uint32_t i = 0; i < n; i++)
        if (!done[i] && t - moved_at[i] > period_us_ * 2e-3)
            gaps_.push_back({i, moved_at[i], t - moved_at[i], {}});
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    cpu_s_ = static_cast<double>(c1.tv_sec - c0.tv_sec) + static_cast<double>(c1.tv_nsec - c0.tv_nsec) * 1e-9;
    wall_s_ = t / 1000;
}

std::vector<Stall> ProgressSampler::stalls_over(double threshold_ms) const
{
    std::vector<Stall> out;
    for (const auto& g : gaps_)
        if (g.len_ms > threshold_ms)
            out.push_back(g);
    return out;
}

std::vector<std::pair<double, double>> all_vcpus_rate(const std::vector<ProgressSample>& samples,
                                                      double min_bin_ms, size_t max_points)
{
    std::map<double, uint64_t> total;  // per tick: pages of all vCPUs
    for (const ProgressSample& p : samples)
        total[p.t_ms] += p.pages;
    std::vector<std::pair<double, double>> out;
    if (total.size() < 2)
        return out;
    const double span = total.rbegin()->first - total.begin()->first;
    const double bin = std::max(min_bin_ms, span / static_cast<double>(std::max<size_t>(max_points, 1)));
    auto prev = total.begin();
    for (auto it = std::next(total.begin()); it != total.end(); ++it) {
        const double dt = it->first - prev->first;
        if (dt < bin && std::next(it) != total.end())
            continue;
        const double d = static_cast<double>(it->second >= prev->second ? it->second - prev->second : 0);
        out.emplace_back(it->first, dt > 0 ? d / dt * 1e3 : 0);
        prev = it;
    }
    return out;
}

}  // namespace mvm
