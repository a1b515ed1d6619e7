// --fill: what a written page holds besides its stamp (issue 16). Each fill
// runs and passes its stamp check (the whole page unless the fill is zero);
// the bytes of written pages, read from the VMM side, are what the fill says;
// a migration of a random-filled guest verifies; bad values are one line.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/stress/workload.hpp"

using namespace mvm;
using namespace std::chrono_literals;
using mvm::test::free_port;
using mvm::test::Receiver;
using mvm::test::run_minivmm;

namespace {

constexpr uint64_t kPageQwords = 4096 / 8;

struct FillCase {
    const char* name;  // as --fill spells it
    uint32_t fill;
    double ratio;
};
std::ostream& operator<<(std::ostream& os, const FillCase& c) { return os << c.name; }

const FillCase kFills[] = {{"zero", MVM_FILL_ZERO, 0},      {"stamp", MVM_FILL_STAMP, 0},
                           {"random", MVM_FILL_RANDOM, 0},  {"ratio:2", MVM_FILL_RATIO, 2},
                           {"ratio:3.5", MVM_FILL_RATIO, 3.5}, {"ratio:16", MVM_FILL_RATIO, 16}};

MachineConfig fill_config(const FillCase& f, uint64_t mem = 8ull << 20)
{
    MachineConfig c = single_node_config(2, mem);
    c.workload.fill = f.fill;
    c.workload.fill_ratio = f.ratio;
    return c;
}

size_t nonzero_bytes(const uint8_t* p)
{
    size_t n = 0;
    for (size_t i = 0; i < 4096; i++)
        n += p[i] != 0;
    return n;
}

uint64_t qword(const uint8_t* p, uint64_t q)
{
    uint64_t v;
    std::memcpy(&v, p + q * 8, 8);
    return v;
}

// Every page of vCPU 0's working set (one segment here).
std::vector<const uint8_t*> pages_of_vcpu0(const StressVm& m)
{
    const mvm_vcpu_params& vp = m.vcpu_params(0);
    std::vector<const uint8_t*> out;
    for (uint32_t k = 0; k < vp.nr_segments; k++)
        for (uint64_t i = 0; i < vp.seg[k].pages; i++)
            out.push_back(m.host_ptr(vp.seg[k].gpa + i * 4096, 4096));
    return out;
}

nlohmann::json parse(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j;
}

}  // namespace

class FillTest : public ::testing::TestWithParam<FillCase> {};

// Two whole passes: every page holds the pass-2 stamp and what the fill says.
TEST_P(FillTest, WrittenPagesHoldWhatTheFillSays)
{
    REQUIRE_KVM();
    const FillCase f = GetParam();
    MachineConfig c = fill_config(f);
    c.workload.max_passes = 2;
    StressVm m(kvm, c);
    m.start();
    ASSERT_TRUE(m.wait_finished(20s));
    ASSERT_FALSE(m.failure()) << m.failure()->reason;
    StampCheck check = verify_stamps(m);
    EXPECT_TRUE(check.ok()) << check.summary();
    EXPECT_EQ(check.pages_checked, (8ull << 20) / 4096);

    const uint64_t stamp = MVM_STAMP(m.vm_tag(), 0, 2);
    const uint32_t fq = fill_qwords(c.workload);
    EXPECT_EQ(m.boot_params()->fill_qwords, fq);
    std::set<uint64_t> second_qwords;
    size_t nonzero = 0;
    const auto pages = pages_of_vcpu0(m);
    ASSERT_GT(pages.size(), 100u);
    for (const uint8_t* p : pages) {
        ASSERT_EQ(qword(p, 0), stamp) << "qword 0 is the stamp whatever the fill";
        const size_t nz = nonzero_bytes(p);
        nonzero += nz;
        switch (f.fill) {
        case MVM_FILL_ZERO:
            ASSERT_LE(nz, 8u) << "fill zero writes the stamp qword only";
            break;
        case MVM_FILL_STAMP:
            for (uint64_t q = 1; q < kPageQwords; q++)
                ASSERT_EQ(qword(p, q), stamp) << "qword " << q;
            break;
        default:
            // Random up to fill_qwords, zero after.
            for (uint64_t q = fq; q < kPageQwords; q++)
                ASSERT_EQ(qword(p, q), 0u) << "qword " << q;
            for (uint64_t q = 1; q < fq; q++)
                ASSERT_NE(qword(p, q), stamp) << "qword " << q;
            second_qwords.insert(qword(p, 1));
            break;
        }
    }
    const double per_page = static_cast<double>(nonzero) / static_cast<double>(pages.size());
    if (f.fill == MVM_FILL_RANDOM) {
        EXPECT_GT(per_page, 4000) << "random pages are not mostly zero";
    } else if (f.fill == MVM_FILL_RATIO) {
        // About 4096 / R non-zero bytes (a random byte is zero 1 time in 256).
        const double want = 4096 / f.ratio;
        EXPECT_GT(per_page, want * 0.95) << f.name;
        EXPECT_LT(per_page, want * 1.02 + 8) << f.name;
    }
    if (f.fill == MVM_FILL_RANDOM || f.fill == MVM_FILL_RATIO) {
        EXPECT_EQ(second_qwords.size(), pages.size()) << "every page's random bytes are its own";
    }
}

// Paused mid-pass, again and again: the whole-page check holds for the page
// the guest was writing too (old fill, new fill or a mix per qword).
TEST_P(FillTest, StampsVerifyWhilePausedMidPass)
{
    REQUIRE_KVM();
    MachineConfig c = fill_config(GetParam(), 16ull << 20);
    c.workload.pattern = MVM_PATTERN_RANDOM;
    c.workload.write_pct = 70;
    c.workload.seed = 7;
    StressVm m(kvm, c);
    m.start();
    ASSERT_TRUE(m.wait_first_pass(20s));
    for (int round = 0; round < 5; round++) {
        m.pause();
        StampCheck check = verify_stamps(m);
        EXPECT_TRUE(check.ok()) << "round " << round << ": " << check.summary();
        m.resume();
        std::this_thread::sleep_for(3ms);
    }
    m.kill();
    EXPECT_FALSE(m.failure());
}

INSTANTIATE_TEST_SUITE_P(Fills, FillTest, ::testing::ValuesIn(kFills), [](const auto& info) {
    std::string n = info.param.name;
    for (char& ch : n)
        if (ch == ':' || ch == '.')
            ch = '_';
    return n;
});

// One random qword changed deep in a page: the check names the page and the qword.
TEST(Fill, CheckFindsADamagedRandomQword)
{
    REQUIRE_KVM();
    MachineConfig c = fill_config({"random", MVM_FILL_RANDOM, 0});
    c.workload.max_passes = 1;
    StressVm m(kvm, c);
    m.start();
    ASSERT_TRUE(m.wait_finished(20s));
    ASSERT_TRUE(verify_stamps(m).ok());
    const uint64_t gpa = m.vcpu_params(1).seg[0].gpa + 9 * 4096;
    auto* p = reinterpret_cast<uint64_t*>(m.host_ptr(gpa, 4096));
    p[300] ^= 1;
    StampCheck check = verify_stamps(m);
    EXPECT_EQ(check.mismatches, 1u);
    EXPECT_EQ(check.foreign, 0u);
    ASSERT_FALSE(check.first.empty());
    EXPECT_EQ(check.first[0].gpa, gpa);
    EXPECT_EQ(check.first[0].qword, 300u);
    EXPECT_NE(check.summary().find("qword 300"), std::string::npos) << check.summary();
}

// Through the CLI: each fill runs, its stamp check passes, and the report says which fill it was.
TEST(Fill, EveryFillRunsAndIsEchoed)
{
    REQUIRE_KVM();
    for (const FillCase& f : kFills) {
        auto r = run_minivmm(fmt::format("run --vcpus 2 --mem 16M --duration 0.3 --fill {} --json -", f.name));
        ASSERT_EQ(r.exit_code, 0) << f.name << ": " << r.err;
        auto j = parse(r.out);
        EXPECT_EQ(j["verify"]["mismatches"], 0) << f.name;
        EXPECT_GT(j["verify"]["pages_checked"].get<uint64_t>(), 0u) << f.name;
        EXPECT_EQ(j["config"]["machine"]["workload"]["fill"], f.name) << j["config"].dump();
        EXPECT_NE(r.err.find(fmt::format("fill {}", f.name)), std::string::npos) << r.err;
    }
}

// --touch stays: qword is --fill zero, page is --fill stamp; the two agreeing is fine.
TEST(Fill, TouchIsAnAliasOfFill)
{
    REQUIRE_KVM();
    struct Case {
        const char* args;
        const char* fill;
    };
    for (Case k : {Case{"--touch page", "stamp"}, Case{"--touch qword", "zero"}, Case{"--touch page --fill stamp", "stamp"},
                   Case{"", "zero"}}) {
        auto r = run_minivmm(fmt::format("run --vcpus 1 --mem 8M --duration 0.2 {} --json -", k.args));
        ASSERT_EQ(r.exit_code, 0) << k.args << ": " << r.err;
        EXPECT_EQ(parse(r.out)["config"]["machine"]["workload"]["fill"], k.fill) << k.args;
    }
}

TEST(Fill, BadValuesAreOneLineAndExit2)
{
    struct Case {
        const char* args;
        const char* says;
    };
    for (Case k : {Case{"--fill ratio:0.5", "--fill ratio:0.5: R must be a number from 1 to 512"},
                   Case{"--fill foo", "--fill: unknown fill 'foo'"}, Case{"--fill ratio:", "R must be a number"},
                   Case{"--fill ratio:x2", "R must be a number"}, Case{"--fill ratio:1000", "R must be a number"},
                   Case{"--fill random --touch page", "--fill random conflicts with --touch page"}}) {
        for (const char* cmd : {"run --duration 0.1", "migrate --to inproc"}) {
            auto r = run_minivmm(fmt::format("{} --vcpus 1 --mem 8M {}", cmd, k.args));
            EXPECT_EQ(r.exit_code, 2) << cmd << " " << k.args << ": " << r.err;
            EXPECT_NE(r.err.find(k.says), std::string::npos) << cmd << " " << k.args << ": " << r.err;
            EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
        }
    }
    auto r = run_minivmm("dirty-log-perf -v 1 -b 8M --fill ratio:0.5");
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_NE(r.err.find("--fill ratio:0.5"), std::string::npos) << r.err;
}

// A random-filled guest migrates with every page intact, every qword of it checked.
TEST(Fill, RandomFillMigratesInProcessWithZeroMismatches)
{
    REQUIRE_KVM();
    auto r = run_minivmm("migrate --to inproc --vcpus 2 --mem 64M --fill random --rate 100000 --warmup 0.3 "
                         "--post-run 0.3 --bandwidth 400M --max-iterations 4 --max-downtime 5 --json -");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = parse(r.out);
    EXPECT_EQ(j["status"], "completed") << j.dump();
    EXPECT_EQ(j["verify"]["pages_checked"].get<uint64_t>(), (64ull << 20) / 4096);
    EXPECT_EQ(j["verify"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["config"]["machine"]["workload"]["fill"], "random") << j["config"].dump();
}

// A receiver started with another --fill is refused like one with another --seed.
TEST(Fill, ReceiverWithAnotherFillRefuses)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver recv(fmt::format("--vcpus 2 --mem 32M --fill ratio:2 --listen tcp:127.0.0.1:{}", port));
    auto r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} --vcpus 2 --mem 32M --fill ratio:4 --warmup 0.2 "
                                     "--max-downtime 5 --json -",
                                     port));
    const int rc = recv.wait();
    EXPECT_GT(rc, 0) << recv.output();
    EXPECT_LT(rc, 128) << recv.output();
    EXPECT_NE(recv.output().find("guest boot parameter fill_qwords is 0x80, the host wrote 0x100"), std::string::npos)
        << recv.output();
    EXPECT_EQ(r.exit_code, 5) << r.err;
    auto j = parse(r.out);
    EXPECT_EQ(j["status"], "failed");
    EXPECT_TRUE(j["source"]["running"].get<bool>());
    EXPECT_EQ(j["source"]["mismatches"].get<uint64_t>(), 0u);
}
