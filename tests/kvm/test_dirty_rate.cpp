// dirty-rate reports what its figures count: saturation flagged (the rate is
// then a lower bound), the --interval time series, per-vCPU columns named by
// what they count (distinct pages vs ring entries), and the guest's own write
// rate with logging off and on.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engines/dirty_rate.hpp"
#include "kvm_test_util.hpp"

using namespace mvm;
using mvm::test::run_minivmm;

namespace {

// A window in which every page that can be dirtied was dirty is saturated
// and a lower bound; one page short is neither.
TEST(DirtyRateWindow, SaturatedWhenEveryPageIsDirty)
{
    engines::RateWindow w;
    w.period_s = 0.5;
    w.capacity_pages = w.dirty_pages = 4096;
    w.vcpus.push_back({0, 4096, 4096});
    w.vnodes.push_back({0, 4096, 4096});
    engines::finish_window(w);
    EXPECT_TRUE(w.saturated);
    EXPECT_TRUE(w.lower_bound);
    EXPECT_TRUE(w.vcpus[0].saturated);
    EXPECT_TRUE(w.vnodes[0].saturated);
    EXPECT_DOUBLE_EQ(w.pages_per_s, 8192);

    w.dirty_pages = w.vcpus[0].dirty_pages = w.vnodes[0].dirty_pages = 4095;
    engines::finish_window(w);
    EXPECT_FALSE(w.saturated);
    EXPECT_FALSE(w.lower_bound);
    EXPECT_FALSE(w.vcpus[0].saturated);
}

// An uncapped guest rewrites its 8 MiB many times in 0.4 s: every mode must
// say the figure is saturated (the old report printed it as a clean rate).
TEST(DirtyRate, SaturationIsFlaggedInTableAndJson)
{
    REQUIRE_KVM();
    for (const char* mode : {"bitmap", "ring", "sampling"}) {
        auto r = run_minivmm(fmt::format("dirty-rate --mode {} --period 0.4 --baseline 0.1 --vcpus 1 --mem 8M "
                                         "--sample-pages 65536 --json -",
                                         mode));
        ASSERT_EQ(r.exit_code, 0) << mode << ": " << r.err;
        auto j = nlohmann::json::parse(r.out);
        EXPECT_TRUE(j["saturated"].get<bool>()) << mode << ": " << r.err;
        EXPECT_TRUE(j["lower_bound"].get<bool>()) << mode;
        if (std::string(mode) != "sampling") {
            EXPECT_EQ(j["dirty_pages"], j["capacity_pages"]) << mode;
            EXPECT_EQ(j["capacity_pages"].get<uint64_t>(), 2048u) << mode;
        }
        EXPECT_TRUE(j["vcpus"][0]["saturated"].get<bool>()) << mode;
        EXPECT_NE(r.err.find("SATURATED"), std::string::npos) << r.err;
        EXPECT_NE(r.err.find(">= "), std::string::npos) << r.err;
    }
}

// --interval: windows in order, each with per-vCPU and per-vnode figures,
// covering the period; no window has more distinct pages than the period.
TEST(DirtyRate, IntervalGivesATimeSeriesPerVcpuAndVnode)
{
    REQUIRE_KVM();
    for (const char* mode : {"bitmap", "sampling"}) {
        auto r = run_minivmm(fmt::format("dirty-rate --mode {} --period 0.6 --interval 0.2 --baseline 0 --vcpus 2 "
                                         "--numa node=0,cpus=0,mem=16M,host-nodes=0 "
                                         "--numa node=1,cpus=1,mem=16M,host-nodes=0 --rate 5000 --sample-pages 65536 --json -",
                                         mode));
        ASSERT_EQ(r.exit_code, 0) << mode << ": " << r.err;
        auto j = nlohmann::json::parse(r.out);
        EXPECT_DOUBLE_EQ(j["interval_s"].get<double>(), 0.2);
        const auto& s = j["series"];
        ASSERT_GE(s.size(), 2u) << mode;
        ASSERT_LE(s.size(), 3u) << mode;
        double covered = 0, last_start = -1;
        uint64_t vcpu_pages[2] = {0, 0};
        for (const auto& w : s) {
            EXPECT_GT(w["start_s"].get<double>(), last_start);
            last_start = w["start_s"].get<double>();
            covered += w["period_s"].get<double>();
            EXPECT_EQ(w["vcpus"].size(), 2u);
            ASSERT_EQ(w["vnodes"].size(), 2u);
            EXPECT_EQ(w["vnodes"][1]["vnode"], 1);
            EXPECT_EQ(w["vnodes"][0]["capacity_pages"].get<uint64_t>(), 4096u);
            for (size_t v = 0; v < 2; v++)
                vcpu_pages[v] += w["vcpus"][v]["dirty_pages"].get<uint64_t>();
            EXPECT_FALSE(w["saturated"].get<bool>()) << "5000 pages/s cannot fill 4096 pages in 0.2 s";
            if (std::string(mode) == "bitmap")
                EXPECT_LE(w["dirty_pages"].get<uint64_t>(), j["dirty_pages"].get<uint64_t>());
        }
        EXPECT_NEAR(covered, j["period_s"].get<double>(), 0.01) << mode;
        // Each vCPU that wrote in the period shows dirty pages in the series
        // (one starved for the whole period on a loaded host writes nothing).
        for (size_t v = 0; v < 2; v++)
            if (j["vcpus"][v]["guest_writes_per_s"].get<double>() * j["period_s"].get<double>() > 100)
                EXPECT_GT(vcpu_pages[v], 0u) << mode << " vCPU " << v << ": " << r.err;
        EXPECT_NE(r.err.find("time series"), std::string::npos) << r.err;
    }
}

// Ring mode: per-vCPU dirty_pages are distinct pages (they add up to the
// total); ring entries are a column of their own; every column is described;
// the guest's own rate with logging off and on is reported.
TEST(DirtyRate, RingColumnsSayWhatTheyCountAndLoggingCostIsShown)
{
    REQUIRE_KVM();
    auto r = run_minivmm("dirty-rate --mode ring --period 0.5 --baseline 0.2 --vcpus 2 --mem 16M --json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["config"]["machine"]["dirty_ring_bytes"], 64 * 1024) << "the report says what it ran with";
    EXPECT_TRUE(j["config"]["host"].contains("kernel"));
    uint64_t distinct = 0, entries = 0;
    for (const auto& v : j["vcpus"]) {
        distinct += v["dirty_pages"].get<uint64_t>();
        entries += v["ring_entries"].get<uint64_t>();
        EXPECT_NEAR(v["dirty_rate_pages_per_s"].get<double>() * j["period_s"].get<double>(),
                    v["dirty_pages"].get<double>(), 1.0);
    }
    EXPECT_EQ(distinct, j["dirty_pages"].get<uint64_t>()) << "per-vCPU distinct pages add up to the total";
    EXPECT_GE(entries, distinct) << "a page counts in the ring again after every reset";
    for (const char* col : {"dirty_pages", "dirty_rate_pages_per_s", "ring_entries", "ring_entries_per_s",
                            "guest_writes_per_s", "working_set_pages", "saturated"})
        EXPECT_TRUE(j["vcpu_columns"].contains(col)) << col;
    EXPECT_NE(r.err.find("ring entries/s"), std::string::npos) << r.err;

    const auto& c = j["logging_cost"];
    ASSERT_TRUE(c.is_object()) << r.out;
    EXPECT_GT(c["baseline_s"].get<double>(), 0.15);
    EXPECT_GT(c["guest_writes_per_s_unlogged"].get<double>(), 0);
    EXPECT_GT(c["guest_writes_per_s_logged"].get<double>(), 0);
    EXPECT_NEAR(c["slowdown"].get<double>(),
                c["guest_writes_per_s_unlogged"].get<double>() / c["guest_writes_per_s_logged"].get<double>(), 1e-6);
    EXPECT_DOUBLE_EQ(c["guest_writes_per_s_logged"].get<double>(), j["guest_writes_per_s"].get<double>());
    EXPECT_EQ(c["vcpus_guest_writes_per_s_unlogged"].size(), 2u);
    EXPECT_NE(r.err.find("logging slowed the guest"), std::string::npos) << r.err;
}

}  // namespace
