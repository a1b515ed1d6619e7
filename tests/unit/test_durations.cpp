// Durations on the command line: seconds options and millisecond options
// take the same units, and a bare number means the option's own unit.
#include <gtest/gtest.h>

#include "base/error.hpp"
#include "cli/options.hpp"

using mvm::UsageError;
using mvm::cli::parse_ms;
using mvm::cli::parse_seconds;
using mvm::cli::value_kind;

TEST(Durations, SecondsTakeUnits)
{
    EXPECT_DOUBLE_EQ(parse_seconds("--duration", "3"), 3.0);
    EXPECT_DOUBLE_EQ(parse_seconds("--duration", "0.5"), 0.5);
    EXPECT_DOUBLE_EQ(parse_seconds("--duration", "500ms"), 0.5);
    EXPECT_DOUBLE_EQ(parse_seconds("--duration", "2s"), 2.0);
    EXPECT_DOUBLE_EQ(parse_seconds("--duration", "1m"), 60.0);
    EXPECT_DOUBLE_EQ(parse_seconds("--duration", "250us"), 250e-6);
}

TEST(Durations, MillisecondsTakeUnits)
{
    EXPECT_DOUBLE_EQ(parse_ms("--max-downtime", "300"), 300.0);
    EXPECT_DOUBLE_EQ(parse_ms("--max-downtime", "300ms"), 300.0);
    EXPECT_DOUBLE_EQ(parse_ms("--max-downtime", "0.3s"), 300.0);
    EXPECT_DOUBLE_EQ(parse_ms("--max-downtime", "2.5"), 2.5);
    EXPECT_DOUBLE_EQ(parse_ms("--max-downtime", "0"), 0.0);
}

TEST(Durations, ABareFractionOfAMillisecondIsRefused)
{
    // "0.3" for a millisecond option is seconds written where ms are asked for.
    try {
        parse_ms("--max-downtime", "0.3");
        FAIL() << "0.3 taken as 0.3 ms";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("write 0.3ms, or 0.3s"), std::string::npos) << e.what();
    }
    EXPECT_DOUBLE_EQ(parse_ms("--max-downtime", "0.3ms"), 0.3);  // said explicitly: taken
}

TEST(Durations, BadValuesNameTheOptionAndTheUnits)
{
    for (const char* v : {"", "soon", "3x", "-1", "ms", "1e400", "3 s"}) {
        try {
            parse_ms("--harvest-ms", v);
            FAIL() << "'" << v << "' accepted";
        } catch (const UsageError& e) {
            EXPECT_NE(std::string(e.what()).find("--harvest-ms"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("milliseconds"), std::string::npos) << e.what();
        }
        EXPECT_THROW(parse_seconds("--duration", v), UsageError) << v;
    }
}

TEST(ValueKinds, UnitsAreNamed)
{
    EXPECT_STREQ(value_kind("--max-downtime"), "MS");
    EXPECT_STREQ(value_kind("--duration"), "SECONDS");
    EXPECT_STREQ(value_kind("--mem"), "SIZE");
    EXPECT_STREQ(value_kind("--vcpus"), "N");
    EXPECT_EQ(value_kind("--no-such-option"), nullptr);
}
