// bench_numa - the two speed goals of the vNUMA work, as ratios measured in
// one run (machines are shared and noisy):
//  - placement check throughput: GiB of guest memory checked per second by
//    move_pages, for 4 KiB-mapped memory (one query per page) and for 2 MiB
//    hugetlb memory (one query per huge page), against the rate of simply
//    reading one qword per page of the same memory;
//  - parallel preallocation: the same total memory populated by 1, 2 and 4
//    per-node threads, speed-up against one thread.
// Run by scripts/bench-numa.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <memory>
#include <thread>

#include "memory/backing.hpp"
#include "memory/hugetlb.hpp"
#include "memory/prealloc.hpp"
#include "numa/placement.hpp"

using namespace mvm;

namespace {

constexpr uint64_t kCheckBytes = 512ull << 20;
constexpr uint64_t kPreallocBytes = 1024ull << 20;

void set_gib_per_s(benchmark::State& state, uint64_t bytes_per_iter)
{
    state.counters["GiB_per_s"] = benchmark::Counter(
        static_cast<double>(bytes_per_iter) * static_cast<double>(state.iterations()) / (1ull << 30),
        benchmark::Counter::kIsRate);
}

// Reference: one read per 4 KiB page of populated memory.
void BM_ReadOneQwordPerPage(benchmark::State& state)
{
    Backing b = Backing::create(BackingKind::Anon, kCheckBytes, nullptr, "bench");
    std::memset(b.host(), 1, b.size());
    uint64_t sink = 0;
    for (auto _ : state) {
        for (uint64_t off = 0; off < b.size(); off += 4096)
            sink += *reinterpret_cast<volatile uint64_t*>(b.host() + off);
        benchmark::DoNotOptimize(sink);
    }
    set_gib_per_s(state, kCheckBytes);
}
BENCHMARK(BM_ReadOneQwordPerPage)->Unit(benchmark::kMillisecond)->MinTime(0.5);

void BM_PlacementCheck4K(benchmark::State& state)
{
    Backing b = Backing::create(BackingKind::Anon, kCheckBytes, nullptr, "bench");
    std::memset(b.host(), 1, b.size());
    for (auto _ : state) {
        auto pl = numa::query_placement(b.host(), b.size(), 4096, {0});
        if (pl.pages_not_present)
            state.SkipWithError("pages went missing");
    }
    set_gib_per_s(state, kCheckBytes);
}
BENCHMARK(BM_PlacementCheck4K)->Unit(benchmark::kMillisecond)->MinTime(0.5);

void BM_PlacementCheckHugetlb2M(benchmark::State& state)
{
    HugetlbReservation pool(2ull << 20, kCheckBytes >> 21);
    if (!pool.ok()) {
        state.SkipWithError(pool.why_not().c_str());
        return;
    }
    {
        Backing b = Backing::create(BackingKind::Hugetlb2M, kCheckBytes, nullptr, "bench");
        std::memset(b.host(), 1, b.size());
        for (auto _ : state) {
            auto pl = numa::query_placement(b.host(), b.size(), 2ull << 20, {0});
            if (pl.pages_not_present)
                state.SkipWithError("pages went missing");
        }
    }  // unmapped before the pool shrinks back
    set_gib_per_s(state, kCheckBytes);
}
BENCHMARK(BM_PlacementCheckHugetlb2M)->Unit(benchmark::kMillisecond)->MinTime(0.5);

// kPreallocBytes split over N virtual nodes, each populated by its own thread.
void BM_Prealloc(benchmark::State& state)
{
    const auto nodes = static_cast<uint64_t>(state.range(0));
    for (auto _ : state) {
        state.PauseTiming();
        std::vector<Backing> backings;
        std::vector<PreallocJob> jobs;
        for (uint64_t i = 0; i < nodes; i++) {
            backings.push_back(Backing::create(BackingKind::Anon, kPreallocBytes / nodes, nullptr, "bench"));
            PreallocJob j;
            j.name = fmt::format("node{}", i);
            j.addr = backings.back().host();
            j.len = backings.back().size();
            jobs.push_back(j);
        }
        state.ResumeTiming();
        prealloc_parallel(jobs);
        state.PauseTiming();
        backings.clear();  // unmapping is not part of the measurement
        state.ResumeTiming();
    }
    set_gib_per_s(state, kPreallocBytes);
}
BENCHMARK(BM_Prealloc)->Arg(1)->Arg(2)->Arg(4)->Unit(benchmark::kMillisecond)->MinTime(1.0)->UseRealTime();

class RatioReporter : public benchmark::ConsoleReporter {
public:
    void ReportRuns(const std::vector<Run>& runs) override
    {
        ConsoleReporter::ReportRuns(runs);
        for (const auto& r : runs)
            if (!r.error_occurred)
                for (const auto& [k, c] : r.counters)
                    counters_[r.benchmark_name() + "/" + k] = c.value;
    }
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        // First counter whose benchmark name starts with `prefix`.
        auto get = [&](const std::string& prefix) {
            for (const auto& [k, v] : counters_)
                if (k.rfind(prefix, 0) == 0 && k.find("/GiB_per_s") != std::string::npos)
                    return v;
            return 0.0;
        };
        const double read = get("BM_ReadOneQwordPerPage"), q4k = get("BM_PlacementCheck4K"),
                     q2m = get("BM_PlacementCheckHugetlb2M");
        fmt::print("\nplacement check (move_pages over every page, {} MiB)\n", kCheckBytes >> 20);
        fmt::print("  reading one qword per 4K page: {:8.1f} GiB/s (reference)\n", read);
        fmt::print("  check, 4K pages:               {:8.1f} GiB/s = {:.3f} x reading\n", q4k, read > 0 ? q4k / read : 0);
        if (q2m > 0)
            fmt::print("  check, hugetlb 2M pages:       {:8.1f} GiB/s = {:.1f} x the 4K check\n", q2m,
                       q4k > 0 ? q2m / q4k : 0);
        else
            fmt::print("  check, hugetlb 2M pages:       skipped (no 2M hugetlb pages could be reserved)\n");
        const double p1 = get("BM_Prealloc/1/");
        fmt::print("\nparallel preallocation ({} MiB anon split over N nodes, one thread each)\n", kPreallocBytes >> 20);
        for (int n : {1, 2, 4}) {
            const double pn = get(fmt::format("BM_Prealloc/{}/", n));
            fmt::print("  {} node(s): {:6.2f} GiB/s = {:.2f} x one node\n", n, pn, p1 > 0 ? pn / p1 : 0);
        }
        fmt::print("  (host CPUs: {}; the speed-up is bounded by them)\n", std::thread::hardware_concurrency());
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
