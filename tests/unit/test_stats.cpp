// Unit tests for vmm/kvm/stats.hpp: stat_delta, StatDesc type helpers, and
// StatsReader parsing a hand-made file in the KVM binary stats format (a
// memfd stands in for the fd KVM_GET_STATS_FD would return).
#include <gtest/gtest.h>

#include <linux/kvm.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "vmm/kvm/kvm_abi.h"
#include "vmm/kvm/stats.hpp"

namespace mvm {
namespace {

TEST(StatDelta, EmptySnapshots)
{
    EXPECT_TRUE(stat_delta({}, {}).empty());
}

TEST(StatDelta, GrowingCounters)
{
    StatSnapshot before{{"exits", 100}, {"halt_exits", 7}};
    StatSnapshot after{{"exits", 250}, {"halt_exits", 7}};
    StatDelta d = stat_delta(before, after);
    ASSERT_EQ(d.size(), 2u);
    EXPECT_EQ(d.at("exits"), 150);
    EXPECT_EQ(d.at("halt_exits"), 0);
}

TEST(StatDelta, ShrinkingInstantStatsGiveNegativeDeltas)
{
    StatSnapshot before{{"pages_4k", 5000}, {"pages_2m", 10}};
    StatSnapshot after{{"pages_4k", 1200}, {"pages_2m", 12}};
    StatDelta d = stat_delta(before, after);
    EXPECT_EQ(d.at("pages_4k"), -3800);
    EXPECT_EQ(d.at("pages_2m"), 2);
}

TEST(StatDelta, MissingBeforeCountsAsZero)
{
    StatSnapshot before{{"exits", 1}};
    StatSnapshot after{{"exits", 3}, {"new_stat", 42}};
    StatDelta d = stat_delta(before, after);
    ASSERT_EQ(d.count("new_stat"), 1u);
    EXPECT_EQ(d.at("new_stat"), 42);
    EXPECT_EQ(d.at("exits"), 2);
}

TEST(StatDelta, LargeValuesStaySigned)
{
    const uint64_t big = (1ull << 63) + 5;
    StatSnapshot before{{"a", big}, {"b", big - 10}};
    StatSnapshot after{{"a", big - 3}, {"b", big}};
    StatDelta d = stat_delta(before, after);
    EXPECT_EQ(d.at("a"), -3);
    EXPECT_EQ(d.at("b"), 10);
}

TEST(StatDesc, TypeHelpers)
{
    StatDesc d{"x", 0, 1, 0};
    d.flags = KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_NONE | KVM_STATS_BASE_POW10;
    EXPECT_TRUE(d.cumulative());
    EXPECT_FALSE(d.instant_or_peak());
    d.flags = KVM_STATS_TYPE_INSTANT | KVM_STATS_UNIT_BYTES;
    EXPECT_FALSE(d.cumulative());
    EXPECT_TRUE(d.instant_or_peak());
    d.flags = KVM_STATS_TYPE_PEAK | KVM_STATS_UNIT_SECONDS;
    EXPECT_FALSE(d.cumulative());
    EXPECT_TRUE(d.instant_or_peak());
    d.flags = KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_SECONDS;
    EXPECT_FALSE(d.cumulative());
    EXPECT_FALSE(d.instant_or_peak());
    // Unit bits alone must not make a cumulative stat look instant.
    d.flags = KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_CYCLES;
    EXPECT_TRUE(d.cumulative());
}

// A fake stats file laid out as api.rst describes: header, id string,
// descriptors (each followed by name_size bytes of name), data block.
class FakeStatsFile {
public:
    struct Stat {
        std::string name;
        uint32_t flags;
        uint16_t size;
        uint32_t offset;
    };
    static constexpr uint32_t kNameSize = 48;
    static constexpr uint32_t kIdOffset = sizeof(kvm_stats_header);
    static constexpr uint32_t kDescOffset = kIdOffset + 32;

    explicit FakeStatsFile(const std::vector<Stat>& stats, uint32_t data_words)
    {
        fd_ = ::memfd_create("fake-kvm-stats", MFD_CLOEXEC);
        EXPECT_GE(fd_, 0);
        kvm_stats_header h{};
        h.name_size = kNameSize;
        h.num_desc = static_cast<uint32_t>(stats.size());
        h.id_offset = kIdOffset;
        h.desc_offset = kDescOffset;
        h.data_offset = kDescOffset + static_cast<uint32_t>(stats.size()) * (sizeof(abi::stats_desc_header) + kNameSize);
        data_offset_ = h.data_offset;
        write_at(0, &h, sizeof h);
        char id[32] = "kvm-1234/vcpu-0";
        write_at(kIdOffset, id, sizeof id);
        for (size_t i = 0; i < stats.size(); i++) {
            std::vector<uint8_t> rec(sizeof(abi::stats_desc_header) + kNameSize, 0);
            abi::stats_desc_header d{};
            d.flags = stats[i].flags;
            d.size = stats[i].size;
            d.offset = stats[i].offset;
            std::memcpy(rec.data(), &d, sizeof d);
            std::memcpy(rec.data() + sizeof d, stats[i].name.data(), stats[i].name.size());
            write_at(kDescOffset + i * rec.size(), rec.data(), rec.size());
        }
        std::vector<uint64_t> zero(data_words, 0);
        write_at(data_offset_, zero.data(), zero.size() * 8);
    }
    ~FakeStatsFile()
    {
        if (fd_ >= 0)
            ::close(fd_);
    }
    void set_word(uint32_t word, uint64_t v) { write_at(data_offset_ + word * 8ull, &v, 8); }
    void truncate(off_t len) { ASSERT_EQ(::ftruncate(fd_, len), 0); }
    // A second fd on the same file, for StatsReader to own.
    UniqueFd dup_fd() const { return UniqueFd(::dup(fd_)); }

private:
    void write_at(uint64_t off, const void* p, size_t n)
    {
        ASSERT_EQ(::pwrite(fd_, p, n, static_cast<off_t>(off)), static_cast<ssize_t>(n));
    }
    int fd_ = -1;
    uint32_t data_offset_ = 0;
};

std::vector<FakeStatsFile::Stat> sample_stats()
{
    return {
        {"exits", KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_NONE, 1, 0},
        {"pages_4k", KVM_STATS_TYPE_INSTANT | KVM_STATS_UNIT_NONE, 1, 8},
        {"halt_wait_hist", KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_SECONDS, 4, 16},
        {"max_mmu_page_hash_collisions", KVM_STATS_TYPE_PEAK | KVM_STATS_UNIT_NONE, 1, 48},
    };
}

TEST(StatsReader, DefaultIsEmpty)
{
    StatsReader r;
    EXPECT_FALSE(static_cast<bool>(r));
    EXPECT_TRUE(r.read().empty());
    EXPECT_TRUE(r.descriptors().empty());
}

TEST(StatsReader, ParsesDescriptors)
{
    FakeStatsFile f(sample_stats(), 7);
    StatsReader r(f.dup_fd());
    ASSERT_TRUE(static_cast<bool>(r));
    const auto& d = r.descriptors();
    ASSERT_EQ(d.size(), 4u);
    EXPECT_EQ(d[0].name, "exits");
    EXPECT_TRUE(d[0].cumulative());
    EXPECT_EQ(d[1].name, "pages_4k");
    EXPECT_TRUE(d[1].instant_or_peak());
    EXPECT_EQ(d[2].name, "halt_wait_hist");
    EXPECT_EQ(d[2].size, 4u);
    EXPECT_EQ(d[2].offset, 16u);
    EXPECT_EQ(d[3].name, "max_mmu_page_hash_collisions");
    EXPECT_TRUE(d[3].instant_or_peak());
}

TEST(StatsReader, ReadsValuesAndSumsHistograms)
{
    FakeStatsFile f(sample_stats(), 7);
    f.set_word(0, 1000);  // exits
    f.set_word(1, 512);   // pages_4k
    f.set_word(2, 1);     // halt_wait_hist buckets
    f.set_word(3, 2);
    f.set_word(4, 30);
    f.set_word(5, 400);
    f.set_word(6, 9);  // max_mmu_page_hash_collisions
    StatsReader r(f.dup_fd());
    StatSnapshot s = r.read();
    ASSERT_EQ(s.size(), 4u);
    EXPECT_EQ(s.at("exits"), 1000u);
    EXPECT_EQ(s.at("pages_4k"), 512u);
    EXPECT_EQ(s.at("halt_wait_hist"), 433u);
    EXPECT_EQ(s.at("max_mmu_page_hash_collisions"), 9u);
}

TEST(StatsReader, EachReadSeesCurrentData)
{
    FakeStatsFile f(sample_stats(), 7);
    StatsReader r(f.dup_fd());
    f.set_word(0, 5);
    f.set_word(1, 100);
    StatSnapshot a = r.read();
    f.set_word(0, 17);
    f.set_word(1, 40);
    StatSnapshot b = r.read();
    EXPECT_EQ(a.at("exits"), 5u);
    EXPECT_EQ(b.at("exits"), 17u);
    StatDelta d = stat_delta(a, b);
    EXPECT_EQ(d.at("exits"), 12);
    EXPECT_EQ(d.at("pages_4k"), -60);
}

TEST(StatsReader, TruncatedDescriptorsThrow)
{
    FakeStatsFile f(sample_stats(), 7);
    f.truncate(FakeStatsFile::kDescOffset + 20);  // cuts into the first descriptor
    EXPECT_THROW(StatsReader r(f.dup_fd()), SysError);
}

TEST(StatsReader, TruncatedDataThrowsOnRead)
{
    FakeStatsFile f(sample_stats(), 7);
    StatsReader r(f.dup_fd());
    f.truncate(FakeStatsFile::kDescOffset + 4 * (sizeof(abi::stats_desc_header) + FakeStatsFile::kNameSize) + 16);
    EXPECT_THROW(r.read(), SysError);
}

}  // namespace
}  // namespace mvm
