// bench_guest - the guest's warm dirtying rate per vCPU, against a bare
// single loop on the host that writes one qword per 4 KiB page over the same
// amount of warm memory, measured in the same run (machines are shared and
// noisy: compare ratios, not absolute numbers). Run by scripts/bench-guest.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <thread>

#include "vmm/kvm/kvm.hpp"
#include "vmm/stress/stress_vm.hpp"

using namespace mvm;

namespace {

constexpr uint64_t kMemBytes = 256ull << 20;  // as in `minivmm run --mem 256M`
constexpr uint32_t kVcpus = 2;

// The reference: what one host thread does with the guest's per-vCPU region.
void BM_HostSingleLoop(benchmark::State& state)
{
    const uint64_t bytes = kMemBytes / kVcpus;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        state.SkipWithError("mmap failed");
        return;
    }
    auto* mem = static_cast<volatile uint64_t*>(p);
    const uint64_t pages = bytes / 4096;
    uint64_t gen = 0, total = 0;
    for (auto _ : state) {
        gen++;
        for (uint64_t i = 0; i < pages; i++)
            mem[i * 512] = gen;
        total += pages;
    }
    state.counters["pages_per_s"] = benchmark::Counter(static_cast<double>(total), benchmark::Counter::kIsRate);
    munmap(p, bytes);
}
BENCHMARK(BM_HostSingleLoop)->Unit(benchmark::kMillisecond)->MinTime(1.0);

// The guest: 2 vCPUs on 256 MiB; warm rate from the mailboxes after pass 1.
void BM_GuestWarm(benchmark::State& state)
{
    std::unique_ptr<Kvm> kvm;
    try {
        kvm = std::make_unique<Kvm>();
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    StressVm m(*kvm, single_node_config(kVcpus, kMemBytes));
    m.start();
    while (m.snapshot(0).passes < 2 || m.snapshot(1).passes < 2)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::vector<double> rate(kVcpus, 0);
    double seconds = 0;
    for (auto _ : state) {
        std::vector<uint64_t> p0, t0;
        for (uint32_t i = 0; i < kVcpus; i++) {
            p0.push_back(m.snapshot(i).pages_written);
            t0.push_back(m.snapshot(i).last_tsc);
        }
        auto w0 = std::chrono::steady_clock::now();
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
        for (uint32_t i = 0; i < kVcpus; i++) {
            auto s = m.snapshot(i);
            double guest_s = static_cast<double>(s.last_tsc - t0[i]) / (static_cast<double>(m.tsc_khz()) * 1000);
            rate[i] += static_cast<double>(s.pages_written - p0[i]) / guest_s;
        }
        seconds += dt;
        state.SetIterationTime(dt);
    }
    for (uint32_t i = 0; i < kVcpus; i++)
        state.counters[fmt::format("vcpu{}_pages_per_s", i)] = rate[i] / static_cast<double>(state.iterations());
    m.request_stop();
    m.wait_finished(std::chrono::seconds(5));
    if (m.failure())
        state.SkipWithError(m.failure()->reason.c_str());
}
BENCHMARK(BM_GuestWarm)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(8);

// Prints the usual table, then the ratios from the same run.
class RatioReporter : public benchmark::ConsoleReporter {
public:
    void ReportRuns(const std::vector<Run>& runs) override
    {
        ConsoleReporter::ReportRuns(runs);
        for (const auto& r : runs)
            for (const auto& [k, c] : r.counters)
                counters_[r.benchmark_name() + "/" + k] = c.value;
    }
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        double host = 0;
        for (const auto& [k, v] : counters_)
            if (k.find("BM_HostSingleLoop") == 0 && k.find("pages_per_s") != std::string::npos)
                host = v;
        fmt::print("\nwarm dirtying rate (one qword per 4 KiB page, {} MiB per vCPU)\n", kMemBytes / kVcpus >> 20);
        fmt::print("  host single loop reference: {:8.1f} M pages/s\n", host / 1e6);
        for (const auto& [k, v] : counters_) {
            auto pos = k.find("vcpu");
            if (k.find("BM_GuestWarm") != 0 || pos == std::string::npos)
                continue;
            std::string name = k.substr(pos, k.find("_pages") - pos);
            fmt::print("  guest {:<6}                {:8.1f} M pages/s  = {:.2f} x host loop\n", name, v / 1e6,
                       host > 0 ? v / host : 0.0);
        }
    }

private:
    std::map<std::string, double> counters_;
};

}  // namespace

int main(int argc, char** argv)
{
    benchmark::Initialize(&argc, argv);
    RatioReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
