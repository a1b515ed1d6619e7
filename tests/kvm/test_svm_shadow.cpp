// The emulated SVM host booted with kvm_amd npt=0 (scripts/test-svm): KVM
// runs guests on the shadow MMU (tdp_mmu=N), like our own kvm-pvm host, but
// here eager_page_split is writable: setting it on must change nothing,
// since upstream KVM splits eagerly only on the TDP MMU; and dirty tracking
// on that MMU misses no page. Elsewhere these skip, saying why.
#include <gtest/gtest.h>

#include <iostream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"
#include "memory/hugetlb.hpp"
#include "svm_test_util.hpp"

using namespace mvm::test::svm;

namespace {

constexpr uint64_t kMiB = 1ull << 20;

#define REQUIRE_SVM_SHADOW()                              \
    REQUIRE_KVM();                                        \
    if (auto why = why_not_svm(false); !why.empty())      \
        GTEST_SKIP() << why

}  // namespace

// hugetlb2m, eager split on: the shadow MMU maps the guest 2M, yet the
// windows where the TDP MMU splits eagerly (enable with -g; the first clear
// under INITIALLY_SET) show no huge mapping dropped: they go on the write
// faults after, as with eager split off on the TDP MMU; the stamps verify.
TEST(SvmShadow, NothingSplitsEagerly)
{
    REQUIRE_SVM_SHADOW();
    mvm::HugetlbReservation pool(2 * kMiB, 40);
    if (!pool.ok())
        GTEST_SKIP() << "cannot get 2M pages: " << pool.why_not();
    const std::string before = read_word(kEagerSplit);
    for (std::string extra : {"", " -g"}) {
        const size_t eager_at = extra.empty() ? 2 : 0;  // harvest 1 (the first clear) / enable
        const size_t lazy_at = extra.empty() ? 3 : 1;   // iteration 2 / iteration 1: the write faults
        const char* mode = extra.empty() ? "manual protect + INITIALLY_SET" : "-g";
        auto j = dirty_log_perf("-v 1 -b 64M -i 2 -s hugetlb2m" + extra, "on");
        const auto& w = j["kvm_stats_windows"];
        ASSERT_GE(w.size(), 4u) << j.dump();
        // npt=0: the shadow MMU, though kvm.tdp_mmu reads Y on 6.1; minivmm must say so.
        EXPECT_EQ(j["eager_split"]["mmu"], "shadow") << j["eager_split"];
        EXPECT_EQ(j["eager_split"]["effective"], false) << j["eager_split"];
        if (extra.empty()) {
            EXPECT_TRUE(w[eager_at]["first_clear"].get<bool>()) << w[eager_at];
        }
        // The guest maps its memory with 2M pages and the shadow MMU follows
        // where the backing is 2M too: there is something eager split could split.
        const int64_t before_2m = j["kvm_stats_before_logging"].value("pages_2m", int64_t{0});
        EXPECT_GE(before_2m, 32) << mode << ": the shadow MMU maps hugetlb2m 2M: " << j["kvm_stats_before_logging"];
        EXPECT_LE(vm_stat(w[lazy_at], "pages_2m"), -32) << mode << ": the write faults split them: " << w[lazy_at];
        for (size_t i = 0; i <= eager_at; i++) {
            EXPECT_GE(vm_stat(w[i], "pages_2m"), 0) << mode << ": nothing splits eagerly: " << w[i];
            EXPECT_GE(vm_stat(w[i], "pages_1g"), 0) << mode << ": nothing splits eagerly: " << w[i];
        }
        std::cout << fmt::format("shadow MMU, hugetlb2m 64M, {}, eager on: 2M mappings before logging {}; at {}: "
                                 "pages_2m {:+}; split on {} write faults (pages_2m {:+})\n",
                                 mode, before_2m, w[eager_at]["window"].get<std::string>(),
                                 vm_stat(w[eager_at], "pages_2m"), w[lazy_at]["window"].get<std::string>(),
                                 vm_stat(w[lazy_at], "pages_2m"));
    }
    EXPECT_EQ(read_word(kEagerSplit), before) << "eager_page_split restored";
}

TEST(SvmShadow, DirtyTrackingMissesNoPage)
{
    REQUIRE_SVM_SHADOW();
    mvm::HugetlbReservation pool(2 * kMiB, 20);
    if (!pool.ok())
        GTEST_SKIP() << "cannot get 2M pages: " << pool.why_not();
    expect_no_missed_page_in_any_mode(kvm, mvm::BackingKind::Hugetlb2M, "hugetlb2m");
}
