// scripts/compare-qemu, short: QEMU 7.2 and minivmm migrate the same small
// workload over loopback once each; the table has both columns with numbers
// and a ratio, the JSON has every figure for both sides. Skips without QEMU.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <regex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kvm_test_util.hpp"

namespace {

const std::string kScript = std::string(MINIVMM_FUZZ_DIR) + "/../../scripts/compare-qemu";

// Runs `cmd` through the shell; its exit status and stdout+stderr.
int run(const std::string& cmd, std::string* out)
{
    std::FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
    if (!p)
        return -1;
    char buf[4096];
    while (size_t n = std::fread(buf, 1, sizeof buf, p))
        out->append(buf, n);
    return ::pclose(p);
}

bool have_qemu()
{
    return std::system("command -v qemu-system-x86_64 >/dev/null 2>&1") == 0;
}

TEST(CompareQemu, BothColumnsWithNumbersAndTheJsonFields)
{
    REQUIRE_KVM();
    if (!have_qemu())
        GTEST_SKIP() << "qemu-system-x86_64 is not installed (Debian: qemu-system-x86; scripts/setup installs it)";
    const std::string json = testing::TempDir() + "compare-qemu-" + std::to_string(::getpid()) + ".json";
    struct Unlink {
        const std::string& path;
        ~Unlink() { ::unlink(path.c_str()); }
    } unlink_json{json};  // also when an ASSERT returns early
    std::string out;
    ASSERT_EQ(run(fmt::format("{} --repeat 1 --mem 64M --warmup 0.5 --minivmm {} --json {}", kScript,
                              MINIVMM_BINARY, json),
                  &out),
              0)
        << out;
    // A table row: label, QEMU median [min..max], minivmm median [min..max], the
    // ratio ("-" when QEMU's median is 0: its figures are whole ms).
    const std::string num = R"(\d+(\.\d+)?)";
    const std::string cell = num + " \\[" + num + "\\.\\." + num + "\\]";
    for (const char* label : {"total time (ms)", "downtime (ms)", "setup (ms)", "transferred (MiB)",
                               "throughput (Mbit/s)"}) {
        const std::regex row(std::regex_replace(std::string(label), std::regex(R"([()])"), R"(\$&)") + " +" +
                             cell + " +" + cell + " +(" + num + "x|-)");
        EXPECT_TRUE(std::regex_search(out, row)) << label << " in:\n" << out;
    }
    EXPECT_NE(out.find("matched: 64 MiB, 1 vCPU"), std::string::npos) << out;
    EXPECT_NE(out.find("downtime limit 300 ms, bandwidth unlimited"), std::string::npos) << out;
    EXPECT_NE(out.find("copies checked: minivmm 0 mismatches"), std::string::npos) << out;

    const auto j = nlohmann::json::parse(mvm::test::read_file(json));
    EXPECT_EQ(j["repeat"], 1);
    EXPECT_EQ(j["mem_bytes"], 64 << 20);
    EXPECT_GT(j["logging_off_pages_per_s"]["qemu"].get<double>(), 0);
    EXPECT_GT(j["logging_off_pages_per_s"]["minivmm"].get<double>(), 0);
    for (const char* figure : {"total_ms", "downtime_ms", "setup_ms", "transferred_mib", "mbps"}) {
        bool found = false;
        for (const auto& f : j["figures"]) {
            if (f["figure"] != figure)
                continue;
            found = true;
            for (const char* side : {"qemu", "minivmm"}) {
                ASSERT_TRUE(f[side].is_object()) << figure << " " << side;
                EXPECT_EQ(f[side]["runs"].size(), 1u) << figure << " " << side;
                EXPECT_GE(f[side]["median"].get<double>(), 0) << figure << " " << side;
            }
            // QEMU reports whole ms: a ratio needs its median above 0.
            if (f["qemu"]["median"].get<double>() > 0) {
                EXPECT_GT(f["ratio_x"].get<double>(), 0) << figure;
            }
        }
        EXPECT_TRUE(found) << figure;
    }
    // Both sides moved at least the guest's memory, and the downtime is inside the total.
    for (const char* side : {"qemu", "minivmm"}) {
        const auto& r = j["runs"][side][0];
        EXPECT_GE(r["transferred_mib"].get<double>(), 60.0) << side;
        EXPECT_GT(r["total_ms"].get<double>(), 0) << side;
        EXPECT_GT(r["mbps"].get<double>(), 0) << side;
        EXPECT_LE(r["downtime_ms"].get<double>(), r["total_ms"].get<double>()) << side;
        // The guest's own view of the stop was found (QEMU: the gap at the source's last progress point).
        ASSERT_TRUE(r["downtime_guest_ms"].is_number()) << side << ": " << r.dump();
        EXPECT_GT(r["downtime_guest_ms"].get<double>(), 0) << side;
    }
}

TEST(CompareQemu, BadInputIsOneLineNamingTheOption)
{
    for (const char* bad : {"--repeat 0", "--repeat x", "--mem 7", "--touch byte", "--prealloc maybe",
                            "--qemu-cpl 1", "--minivmm /nonexistent",
                            "--json /nonexistent/x.json"}) {
        std::string err;
        EXPECT_NE(run(fmt::format("{} --minivmm {} {}", kScript, MINIVMM_BINARY, bad), &err), 0) << bad;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << bad << ": " << err;
        const std::string opt = std::string(bad).substr(0, std::string(bad).find(' '));
        EXPECT_NE(err.find(opt), std::string::npos) << err;
    }
}

}  // namespace
