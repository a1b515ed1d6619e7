// What the migrate and receive reports print (migration/report.hpp), without
// a migration: one failure, one message; each side's state once; a failed
// receive times the step the failure cut short and none after it.
#include <gtest/gtest.h>

#include <string>

#include "migration/report.hpp"

using mvm::migration::MigrateReport;
using mvm::migration::ReceiveReport;

namespace {

size_t count(const std::string& s, const std::string& what)
{
    size_t n = 0;
    for (size_t at = 0; (at = s.find(what, at)) != std::string::npos; at += what.size())
        n++;
    return n;
}

}  // namespace

// A refusal before a page was sent: the cause once (the caller's stderr
// line), no block of zeros ("setup 0.0 ms ... 0 Mbit/s", an empty round table).
TEST(MigrateReportTable, NothingMigratedIsTheCauseAlone)
{
    MigrateReport r;
    r.status = "failed";
    r.phase = "setup";
    r.error = "the receiver closed the connection during the TLS handshake";
    EXPECT_TRUE(r.nothing_migrated());
    EXPECT_EQ(r.to_table(false), "");
    EXPECT_EQ(r.to_table(), "migration failed in setup: " + r.error + "\n");
}

// After some pages: the figures, the cause left to the caller's one line.
TEST(MigrateReportTable, AFailureAfterPagesHasFiguresButNotTheCauseTwice)
{
    MigrateReport r;
    r.status = "failed";
    r.phase = "bulk";
    r.error = "cancelled by signal";
    r.transferred_bytes = 4096 * 100;
    r.rounds.push_back({});
    r.rounds.back().kind = "interrupted";
    EXPECT_FALSE(r.nothing_migrated());
    const std::string t = r.to_table(false);
    EXPECT_EQ(count(t, r.error), 0u) << t;
    EXPECT_NE(t.find("remaining"), std::string::npos) << t;
    EXPECT_EQ(count(r.to_table(), r.error), 1u);
}

// A completed migration says each side's state once (it said it twice).
TEST(MigrateReportTable, CompletedSaysEachSidesStateOnce)
{
    MigrateReport r;
    r.status = "completed";
    r.converged = true;
    r.source_state = "parked";
    r.destination_state = "checked";
    r.downtime_ms = 12.5;
    r.rounds.push_back({});
    r.rounds.back().kind = "bulk";
    EXPECT_EQ(count(r.to_table(), "source: parked; destination: checked"), 1u) << r.to_table();
}

// It printed "memory 0.0 ms, switchover 0.0 ms ..., total 18273.5 ms" after
// 1.1 GiB had arrived over 18 s from a sender that was cancelled.
TEST(ReceiveReportTable, AFailureInMemoryTimesMemoryAndNothingAfter)
{
    ReceiveReport r;
    r.status = "failed";
    r.error = "the sender closed the connection";
    r.failed_step = "memory";
    r.memory_ms = 18250.0;
    r.total_ms = 18273.5;
    const std::string t = r.to_table();
    EXPECT_NE(t.find("memory 18250.0 ms (cut short by the failure), total 18273.5 ms"), std::string::npos) << t;
    EXPECT_EQ(t.find("switchover"), std::string::npos) << t;
    EXPECT_EQ(t.find("verify"), std::string::npos) << t;
    r.failed_step = "header";
    EXPECT_NE(r.to_table().find("failed before any memory arrived"), std::string::npos);
}
