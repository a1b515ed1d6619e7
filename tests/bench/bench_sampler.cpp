// bench_sampler - the VMM's own cost of watching vCPUs: host CPU time of the
// progress sampler at 1 kHz with 64 vCPUs running (more vCPUs than host CPUs,
// as the lockup reproductions use), as a share of one core. Goal: < 2%.
// Also the cost of one sampling tick, for scale. Run by scripts/bench-sampler.
#include <benchmark/benchmark.h>

#include <chrono>
#include <fmt/format.h>
#include <thread>

#include "vmm/kvm/kvm.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/stress/sampler.hpp"

using namespace mvm;

namespace {

std::unique_ptr<Kvm> g_kvm;
double g_share = -1, g_hz = 0, g_tick_us = 0;

void BM_Sampler1kHz64Vcpus(benchmark::State& state)
{
    if (!g_kvm) {
        state.SkipWithError("no /dev/kvm");
        return;
    }
    MachineConfig cfg = single_node_config(64, 128ull << 20);
    StressVm m(*g_kvm, cfg);
    m.start();
    double cpu = 0, wall = 0;
    uint64_t ticks = 0;
    for (auto _ : state) {
        ProgressSampler s(m, 1000, /*keep_samples=*/true);
        s.start();
        std::this_thread::sleep_for(std::chrono::seconds(2));
        s.stop();
        cpu += s.cpu_seconds();
        wall += s.wall_seconds();
        ticks += s.ticks();
        state.SetIterationTime(s.wall_seconds());
    }
    g_share = cpu / wall;
    g_hz = static_cast<double>(ticks) / wall;
    g_tick_us = cpu / static_cast<double>(ticks) * 1e6;
    state.counters["core_share_pct"] = g_share * 100;
    state.counters["ticks_per_s"] = g_hz;
    m.request_stop();
    m.wait_finished(std::chrono::seconds(20));
}
BENCHMARK(BM_Sampler1kHz64Vcpus)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

class Reporter : public benchmark::ConsoleReporter {
public:
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        if (g_share < 0)
            return;
        fmt::print("\nprogress sampler, 64 vCPUs on {} host CPUs, target 1000 Hz\n", std::thread::hardware_concurrency());
        fmt::print("  achieved rate:         {:.0f} Hz\n", g_hz);
        fmt::print("  CPU per tick:          {:.2f} us (reads 64 mailboxes, keeps 64 samples)\n", g_tick_us);
        fmt::print("  share of one core:     {:.2f} % (goal < 2 %)\n", g_share * 100);
    }
};

}  // namespace

int main(int argc, char** argv)
{
    try {
        g_kvm = std::make_unique<Kvm>();
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench_sampler: {}\n", e.what());
    }
    benchmark::Initialize(&argc, argv);
    Reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
