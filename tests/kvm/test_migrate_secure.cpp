// A migration channel fit for a real network (issue 18), against the real
// KVM: TLS with x509 or PSK and each tracker completes verified; every
// refusal is one line on both sides with the source running and nothing of
// the guest received; idle, junk and stalled connections do not keep a real
// sender out; --timeout bounds a paced bulk pass and a send blocked on a
// stopped receiver; --io-timeout bounds a receiver whose sender stalls.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "kvm_test_util.hpp"
#include "migration/stream.hpp"
#include "migration/transport/tls.hpp"

using namespace mvm;
using namespace mvm::migration;
using mvm::test::CmdResult;
using mvm::test::free_port;
using mvm::test::Receiver;
using mvm::test::run_minivmm;
using clk = std::chrono::steady_clock;

namespace {

namespace fs = std::filesystem;

double since_s(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }

size_t lines(const std::string& s)
{
    size_t n = 0;
    for (char c : s)
        n += c == '\n';
    return n;
}

// Credentials made once per test binary by scripts/make-tls-creds (openssl):
// a CA with its server and client certificates; the same CA's certificates
// expired in 2020; another CA's; a server certificate for another name; two
// PSK files with different keys for the same user, and one with two users.
struct Creds {
    std::string dir;
    std::string good, expired, other_ca, other_host, psk, psk_other_key, psk_two_users;
    std::string why_not;  // set when they could not be made
    static const Creds& get()
    {
        static const Creds c = make();
        return c;
    }

private:
    static Creds make()
    {
        Creds c;
        char tmpl[] = "/tmp/minivmm-tls-XXXXXX";
        if (!::mkdtemp(tmpl)) {
            c.why_not = "mkdtemp failed";
            return c;
        }
        c.dir = tmpl;
        const std::string script = std::string(MINIVMM_SOURCE_DIR) + "/scripts/make-tls-creds";
        auto sh = [&](const std::string& args) {
            return std::system((script + " " + args + " >/dev/null 2>&1").c_str()) == 0;
        };
        c.good = c.dir + "/good";
        c.expired = c.dir + "/expired";
        c.other_ca = c.dir + "/other-ca";
        c.other_host = c.dir + "/other-host";
        c.psk = c.dir + "/keys.psk";
        c.psk_other_key = c.dir + "/other.psk";
        c.psk_two_users = c.dir + "/two.psk";
        const bool ok = sh(c.good) && sh(c.expired + " --ca-from " + c.good + " --expired") && sh(c.other_ca) &&
                        sh(c.other_host + " --ca-from " + c.good + " --server-name other.example --server-ip 10.9.9.9") &&
                        sh("--psk " + c.psk + " --user src1") && sh("--psk " + c.psk_other_key + " --user src1") &&
                        sh("--psk " + c.psk_two_users + " --user src1") && sh("--psk " + c.psk_two_users + " --user src2");
        if (!ok)
            c.why_not = "scripts/make-tls-creds failed (is openssl installed? scripts/setup installs it)";
        return c;
    }
};

#define REQUIRE_CREDS()                                        \
    do {                                                       \
        if (!Creds::get().why_not.empty())                     \
            GTEST_SKIP() << Creds::get().why_not;              \
    } while (0)

const char* kVm = "--vcpus 2 --mem 64M --rate 20000";

nlohmann::json parse(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j;
}

// A raw connection to the receiver.
int dial(uint16_t port)
{
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

}  // namespace

// ---- TLS migrations ---------------------------------------------------------------------

class MigrateTls : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(MigrateTls, CompletesWithZeroMismatches)
{
    REQUIRE_KVM();
    REQUIRE_CREDS();
    const auto& [kind, tracker] = GetParam();
    const Creds& c = Creds::get();
    const std::string creds = kind == "x509" ? "x509:" + c.good : "psk:" + c.psk;
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60 --tls-creds {} --json -", kVm,
                            port, creds) +
                (kind == "x509" ? " --tls-authz 'CN=minivmm-sender,*'" : " --tls-authz src1"));
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} --warmup 0.3 --tracker {} "
                                                "--bandwidth 400M --max-iterations 4 --channels 2 --tls-creds {} "
                                                "--json -",
                                                port, kVm, tracker, creds));
    ASSERT_EQ(rx.wait(), 0) << rx.output();
    ASSERT_EQ(r.exit_code, 0) << r.err << rx.output();
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "completed");
    EXPECT_EQ(j["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["pages_checked"].get<uint64_t>(), 64u * 256);
    const std::string rout = rx.result().out;
    const auto rj = parse(rout.substr(rout.find('{')));
    EXPECT_EQ(rj["status"], "completed");
    EXPECT_EQ(rj["sender"]["security"], "tls-" + kind);
    EXPECT_EQ(rj["sender"]["identity"], kind == "x509" ? "CN=minivmm-sender,O=minivmm test" : "src1");
    EXPECT_EQ(rj["channels"], 2);
    EXPECT_NE(rx.result().err.find("(TLS: " + kind), std::string::npos) << rx.result().err;
}

INSTANTIATE_TEST_SUITE_P(KindsAndTrackers, MigrateTls,
                         ::testing::Combine(::testing::Values("x509", "psk"), ::testing::Values("bitmap", "ring")),
                         [](const auto& i) { return std::get<0>(i.param) + "_" + std::get<1>(i.param); });

// ---- refusals ------------------------------------------------------------------------------
// Each case: migrate fails in one line with exit 5 and its source running;
// the receiver drops the connection with one line naming the reason.

struct Refusal {
    const char* name;
    std::string receiver, sender;  // their TLS options (%G good dir, ...)
    const char* sender_says;       // in migrate's one line
    const char* receiver_says;     // in receive's line about the dropped connection
};

class MigrateTlsRefusal : public ::testing::TestWithParam<Refusal> {};

TEST_P(MigrateTlsRefusal, OneLineEachSideSourceRunsNothingReceived)
{
    REQUIRE_KVM();
    REQUIRE_CREDS();
    const Creds& c = Creds::get();
    auto expand = [&](std::string s) {
        for (auto [k, v] : {std::pair<std::string, std::string>{"%G", c.good}, {"%E", c.expired}, {"%O", c.other_ca},
                            {"%H", c.other_host}, {"%P", c.psk}, {"%K", c.psk_other_key}, {"%T", c.psk_two_users}})
            for (size_t at; (at = s.find(k)) != std::string::npos;)
                s.replace(at, k.size(), v);
        return s;
    };
    const Refusal& row = GetParam();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("--vcpus 1 --mem 32M --listen tcp:127.0.0.1:{} --timeout 60 --io-timeout 2 {}", port,
                            expand(row.receiver)));
    const auto t0 = clk::now();
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} --vcpus 1 --mem 32M --warmup 0.2 {}",
                                                port, expand(row.sender)));
    EXPECT_LT(since_s(t0), 10.0) << "refused promptly";
    EXPECT_EQ(r.exit_code, 5) << r.err;
    EXPECT_EQ(lines(r.err), 1u) << r.err;
    EXPECT_NE(r.err.find(row.sender_says), std::string::npos) << r.err;
    EXPECT_NE(r.out.find("source: kept running (made progress)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(", 0 mismatches"), std::string::npos) << r.out;
    // Nothing was migrated: the reason once (stderr), the source's state and
    // its stamp check; no cause repeated, no block of zeros.
    EXPECT_EQ(r.out.find(row.sender_says), std::string::npos) << r.out;
    EXPECT_EQ(lines(r.out), 1u) << r.out;
    // The receiver: one line about the connection, and it listens on for a
    // sender it can admit (ReceiverAdmission.UnwelcomeConnectionsAloneTimeOutAndExit6
    // waits out --timeout to its exit 6; here it is killed once it said why).
    // It never received anything: no report.
    std::string err;
    for (int i = 0; i < 100; i++) {
        err = rx.output();
        if (err.find("receive: dropped the connection from") != std::string::npos)
            break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ::kill(rx.pid, SIGKILL);
    rx.wait();
    EXPECT_EQ(rx.result().out, "") << "the receiver reported a migration it never admitted";
    err = rx.result().err;
    EXPECT_NE(err.find("receive: dropped the connection from 127.0.0.1:"), std::string::npos) << err;
    EXPECT_NE(err.find(row.receiver_says), std::string::npos) << err;
    EXPECT_EQ(lines(err), 2u) << "listening, dropped:\n" << err;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MigrateTlsRefusal,
    ::testing::Values(
        Refusal{"UnknownCa", "--tls-creds x509:%G", "--tls-creds x509:%O", "not signed by", "unknown ca"},
        Refusal{"ExpiredClientCertificate", "--tls-creds x509:%G", "--tls-creds x509:%E", "certificate expired",
                "certificate has expired"},
        Refusal{"WrongHost", "--tls-creds x509:%G", "--tls-creds x509:%G --tls-hostname dst.example",
                "is not for 'dst.example'", "bad certificate"},
        Refusal{"ServerCertificateForAnotherHost", "--tls-creds x509:%H", "--tls-creds x509:%G",
                "is not for '127.0.0.1'", "bad certificate"},
        Refusal{"WrongPsk", "--tls-creds psk:%P", "--tls-creds psk:%K", "pre-shared key does not match",
                "pre-shared key does not match"},
        Refusal{"PlainSenderToTlsReceiver", "--tls-creds x509:%G", "", "this receiver takes TLS only",
                "a plain connection"},
        Refusal{"TlsSenderToPlainReceiver", "", "--tls-creds x509:%G", "closed the connection during the TLS handshake",
                "a TLS client, but this receiver was started without --tls-creds"},
        Refusal{"CertificateNotAuthorised", "--tls-creds x509:%G --tls-authz 'CN=someone-else,*'",
                "--tls-creds x509:%G", "does not authorise 'CN=minivmm-sender,O=minivmm test'", "is not authorised"},
        Refusal{"PskIdentityNotAuthorised", "--tls-creds psk:%T --tls-authz src2", "--tls-creds psk:%T",
                "does not authorise 'src1'", "is not authorised"}),
    [](const auto& i) { return std::string(i.param.name); });

// ---- admission: idle, junk and stalled connections ----------------------------------------

// Each kind of unwelcome connection, made before the real sender: none of
// them keeps it out, each is dropped (junk at once, the others when the
// real sender is admitted), and the receiver says so.
TEST(ReceiverAdmission, IdleJunkAndStalledConnectionsDoNotBlockARealSender)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --post-run 0.5 --timeout 60 --io-timeout 20 --json -", kVm,
                            port));
    std::vector<int> fds;
    // Idle: connects, sends nothing.
    fds.push_back(dial(port));
    // Junk: 16 bytes that are no record.
    fds.push_back(dial(port));
    ASSERT_EQ(::write(fds.back(), "0123456789abcdef", 16), 16);
    // A valid HELLO for channel 0 of 1, then 8 bytes of a HEADER frame, then nothing.
    fds.push_back(dial(port));
    {
        FdTransport t(::dup(fds.back()), "test");
        RecordWriter(t).write(RecordType::Hello, Hello{kStreamVersion, 0, 1, 42}.encode());
        const uint32_t head[2] = {static_cast<uint32_t>(RecordType::Header), 200};
        t.write_all(head, sizeof(head));
    }
    // A HELLO that claims 64 channels (the other 63 never come).
    fds.push_back(dial(port));
    {
        FdTransport t(::dup(fds.back()), "test");
        RecordWriter(t).write(RecordType::Hello, Hello{kStreamVersion, 5, 64, 43}.encode());
    }
    for (int fd : fds)
        ASSERT_GE(fd, 0);
    const auto t0 = clk::now();
    const CmdResult r = run_minivmm(fmt::format("migrate --to tcp:127.0.0.1:{} {} --warmup 0.2 --json -", port, kVm));
    EXPECT_LT(since_s(t0), 15.0) << "the real sender waited on the others (--io-timeout is 20 s)";
    ASSERT_EQ(r.exit_code, 0) << r.err << rx.output();
    EXPECT_EQ(parse(r.out)["verify"]["mismatches"].get<uint64_t>(), 0u);
    ASSERT_EQ(rx.wait(), 0) << rx.output();
    const std::string& err = rx.result().err;
    EXPECT_NE(err.find("has unknown type"), std::string::npos) << "the junk connection, at once:\n" << err;
    const std::string rout = rx.result().out;
    const auto rj = parse(rout.substr(rout.find('{')));
    EXPECT_EQ(rj["status"], "completed");
    EXPECT_EQ(rj["sender"]["dropped_connections"], 1) << "the junk one before admission";
    // The idle, the stalled and the 64-channel one: dropped at admission.
    size_t at_admission = 0;
    for (size_t at = 0; (at = err.find("a sender was admitted", at)) != std::string::npos; at++)
        at_admission++;
    EXPECT_EQ(at_admission, 3u) << err;
    // The connections the receiver dropped are closed.
    for (int fd : fds) {
        char b;
        EXPECT_LE(::recv(fd, &b, 1, 0), 0);
        ::close(fd);
    }
}

// Unwelcome connections time out on their own: with only those, the receiver
// drops each after --io-timeout and exits 6 at its --timeout.
TEST(ReceiverAdmission, UnwelcomeConnectionsAloneTimeOutAndExit6)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("--vcpus 1 --mem 32M --listen tcp:127.0.0.1:{} --timeout 3 --io-timeout 1", port));
    const int idle = dial(port);
    const int stalled = dial(port);
    ASSERT_GE(idle, 0);
    ASSERT_GE(stalled, 0);
    {
        FdTransport t(::dup(stalled), "test");
        RecordWriter(t).write(RecordType::Hello, Hello{kStreamVersion, 0, 1, 7}.encode());
    }
    const auto t0 = clk::now();
    EXPECT_EQ(rx.wait(), 6) << rx.output();
    EXPECT_LT(since_s(t0), 6.0);
    const std::string& err = rx.result().err;
    EXPECT_NE(err.find("it sent nothing for 1 s (--io-timeout)"), std::string::npos) << err;
    EXPECT_NE(err.find("--io-timeout 1 s (the time a connection has to be admitted)"), std::string::npos) << err;
    EXPECT_NE(err.find("no sender was admitted on tcp:127.0.0.1"), std::string::npos) << err;
    EXPECT_NE(err.find("2 connections dropped"), std::string::npos) << err;
    ::close(idle);
    ::close(stalled);
}

// ---- timeouts -------------------------------------------------------------------------------

// A bulk pass paced at 1 MiB/s would take a minute: --timeout 3 ends it at 3 s.
TEST(MigrateTimeouts, BulkHonoursTimeout)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --timeout 60", kVm, port));
    const auto t0 = clk::now();
    const CmdResult r = run_minivmm(
        fmt::format("migrate --to tcp:127.0.0.1:{} {} --warmup 0.2 --bandwidth 1M --timeout 3", port, kVm));
    const double took = since_s(t0);
    EXPECT_EQ(r.exit_code, 5) << r.err;
    EXPECT_NE(r.err.find("--timeout 3 s"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("in bulk"), std::string::npos) << r.err;
    EXPECT_NE(r.out.find("source: kept running (made progress)"), std::string::npos) << r.out;
    EXPECT_LT(took, 3.0 + 0.2 + 3.0) << "3 s of migration after the warm-up, plus boot and the source's check";
    EXPECT_EQ(rx.wait(), 5) << rx.output();
}

// A receiver that stops (SIGSTOP) after its first page: the sender's blocked
// send ends at its --timeout, not when the receiver wakes.
TEST(MigrateTimeouts, SendBlockedOnAStoppedReceiverEndsAtTimeout)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("--vcpus 2 --mem 256M --rate 20000 --listen tcp:127.0.0.1:{} --timeout 60", port),
                "env MINIVMM_TEST_STOP_IN=bulk");
    const auto t0 = clk::now();
    const std::string json = fs::temp_directory_path() / fmt::format("minivmm-timeout-{}.json", ::getpid());
    const CmdResult r = run_minivmm(fmt::format(
        "migrate --to tcp:127.0.0.1:{} --vcpus 2 --mem 256M --rate 20000 --warmup 0.2 --timeout 4 --json {}", port,
        json));
    const double took = since_s(t0);
    ::kill(rx.pid, SIGKILL);
    EXPECT_EQ(r.exit_code, 5) << r.err;
    EXPECT_NE(r.err.find("in bulk"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("--timeout 4 s reached while the peer was not reading"), std::string::npos) << r.err;
    EXPECT_NE(r.out.find("source: kept running (made progress)"), std::string::npos) << r.out;
    // The migration itself (the report's start -> failure) ends at its deadline;
    // the whole command (boot, first pass, the source's check after it) well
    // before the receiver's 30 s --io-timeout would have ended it.
    const auto j = nlohmann::json::parse(mvm::test::read_file(json), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << r.err;
    EXPECT_GE(j["total_ms"].get<double>(), 4000) << r.err;
    EXPECT_LT(j["total_ms"].get<double>(), 4000 + 1500) << r.err;
    EXPECT_LT(took, 20) << r.err;
    fs::remove(json);
    rx.wait();
}

// A sender that stops (SIGSTOP) before its bulk pages: the receiver gives up
// after --io-timeout.
TEST(MigrateTimeouts, ReceiverGivesUpOnAStalledSenderAfterIoTimeout)
{
    REQUIRE_KVM();
    const uint16_t port = free_port();
    Receiver rx(fmt::format("{} --listen tcp:127.0.0.1:{} --timeout 60 --io-timeout 2", kVm, port));
    pid_t sender = fork();
    if (sender == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        const std::string cmd = fmt::format("MINIVMM_TEST_STOP_IN=bulk exec {} migrate --to tcp:127.0.0.1:{} {} "
                                            "--warmup 0.2 --timeout 60 >/dev/null 2>&1",
                                            MINIVMM_BINARY, port, kVm);
        execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
        _exit(127);
    }
    const auto t0 = clk::now();
    const int rc = rx.wait();
    const double took = since_s(t0);
    ::kill(sender, SIGKILL);
    int st = 0;
    ::waitpid(sender, &st, 0);
    EXPECT_EQ(rc, 5) << rx.output();
    EXPECT_GE(took, 2.0) << rx.output();
    EXPECT_LT(took, 2.0 + 4.0) << "boot, warm-up, then 2 s of nothing" << rx.output();
    EXPECT_NE(rx.result().err.find("nothing came for 2 s (--io-timeout)"), std::string::npos) << rx.output();
    // Its figures: the memory step timed up to the failure (pages came, then
    // 2 s of nothing), no switchover or verify it never reached (it printed
    // "memory 0.0 ms, switchover 0.0 ms ..." after 1.1 GiB over 18 s).
    const std::string& out = rx.result().out;
    const auto at = out.find("memory ");
    ASSERT_NE(at, std::string::npos) << out;
    EXPECT_GE(std::stod(out.substr(at + 7)), 2000.0) << out;
    EXPECT_NE(out.find("(cut short by the failure)"), std::string::npos) << out;
    EXPECT_EQ(out.find("switchover"), std::string::npos) << out;
    EXPECT_EQ(out.find("verify"), std::string::npos) << out;
}

// QEMU's verify-peer and anonymous x509 clients (tls-tests.c allow-/reject-anon-client), at the
// handshake itself over a socketpair (no KVM): a client whose directory holds only the CA's
// certificate has none to show; a receiver with verify-peer false admits it (identity ""), one
// with verify-peer true refuses it, and the sender hears why.
TEST(TlsAnonymousClient, VerifyPeerDecidesWhetherItIsAdmitted)
{
    REQUIRE_CREDS();
    const Creds& c = Creds::get();
    const std::string anon = c.dir + "/anon";
    fs::create_directories(anon);
    fs::copy_file(c.good + "/ca-cert.pem", anon + "/ca-cert.pem", fs::copy_options::overwrite_existing);
    tls::Options client;
    client.creds = "x509:" + anon;
    auto cctx = tls::Context::client(client, "127.0.0.1");
    EXPECT_NE(cctx->describe().find("anonymous"), std::string::npos) << cctx->describe();
    for (const bool verify : {false, true}) {
        tls::Options server;
        server.creds = "x509:" + c.good;
        server.verify_peer = verify;
        auto sctx = tls::Context::server(server);
        int sv[2];
        ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
        std::string server_error, identity = "unset";
        std::thread srv([&] {
            try {
                tls::Peer p = sctx->accept(std::make_unique<FdTransport>(sv[0], "sender"));
                identity = p.identity;
            } catch (const std::exception& e) {
                server_error = e.what();
            }
        });
        std::string client_error;
        try {
            cctx->connect(std::make_unique<FdTransport>(sv[1], "receiver"));
        } catch (const std::exception& e) {
            client_error = e.what();
        }
        srv.join();
        if (!verify) {
            EXPECT_EQ(server_error, "");
            EXPECT_EQ(client_error, "");
            EXPECT_EQ(identity, "") << "an anonymous client has no identity";
        } else {
            EXPECT_NE(server_error.find("certificate"), std::string::npos) << server_error;
            EXPECT_NE(client_error, "") << "the refused sender must fail";
        }
    }
}
