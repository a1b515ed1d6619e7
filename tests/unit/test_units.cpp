// Unit tests for vmm/units.hpp: size parsing and display.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>

#include "base/error.hpp"
#include "base/units.hpp"

using ::testing::HasSubstr;
using ::testing::StartsWith;

namespace mvm {
namespace {

constexpr uint64_t KiB = 1ull << 10, MiB = 1ull << 20, GiB = 1ull << 30, TiB = 1ull << 40;

TEST(ParseSize, PlainNumbersAreBytes)
{
    EXPECT_EQ(parse_size("0"), 0u);
    EXPECT_EQ(parse_size("1"), 1u);
    EXPECT_EQ(parse_size("4096"), 4096u);
    EXPECT_EQ(parse_size("1536"), 1536u);
}

TEST(ParseSize, BinarySuffixes)
{
    EXPECT_EQ(parse_size("4K"), 4 * KiB);
    EXPECT_EQ(parse_size("256M"), 256 * MiB);
    EXPECT_EQ(parse_size("2G"), 2 * GiB);
    EXPECT_EQ(parse_size("1T"), 1 * TiB);
}

TEST(ParseSize, SuffixesAreCaseInsensitive)
{
    EXPECT_EQ(parse_size("4k"), 4 * KiB);
    EXPECT_EQ(parse_size("256m"), 256 * MiB);
    EXPECT_EQ(parse_size("2g"), 2 * GiB);
    EXPECT_EQ(parse_size("1t"), 1 * TiB);
}

TEST(ParseSize, OptionalByteSuffix)
{
    EXPECT_EQ(parse_size("4KB"), 4 * KiB);
    EXPECT_EQ(parse_size("4KiB"), 4 * KiB);
    EXPECT_EQ(parse_size("256MiB"), 256 * MiB);
    EXPECT_EQ(parse_size("256MB"), 256 * MiB);
    EXPECT_EQ(parse_size("2GiB"), 2 * GiB);
    EXPECT_EQ(parse_size("512B"), 512u);
    EXPECT_EQ(parse_size("512b"), 512u);
}

TEST(ParseSize, TrailingWhitespaceIsIgnored)
{
    EXPECT_EQ(parse_size("4K "), 4 * KiB);
    EXPECT_EQ(parse_size("4096\n"), 4096u);
}

TEST(ParseSize, RejectsGarbage)
{
    for (const char* bad : {"", " ", " 4K", "K", "abc", "-1", "+1", "4X", "4KK", "4 K", "1.5G", "0x1000", "4Kx", "G4",
                            "4KiBB", "256MM"}) {
        EXPECT_EQ(parse_size(bad), std::nullopt) << "'" << bad << "'";
    }
}

TEST(ParseSize, LargestValues)
{
    EXPECT_EQ(parse_size("18446744073709551615"), std::numeric_limits<uint64_t>::max());
    EXPECT_EQ(parse_size("16777215T"), 16777215ull << 40);
    EXPECT_EQ(parse_size("17179869183G"), 17179869183ull << 30);
}

TEST(ParseSize, RejectsOverflow)
{
    EXPECT_EQ(parse_size("18446744073709551616"), std::nullopt);  // 2^64
    EXPECT_EQ(parse_size("16777216T"), std::nullopt);             // 2^64
    EXPECT_EQ(parse_size("17179869184G"), std::nullopt);          // 2^64
    EXPECT_EQ(parse_size("99999999999999999999999"), std::nullopt);
}

TEST(ParseSizeOption, ReturnsTheValue)
{
    EXPECT_EQ(parse_size_option("--mem", "256M"), 256 * MiB);
    EXPECT_EQ(parse_size_option("--mem", "4096"), 4096u);
}

TEST(ParseSizeOption, ThrowsUsageErrorNamingOptionAndValue)
{
    try {
        parse_size_option("--mem", "lots");
        FAIL() << "parse_size_option accepted 'lots'";
    } catch (const UsageError& e) {
        EXPECT_THAT(e.what(), StartsWith("--mem: 'lots' is not a size"));
        EXPECT_THAT(e.what(), HasSubstr("K/M/G"));
        EXPECT_EQ(e.exit_code(), kExitUsage);
    }
}

TEST(ParseSizeOption, OverflowIsAUsageError)
{
    EXPECT_THROW(parse_size_option("--dirty-ring", "16777216T"), UsageError);
    EXPECT_THROW(parse_size_option("--dirty-ring", ""), UsageError);
}

TEST(FormatSize, UsesTheLargestExactUnit)
{
    EXPECT_EQ(format_size(0), "0");
    EXPECT_EQ(format_size(1), "1");
    EXPECT_EQ(format_size(1536), "1536");
    EXPECT_EQ(format_size(1023), "1023");
    EXPECT_EQ(format_size(1025), "1025");
    EXPECT_EQ(format_size(1024), "1K");
    EXPECT_EQ(format_size(4096), "4K");
    EXPECT_EQ(format_size(1536 * KiB), "1536K");
    EXPECT_EQ(format_size(268435456), "256M");
    EXPECT_EQ(format_size(3 * GiB), "3G");
    EXPECT_EQ(format_size(GiB + 2 * MiB), "1026M");
    EXPECT_EQ(format_size(TiB), "1T");
    EXPECT_EQ(format_size(1024 * TiB), "1024T");  // T is the largest unit
}

TEST(FormatSize, RoundTripsThroughParseSize)
{
    const uint64_t values[] = {0,         1,          7,          1023,           1024,     1025,
                               4096,      1536,       2 * MiB,    2 * MiB + 4096, 3 * GiB,  GiB + 2 * MiB,
                               5 * TiB,   1024 * TiB, 123456789,  (1ull << 63),   ~0ull,    (1ull << 63) + 1024};
    for (uint64_t v : values) {
        std::string s = format_size(v);
        EXPECT_EQ(parse_size(s), v) << "format_size(" << v << ") = '" << s << "'";
    }
}

TEST(HumanBytes, Formats)
{
    EXPECT_EQ(human_bytes(0), "0 B");
    EXPECT_EQ(human_bytes(1), "1 B");
    EXPECT_EQ(human_bytes(1023), "1023 B");
    EXPECT_EQ(human_bytes(1024), "1.0 KiB");
    EXPECT_EQ(human_bytes(1536), "1.5 KiB");
    EXPECT_EQ(human_bytes(268435456), "256.0 MiB");
    EXPECT_EQ(human_bytes(1.5 * GiB), "1.5 GiB");
    EXPECT_EQ(human_bytes(static_cast<double>(TiB)), "1.0 TiB");
    EXPECT_EQ(human_bytes(2048.0 * TiB), "2048.0 TiB");  // TiB is the largest unit
}

}  // namespace
}  // namespace mvm
