// bench_dirty - harvest cost of the dirty ring and the dirty bitmap against
// guest memory size and the number of dirty pages, measured in one run. The
// guest (one vCPU, lock-step passes) dirties exactly D pages of an M-byte
// memslot per iteration; each iteration is then harvested:
//   bitmap: KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect)
//   ring:   collect the ring entries + KVM_RESET_DIRTY_RINGS
// Expected shape: ring cost follows D, bitmap cost follows M. Memory beyond
// the working set is never touched, so 64 GiB slots cost no host memory.
// Run by scripts/bench-dirty.
#include <benchmark/benchmark.h>

#include <chrono>
#include <fmt/format.h>
#include <map>
#include <thread>

#include "vmm/dirty/tracker.hpp"
#include "vmm/kvm/kvm.hpp"
#include "vmm/stress/stress_vm.hpp"

using namespace mvm;

namespace {

std::unique_ptr<Kvm> g_kvm;

void wait_pass(StressVm& m, uint64_t gate)
{
    m.set_pass_gate(gate);
    while (m.snapshot(0).passes < gate) {
        if (m.failure())
            throw std::runtime_error(m.failure()->reason);
        std::this_thread::yield();
    }
}

// Args: memory MiB, dirty pages, mode (0 bitmap, 1 ring).
void BM_Harvest(benchmark::State& state)
{
    if (!g_kvm) {
        state.SkipWithError("no /dev/kvm");
        return;
    }
    const uint64_t mem = static_cast<uint64_t>(state.range(0)) << 20;
    const uint64_t dirty = static_cast<uint64_t>(state.range(1));
    const bool ring = state.range(2) == 1;
    MachineConfig cfg = single_node_config(1, mem);
    cfg.workload.working_set_pages = dirty;
    if (ring)
        cfg.dirty_ring_bytes = 1u << 20;  // 65536 entries: holds a whole iteration
    StressVm m(*g_kvm, cfg);
    dirty::TrackerOptions to;
    to.mode = ring ? dirty::Mode::Ring : dirty::Mode::Bitmap;
    to.manual_protect = true;
    auto tracker = dirty::Tracker::create(m, to);
    m.set_pass_gate(1);
    m.start();
    wait_pass(m, 1);
    tracker->enable();
    uint64_t gate = 1;
    wait_pass(m, ++gate);
    tracker->harvest();  // everything since enabling
    double harvest_s = 0;
    uint64_t pages = 0;
    for (auto _ : state) {
        state.PauseTiming();
        wait_pass(m, ++gate);
        state.ResumeTiming();
        auto t0 = std::chrono::steady_clock::now();
        dirty::Harvest h = tracker->harvest();
        double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        state.SetIterationTime(t);
        harvest_s += t;
        pages += h.dirty_pages;
    }
    state.counters["dirty_pages"] = static_cast<double>(pages) / static_cast<double>(state.iterations());
    state.counters["pages_per_s"] = static_cast<double>(pages) / harvest_s;
    state.SetLabel(ring ? "ring" : "bitmap");
    m.request_stop();
    m.set_pass_gate(0);
    m.wait_finished(std::chrono::seconds(10));
}
BENCHMARK(BM_Harvest)
    ->ArgNames({"mem_mib", "dirty", "ring"})
    ->ArgsProduct({{64, 1024, 16384, 65536}, {1024, 16384}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->Iterations(20);

class ShapeReporter : public benchmark::ConsoleReporter {
public:
    void ReportRuns(const std::vector<Run>& runs) override
    {
        ConsoleReporter::ReportRuns(runs);
        for (const auto& r : runs)
            if (!r.error_occurred)
                us_[{r.run_name.args}] = r.GetAdjustedRealTime();
    }
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        // args string: "mem_mib:64/dirty:1024/ring:0"
        auto get = [&](int mem, int dirty, int ring) {
            auto it = us_.find(fmt::format("mem_mib:{}/dirty:{}/ring:{}", mem, dirty, ring));
            return it == us_.end() ? 0.0 : it->second;
        };
        fmt::print("\nharvest time per iteration (us), one vCPU dirtying D pages of M memory\n");
        fmt::print("{:>8} {:>8} {:>12} {:>12} {:>14} {:>14}\n", "M", "D", "bitmap", "ring", "bitmap pages/s",
                   "ring pages/s");
        for (int d : {1024, 16384})
            for (int mem : {64, 1024, 16384, 65536}) {
                double b = get(mem, d, 0), r = get(mem, d, 1);
                fmt::print("{:>7}M {:>8} {:>12.1f} {:>12.1f} {:>14.3g} {:>14.3g}\n", mem, d, b, r, b > 0 ? d / b * 1e6 : 0,
                           r > 0 ? d / r * 1e6 : 0);
            }
        for (int d : {1024, 16384}) {
            double b64 = get(64, d, 0), b1g = get(65536, d, 0), r64 = get(64, d, 1), r1g = get(65536, d, 1);
            fmt::print("D={:>5}: 1024x the memory (64M -> 64G) costs the bitmap {:.2f}x, the ring {:.2f}x\n", d,
                       b64 > 0 ? b1g / b64 : 0, r64 > 0 ? r1g / r64 : 0);
        }
        for (int mem : {64, 65536}) {
            double b1 = get(mem, 1024, 0), b16 = get(mem, 16384, 0), r1 = get(mem, 1024, 1), r16 = get(mem, 16384, 1);
            fmt::print("M={:>4}M: 16x the dirty pages costs the bitmap {:.2f}x, the ring {:.2f}x\n", mem,
                       b1 > 0 ? b16 / b1 : 0, r1 > 0 ? r16 / r1 : 0);
        }
    }

private:
    std::map<std::string, double> us_;
};

}  // namespace

int main(int argc, char** argv)
{
    try {
        g_kvm = std::make_unique<Kvm>();
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench_dirty: {}\n", e.what());
    }
    benchmark::Initialize(&argc, argv);
    ShapeReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
