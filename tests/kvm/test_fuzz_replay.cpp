// The fuzz targets' seed corpus and every crash the fuzzers ever found
// (tests/fuzz/regressions), replayed through the same entry points in every
// build, sanitizer builds included.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>
#include <vector>

#include "kvm_test_util.hpp"
#include "migration/stream.hpp"
#include "tests/fuzz/targets.hpp"

namespace fs = std::filesystem;
using namespace mvm::migration;

namespace {

std::vector<uint8_t> slurp(const fs::path& p)
{
    const std::string s = mvm::test::read_file(p);
    return {s.begin(), s.end()};
}

std::vector<fs::path> files_in(const fs::path& d)
{
    std::vector<fs::path> out;
    if (fs::is_directory(d))
        for (const auto& e : fs::directory_iterator(d))
            if (e.is_regular_file() && e.path().filename().string()[0] != '.')
                out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
}

const fs::path kFuzz = MINIVMM_FUZZ_DIR;

}  // namespace

TEST(FuzzCorpus, StreamSeedsCoverEveryRecordTypeWithValidFrames)
{
    std::set<uint32_t> seen;
    auto seeds = files_in(kFuzz / "corpus" / "stream");
    ASSERT_GE(seeds.size(), 5u) << "the stream seed corpus is missing: run scripts/fuzz --make-seeds";
    for (const auto& p : seeds) {
        auto b = slurp(p);
        size_t pos = 0;
        while (b.size() - pos >= 16) {
            uint32_t hdr[2];
            uint64_t sum;
            std::memcpy(hdr, b.data() + pos, 8);
            ASSERT_LE(hdr[1], b.size() - pos - 16) << p << " at byte " << pos;
            std::memcpy(&sum, b.data() + pos + 8 + hdr[1], 8);
            EXPECT_EQ(sum, record_checksum(static_cast<RecordType>(hdr[0]),
                                           std::span<const uint8_t>(b.data() + pos + 8, hdr[1])))
                << p << " at byte " << pos;
            seen.insert(hdr[0]);
            pos += 16 + hdr[1];
        }
        EXPECT_EQ(pos, b.size()) << p << " ends inside a frame";
    }
    for (uint32_t t = static_cast<uint32_t>(RecordType::Header); t <= kLastRecordType; t++)
        EXPECT_TRUE(seen.count(t)) << record_name(static_cast<RecordType>(t)) << " is in no stream seed";
}

TEST(FuzzCorpus, EveryCorpusAndRegressionFileReplaysCleanly)
{
    REQUIRE_KVM();
    struct Target {
        const char* name;
        int (*one)(const uint8_t*, size_t);
    } targets[] = {{"stream", mvm::fuzz::stream_one},
                   {"options", mvm::fuzz::options_one},
                   {"guest_state", mvm::fuzz::guest_state_one}};
    for (const auto& t : targets) {
        auto corpus = files_in(kFuzz / "corpus" / t.name);
        EXPECT_FALSE(corpus.empty()) << t.name << " has no seed corpus";
        auto regressions = files_in(kFuzz / "regressions" / t.name);
        corpus.insert(corpus.end(), regressions.begin(), regressions.end());
        for (const auto& p : corpus) {
            SCOPED_TRACE(p.string());
            auto b = slurp(p);
            EXPECT_EQ(t.one(b.data(), b.size()), 0);  // a finding aborts the process instead
        }
        std::printf("%s: %zu seeds, %zu regression files replayed\n", t.name, corpus.size() - regressions.size(),
                    regressions.size());
    }
}
