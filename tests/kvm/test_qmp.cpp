// QMP (cli/qmp/): the wire protocol, a complete migration driven through QMP
// alone, a mid-flight max-bandwidth change, a cancel, and calc-dirty-rate in
// each mode. The client here is the test's own (a unix socket and
// nlohmann::json), not minivmm's server code: what a harness written against
// QEMU would send.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/kvm/kvm_test_util.hpp"

using nlohmann::json;
using namespace mvm::test;

namespace {

using clock_type = std::chrono::steady_clock;

double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

std::string temp_dir()
{
    char d[] = "/tmp/minivmm-qmp-XXXXXX";
    return mkdtemp(d);
}

// `minivmm ARGS` in the background, stdout and stderr to files; killed if still running at the end.
class Process {
public:
    explicit Process(const std::string& args)
    {
        char out[] = "/tmp/minivmm-qmp-out-XXXXXX", err[] = "/tmp/minivmm-qmp-err-XXXXXX";
        const int o = mkstemp(out), e = mkstemp(err);
        out_ = out;
        err_ = err;
        pid_ = fork();
        if (pid_ == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives the test (a killed test binary included)
            dup2(o, 1);
            dup2(e, 2);
            const int null = open("/dev/null", O_RDONLY);
            dup2(null, 0);
            const std::string cmd = std::string("exec ") + MINIVMM_BINARY + " " + args;
            execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
            _exit(127);
        }
        close(o);
        close(e);
    }
    ~Process()
    {
        if (pid_ > 0) {
            kill(pid_, SIGKILL);
            waitpid(pid_, nullptr, 0);
        }
        unlink(out_.c_str());
        unlink(err_.c_str());
    }
    // Until stderr holds `what` (true) or the process exited / timeout (false).
    bool wait_for_stderr(const std::string& what, double timeout_s = 60)
    {
        const auto t0 = clock_type::now();
        while (since(t0) < timeout_s) {
            if (read_file(err_).find(what) != std::string::npos)
                return true;
            if (exited(0))
                return read_file(err_).find(what) != std::string::npos;
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        return false;
    }
    // Exit code once it exited within timeout_s (128 + signal), else -1.
    int wait(double timeout_s = 60)
    {
        const auto t0 = clock_type::now();
        while (!exited(0.05) && since(t0) < timeout_s) {
        }
        return code_;
    }
    std::string err() const { return read_file(err_); }
    std::string out() const { return read_file(out_); }

private:
    bool exited(double wait_s)
    {
        if (pid_ <= 0)
            return true;
        int st = 0;
        if (waitpid(pid_, &st, WNOHANG) == pid_) {
            code_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            pid_ = -1;
            return true;
        }
        std::this_thread::sleep_for(std::chrono::duration<double>(wait_s));
        return false;
    }
    pid_t pid_ = -1;
    int code_ = -1;
    std::string out_, err_;
};

// A QMP client: connects, reads the greeting; cmd() sends one command with
// an id and returns the reply with that id, keeping the events that arrive meanwhile.
class Client {
public:
    explicit Client(const std::string& path)
    {
        fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un sa{};
        sa.sun_family = AF_UNIX;
        std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
        if (connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0)
            throw std::runtime_error("connect " + path + ": " + std::strerror(errno));
        greeting = next();
    }
    ~Client() { close(); }
    void close()
    {
        if (fd_ >= 0)
            ::close(fd_);
        fd_ = -1;
    }
    // (MSG_NOSIGNAL: a server that exited is an EPIPE here, not a SIGPIPE for the test.)
    void send_raw(const std::string& s) { [[maybe_unused]] auto n = ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL); }
    json cmd(const std::string& name, const json& args = nullptr)
    {
        json req = {{"execute", name}, {"id", ++id_}};
        if (!args.is_null())
            req["arguments"] = args;
        send_raw(req.dump());
        return reply(id_);
    }
    // The reply with `id` (events before it are kept).
    json reply(int id)
    {
        for (;;) {
            json m = next();
            if (m.is_null())
                return m;
            if (m.contains("event")) {
                events.push_back(m);
                continue;
            }
            if (m.value("id", -1) == id)
                return m;
        }
    }
    // The next message, whatever it is (null after 60 s or when the server closed).
    json next(double timeout_s = 60)
    {
        const auto t0 = clock_type::now();
        for (;;) {
            const size_t nl = buf_.find('\n');
            if (nl != std::string::npos) {
                const std::string line = buf_.substr(0, nl);
                buf_.erase(0, nl + 1);
                return json::parse(line);
            }
            pollfd p{fd_, POLLIN, 0};
            if (since(t0) > timeout_s || poll(&p, 1, 100) < 0)
                return nullptr;
            if (!(p.revents & (POLLIN | POLLHUP)))
                continue;
            char b[4096];
            const ssize_t n = read(fd_, b, sizeof(b));
            if (n <= 0)
                return nullptr;
            buf_.append(b, static_cast<size_t>(n));
        }
    }
    bool saw_event(const std::string& name, const json& data = nullptr) const
    {
        for (const auto& e : events)
            if (e["event"] == name && (data.is_null() || e.value("data", json()) == data))
                return true;
        return false;
    }
    json greeting;
    std::vector<json> events;

private:
    int fd_ = -1;
    int id_ = 0;
    std::string buf_;
};

json ok(Client& c, const std::string& name, const json& args = nullptr)
{
    json r = c.cmd(name, args);
    EXPECT_TRUE(r.contains("return")) << name << " " << args.dump() << " -> " << r.dump();
    return r.value("return", json());
}

std::string error_class(const json& r) { return r.contains("error") ? r["error"].value("class", "") : ""; }
std::string error_desc(const json& r) { return r.contains("error") ? r["error"].value("desc", "") : ""; }

// Negotiated, and with the events capability on (MIGRATION and MIGRATION_PASS are sent only then, as in QEMU).
void negotiate(Client& c, bool events = true)
{
    ok(c, "qmp_capabilities");
    if (events)
        ok(c, "migrate-set-capabilities", {{"capabilities", {{{"capability", "events"}, {"state", true}}}}});
}

// QEMU's byte counters add up at every poll, a running migration's included.
void expect_bytes_add_up(const json& j)
{
    if (!j.contains("ram") || !j["ram"].contains("precopy-bytes"))
        return;
    const json& r = j["ram"];
    EXPECT_EQ(r["precopy-bytes"].get<uint64_t>() + r["downtime-bytes"].get<uint64_t>() +
                  r.value("postcopy-bytes", uint64_t{0}),
              r["transferred"].get<uint64_t>())
        << "precopy + downtime + postcopy bytes != transferred (status " << j.value("status", "") << "): "
        << j.dump();
}

// Polls query-migrate every 100 ms until `done` says so or timeout; returns the
// last answer. Every answer's byte counts must add up.
json poll_migrate(Client& c, const std::function<bool(const json&)>& done, double timeout_s)
{
    const auto t0 = clock_type::now();
    json last;
    while (since(t0) < timeout_s) {
        last = ok(c, "query-migrate");
        expect_bytes_add_up(last);
        if (done(last))
            return last;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return last;
}

const char* kGuest = "--mem 64M --vcpus 1 --rate 500";

}  // namespace

TEST(Qmp, ProtocolNegotiationErrorsEventsAndTheSocket)
{
    REQUIRE_KVM();
    const std::string dir = temp_dir(), sock = dir + "/src.qmp";
    Process src(fmt::format("run --qmp unix:{} {}", sock, kGuest));
    ASSERT_TRUE(src.wait_for_stderr("qmp: serving on")) << src.err();
    struct stat st{};
    ASSERT_EQ(stat(sock.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0600u) << "the socket is owner-only";

    Client c(sock);
    ASSERT_TRUE(c.greeting.contains("QMP")) << c.greeting.dump();
    EXPECT_TRUE(c.greeting["QMP"]["version"]["qemu"].contains("major"));
    EXPECT_TRUE(c.greeting["QMP"]["capabilities"].is_array());
    // Before negotiation only qmp_capabilities is served.
    json r = c.cmd("query-status");
    EXPECT_EQ(error_class(r), "CommandNotFound") << r.dump();
    EXPECT_NE(error_desc(r).find("qmp_capabilities"), std::string::npos);
    ok(c, "qmp_capabilities");
    EXPECT_EQ(error_class(c.cmd("qmp_capabilities")), "CommandNotFound");

    // Errors with QEMU's classes; the server keeps serving after each.
    r = c.cmd("no-such-command");
    EXPECT_EQ(error_class(r), "CommandNotFound") << r.dump();
    r = c.cmd("query-migrate", {{"bogus", 1}});
    EXPECT_EQ(error_class(r), "GenericError");
    EXPECT_EQ(error_desc(r), "Parameter 'bogus' is unexpected");
    r = c.cmd("migrate-set-parameters", {{"max-bandwidth", "fast"}});
    EXPECT_EQ(error_desc(r), "Invalid parameter type for 'max-bandwidth', expected: integer") << r.dump();
    r = c.cmd("migrate-set-parameters", {{"xbzrle-cache-size", 1 << 20}});
    EXPECT_EQ(error_class(r), "GenericError");
    EXPECT_NE(error_desc(r).find("not supported"), std::string::npos) << r.dump();
    r = c.cmd("migrate-set-capabilities", {{"capabilities", {{{"capability", "postcopy-preempt"}, {"state", true}}}}});
    EXPECT_NE(error_desc(r).find("not supported"), std::string::npos) << r.dump();
    r = c.cmd("migrate", json::object());
    EXPECT_EQ(error_desc(r), "need either 'uri' or 'channels' argument");
    r = c.cmd("migrate", {{"uri", "exec:cat"}});
    EXPECT_EQ(error_class(r), "GenericError");
    // QMP objects: what a migration's TLS parameters name.
    r = c.cmd("object-add", {{"qom-type", "memory-backend-ram"}, {"id", "m0"}});
    EXPECT_NE(error_desc(r).find("not supported by minivmm"), std::string::npos) << r.dump();
    r = c.cmd("object-add", {{"qom-type", "tls-creds-psk"}, {"id", "p0"}, {"endpoint", "client"}, {"dir", "/nonexistent"}});
    EXPECT_TRUE(r.contains("return")) << r.dump();  // files are read when a migration uses them, as in QEMU
    r = c.cmd("object-add", {{"qom-type", "tls-creds-psk"}, {"id", "p0"}, {"endpoint", "client"}, {"dir", "/x"}});
    EXPECT_NE(error_desc(r).find("duplicate"), std::string::npos) << r.dump();
    r = c.cmd("object-add", {{"qom-type", "tls-creds-x509"}, {"id", "x0"}, {"endpoint", "server"}, {"dir", "/x"},
                             {"verify-peer", false}});
    EXPECT_NE(error_desc(r).find("verify-peer false is not supported"), std::string::npos) << r.dump();
    r = c.cmd("object-add", {{"qom-type", "tls-creds-psk"}, {"id", "p1"}, {"endpoint", "middle"}, {"dir", "/x"}});
    EXPECT_EQ(error_desc(r), "Parameter 'endpoint' does not accept value 'middle'");
    r = c.cmd("migrate-set-parameters", {{"tls-creds", "nosuch"}});
    EXPECT_TRUE(r.contains("return")) << r.dump();  // looked up when a migration starts
    r = c.cmd("migrate", {{"uri", "tcp:127.0.0.1:1"}});
    EXPECT_EQ(error_desc(r), "No TLS credentials with id 'nosuch'");
    r = c.cmd("migrate-set-parameters", {{"tls-creds", nullptr}});
    EXPECT_TRUE(r.contains("return")) << r.dump();
    r = c.cmd("object-del", {{"id", "p0"}});
    EXPECT_TRUE(r.contains("return")) << r.dump();
    r = c.cmd("object-del", {{"id", "p0"}});
    EXPECT_EQ(error_desc(r), "object 'p0' not found");
    r = c.cmd("query-migrate-parameters", json::object());
    EXPECT_EQ(r["return"]["tls-creds"], "") << r.dump();
    r = c.cmd("set-vcpu-dirty-limit", {{"cpu-index", 99}, {"dirty-rate", 10}});
    EXPECT_EQ(error_desc(r), "incorrect cpu index specified");
    r = c.cmd("set-vcpu-dirty-limit", {{"dirty-rate", 0}});
    EXPECT_NE(error_desc(r).find("dirty-rate"), std::string::npos) << r.dump();
    EXPECT_EQ(ok(c, "query-vcpu-dirty-limit"), json::array()) << "no limit set: an empty list, as in QEMU";
    r = c.cmd("getfd", {{"fdname", "f"}});
    EXPECT_EQ(error_desc(r), "No file descriptor supplied via SCM_RIGHTS");
    r = c.cmd("getfd", {{"fdname", "1f"}});
    EXPECT_EQ(error_desc(r), "Parameter 'fdname' expects a name not starting with a digit");
    c.send_raw("{\"execute\": \"query-status\", \"id\": \"str\"");  // incomplete: waits for the rest
    c.send_raw("}");
    json m = c.next();
    EXPECT_EQ(m.value("id", ""), "str") << m.dump();
    EXPECT_TRUE(m["return"]["running"].get<bool>());
    c.send_raw("{\"execute\": }");
    m = c.next();
    EXPECT_EQ(error_class(m), "GenericError") << m.dump();
    c.send_raw("[1, 2]");
    m = c.next();
    EXPECT_EQ(error_desc(m), "QMP input must be a JSON object") << m.dump();
    // Parameters changed without a migration are what the next one takes.
    ok(c, "migrate-set-parameters", {{"max-bandwidth", 33554432}, {"downtime-limit", 250}});
    json p = ok(c, "query-migrate-parameters");
    EXPECT_EQ(p["max-bandwidth"], 33554432);
    EXPECT_EQ(p["downtime-limit"], 250);
    EXPECT_EQ(ok(c, "query-migrate"), json::object()) << "no migration yet";

    json cmds = ok(c, "query-commands");
    std::vector<std::string> names;
    for (const auto& e : cmds)
        names.push_back(e["name"]);
    for (const char* want : {"query-status", "stop", "cont", "migrate", "migrate-incoming", "migrate_cancel",
                             "query-migrate", "migrate-set-parameters", "calc-dirty-rate", "query-stats", "quit"})
        EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
    EXPECT_TRUE(ok(c, "query-version")["qemu"].contains("minor"));

    // stop / cont: STOP and RESUME, and the run state.
    ok(c, "stop");
    json s = ok(c, "query-status");
    EXPECT_FALSE(s["running"].get<bool>());
    EXPECT_EQ(s["status"], "paused");
    ok(c, "cont");
    s = ok(c, "query-status");
    EXPECT_TRUE(s["running"].get<bool>());
    EXPECT_EQ(s["status"], "running");
    EXPECT_TRUE(c.saw_event("STOP"));
    EXPECT_TRUE(c.saw_event("RESUME"));
    for (const auto& e : c.events)
        EXPECT_TRUE(e.contains("timestamp") && e["timestamp"].contains("seconds") &&
                    e["timestamp"].contains("microseconds"))
            << e.dump();

    // KVM's binary stats, for the VM and per vCPU.
    json vm = ok(c, "query-stats", {{"target", "vm"}});
    ASSERT_EQ(vm.size(), 1u);
    EXPECT_EQ(vm[0]["provider"], "kvm");
    EXPECT_FALSE(vm[0]["stats"].empty());
    json vc = ok(c, "query-stats", {{"target", "vcpu"}});
    ASSERT_EQ(vc.size(), 1u);
    EXPECT_EQ(vc[0]["qom-path"], "/machine/unattached/device[0]");
    bool exits = false;
    for (const auto& st2 : vc[0]["stats"])
        exits = exits || st2["name"] == "exits";
    EXPECT_TRUE(exits) << vc.dump();

    // minivmm's own: where each virtual node's memory is, page by page.
    json pl = ok(c, "x-minivmm-query-placement", {{"sample-pages", 0}});
    ASSERT_EQ(pl.size(), 1u) << pl.dump();
    EXPECT_EQ(pl[0]["pages"], 16384);
    EXPECT_EQ(pl[0]["pages_queried"], 16384);
    EXPECT_FALSE(pl[0]["sampled"].get<bool>());
    uint64_t placed = pl[0]["pages_not_present"].get<uint64_t>();
    for (const auto& [node, pages] : pl[0]["pages_per_host_node"].items())
        placed += pages.get<uint64_t>();
    EXPECT_EQ(placed, 16384u) << pl.dump();
    EXPECT_EQ(ok(c, "x-minivmm-query-placement", {{"sample-pages", 100}})[0]["pages_queried"], 100);

    // Clients in turn, and one that vanishes mid-command, disturb nothing.
    {
        Client c2(sock);
        ok(c2, "qmp_capabilities");
        c2.send_raw("{\"execute\": \"query-status\"");
        c2.close();
    }
    Client c3(sock);
    ok(c3, "qmp_capabilities");
    EXPECT_TRUE(ok(c3, "query-status")["running"].get<bool>());

    // quit: its answer, then SHUTDOWN, a clean exit, the socket file gone.
    ok(c3, "quit");
    EXPECT_FALSE(c3.saw_event("SHUTDOWN")) << "quit answers before its SHUTDOWN event";
    json sd = c3.next();
    EXPECT_EQ(sd.value("event", ""), "SHUTDOWN") << sd.dump();
    EXPECT_EQ(src.wait(), 0) << src.err();
    EXPECT_NE(stat(sock.c_str(), &st), 0) << "the socket file is removed at exit";
    EXPECT_NE(src.out().find("stamp"), std::string::npos) << src.out();
    rmdir(dir.c_str());
}

// migrate --qmp: the command line's migration, watched over a TCP QMP
// socket; receive --qmp with an address of its own reports its side.
TEST(Qmp, WatchesTheCommandLinesMigrationOverTcp)
{
    REQUIRE_KVM();
    const std::string dir = temp_dir(), dsock = dir + "/dst.qmp";
    const uint16_t port = free_port(), qport = free_port();
    const std::string guest = "--mem 64M --vcpus 1 --rate 20000";
    Process dst(fmt::format("receive --listen tcp:127.0.0.1:{} --qmp unix:{} --post-run 0.5 {}", port, dsock, guest));
    ASSERT_TRUE(dst.wait_for_stderr("listening on")) << dst.err();
    Client d(dsock);
    negotiate(d);
    EXPECT_EQ(ok(d, "query-migrate").value("status", ""), "setup");
    Process src(fmt::format("migrate --to tcp:127.0.0.1:{} --qmp tcp:127.0.0.1:{} --bandwidth 32M --warmup 1 "
                            "--throttle dirty-limit:512 {}",
                            port, qport, guest));
    ASSERT_TRUE(src.wait_for_stderr("qmp: serving on tcp:127.0.0.1:")) << src.err();
    // A TCP client: the same protocol.
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(qport);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    std::string buf;
    std::vector<json> got;
    auto read_line = [&] {
        for (;;) {
            const size_t nl = buf.find('\n');
            if (nl != std::string::npos) {
                json m = json::parse(buf.substr(0, nl));
                buf.erase(0, nl + 1);
                return m;
            }
            char b[4096];
            const ssize_t n = read(fd, b, sizeof(b));
            if (n <= 0)
                return json();
            buf.append(b, static_cast<size_t>(n));
        }
    };
    auto cmd = [&](const json& req) {
        const std::string t = req.dump();
        if (::send(fd, t.data(), t.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(t.size()))
            return json();
        for (;;) {
            json m = read_line();
            if (m.is_null() || m.contains("return") || m.contains("error"))
                return m;
            got.push_back(m);
        }
    };
    EXPECT_TRUE(read_line().contains("QMP"));
    EXPECT_TRUE(cmd({{"execute", "qmp_capabilities"}}).contains("return"));
    // The migration runs (--bandwidth 32M: ~2 s of bulk); watch it, lower the downtime limit mid-flight.
    std::string seen;
    json last;
    const auto t0 = clock_type::now();
    while (since(t0) < 60) {
        json r = cmd({{"execute", "query-migrate"}});
        if (r.is_null())
            break;  // the command finished and exited
        last = r["return"];
        const std::string st = last.value("status", "");
        if (st == "active" && seen.find("active") == std::string::npos) {
            EXPECT_TRUE(cmd({{"execute", "migrate-set-parameters"}, {"arguments", {{"downtime-limit", 200}}}})
                            .contains("return"));
            EXPECT_EQ(cmd({{"execute", "query-migrate-parameters"}})["return"]["downtime-limit"], 200);
            EXPECT_GT(last["ram"]["total"].get<uint64_t>(), 0u);
        }
        if (seen.find(st) == std::string::npos)
            seen += st + " ";
        if (st == "completed" || st == "failed")
            break;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    close(fd);
    EXPECT_NE(seen.find("active"), std::string::npos) << seen;
    EXPECT_EQ(src.wait(), 0) << src.err() << src.out();
    EXPECT_NE(src.out().find("completed"), std::string::npos) << src.out();
    // The destination's side: its events (it exits once its check is reported:
    // what it sent is still read from the socket).
    json dm = json::object();
    for (int i = 0; i < 50 && dm.value("status", "") != "completed"; i++) {
        json r = d.cmd("query-migrate");
        if (r.is_null())
            break;
        dm = r.value("return", json::object());
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_TRUE(d.saw_event("MIGRATION", {{"status", "active"}})) << dm.dump();
    EXPECT_TRUE(d.saw_event("RESUME")) << "the destination's guest resumed";
    EXPECT_EQ(dst.wait(), 0) << dst.err();
    rmdir(dir.c_str());
}

TEST(Qmp, BadQmpOptionsAreOneLineAndExit2)
{
    const std::string dir = temp_dir();
    struct Case {
        std::string args, expect;
        bool after_kvm = false;  // a resource checked once /dev/kvm is open (the socket's directory)
    } cases[] = {
        {"run --qmp tcp:0.0.0.0:4445 --mem 16M", "loopback"},
        {"run --qmp ftp:x --mem 16M", "--qmp"},
        {"run --qmp unix: --mem 16M", "--qmp"},
        {"run --qmp-allow-remote --mem 16M", "--qmp-allow-remote"},
        {fmt::format("run --qmp unix:{}/x --dirty-log bitmap --mem 16M", dir), "--dirty-log"},
        {"receive --listen defer --mem 16M", "--listen defer"},
        {fmt::format("run --qmp unix:{}/no/such/dir/x --mem 16M", dir), "--qmp", true},
    };
    std::string no_kvm;
    const bool have_kvm = mvm::test::host_kvm(&no_kvm) != nullptr;
    for (const auto& c : cases) {
        if (c.after_kvm && !have_kvm) {
            std::printf("skipped: %s (needs /dev/kvm: %s)\n", c.args.c_str(), no_kvm.c_str());
            continue;
        }
        CmdResult r = run_minivmm(c.args);
        EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
        EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.args << "\n" << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
    }
    rmdir(dir.c_str());
}

// The Done-when test: a migration driven through QMP alone. A first
// migration is cancelled (the source keeps running), a second one completes;
// max-bandwidth changes mid-flight and the rate follows; query-migrate's
// final answer agrees with the source's own JSON report.
// --listen defer and no migrate-incoming before --timeout: no sender was
// admitted, exit 6 as at an address (it was 5, an admitted sender's failure).
TEST(Qmp, DeferredReceiveWithoutMigrateIncomingExits6)
{
    REQUIRE_KVM();
    const std::string dir = temp_dir();
    const CmdResult r = run_minivmm(fmt::format("receive --listen defer --qmp unix:{}/d.qmp --mem 16M --timeout 1", dir));
    EXPECT_EQ(r.exit_code, 6) << r.err;
    EXPECT_NE(r.err.find("no sender was admitted: --timeout 1 s passed without QMP's migrate-incoming"),
              std::string::npos)
        << r.err;
    EXPECT_EQ(r.out, "") << "nothing was received: no report";
}

TEST(Qmp, DrivesMigrationsCancelThenCompleteWithAMidFlightBandwidthChange)
{
    REQUIRE_KVM();
    const std::string dir = temp_dir();
    const std::string ssock = dir + "/src.qmp", d1 = dir + "/dst1.qmp", d2 = dir + "/dst2.qmp";
    const std::string report = dir + "/src.json";
    // One vCPU at 20000 pages/s: every page written within ~1 s (so the bulk
    // pass is data, not zero pages); QMP's dirty-limit (as a harness turns it
    // on) caps it at 2 MB/s from the first pre-copy round, so it converges.
    const std::string guest = "--mem 64M --vcpus 1 --rate 20000";
    Process src(fmt::format("run --qmp unix:{} {} --json {}", ssock, guest, report));
    ASSERT_TRUE(src.wait_for_stderr("qmp: serving on")) << src.err();
    Client s(ssock);
    negotiate(s);
    const double mib = 1 << 20;
    ok(s, "migrate-set-capabilities", {{"capabilities", {{{"capability", "dirty-limit"}, {"state", true}}}}});
    ok(s, "migrate-set-parameters", {{"vcpu-dirty-limit", 2}});
    EXPECT_EQ(ok(s, "query-migrate-parameters")["vcpu-dirty-limit"], 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));

    // ---- 1: cancelled ----
    {
        Process dst(fmt::format("receive --listen defer --qmp unix:{} {}", d1, guest));
        ASSERT_TRUE(dst.wait_for_stderr("qmp: serving on")) << dst.err();
        Client d(d1);
        negotiate(d);
        EXPECT_EQ(ok(d, "query-status")["status"], "inmigrate");
        const uint16_t port = free_port();
        ok(d, "migrate-incoming", {{"uri", fmt::format("tcp:127.0.0.1:{}", port)}});
        ASSERT_TRUE(dst.wait_for_stderr("listening on")) << dst.err();
        ok(s, "migrate-set-parameters", {{"max-bandwidth", static_cast<int64_t>(8 * mib)}});
        ok(s, "migrate", {{"uri", fmt::format("tcp:127.0.0.1:{}", port)}});
        EXPECT_EQ(error_desc(s.cmd("migrate", {{"uri", fmt::format("tcp:127.0.0.1:{}", port)}})),
                  "There's a migration process in progress");
        json a = poll_migrate(s, [](const json& j) { return j.value("status", "") == "active"; }, 30);
        ASSERT_EQ(a.value("status", ""), "active") << a.dump();
        ok(s, "migrate_cancel");
        json c = poll_migrate(s, [](const json& j) { return j.value("status", "") == "cancelled"; }, 30);
        ASSERT_EQ(c.value("status", ""), "cancelled") << c.dump();
        EXPECT_EQ(c.value("x-minivmm-source-state", ""), "running") << c.dump();
        json st = ok(s, "query-status");
        EXPECT_TRUE(st["running"].get<bool>()) << st.dump();
        EXPECT_TRUE(s.saw_event("MIGRATION", {{"status", "cancelling"}}));
        EXPECT_TRUE(s.saw_event("MIGRATION", {{"status", "cancelled"}}));
        // The source's guest still writes its memory: QMP's own measure of it.
        ok(s, "calc-dirty-rate", {{"calc-time", 1}, {"mode", "dirty-bitmap"}});
        json q = json::object();
        for (int i = 0; i < 100 && q.value("status", "") != "measured"; i++) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            q = ok(s, "query-dirty-rate");
        }
        EXPECT_GT(q.value("dirty-rate", 0), 0) << "the source runs after the cancel: " << q.dump();
        EXPECT_NE(dst.wait(), 0) << "the destination of a cancelled migration fails";
    }

    // ---- 2: completed, with max-bandwidth raised mid-flight ----
    Process dst(fmt::format("receive --listen defer --qmp unix:{} {}", d2, guest));
    ASSERT_TRUE(dst.wait_for_stderr("qmp: serving on")) << dst.err();
    Client d(d2);
    negotiate(d);
    const uint16_t port = free_port();
    ok(d, "migrate-incoming", {{"uri", fmt::format("tcp:127.0.0.1:{}", port)}});
    ASSERT_TRUE(dst.wait_for_stderr("listening on")) << dst.err();
    s.events.clear();
    ok(s, "migrate-set-parameters", {{"max-bandwidth", static_cast<int64_t>(8 * mib)}});
    ok(s, "migrate", {{"uri", fmt::format("tcp:127.0.0.1:{}", port)}});
    {
        // Another client watches (capabilities cannot change mid-migration:
        // refused, as in QEMU), then vanishes mid-command with its events
        // unread: the migration does not notice.
        Client w(ssock);
        negotiate(w, false);
        EXPECT_EQ(error_desc(w.cmd("migrate-set-capabilities",
                                   {{"capabilities", {{{"capability", "auto-converge"}, {"state", true}}}}})),
                  "There's a migration process in progress");
        ok(w, "query-migrate");
        w.send_raw("{\"execute\": \"query-migrate\"");  // and gone before the rest
    }
    // The bulk pass at 8 MiB/s: mbps (over the last second) near 67 Mbit/s.
    poll_migrate(s, [](const json& j) { return j.value("status", "") == "active"; }, 30);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    json slow = ok(s, "query-migrate");
    ASSERT_EQ(slow.value("status", ""), "active") << slow.dump();
    expect_bytes_add_up(slow);  // was: transferred 67331680, precopy-bytes 0
    const double mbps_slow = slow["ram"]["mbps"].get<double>();
    const uint64_t sent_slow = slow["ram"]["transferred"].get<uint64_t>();
    EXPECT_GT(slow["ram"]["remaining"].get<uint64_t>(), 0u) << slow.dump();
    EXPECT_GT(slow["ram"]["total"].get<uint64_t>(), 64 * mib) << slow.dump();
    ok(s, "migrate-set-parameters", {{"max-bandwidth", static_cast<int64_t>(32 * mib)}});
    std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // a whole 1 s rate window at the new cap
    json fast = ok(s, "query-migrate");
    const double mbps_fast = fast["ram"]["mbps"].get<double>();
    EXPECT_NEAR(mbps_slow, 8 * mib * 8 / 1e6, 8 * mib * 8 / 1e6 * 0.35) << slow.dump();
    if (fast.value("status", "") == "active") {
        EXPECT_GT(mbps_fast, 2.5 * mbps_slow) << "the rate follows max-bandwidth: " << fast.dump();
        EXPECT_NEAR(mbps_fast, 32 * mib * 8 / 1e6, 32 * mib * 8 / 1e6 * 0.35) << fast.dump();
    }
    json done = poll_migrate(s, [](const json& j) {
        const std::string st = j.value("status", "");
        return st == "completed" || st == "failed" || st == "cancelled";
    }, 90);
    ASSERT_EQ(done.value("status", ""), "completed") << done.dump() << "\n" << dst.err();
    EXPECT_GT(done["ram"]["transferred"].get<uint64_t>(), sent_slow);
    for (const char* f : {"total-time", "downtime", "setup-time", "expected-downtime"})
        EXPECT_TRUE(done.contains(f)) << f << " " << done.dump();
    for (const char* f : {"transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-pages-rate",
                          "mbps", "dirty-sync-count", "pages-per-second", "precopy-bytes", "downtime-bytes"})
        EXPECT_TRUE(done["ram"].contains(f)) << f << " " << done.dump();
    EXPECT_EQ(done["ram"]["remaining"], 0);
    EXPECT_EQ(done["ram"]["precopy-bytes"].get<uint64_t>() + done["ram"]["downtime-bytes"].get<uint64_t>(),
              done["ram"]["transferred"].get<uint64_t>())
        << done.dump();
    EXPECT_LE(done["downtime"].get<int64_t>(), done["total-time"].get<int64_t>());
    EXPECT_EQ(done["x-minivmm-verification"]["switchover_mismatches"], 0) << done.dump();
    EXPECT_EQ(done["x-minivmm-verification"]["stamp_mismatches"], 0) << done.dump();
    EXPECT_EQ(done["x-minivmm-vcpu-stall-ms"].size(), 1u) << done.dump();
    EXPECT_EQ(ok(s, "query-status")["status"], "postmigrate");
    EXPECT_NE(error_desc(s.cmd("cont")).find("twice"), std::string::npos) << "cont after completion is refused";
    // Events: the status changes in order, a pass per dirty sync, the source stopped.
    std::vector<std::string> statuses;
    uint64_t passes = 0;
    for (const auto& e : s.events) {
        if (e["event"] == "MIGRATION")
            statuses.push_back(e["data"]["status"]);
        if (e["event"] == "MIGRATION_PASS")
            passes = std::max<uint64_t>(passes, e["data"]["pass"].get<uint64_t>());
    }
    ASSERT_GE(statuses.size(), 4u) << s.events.size();
    EXPECT_EQ(statuses.front(), "setup");
    EXPECT_EQ(statuses[1], "active");
    EXPECT_EQ(statuses.back(), "completed");
    EXPECT_NE(std::find(statuses.begin(), statuses.end(), "device"), statuses.end());
    EXPECT_EQ(passes, done["ram"]["dirty-sync-count"].get<uint64_t>());
    EXPECT_TRUE(s.saw_event("STOP"));
    EXPECT_EQ(dst.wait(), 0) << dst.err();

    // The source's own report agrees with what QMP said.
    ok(s, "quit");
    EXPECT_EQ(src.wait(), 0) << src.err();
    json j = json::parse(read_file(report));
    ASSERT_EQ(j["migrations"].size(), 2u);
    EXPECT_EQ(j["migrations"][0]["status"], "cancelled");
    EXPECT_EQ(j["migrations"][0]["source_state"], "running");
    const json& m = j["migrations"][1];
    EXPECT_EQ(m["status"], "completed");
    EXPECT_NEAR(m["total_ms"].get<double>(), done["total-time"].get<double>(), 1.0);
    EXPECT_NEAR(m["downtime_ms"].get<double>(), done["downtime"].get<double>(), 1.0);
    EXPECT_NEAR(m["setup_ms"].get<double>(), done["setup-time"].get<double>(), 1.0);
    EXPECT_EQ(m["transferred_bytes"], done["ram"]["transferred"]);
    EXPECT_EQ(m["dirty_syncs"], done["ram"]["dirty-sync-count"]);
    EXPECT_EQ(m["zero_pages"], done["ram"]["duplicate"]);
    EXPECT_DOUBLE_EQ(m["mbps"].get<double>(), done["ram"]["mbps"].get<double>());
    rmdir(dir.c_str());
}

TEST(Qmp, CalcDirtyRateInEachMode)
{
    REQUIRE_KVM();
    const std::string dir = temp_dir();
    struct Run {
        std::string extra;
        std::vector<std::string> modes;
        std::string refused;
    } runs[] = {
        {"", {"page-sampling", "dirty-bitmap"}, "dirty-ring"},
        {"--ring 64K", {"dirty-ring"}, "dirty-bitmap"},
    };
    for (const auto& run : runs) {
        const std::string sock = dir + "/rate.qmp";
        Process src(fmt::format("run --qmp unix:{} --mem 64M --vcpus 2 --rate 2000 {}", sock, run.extra));
        ASSERT_TRUE(src.wait_for_stderr("qmp: serving on")) << src.err();
        Client c(sock);
        negotiate(c, false);
        EXPECT_EQ(ok(c, "query-dirty-rate")["status"], "unstarted");
        json r = c.cmd("calc-dirty-rate", {{"calc-time", 1}, {"mode", run.refused}});
        EXPECT_EQ(error_class(r), "GenericError") << r.dump();
        EXPECT_NE(error_desc(r).find("not enabled"), std::string::npos) << r.dump();
        EXPECT_EQ(error_class(c.cmd("calc-dirty-rate", {{"calc-time", 1}, {"mode", "bogus"}})), "GenericError");
        for (const auto& mode : run.modes) {
            // QEMU's TimeUnit names (second, millisecond); minivmm also takes s and ms.
            json args = {{"calc-time", 800}, {"calc-time-unit", "millisecond"}, {"mode", mode}};
            if (mode == "page-sampling")
                args["sample-pages"] = 4096;  // per GiB: 256 samples of this 64 MiB guest
            ok(c, "calc-dirty-rate", args);
            EXPECT_EQ(error_desc(c.cmd("calc-dirty-rate", {{"calc-time", 1}, {"mode", mode}})),
                      "the dirty rate is already being measured");
            json q;
            const auto t0 = clock_type::now();
            do {
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
                q = ok(c, "query-dirty-rate");
            } while (q["status"] != "measured" && since(t0) < 30);
            ASSERT_EQ(q["status"], "measured") << q.dump();
            EXPECT_EQ(q["mode"], mode);
            EXPECT_EQ(q["calc-time"], 800);
            EXPECT_EQ(q["calc-time-unit"], "millisecond");
            EXPECT_FALSE(q.contains("x-minivmm-error")) << q.dump();
            // 2 vCPUs at 2000 pages/s each: ~15.6 MiB/s of distinct pages at most.
            ASSERT_TRUE(q.contains("dirty-rate")) << q.dump();
            EXPECT_GE(q["dirty-rate"].get<int64_t>(), 4) << q.dump();
            EXPECT_LE(q["dirty-rate"].get<int64_t>(), 24) << q.dump();
            if (mode == "dirty-ring") {
                ASSERT_EQ(q["vcpu-dirty-rate"].size(), 2u) << q.dump();
                for (const auto& v : q["vcpu-dirty-rate"])
                    EXPECT_GE(v["dirty-rate"].get<int64_t>(), 2) << q.dump();
            } else {
                EXPECT_FALSE(q.contains("vcpu-dirty-rate"));
            }
            json sec = ok(c, "query-dirty-rate", {{"calc-time-unit", "second"}});
            EXPECT_EQ(sec["calc-time"], 0);  // 800 ms in whole seconds, as QEMU converts
            EXPECT_EQ(sec["calc-time-unit"], "second");
            EXPECT_EQ(ok(c, "query-dirty-rate", {{"calc-time-unit", "s"}})["calc-time-unit"], "second");
            EXPECT_EQ(error_class(c.cmd("query-dirty-rate", {{"calc-time-unit", "minute"}})), "GenericError");
        }
        EXPECT_TRUE(ok(c, "query-status")["running"].get<bool>());
        ok(c, "quit");
        EXPECT_EQ(src.wait(), 0) << src.err();
    }
    rmdir(dir.c_str());
}

// Postcopy as a QEMU harness drives it: postcopy-ram on, migrate, then
// migrate-start-postcopy while pre-copy cannot converge; the source's
// postcopy-requests and postcopy-bytes, the destination's blocktime and
// latency figures (postcopy-blocktime capability, QEMU 10.1's names).
TEST(Qmp, PostcopyStartedByMigrateStartPostcopy)
{
    REQUIRE_KVM();
    const std::string dir = temp_dir();
    const std::string ssock = dir + "/src.qmp", dsock = dir + "/dst.qmp";
    const std::string guest = "--mem 32M --vcpus 2";  // writes all of its memory as fast as it can
    Process src(fmt::format("run --qmp unix:{} {}", ssock, guest));
    ASSERT_TRUE(src.wait_for_stderr("qmp: serving on")) << src.err();
    Client s(ssock);
    negotiate(s);
    EXPECT_EQ(error_desc(s.cmd("migrate-start-postcopy")), "Enable postcopy with migrate-set-capabilities before the "
                                                           "start of migration");
    ok(s, "migrate-set-capabilities", {{"capabilities", {{{"capability", "postcopy-ram"}, {"state", true}}}}});
    EXPECT_EQ(error_desc(s.cmd("migrate-start-postcopy")), "Postcopy must be started after migration has been started");
    Process dst(fmt::format("receive --listen defer --qmp unix:{} {} --post-run 3", dsock, guest));
    ASSERT_TRUE(dst.wait_for_stderr("qmp: serving on")) << dst.err();
    Client d(dsock);
    negotiate(d);
    ok(d, "migrate-set-capabilities", {{"capabilities", {{{"capability", "postcopy-ram"}, {"state", true}},
                                                         {{"capability", "postcopy-blocktime"}, {"state", true}}}}});
    const uint16_t port = free_port();
    ok(d, "migrate-incoming", {{"uri", fmt::format("tcp:127.0.0.1:{}", port)}});
    ASSERT_TRUE(dst.wait_for_stderr("listening on")) << dst.err();
    ok(s, "migrate-set-parameters", {{"max-bandwidth", 32 << 20}, {"x-minivmm-post-run", 500}});
    ok(s, "migrate", {{"uri", fmt::format("tcp:127.0.0.1:{}", port)}});
    json a = poll_migrate(s, [](const json& j) { return j.value("x-minivmm-phase", "") == "precopy"; }, 30);
    ASSERT_EQ(a.value("x-minivmm-phase", ""), "precopy") << a.dump();
    ok(s, "migrate-start-postcopy");
    struct Dump {
        Process &a, &b;
        ~Dump()
        {
            if (::testing::Test::HasFailure())
                std::cerr << "source:\n" << a.err() << "destination:\n" << b.err();
        }
    } dump{src, dst};
    // The destination's figures, while it runs its --post-run 3 s after postcopy (the
    // source says completed only once the destination's check reported, after it).
    json in = poll_migrate(d, [](const json& j) { return j.contains("postcopy-blocktime"); }, 30);
    ASSERT_TRUE(in.contains("postcopy-blocktime")) << in.dump();
    EXPECT_TRUE(d.saw_event("MIGRATION", {{"status", "postcopy-active"}}));
    EXPECT_EQ(in["postcopy-vcpu-blocktime"].size(), 2u) << in.dump();
    EXPECT_EQ(in["postcopy-vcpu-latency"].size(), 2u) << in.dump();
    EXPECT_EQ(in["postcopy-latency-dist"].size(), 24u) << in.dump();
    EXPECT_GT(in["postcopy-latency"].get<uint64_t>(), 0u) << in.dump();
    json done = poll_migrate(s, [](const json& j) {
        const std::string st = j.value("status", "");
        return st == "completed" || st == "failed";
    }, 60);
    ASSERT_EQ(done.value("status", ""), "completed") << done.dump();
    EXPECT_GT(done["ram"]["postcopy-requests"].get<uint64_t>(), 0u) << done.dump();
    EXPECT_GT(done["ram"]["postcopy-bytes"].get<uint64_t>(), 0u) << done.dump();
    EXPECT_EQ(done["ram"]["precopy-bytes"].get<uint64_t>() + done["ram"]["postcopy-bytes"].get<uint64_t>() +
                  done["ram"]["downtime-bytes"].get<uint64_t>(),
              done["ram"]["transferred"].get<uint64_t>());
    EXPECT_EQ(done["x-minivmm-verification"]["switchover_mismatches"], 0) << done.dump();
    EXPECT_EQ(done["x-minivmm-verification"]["stamp_mismatches"], 0) << done.dump();
    std::vector<std::string> statuses;
    for (const auto& e : s.events)
        if (e["event"] == "MIGRATION")
            statuses.push_back(e["data"]["status"]);
    EXPECT_NE(std::find(statuses.begin(), statuses.end(), "postcopy-active"), statuses.end()) << s.events.size();
    EXPECT_EQ(dst.wait(), 0) << dst.err();
    ok(s, "quit");
    EXPECT_EQ(src.wait(), 0) << src.err();
    rmdir(dir.c_str());
}
