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

// hugetlb2m, eager split on: the windows where the TDP MMU splits eagerly
// (enable with -g; the first clear under INITIALLY_SET) show no huge mapping
// dropped, whatever huge mappings the shadow MMU made; the stamps verify.
TEST(SvmShadow, NothingSplitsEagerly)
{
    REQUIRE_SVM_SHADOW();
    EXPECT_NE(read_word(kTdpMmu), "Y") << "npt=0 leaves KVM on the shadow MMU";
    mvm::HugetlbReservation pool(2 * kMiB, 40);
    if (!pool.ok())
        GTEST_SKIP() << "cannot get 2M pages: " << pool.why_not();
    const std::string before = read_word(kEagerSplit);
    for (std::string extra : {"", " -g"}) {
        const size_t eager_at = extra.empty() ? 2 : 0;  // harvest 1 (the first clear) / enable
        const char* mode = extra.empty() ? "manual protect + INITIALLY_SET" : "-g";
        auto j = dirty_log_perf("-v 1 -b 64M -i 2 -s hugetlb2m" + extra, "on");
        const auto& w = j["kvm_stats_windows"];
        ASSERT_GE(w.size(), 4u) << j.dump();
        if (extra.empty()) {
            EXPECT_TRUE(w[eager_at]["first_clear"].get<bool>()) << w[eager_at];
        }
        for (size_t i = 0; i <= eager_at; i++) {
            EXPECT_GE(vm_stat(w[i], "pages_2m"), 0) << mode << ": nothing splits eagerly: " << w[i];
            EXPECT_GE(vm_stat(w[i], "pages_1g"), 0) << mode << ": nothing splits eagerly: " << w[i];
        }
        std::string lazy = "none";
        for (const auto& x : w)
            if (vm_stat(x, "pages_2m") < 0) {
                lazy = fmt::format("{} (pages_2m {:+})", x["window"].get<std::string>(), vm_stat(x, "pages_2m"));
                break;
            }
        std::cout << fmt::format("shadow MMU, hugetlb2m 64M, {}, eager on: 2M mappings before logging {}; at {}: "
                                 "pages_2m {:+}; first drop: {}\n",
                                 mode, j["kvm_stats_before_logging"].value("pages_2m", int64_t{0}),
                                 w[eager_at]["window"].get<std::string>(), vm_stat(w[eager_at], "pages_2m"), lazy);
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
