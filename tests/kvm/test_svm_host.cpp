// What only a hardware-style KVM host shows: huge pages mapped 2M and split
// where eager_page_split says. `scripts/test svm` runs these inside the
// emulated SVM host (scripts/svm-host: TDP MMU, eager_page_split writable);
// on a shadow-MMU host such as our own they skip, saying why.
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>
#include <iostream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"
#include "memory/hugetlb.hpp"

using mvm::test::run_minivmm;

namespace {

constexpr const char* kTdpMmu = "/sys/module/kvm/parameters/tdp_mmu";
constexpr const char* kEagerSplit = "/sys/module/kvm/parameters/eager_page_split";

std::string read_word(const char* path)
{
    std::ifstream f(path);
    std::string w;
    f >> w;
    return w;
}

int64_t vm_stat(const nlohmann::json& window, const char* name)
{
    const auto& vm = window["vm"];
    return vm.contains(name) ? vm[name].get<int64_t>() : 0;
}

int64_t vcpu_stat(const nlohmann::json& window, const char* name)
{
    const auto& v = window["vcpus_sum"];
    return v.contains(name) ? v[name].get<int64_t>() : 0;
}

// Empty when this host can split huge pages eagerly and let us choose, else why not.
std::string why_no_tdp_mmu()
{
    const std::string tdp = read_word(kTdpMmu);
    if (tdp != "Y")
        return fmt::format("needs KVM's TDP MMU (tdp_mmu={}); run it on the emulated SVM host: scripts/test svm",
                           tdp.empty() ? "absent" : tdp);
    if (::access(kEagerSplit, W_OK) != 0)
        return "eager_page_split is read-only here";
    return "";
}

struct Windows {
    nlohmann::json w;  // kvm_stats_windows: enable, iteration 1, harvest 1, iteration 2, harvest 2, disable
};

Windows dirty_log_perf(const std::string& extra, const char* eager)
{
    auto r = run_minivmm(fmt::format("dirty-log-perf -v 1 -b 64M -i 2 -s hugetlb2m --eager-split {}{} --json -", eager,
                                     extra));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << r.out;
    if (j.is_discarded())
        return {};
    EXPECT_EQ(j["verify"]["mismatches"], 0) << j.dump();
    return {j["kvm_stats_windows"]};
}

}  // namespace

// 64 MiB of hugetlb2m (32 x 2M). Default mode (manual protect +
// INITIALLY_SET): with eager split on, the split is at the first clear and
// the later write faults are fast; off, it happens on iteration 2's write
// faults. With -g (GET_DIRTY_LOG clears): on, at enable; off, on iteration 1's
// faults. Relations only: times under emulation mean nothing.
TEST(SvmHost, HugePagesSplitWhereEagerSplitSays)
{
    REQUIRE_KVM();
    if (auto why = why_no_tdp_mmu(); !why.empty())
        GTEST_SKIP() << why;
    mvm::HugetlbReservation pool(2ull << 20, 40);
    if (!pool.ok())
        GTEST_SKIP() << "cannot get 2M pages: " << pool.why_not();
    const std::string before = read_word(kEagerSplit);

    for (std::string extra : {"", " -g"}) {
        // Where the split must show: default mode, harvest 1 (the first clear) / iteration 2;
        // with -g, enable / iteration 1.
        const size_t eager_at = extra.empty() ? 2 : 0, lazy_at = extra.empty() ? 3 : 1;
        const char* mode = extra.empty() ? "manual protect + INITIALLY_SET" : "-g";
        auto on = dirty_log_perf(extra, "on").w;
        auto off = dirty_log_perf(extra, "off").w;
        ASSERT_GE(on.size(), 4u);
        ASSERT_GE(off.size(), 4u);
        const int64_t before_2m = -vm_stat(on[eager_at], "pages_2m");
        EXPECT_GE(before_2m, 32) << mode << ", eager on: every 2M mapping splits at once: " << on.dump();
        for (size_t i = 0; i < on.size(); i++)
            if (i != eager_at)
                EXPECT_GE(vm_stat(on[i], "pages_2m"), 0) << mode << ", eager on: no other window splits: " << on[i];
        EXPECT_GE(vcpu_stat(on[lazy_at], "pf_fast"), vcpu_stat(on[lazy_at], "pf_taken") * 9 / 10)
            << mode << ", eager on: the write faults after the split are fast ones: " << on[lazy_at];
        EXPECT_EQ(vm_stat(off[eager_at], "pages_2m"), 0) << mode << ", eager off: nothing splits there: " << off[eager_at];
        EXPECT_LE(vm_stat(off[lazy_at], "pages_2m"), -32) << mode << ", eager off: the writes split: " << off[lazy_at];
        EXPECT_LT(vcpu_stat(off[lazy_at], "pf_fast"), vcpu_stat(off[lazy_at], "pf_taken"))
            << mode << ", eager off: splitting faults take the slow path: " << off[lazy_at];
        std::cout << fmt::format("hugetlb2m 32 x 2M, {}: eager on: split at {} (pages_2m {:+}); eager off: split on "
                                 "{} write faults (pages_2m {:+})\n",
                                 mode, on[eager_at]["window"].get<std::string>(), vm_stat(on[eager_at], "pages_2m"),
                                 off[lazy_at]["window"].get<std::string>(), vm_stat(off[lazy_at], "pages_2m"));
    }
    EXPECT_EQ(read_word(kEagerSplit), before) << "eager_page_split restored";
}
