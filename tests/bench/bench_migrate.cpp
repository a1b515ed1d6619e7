// bench_migrate - migration throughput, as ratios from one run:
//  - in-process migration (pre-copy bytes / pre-copy time) of a 256 MiB guest
//    against a plain memcpy of the same amount of memory into populated
//    memory (the destination preallocates, like QEMU's -mem-prealloc), and
//    into fresh memory for scale;
//  - the same migration over TCP loopback to a receiver thread.
// The guest writes all its memory once and then idles at the pass gate, so the
// bulk pass dominates and the copy has the CPUs to itself, as memcpy does.
// Run by scripts/bench-migrate.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <thread>

#include "migration/migrate.hpp"
#include "vmm/kvm/kvm.hpp"
#include "vmm/stress/stress_vm.hpp"

using namespace mvm;

namespace {

constexpr uint64_t kBytes = 256ull << 20;
std::unique_ptr<Kvm> g_kvm;
std::map<std::string, double> g_rate;  // bytes/s by name

void* map_fresh()
{
    return mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

void BM_MemcpyFresh(benchmark::State& state)
{
    void* src = map_fresh();
    std::memset(src, 0x5a, kBytes);
    double secs = 0;
    for (auto _ : state) {
        void* dst = map_fresh();
        auto t0 = std::chrono::steady_clock::now();
        for (uint64_t off = 0; off < kBytes; off += 4096)
            std::memcpy(static_cast<char*>(dst) + off, static_cast<char*>(src) + off, 4096);
        double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        state.SetIterationTime(t);
        secs += t;
        munmap(dst, kBytes);
    }
    g_rate["memcpy_fresh"] = static_cast<double>(kBytes) * static_cast<double>(state.iterations()) / secs;
    state.counters["GiB_per_s"] = g_rate["memcpy_fresh"] / (1ull << 30);
    munmap(src, kBytes);
}
BENCHMARK(BM_MemcpyFresh)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

void BM_MemcpyPopulated(benchmark::State& state)
{
    void* src = map_fresh();
    void* dst = map_fresh();
    std::memset(src, 0x5a, kBytes);
    std::memset(dst, 0, kBytes);
    for (auto _ : state)
        for (uint64_t off = 0; off < kBytes; off += 4096)
            std::memcpy(static_cast<char*>(dst) + off, static_cast<char*>(src) + off, 4096);
    g_rate["memcpy_populated"] = static_cast<double>(kBytes) * static_cast<double>(state.iterations()) /
                                 (state.iterations() ? 1 : 1);  // replaced below from the timing
    state.counters["GiB_per_s"] =
        benchmark::Counter(static_cast<double>(kBytes) * static_cast<double>(state.iterations()) / (1ull << 30),
                           benchmark::Counter::kIsRate);
    munmap(src, kBytes);
    munmap(dst, kBytes);
}
BENCHMARK(BM_MemcpyPopulated)->Unit(benchmark::kMillisecond)->Iterations(5);

void migrate_once(benchmark::State& state, const std::string& to, const char* name)
{
    if (!g_kvm) {
        state.SkipWithError("no /dev/kvm");
        return;
    }
    double bytes = 0, secs = 0;
    for (auto _ : state) {
        MachineConfig cfg = single_node_config(2, kBytes);
        cfg.workload.rate_pages_per_s = 1000;
        StressVm src(*g_kvm, cfg);
        auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
        std::unique_ptr<StressVm> dst;
        std::thread recv;
        std::string dest = to;
        if (to == "tcp") {
            static uint16_t port = 31000 + static_cast<uint16_t>(::getpid() % 1000);
            port++;
            MachineConfig dcfg = cfg;
            dcfg.nodes[0].prealloc = true;  // as minivmm receive does
            dst = std::make_unique<StressVm>(*g_kvm, dcfg);
            migration::ReceiveOptions ro;
            ro.listen = fmt::format("tcp:127.0.0.1:{}", port);
            ro.post_run_s = 0.1;
            recv = std::thread([&, ro] { migration::receive(*dst, ro); });
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
            dest = ro.listen;
        }
        // After its first pass each vCPU waits at the pass gate, held in the
        // VMM: the guest's memory is all written but its vCPUs use no CPU, so
        // the copy is measured, not the competition for our 2 cores.
        src.set_pass_gate(1);
        src.start();
        while ((src.snapshot(0).passes < 1 || src.snapshot(1).passes < 1) && !src.failure())
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        migration::MigrateOptions o;
        o.to = dest;
        o.post_run_s = 0.1;
        o.verify = false;
        migration::MigrateReport r = migrate(src, *tracker, o, nullptr);
        if (recv.joinable())
            recv.join();
        if (r.status != "completed") {
            state.SkipWithError(r.error.c_str());
            return;
        }
        double pre_s = 0;
        uint64_t pre_b = 0;
        for (size_t i = 0; i + 1 < r.rounds.size(); i++) {
            pre_s += r.rounds[i].duration_s;
            pre_b += r.rounds[i].bytes;
        }
        state.SetIterationTime(pre_s);
        bytes += static_cast<double>(pre_b);
        secs += pre_s;
        src.kill();
    }
    g_rate[name] = bytes / secs;
    state.counters["GiB_per_s"] = g_rate[name] / (1ull << 30);
}

void BM_MigrateInproc(benchmark::State& state) { migrate_once(state, "inproc", "inproc"); }
BENCHMARK(BM_MigrateInproc)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

void BM_MigrateTcpLoopback(benchmark::State& state) { migrate_once(state, "tcp", "tcp"); }
BENCHMARK(BM_MigrateTcpLoopback)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

class RatioReporter : public benchmark::ConsoleReporter {
public:
    void ReportRuns(const std::vector<Run>& runs) override
    {
        ConsoleReporter::ReportRuns(runs);
        for (const auto& r : runs)
            if (!r.error_occurred && r.run_name.function_name == "BM_MemcpyPopulated")
                g_rate["memcpy_populated"] =
                    static_cast<double>(kBytes) / (r.real_accumulated_time / static_cast<double>(r.iterations));
    }
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        auto gib = [](double v) { return v / (1ull << 30); };
        const double fresh = g_rate["memcpy_fresh"], pop = g_rate["memcpy_populated"], in = g_rate["inproc"],
                     tcp = g_rate["tcp"];
        fmt::print("\nmigration throughput, 256 MiB guest, 2 vCPUs\n");
        fmt::print("  memcpy into populated memory: {:6.2f} GiB/s (reference: the destination preallocates)\n", gib(pop));
        fmt::print("  memcpy into fresh memory:     {:6.2f} GiB/s (one page fault per page)\n", gib(fresh));
        fmt::print("  in-process migration:         {:6.2f} GiB/s = {:.2f} x memcpy into populated memory\n", gib(in),
                   pop > 0 ? in / pop : 0);
        fmt::print("  TCP loopback migration:       {:6.2f} GiB/s = {:.2f} x in-process\n", gib(tcp), in > 0 ? tcp / in : 0);
    }
};

}  // namespace

int main(int argc, char** argv)
{
    try {
        g_kvm = std::make_unique<Kvm>();
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench_migrate: {}\n", e.what());
    }
    benchmark::Initialize(&argc, argv);
    RatioReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
