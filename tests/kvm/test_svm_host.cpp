// What only a hardware-style KVM host shows, checked inside the emulated SVM
// host with nested paging (scripts/svm-host, kvm_amd npt=1: TDP MMU,
// eager_page_split writable, a 1 GiB page reserved at boot by
// scripts/test-svm): the guest boots and verifies on every backing that
// kernel offers, dirty tracking misses no page in any mode, migration in
// process and over TCP verifies, and huge pages (THP, hugetlb 2M and 1G) are
// mapped huge and split where eager_page_split says. Relations and counts
// only: times under emulation mean nothing. Elsewhere they skip, saying why.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <initializer_list>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dirty_intervals.hpp"
#include "kvm_test_util.hpp"
#include "memory/hugetlb.hpp"
#include "svm_test_util.hpp"

using namespace mvm::test::svm;
using mvm::test::free_port;
using mvm::test::Receiver;
using mvm::test::run_minivmm;

namespace {

constexpr uint64_t kMiB = 1ull << 20;

#define REQUIRE_SVM_NPT()                                 \
    REQUIRE_KVM();                                        \
    if (auto why = why_not_svm(true); !why.empty())       \
        GTEST_SKIP() << why

#define REQUIRE_TDP_MMU()                                 \
    REQUIRE_KVM();                                        \
    if (auto why = why_no_tdp_mmu(); !why.empty())        \
        GTEST_SKIP() << why

// The first line of `text` that contains `what` ("" if none).
std::string line_with(const std::string& text, const std::string& what)
{
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);)
        if (l.find(what) != std::string::npos)
            return l;
    return "";
}

// Whether some line of `text` holds every one of `words`.
bool has_line(const std::string& text, std::initializer_list<const char*> words)
{
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);)
        if (std::all_of(words.begin(), words.end(), [&](const char* w) { return l.find(w) != std::string::npos; }))
            return true;
    return false;
}

}  // namespace

// caps on the emulated host: KVM's vendor module is kvm_amd with nested
// paging on, guests run on the TDP MMU, eager split can take effect; the CPU
// /proc/cpuinfo describes is an AMD one with SVM.
TEST(SvmHost, CapsSaysAmdSvmWithNestedPaging)
{
    REQUIRE_SVM_NPT();
    const std::string cpuinfo = mvm::test::read_file("/proc/cpuinfo");
    EXPECT_NE(cpuinfo.find("AuthenticAMD"), std::string::npos) << "the emulated CPU is an AMD EPYC";
    EXPECT_NE(line_with(cpuinfo, "flags").find(" svm"), std::string::npos) << line_with(cpuinfo, "flags");
    auto r = run_minivmm("caps --json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse_json(r.out);
    const auto& k = j["kvm"];
    std::string npt;
    for (const auto& p : k["module_params"])
        if (p["module"] == "kvm_amd" && p["name"] == "npt")
            npt = p["value"].get<std::string>();
    EXPECT_EQ(npt, "Y") << "caps lists kvm_amd's npt parameter: " << k["module_params"].dump();
    EXPECT_EQ(k["eager_page_split"]["tdp_mmu"], "Y") << k["eager_page_split"].dump();
    EXPECT_EQ(k["eager_page_split"]["effective"], k["eager_page_split"]["eager_page_split"] == "Y")
        << k["eager_page_split"].dump();
    EXPECT_EQ(k["mmu"]["name"], "tdp") << k["mmu"].dump();
    auto t = run_minivmm("caps");
    ASSERT_EQ(t.exit_code, 0) << t.err;
    const std::string table = t.out + t.err;
    const std::string mmu = line_with(table, "guest MMU:");
    EXPECT_NE(mmu.find("TDP MMU"), std::string::npos) << table;
    EXPECT_TRUE(has_line(table, {"kvm_amd", " npt ", " Y "})) << "the kvm_amd parameters listed: " << table;
    std::cout << fmt::format("caps: CPU AuthenticAMD with svm; kvm_amd npt={};{}\n", npt, mmu);
}

// `run` verifies (0 stamp mismatches, every page checked) on each backing
// this kernel offers (64 MiB; 1 GiB on hugetlb1g), one pass per vCPU (first touch is slow under TCG: a
// pass, not a duration); gmem is refused cleanly where the default VM type
// has no mmap-able guest_memfd (Debian's 6.12 and 6.1): one line, exit 1-127.
TEST(SvmHost, GuestVerifiesOnEveryBacking)
{
    REQUIRE_SVM_NPT();
    mvm::HugetlbReservation pool2m(2 * kMiB, 32);
    mvm::HugetlbReservation pool1g(1024 * kMiB, 1);
    for (const char* backing : {"anon", "shm", "thp", "hugetlb2m", "hugetlb1g"}) {
        if (std::string(backing) == "hugetlb2m" && !pool2m.ok()) {
            ADD_FAILURE() << "no 2M pages for hugetlb2m: " << pool2m.why_not();
            continue;
        }
        if (std::string(backing) == "hugetlb1g" && !pool1g.ok()) {
            std::cout << "hugetlb1g: not checked: " << pool1g.why_not() << " (scripts/test-svm reserves one at boot)\n";
            continue;
        }
        const bool giga = std::string(backing) == "hugetlb1g";
        const uint64_t mem = giga ? 1024 * kMiB : 64 * kMiB;  // whole pages
        auto r = run_minivmm(fmt::format("run --vcpus 2 --mem {}M --backing {} --passes 1 --duration 60 --json -",
                                         mem / kMiB, backing));
        ASSERT_EQ(r.exit_code, 0) << backing << ": " << r.err;
        auto j = parse_json(r.out);
        EXPECT_EQ(j["status"], "completed") << backing << ": " << j.dump();
        EXPECT_EQ(j["verify"]["mismatches"], 0) << backing;
        EXPECT_EQ(j["verify"]["pages_checked"], mem / 4096) << backing;
        uint64_t written = 0;
        for (const auto& v : j["vcpus"]) {
            EXPECT_GE(v["passes"].get<uint64_t>(), 1u) << backing << ": vCPU " << v["vcpu"];
            written += v["pages_written"].get<uint64_t>();
        }
        EXPECT_GE(written, mem / 4096) << backing;
        std::cout << fmt::format("run --backing {}: 2 vCPUs, {} pages written, {} checked, {} mismatches\n", backing,
                                 written, j["verify"]["pages_checked"].get<uint64_t>(),
                                 j["verify"]["mismatches"].get<uint64_t>());
    }
    auto g = run_minivmm("run --vcpus 1 --mem 64M --backing gmem --passes 1 --json -");
    const std::string why = g.err.substr(0, g.err.find('\n'));
    EXPECT_FALSE(g.signaled) << "gmem: killed by signal " << g.term_signal;
    if (g.exit_code == 0) {
        std::cout << "run --backing gmem: offered by this kernel and verified\n";
    } else {
        EXPECT_GT(g.exit_code, 0);
        EXPECT_LT(g.exit_code, 128) << g.err;
        EXPECT_NE(why.find("gmem"), std::string::npos) << "one line naming the backing: " << g.err;
        EXPECT_EQ(g.err.find('\n'), g.err.size() - 1) << "one line: " << g.err;
        EXPECT_TRUE(g.out.empty()) << g.out;
        std::cout << fmt::format("run --backing gmem: refused (exit {}): {}\n", g.exit_code, why);
    }
}

// Every page the guest wrote in a harvest interval is in that interval's
// harvest, in each tracking mode, on hugetlb2m mapped 2M before logging is
// enabled (so enabling write-protects, and eager split splits, live huge
// mappings): GET-clears, manual protect, INITIALLY_SET with a chunked
// clear, and the dirty ring at the host's smallest size (it fills).
TEST(SvmHost, DirtyTrackingMissesNoPage)
{
    REQUIRE_SVM_NPT();
    mvm::HugetlbReservation pool(2 * kMiB, 20);
    if (!pool.ok())
        GTEST_SKIP() << "cannot get 2M pages: " << pool.why_not();
    expect_no_missed_page_in_any_mode(kvm, mvm::BackingKind::Hugetlb2M, "hugetlb2m");
}

// Pre-copy migration of a running guest, in process (bitmap) and to a
// receiver over TCP on the host's loopback (ring): completed, every page
// checked, 0 mismatches at the switchover and after it, and the destination
// guest ran on. TCP there moves ~14 MB/s (the emulated kernel copies), so
// that guest is smaller and dirties slowly: one pre-copy round, then stop.
TEST(SvmHost, MigrationInProcessAndOverTcpVerifies)
{
    REQUIRE_SVM_NPT();
    auto expect_verified = [](const nlohmann::json& j, const std::string& how, uint64_t pages) {
        EXPECT_EQ(j["status"], "completed") << how << ": " << j.dump();
        EXPECT_EQ(j["verify"]["switchover_mismatches"], 0) << how;
        EXPECT_GT(j["verify"].value("switchover_pages_checked", uint64_t{0}), 0u) << how;
        EXPECT_EQ(j["verify"]["pages_checked"], pages) << how;
        EXPECT_EQ(j["verify"]["mismatches"], 0) << how;
        EXPECT_EQ(j["verify"]["destination_progressed"], true) << how;
        EXPECT_GE(j["rounds"].size(), 2u) << how << ": a bulk pass and a stop-and-copy at least";
        uint64_t dirty = 0;
        for (const auto& r : j["rounds"])
            dirty += r.value("dirty_pages", uint64_t{0});
        EXPECT_GT(dirty, 0u) << how << ": the guest dirtied pages while it was copied";
        std::cout << fmt::format("migrate {}: {}, {} rounds, {} dirty pages resent, {} pages checked, {} mismatches\n",
                                 how, j["status"].get<std::string>(), j["rounds"].size(), dirty,
                                 j["verify"].value("pages_checked", uint64_t{0}),
                                 j["verify"].value("mismatches", uint64_t{0}));
    };
    {
        auto r = run_minivmm("migrate --to inproc --tracker bitmap --vcpus 2 --mem 64M --rate 100000 --warmup 0.3 "
                             "--post-run 0.5 --bandwidth 400M --max-iterations 4 --max-downtime 1000 --json -");
        ASSERT_EQ(r.exit_code, 0) << r.err;
        expect_verified(parse_json(r.out), "in process (bitmap)", 64 * kMiB / 4096);
    }
    const uint16_t port = free_port();
    const std::string guest = "--vcpus 2 --mem 32M --rate 500 --post-run 0.5";
    Receiver recv(fmt::format("{} --listen tcp:127.0.0.1:{} --json -", guest, port));
    auto r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} --tracker ring {} --warmup 0.3 --max-iterations 1 "
                                     "--max-downtime 5000 --json -",
                                     port, guest));
    ASSERT_EQ(r.exit_code, 0) << r.err << recv.output();
    expect_verified(parse_json(r.out), "over TCP loopback (ring)", 32 * kMiB / 4096);
    EXPECT_EQ(recv.wait(), 0) << recv.output();
    EXPECT_NE(recv.output().find("0 mismatches"), std::string::npos) << recv.output();
}

// 64 MiB of hugetlb2m (32 x 2M). Default mode (manual protect +
// INITIALLY_SET): with eager split on, the split is at the first clear and
// the later write faults are fast; off, it happens on iteration 2's write
// faults. With -g (GET_DIRTY_LOG clears): on, at enable; off, on iteration 1's
// faults. Relations only: times under emulation mean nothing.
TEST(SvmHost, HugePagesSplitWhereEagerSplitSays)
{
    REQUIRE_TDP_MMU();
    mvm::HugetlbReservation pool(2ull << 20, 40);
    if (!pool.ok())
        GTEST_SKIP() << "cannot get 2M pages: " << pool.why_not();
    const std::string before = read_word(kEagerSplit);

    for (std::string extra : {"", " -g"}) {
        // Where the split must show: default mode, harvest 1 (the first clear) / iteration 2;
        // with -g, enable / iteration 1.
        const size_t eager_at = extra.empty() ? 2 : 0, lazy_at = extra.empty() ? 3 : 1;
        const char* mode = extra.empty() ? "manual protect + INITIALLY_SET" : "-g";
        const std::string args = "-v 1 -b 64M -i 2 -s hugetlb2m" + extra;
        auto on = dirty_log_perf(args, "on")["kvm_stats_windows"];
        auto off_report = dirty_log_perf(args, "off");
        auto off = off_report["kvm_stats_windows"];
        const int64_t off_before_2m = off_report["kvm_stats_before_logging"].value("pages_2m", int64_t{0});
        ASSERT_GE(off_before_2m, 32) << off_report["kvm_stats_before_logging"];
        ASSERT_GE(on.size(), 4u);
        ASSERT_GE(off.size(), 4u);
        const int64_t before_2m = -vm_stat(on[eager_at], "pages_2m");
        EXPECT_GE(before_2m, 32) << mode << ", eager on: every 2M mapping splits at once: " << on.dump();
        for (size_t i = 0; i < on.size(); i++) {
            if (i != eager_at) {
                EXPECT_GE(vm_stat(on[i], "pages_2m"), 0) << mode << ", eager on: no other window splits: " << on[i];
            }
        }
        EXPECT_GE(vcpu_stat(on[lazy_at], "pf_fast"), vcpu_stat(on[lazy_at], "pf_taken") * 9 / 10)
            << mode << ", eager on: the write faults after the split are fast ones: " << on[lazy_at];
        // Besides the 32 x 2M written, guest memory holds a few more 2M
        // mappings (its own pages, in another logged slot) that the guest
        // may write in any window: only the 32 are counted on there.
        const int64_t off_others = off_before_2m - 32;
        EXPECT_GE(vm_stat(off[eager_at], "pages_2m"), -off_others)
            << mode << ", eager off: the 32 x 2M do not split there: " << off[eager_at];
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

// A kernel difference, pinned per kernel: when dirty logging is disabled,
// KVM since 6.13 recovers the huge mappings in place (pages_2m back at
// `disable`); before, it zaps the split 4 KiB mappings and the guest's next
// faults map huge again (pages_4k down, pages_2m unchanged at `disable`).
TEST(SvmHost, HugeMappingsAfterLoggingIsDisabled)
{
    REQUIRE_TDP_MMU();
    mvm::HugetlbReservation pool(2ull << 20, 40);
    if (!pool.ok())
        GTEST_SKIP() << "cannot get 2M pages: " << pool.why_not();
    auto j = dirty_log_perf("-v 1 -b 64M -i 2 -s hugetlb2m -g", "on");
    nlohmann::json disable;
    for (const auto& w : j["kvm_stats_windows"])
        if (w["window"] == "disable")
            disable = w;
    ASSERT_TRUE(disable.is_object()) << "no disable window: " << j["kvm_stats_windows"];
    EXPECT_LE(vm_stat(disable, "pages_4k"), -16384) << "the split mappings go at disable: " << disable;
    const bool in_place = kernel_version() >= 613;
    if (in_place)
        EXPECT_GE(vm_stat(disable, "pages_2m"), 32) << "6.13+: recovered in place at disable: " << disable;
    else
        EXPECT_EQ(vm_stat(disable, "pages_2m"), 0) << "before 6.13: zapped, not recovered, at disable: " << disable;
    std::cout << fmt::format("disable logging on hugetlb2m: pages_4k {:+} pages_2m {:+} ({})\n",
                             vm_stat(disable, "pages_4k"), vm_stat(disable, "pages_2m"),
                             in_place ? "recovered in place, 6.13+" : "zapped; the next faults map huge again");
}

// THP, -g: the guest's memory is mapped 2M where THP gave 2M pages (at least
// some); eager on: every one of them splits at enable and iteration 1's write
// faults are fast; off: nothing at enable, iteration 1's writes split them
// all, each with a slow fault.
TEST(SvmHost, ThpSplitsWhereEagerSplitSays)
{
    REQUIRE_TDP_MMU();
    const std::string before = read_word(kEagerSplit);
    const std::string args = "-v 1 -b 64M -i 1 -s thp -g";
    auto on = dirty_log_perf(args, "on");
    auto off = dirty_log_perf(args, "off");
    ASSERT_GE(on["kvm_stats_windows"].size(), 2u);
    ASSERT_GE(off["kvm_stats_windows"].size(), 2u);
    const auto &on_enable = on["kvm_stats_windows"][0], &on_it1 = on["kvm_stats_windows"][1];
    const auto &off_enable = off["kvm_stats_windows"][0], &off_it1 = off["kvm_stats_windows"][1];
    const int64_t on_2m = on["kvm_stats_before_logging"].value("pages_2m", int64_t{0});
    const int64_t off_2m = off["kvm_stats_before_logging"].value("pages_2m", int64_t{0});
    // 32 for the 64 MiB the guest writes (THP "always" there, memory free),
    // plus what the rest of guest memory got.
    ASSERT_GE(on_2m, 32) << "THP did not map the guest 2M: " << on["kvm_stats_before_logging"].dump();
    ASSERT_GE(off_2m, 32) << "THP did not map the guest 2M: " << off["kvm_stats_before_logging"].dump();
    EXPECT_EQ(vm_stat(on_enable, "pages_2m"), -on_2m) << "eager on: all split at enable: " << on_enable;
    EXPECT_GE(vm_stat(on_enable, "pages_4k"), on_2m * 512) << on_enable;
    EXPECT_GE(vcpu_stat(on_it1, "pf_fast"), vcpu_stat(on_it1, "pf_taken") * 9 / 10)
        << "eager on: the write faults after the split are fast: " << on_it1;
    EXPECT_EQ(vm_stat(off_enable, "pages_2m"), 0) << "eager off: nothing splits at enable: " << off_enable;
    const int64_t split = -vm_stat(off_it1, "pages_2m");
    EXPECT_GE(split, 32) << "eager off: iteration 1's writes split the 64 MiB written: " << off_it1;
    EXPECT_LE(split, off_2m) << off_it1;
    const int64_t slow = vcpu_stat(off_it1, "pf_taken") - vcpu_stat(off_it1, "pf_fast");
    EXPECT_GE(slow, split) << "eager off: a slow fault per 2M mapping split: " << off_it1;
    EXPECT_EQ(read_word(kEagerSplit), before) << "eager_page_split restored";
    std::cout << fmt::format("thp 64M ({} x 2M mapped), -g: eager on: split at enable (pages_2m {:+}, pages_4k {:+}), "
                             "iteration 1: {} of {} faults fast; eager off: split on iteration 1 write faults "
                             "(pages_2m {:+}, {} slow faults)\n",
                             on_2m, vm_stat(on_enable, "pages_2m"), vm_stat(on_enable, "pages_4k"),
                             vcpu_stat(on_it1, "pf_fast"), vcpu_stat(on_it1, "pf_taken"), vm_stat(off_it1, "pages_2m"),
                             slow);
}

// hugetlb1g (the page scripts/test-svm reserves at boot), 1 GiB guest, 1% of
// the pages written per pass, -g: mapped as one 1G page; eager on: it goes at
// enable, split down to 4K (no 2M left), and the write faults are fast; off:
// it goes on iteration 1's writes: on 6.12 each 2M region written splits to
// 4K with one slow fault, the regions not written stay 2M; on 6.1 it is
// dropped and every page faults back 4K on the slow path.
TEST(SvmHost, Hugetlb1gSplitsWhereEagerSplitSays)
{
    REQUIRE_TDP_MMU();
    mvm::HugetlbReservation pool(1024 * kMiB, 1);
    if (!pool.ok())
        GTEST_SKIP() << "no 1 GiB page: " << pool.why_not() << " (scripts/test-svm reserves one at boot: --gigapages 1)";
    const std::string before = read_word(kEagerSplit);
    const std::string args = "-v 1 -b 1G -i 1 -w 1 -s hugetlb1g -g";
    auto on = dirty_log_perf(args, "on");
    auto off = dirty_log_perf(args, "off");
    ASSERT_GE(on["kvm_stats_windows"].size(), 2u);
    ASSERT_GE(off["kvm_stats_windows"].size(), 2u);
    const auto &on_enable = on["kvm_stats_windows"][0], &on_it1 = on["kvm_stats_windows"][1];
    const auto &off_enable = off["kvm_stats_windows"][0], &off_it1 = off["kvm_stats_windows"][1];
    EXPECT_EQ(on["kvm_stats_before_logging"].value("pages_1g", int64_t{0}), 1) << on["kvm_stats_before_logging"];
    EXPECT_EQ(off["kvm_stats_before_logging"].value("pages_1g", int64_t{0}), 1) << off["kvm_stats_before_logging"];
    // The rest of guest memory (not the 1G) may hold a few 2M mappings too:
    // they split along with it. Counted in 2M regions, splitting one to 4K
    // leaves pages_4k / 512 + pages_2m unchanged; the 1G page adds 512.
    const int64_t on_2m = on["kvm_stats_before_logging"].value("pages_2m", int64_t{0});
    EXPECT_EQ(vm_stat(on_enable, "pages_1g"), -1) << "eager on: the 1G mapping goes at enable: " << on_enable;
    EXPECT_EQ(vm_stat(on_enable, "pages_2m"), -on_2m) << "eager on: split through 2M down to 4K: " << on_enable;
    EXPECT_EQ(vm_stat(on_enable, "pages_4k"), (512 + on_2m) * 512) << on_enable;
    EXPECT_GE(vcpu_stat(on_it1, "pf_fast"), vcpu_stat(on_it1, "pf_taken") * 9 / 10)
        << "eager on: the write faults after the split are fast: " << on_it1;
    EXPECT_EQ(vm_stat(off_enable, "pages_1g"), 0) << "eager off: nothing splits at enable: " << off_enable;
    EXPECT_EQ(vm_stat(off_enable, "pages_2m"), 0) << off_enable;
    EXPECT_EQ(vm_stat(off_it1, "pages_1g"), -1) << "eager off: iteration 1's writes split it: " << off_it1;
    const int64_t slow = vcpu_stat(off_it1, "pf_taken") - vcpu_stat(off_it1, "pf_fast");
    std::string how;
    if (kernel_version() >= 602) {
        // 6.12: the write fault splits the huge mapping in place, 1G to 2M,
        // the written 2M region to 4K: one slow fault per region written.
        const int64_t regions_4k = vm_stat(off_it1, "pages_4k") / 512, regions_2m = vm_stat(off_it1, "pages_2m");
        EXPECT_EQ(vm_stat(off_it1, "pages_4k") % 512, 0) << off_it1;
        EXPECT_EQ(regions_4k + regions_2m, 512) << "each 2M region: split to 4K if written, else left 2M: " << off_it1;
        EXPECT_GE(regions_4k, 400) << "1% of each region's 512 pages written: almost every region: " << off_it1;
        EXPECT_GT(regions_2m, 0) << "and a few regions not written at all stay 2M: " << off_it1;
        EXPECT_GE(slow, regions_4k) << "eager off: a slow fault per 2M region written: " << off_it1;
        how = "split in place by the write faults";
    } else {
        // Debian's 6.1 (measured): the first write fault drops the 1G
        // mapping; every page, read or written, then faults back in 4K on
        // the slow path.
        EXPECT_GE(vm_stat(off_it1, "pages_4k"), 262144 * 9 / 10) << off_it1;
        EXPECT_LE(vm_stat(off_it1, "pages_2m"), 0) << "6.1: no 2M mapping comes out of the 1G: " << off_it1;
        EXPECT_GE(slow, vm_stat(off_it1, "pages_4k")) << "6.1: every 4K mapping made on the slow path: " << off_it1;
        how = "dropped by the first write fault, every page faulted back 4K";
    }
    EXPECT_EQ(read_word(kEagerSplit), before) << "eager_page_split restored";
    std::cout << fmt::format("hugetlb1g 1 x 1G, -g: eager on: split at enable (pages_1g {:+}, pages_2m {:+}, pages_4k "
                             "{:+}), iteration 1: {} of {} faults fast; eager off: iteration 1, {} (pages_1g {:+}, "
                             "pages_2m {:+}, pages_4k {:+}, {} slow faults)\n",
                             vm_stat(on_enable, "pages_1g"), vm_stat(on_enable, "pages_2m"),
                             vm_stat(on_enable, "pages_4k"), vcpu_stat(on_it1, "pf_fast"), vcpu_stat(on_it1, "pf_taken"),
                             how, vm_stat(off_it1, "pages_1g"), vm_stat(off_it1, "pages_2m"),
                             vm_stat(off_it1, "pages_4k"), slow);
}
