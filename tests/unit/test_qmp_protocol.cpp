// QMP's framing and argument checks (cli/qmp/server.hpp), without a socket.
#include <gtest/gtest.h>

#include "base/error.hpp"
#include "cli/qmp/monitor_impl.hpp"
#include "cli/qmp/server.hpp"

using mvm::qmp::Args;
using mvm::qmp::json;
using mvm::qmp::QmpError;
using mvm::qmp::split_json_stream;

TEST(QmpStream, SplitsObjectsAcrossReadsAndKeepsTheRest)
{
    std::string buf = "{\"execute\": \"a\"}{\"execute\":";
    auto v = split_json_stream(buf);
    ASSERT_EQ(v.size(), 1u);
    EXPECT_EQ(v[0], "{\"execute\": \"a\"}");
    EXPECT_EQ(buf, "{\"execute\":");
    buf += " \"b\", \"arguments\": {\"x\": [1, {\"y\": \"}\"}]}}\r\n  ";
    v = split_json_stream(buf);
    ASSERT_EQ(v.size(), 1u);
    EXPECT_EQ(json::parse(v[0])["arguments"]["x"][1]["y"], "}");  // a brace inside a string is text
    EXPECT_TRUE(buf.empty());
    buf = "{\"s\": \"a \\\" {\"}";  // an escaped quote does not end the string
    v = split_json_stream(buf);
    ASSERT_EQ(v.size(), 1u);
    EXPECT_EQ(json::parse(v[0])["s"], "a \" {");
}

TEST(QmpStream, JunkComesOutAsTextsTheParserRefuses)
{
    std::string buf = "] 123 {\"a\":1} \"str\" ";
    auto v = split_json_stream(buf);
    ASSERT_EQ(v.size(), 4u);
    EXPECT_EQ(v[0], "]");
    EXPECT_EQ(v[1], "123");
    EXPECT_EQ(v[3], "\"str\"");
    EXPECT_TRUE(json::parse(v[0], nullptr, false).is_discarded());
    EXPECT_TRUE(buf.empty());
}

// Measured on QEMU 7.2's QMP: "not json" gets two errors, one per word,
// "JSON parse error, invalid keyword 'not'" then '...json'; so does minivmm.
TEST(QmpStream, ALineOfBareWordsGetsQemusErrorPerWord)
{
    std::string buf = "not json\n";
    auto v = split_json_stream(buf);
    ASSERT_EQ(v.size(), 2u);
    EXPECT_EQ(mvm::qmp::parse_error_desc(v[0]), "JSON parse error, invalid keyword 'not'");
    EXPECT_EQ(mvm::qmp::parse_error_desc(v[1]), "JSON parse error, invalid keyword 'json'");
    EXPECT_EQ(mvm::qmp::parse_error_desc("]"), "JSON parse error, invalid JSON text");
}

TEST(QmpArgs, QemuWordingForUnexpectedMissingAndMistypedMembers)
{
    const json a = {{"uri", "tcp:1.2.3.4:5"}, {"n", 3}, {"flag", true}};
    EXPECT_NO_THROW(Args(a, {"uri", "n", "flag"}));
    try {
        Args(a, {"uri", "flag"});
        FAIL() << "an unexpected member is an error";
    } catch (const QmpError& e) {
        EXPECT_STREQ(e.what(), "Parameter 'n' is unexpected");
        EXPECT_EQ(e.error_class(), "GenericError");
    }
    Args ok(a, {"uri", "n", "flag", "other"});
    EXPECT_EQ(ok.str("uri"), "tcp:1.2.3.4:5");
    EXPECT_EQ(ok.integer("n"), 3);
    EXPECT_TRUE(ok.boolean_or("flag", false));
    EXPECT_EQ(ok.int_or("other", 7), 7);
    try {
        ok.str("other");
        FAIL();
    } catch (const QmpError& e) {
        EXPECT_STREQ(e.what(), "Parameter 'other' is missing");
    }
    try {
        ok.integer("uri");
        FAIL();
    } catch (const QmpError& e) {
        EXPECT_STREQ(e.what(), "Invalid parameter type for 'uri', expected: integer");
    }
    EXPECT_NO_THROW(Args(json(nullptr), {}));  // no arguments at all
}

TEST(QmpAddress, UnixTcpAndLoopbackOnlyUnlessAllowed)
{
    auto u = mvm::qmp::parse_address("--qmp", "unix:/tmp/x.qmp", false);
    EXPECT_EQ(u.kind, mvm::qmp::Address::Unix);
    EXPECT_EQ(u.path, "/tmp/x.qmp");
    auto t = mvm::qmp::parse_address("--qmp", "tcp:127.0.0.1:4445", false);
    EXPECT_EQ(t.kind, mvm::qmp::Address::Tcp);
    EXPECT_EQ(t.port, 4445);
    EXPECT_EQ(mvm::qmp::parse_address("--qmp", "tcp:[::1]:1", false).host, "::1");
    EXPECT_THROW(mvm::qmp::parse_address("--qmp", "tcp:0.0.0.0:4445", false), mvm::UsageError);
    EXPECT_NO_THROW(mvm::qmp::parse_address("--qmp", "tcp:0.0.0.0:4445", true));
    EXPECT_THROW(mvm::qmp::parse_address("--qmp", "tcp:127.0.0.1:99999", false), mvm::UsageError);
    EXPECT_THROW(mvm::qmp::parse_address("--qmp", "udp:x", false), mvm::UsageError);
    EXPECT_THROW(mvm::qmp::parse_address("--qmp", "unix:" + std::string(200, 'a'), false), mvm::UsageError);
}

TEST(QmpMigrationAddress, ChannelsBecomeTheUriAndBadFormsGetQemusWords)
{
    using mvm::qmp::migration_uri;
    auto uri_of = [](const json& args) { return migration_uri(Args(args, {"uri", "channels"})); };
    auto error_of = [&](const json& args) {
        try {
            uri_of(args);
        } catch (const QmpError& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    auto main_channel = [](const json& addr) { return json::array({{{"channel-type", "main"}, {"addr", addr}}}); };
    EXPECT_EQ(uri_of({{"uri", "unix:/tmp/m"}}), "unix:/tmp/m");
    EXPECT_EQ(uri_of({{"channels", main_channel({{"transport", "socket"}, {"type", "inet"}, {"host", "127.0.0.1"},
                                                 {"port", "4444"}})}}),
              "tcp:127.0.0.1:4444");
    EXPECT_EQ(uri_of({{"channels", main_channel({{"transport", "socket"}, {"type", "unix"}, {"path", "/tmp/s"}})}}),
              "unix:/tmp/s");
    EXPECT_EQ(uri_of({{"channels", main_channel({{"transport", "socket"}, {"type", "fd"}, {"str", "fd-mig"}})}}),
              "fd:fd-mig");
    EXPECT_EQ(error_of(json::object()), "need either 'uri' or 'channels' argument");
    EXPECT_EQ(error_of({{"uri", "tcp:1.2.3.4:5"}, {"channels", main_channel({{"transport", "socket"}})}}),
              "need either 'uri' or 'channels' argument");
    json two = main_channel({{"transport", "socket"}, {"type", "unix"}, {"path", "/a"}});
    two.push_back(two[0]);
    EXPECT_EQ(error_of({{"channels", two}}), "Channel list has more than one main entry");
    EXPECT_EQ(error_of({{"channels", main_channel({{"transport", "socket"}, {"type", "inet"}, {"host", "h"}})}}),
              "Parameter 'addr.port' is missing");
    EXPECT_NE(error_of({{"channels", main_channel({{"transport", "file"}, {"filename", "/tmp/f"}})}}).find(
                  "'file' is not supported"),
              std::string::npos);
    EXPECT_EQ(error_of({{"channels", main_channel({{"transport", "carrier-pigeon"}})}}),
              "Parameter 'addr.transport' does not accept value 'carrier-pigeon'");
}
