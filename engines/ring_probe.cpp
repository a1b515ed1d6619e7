#include "engines/ring_probe.hpp"

#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fmt/format.h>
#include <mutex>
#include <thread>

#include "base/error.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::engines {

namespace {

using clock = std::chrono::steady_clock;

// The signal aimed at the harvesting thread: caught (an ignored signal is
// never pending), no SA_RESTART. The handler stays installed for the life of
// the process: a signal still in flight when the storm ends must find it.
constexpr int kProbeSignal = SIGUSR2;
std::atomic<uint64_t> g_handled{0};
void on_probe_signal(int) { g_handled.fetch_add(1, std::memory_order_relaxed); }

void install_probe_handler()
{
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_handler = on_probe_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(kProbeSignal, &sa, nullptr);
    });
}

// Signals at `tids` every ~100 us until stopped.
class SignalStorm {
public:
    SignalStorm(std::vector<std::pair<int, int>> targets) : targets_(std::move(targets))
    {
        thread_ = std::thread([this] {
            while (!stop_.load()) {
                for (auto [tid, sig] : targets_)
                    sent_ += ::syscall(SYS_tgkill, ::getpid(), tid, sig) == 0;
                std::this_thread::sleep_for(std::chrono::microseconds(100));
            }
        });
    }
    ~SignalStorm() { stop(); }
    uint64_t stop()
    {
        if (thread_.joinable()) {
            stop_ = true;
            thread_.join();
        }
        return sent_;
    }

private:
    std::vector<std::pair<int, int>> targets_;
    std::atomic<bool> stop_{false};
    uint64_t sent_ = 0;
    std::thread thread_;
};

void add(RingProbeResult& r, const dirty::Harvest& h)
{
    r.harvests++;
    r.entries += h.entries;
    r.reset += h.reset;
    r.short_resets += h.reset < h.entries;
}

// Every vCPU completes `passes` more passes from now (false on failure or timeout).
bool wait_passes(const StressVm& m, uint64_t passes, std::chrono::seconds timeout)
{
    std::vector<uint64_t> p0;
    for (uint32_t v = 0; v < m.vcpu_count(); v++)
        p0.push_back(m.snapshot(v).passes);
    const auto deadline = clock::now() + timeout;
    for (;;) {
        bool all = true;
        for (uint32_t v = 0; v < m.vcpu_count(); v++)
            all &= m.snapshot(v).passes >= p0[v] + passes;
        if (all)
            return true;
        if (m.failure() || clock::now() > deadline)
            return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
}

// The pages of every working set that `h` does not hold.
void check_last_pass(const StressVm& m, const dirty::Harvest& h, RingProbeResult& r)
{
    for (uint32_t v = 0; v < m.vcpu_count(); v++) {
        const auto& vp = m.vcpu_params(v);
        for (uint32_t k = 0; k < vp.nr_segments; k++)
            for (uint64_t p = 0; p < vp.seg[k].pages; p++) {
                const uint64_t gpa = vp.seg[k].gpa + p * 4096;
                r.pages_checked++;
                if (!h.contains_gpa(gpa)) {
                    r.unlogged++;
                    if (r.unlogged_gpas.size() < 8)
                        r.unlogged_gpas.push_back(gpa);
                }
            }
    }
}

}  // namespace

RingProbeResult probe_reset_under_signals(const Kvm& kvm, const RingProbeOptions& opt)
{
    RingProbeResult r;
    r.mode = opt.mode;
    r.guarded = opt.guarded;
    MachineConfig cfg = single_node_config(opt.vcpus, opt.bytes_per_vcpu * opt.vcpus);
    if (opt.mode == dirty::Mode::Ring) {
        if (!dirty::min_dirty_ring_bytes(kvm)) {
            r.skipped = "this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)";
            return r;
        }
        cfg.dirty_ring_bytes = opt.ring_bytes;
    }
    install_probe_handler();
    StressVm m(kvm, cfg);
    dirty::TrackerOptions to;
    to.mode = opt.mode;
    to.manual_protect = false;
    to.reset_signal_guard = opt.guarded;
    auto tracker = dirty::Tracker::create(m, to);
    m.start();
    if (!m.wait_first_pass(std::chrono::seconds(20)))
        throw Error("ring probe: the guest did not finish its first pass");
    tracker->enable();
    std::vector<std::pair<int, int>> targets{{static_cast<int>(::gettid()), kProbeSignal}};
    if (opt.kick_vcpus)
        for (uint32_t v = 0; v < m.vcpu_count(); v++)
            targets.emplace_back(m.vcpu_thread_info(v).tid, SIGUSR1);
    const uint64_t handled0 = g_handled.load();
    const auto t0 = clock::now();
    {
        SignalStorm storm(targets);
        while (std::chrono::duration<double>(clock::now() - t0).count() < opt.storm_s) {
            add(r, tracker->harvest());
            std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(opt.harvest_ms));
        }
        r.signals_sent = storm.stop();
    }
    r.storm_s = std::chrono::duration<double>(clock::now() - t0).count();
    r.signals_handled = g_handled.load() - handled0;
    add(r, tracker->harvest());  // drain: what the storm left
    if (!wait_passes(m, 2, std::chrono::seconds(20)))
        throw Error("ring probe: the guest did not complete two more passes");
    dirty::Harvest last = tracker->harvest();
    add(r, last);
    check_last_pass(m, last, r);
    tracker->disable();
    m.request_stop();
    if (!m.wait_finished(std::chrono::seconds(10)))
        m.kill();
    if (auto f = m.failure())
        throw Error("ring probe: " + f->reason);
    return r;
}

std::string RingProbeResult::summary() const
{
    if (!skipped.empty())
        return "skipped: " + skipped;
    const std::string how = mode == dirty::Mode::Bitmap ? "bitmap (KVM_GET_DIRTY_LOG)"
                            : guarded                  ? "ring with signals blocked around the reset"
                                                       : "ring unguarded";
    std::string o = fmt::format("{}: {} of {} pages written after the signals stopped were never logged ({} harvests in "
                                "{:.1f} s under {} signals, {} handled",
                                how, unlogged, pages_checked, harvests, storm_s, signals_sent, signals_handled);
    if (mode == dirty::Mode::Ring)
        o += fmt::format("; {} entries collected, KVM_RESET_DIRTY_RINGS said {}, short {} times", entries, reset,
                         short_resets);
    return o + ")";
}

nlohmann::json RingProbeResult::to_json() const
{
    return {{"skipped", skipped},         {"mode", dirty::mode_name(mode)}, {"guarded", guarded},
            {"storm_s", storm_s},         {"harvests", harvests},           {"entries", entries},
            {"reset", reset},             {"short_resets", short_resets}, {"signals_sent", signals_sent},   {"signals_handled", signals_handled},
            {"pages_checked", pages_checked}, {"unlogged", unlogged},       {"unlogged_gpas", unlogged_gpas}};
}

}  // namespace mvm::engines
