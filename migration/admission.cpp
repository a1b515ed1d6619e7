#include "migration/admission.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "base/error.hpp"
#include "migration/file.hpp"
#include "migration/receiver.hpp"
#include "migration/transport/tcp.hpp"

namespace mvm::migration {

namespace {

using clock = std::chrono::steady_clock;

std::string address_of(const sockaddr_storage& a)
{
    char buf[INET6_ADDRSTRLEN] = "?";
    if (a.ss_family == AF_INET) {
        const auto* in = reinterpret_cast<const sockaddr_in*>(&a);
        ::inet_ntop(AF_INET, &in->sin_addr, buf, sizeof(buf));
        return fmt::format("{}:{}", buf, ntohs(in->sin_port));
    }
    if (a.ss_family == AF_INET6) {
        const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&a);
        ::inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof(buf));
        return fmt::format("[{}]:{}", buf, ntohs(in6->sin6_port));
    }
    return "a peer";
}

// A connection being admitted. The worker does its I/O on a dup of `fd`;
// the main thread owns `fd` itself, so it can shut the socket down (to stop
// the worker) whatever the worker has done with its copy.
struct Conn {
    int fd = -1;
    std::string peer;
    std::thread worker;
    std::atomic<bool> done{false};
    bool handed_over = false;  // its transport is in a session (under Admission::mu_)
    ~Conn()
    {
        if (worker.joinable())
            worker.join();
        if (fd >= 0)
            ::close(fd);
    }
};

struct Session {
    uint32_t channels = 0, have = 0;
    std::vector<std::unique_ptr<Transport>> chans;
    std::optional<Record> header;
    std::string peer, identity;
    clock::time_point first;
};

// Thrown for a connection that closed before its first byte: `minivmm
// migrate` checking that the receiver is there. Not worth a line.
struct Probe {};

class Admission {
public:
    explicit Admission(const AdmitOptions& o) : opt_(o) {}
    ~Admission()
    {
        stop_all();  // the workers first: they may write to wake_
        for (int fd : wake_)
            if (fd >= 0)
                ::close(fd);
    }
    Admitted run(int ls);

private:
    void work(Conn& c, int fd);
    std::optional<Record> read_channel0(RecordReader& rr, const Hello& h) const;
    void take(Conn& c, std::unique_ptr<Transport> t, const Hello& h, std::optional<Record> header,
              const std::string& identity);
    void drop(const std::string& peer, const std::string& why);
    void drop_locked(const std::string& peer, const std::string& why);  // mu_ held
    void expire_sessions();
    void stop_all();
    void accept_one(int ls);

    const AdmitOptions& opt_;
    int wake_[2] = {-1, -1};  // a worker that completes a session wakes the accept loop
    std::mutex mu_;  // sessions_, admitted_, handed_over, dropped_, last_drop_
    std::map<uint64_t, Session> sessions_;
    std::optional<uint64_t> admitted_;
    bool stopping_ = false;
    uint32_t dropped_ = 0;
    std::string last_drop_;
    std::vector<std::unique_ptr<Conn>> conns_;  // main thread only
};

void Admission::drop(const std::string& peer, const std::string& why)
{
    std::lock_guard lk(mu_);
    if (!stopping_)  // else stop_all() said why
        drop_locked(peer, why);
}

void Admission::drop_locked(const std::string& peer, const std::string& why)
{
    dropped_++;
    last_drop_ = fmt::format("{}: {}", peer, why);
    if (!opt_.quiet)
        fmt::print(stderr, "receive: dropped the connection from {}: {}\n", peer, why);
}

// Channel 0's record after its HELLO: a new sender's HEADER, or the paused
// migration's RESUME when recovering.
std::optional<Record> Admission::read_channel0(RecordReader& rr, const Hello& h) const
{
    std::optional<Record> header;
    if (opt_.resume_session && h.session != *opt_.resume_session)
        throw Error("its HELLO names another migration than the paused one");
    if (h.channel == 0 && opt_.resume_session) {
        header = rr.read();
        if (header->type != RecordType::Resume)
            throw Error(fmt::format("{} where a recovering sender's RESUME belongs", record_name(header->type)));
        if (resume_session_of(*header) != *opt_.resume_session)
            throw Error("its RESUME names another migration than the paused one");
    } else if (h.channel == 0) {
        header = rr.read();
        if (header->type != RecordType::Header)
            throw Error(fmt::format("{} where channel 0's HEADER belongs", record_name(header->type)));
        const StreamHeader sh = StreamHeader::decode(header->payload);
        if (sh.nr_channels != h.channels)
            throw Error(fmt::format("its HEADER says {} channels, its HELLO {}", sh.nr_channels, h.channels));
    }
    return header;
}

// One connection: its first byte, TLS, its HELLO (and channel 0's HEADER),
// all within --io-timeout of its accept.
void Admission::work(Conn& c, int fd)
{
    std::unique_ptr<Transport> t;
    try {
        auto raw = std::make_unique<FdTransport>(fd, c.peer);
        IoLimits l;
        l.idle_s = opt_.io_timeout_s;
        l.deadline = clock::now() + std::chrono::duration_cast<clock::duration>(
                                        std::chrono::duration<double>(opt_.io_timeout_s));
        l.deadline_what = fmt::format("--io-timeout {:g} s (the time a connection has to be admitted)",
                                      opt_.io_timeout_s);
        raw->set_limits(l);
        uint8_t first[3] = {};
        ssize_t n;
        raw->arm(false);
        do
            n = ::recv(raw->fd(), first, sizeof(first), MSG_PEEK | MSG_WAITALL);
        while (n < 0 && errno == EINTR);
        if (n == 0)
            throw Probe{};
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            throw Error(fmt::format("it sent nothing for {:g} s (--io-timeout)", opt_.io_timeout_s));
        if (n < 0)
            throw Error(errno_text(errno));
        const bool tls_hello = tls::looks_like_tls(first, static_cast<size_t>(n));
        std::string identity;
        if (opt_.tls) {
            if (!tls_hello) {
                // A plain minivmm sender reads RESULT after its HEADER: tell it why.
                ResultRecord r;
                r.text = "this receiver takes TLS only (it runs with --tls-creds): give migrate the same --tls-creds";
                try {
                    RecordWriter(*raw).write(RecordType::Result, r.encode());
                } catch (...) {
                }
                throw Error("a plain connection, but this receiver takes TLS only (--tls-creds)");
            }
            tls::Peer p = opt_.tls->accept(std::move(raw));
            t = std::move(p.transport);
            identity = std::move(p.identity);
        } else {
            if (tls_hello)
                throw Error("a TLS client, but this receiver was started without --tls-creds; give receive the "
                            "sender's --tls-creds");
            t = std::move(raw);
        }
        RecordReader rr(*t);
        Record rec = rr.read();
        if (rec.type != RecordType::Hello)
            throw Error(fmt::format("its first record is {}, not HELLO", record_name(rec.type)));
        const auto h = Hello::decode(rec.payload);
        if (!h)
            throw Error(fmt::format("a HELLO of {} bytes, not stream version {}'s 20: use the same minivmm on both ends",
                                    rec.payload.size(), kStreamVersion));
        if (h->version != kStreamVersion)
            throw Error(fmt::format("stream version {}, this minivmm reads version {}: use the same minivmm on both ends",
                                    h->version, kStreamVersion));
        if (h->channels == 0 || h->channels > 64 || h->channel >= h->channels)
            throw Error(fmt::format("its HELLO names channel {} of {} (at most 64 channels)", h->channel, h->channels));
        std::optional<Record> header = read_channel0(rr, *h);
        t->set_limits({});  // the receiver sets its own once admitted
        take(c, std::move(t), *h, std::move(header), identity);
    } catch (const Probe&) {
    } catch (const std::exception& e) {
        drop(c.peer, e.what());
    }
    c.done = true;
}

void Admission::take(Conn& c, std::unique_ptr<Transport> t, const Hello& h, std::optional<Record> header,
                     const std::string& identity)
{
    std::lock_guard lk(mu_);
    if (admitted_)
        return;  // dropped with the rest by stop_all()
    Session& s = sessions_[h.session];
    if (s.channels == 0) {
        s.channels = h.channels;
        s.chans.resize(h.channels);
        s.first = clock::now();
    }
    std::string why;
    if (h.channels != s.channels)
        why = fmt::format("its HELLO says {} channels, the session's first {}", h.channels, s.channels);
    else if (s.chans[h.channel])
        why = fmt::format("channel {} of its session connected twice", h.channel);
    else if (!s.identity.empty() && s.identity != identity)
        why = fmt::format("TLS identity '{}' joins a session of '{}'", identity, s.identity);
    if (!why.empty()) {
        drop_locked(c.peer, why);
        return;
    }
    s.chans[h.channel] = std::move(t);
    s.have++;
    s.identity = identity;
    if (s.peer.empty() || h.channel == 0)
        s.peer = c.peer;
    if (h.channel == 0)
        s.header = std::move(header);
    c.handed_over = true;
    if (s.have == s.channels) {
        admitted_ = h.session;
        const char b = 1;
        [[maybe_unused]] ssize_t n = ::write(wake_[1], &b, 1);
    }
}

// A session whose channels did not all arrive within --io-timeout of its first.
void Admission::expire_sessions()
{
    std::vector<Session> gone;
    {
        std::lock_guard lk(mu_);
        const auto limit = std::chrono::duration<double>(opt_.io_timeout_s);
        for (auto it = sessions_.begin(); it != sessions_.end();) {
            if (!admitted_ || *admitted_ != it->first) {
                if (clock::now() - it->second.first > limit) {
                    gone.push_back(std::move(it->second));
                    it = sessions_.erase(it);
                    continue;
                }
            }
            ++it;
        }
    }
    for (const auto& s : gone)
        drop(s.peer.empty() ? "a sender" : s.peer,
             fmt::format("{} of its {} channels connected within --io-timeout {:g} s", s.have, s.channels,
                         opt_.io_timeout_s));
}

// Every connection not handed to the admitted session: shut down, joined.
void Admission::stop_all()
{
    {
        std::lock_guard lk(mu_);
        stopping_ = true;
        for (auto& c : conns_)
            if (!c->handed_over && !c->done) {
                ::shutdown(c->fd, SHUT_RDWR);
                if (admitted_ && !opt_.quiet)
                    fmt::print(stderr, "receive: dropped the connection from {}: a sender was admitted\n", c->peer);
            }
    }
    conns_.clear();  // joins the workers, closes the main thread's copies
}

// Takes one connection from `ls` and starts its admission worker, or drops it.
void Admission::accept_one(int ls)
{
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    const int fd = ::accept4(ls, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)
            return;
        throw SysError("accept", errno);
    }
    const std::string peer = address_of(addr);
    if (conns_.size() >= opt_.max_pending) {
        ::close(fd);
        drop(peer, fmt::format("{} connections are being admitted already", conns_.size()));
        return;
    }
    const int mine = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (mine < 0) {
        ::close(fd);
        drop(peer, fmt::format("dup: {}", errno_text(errno)));
        return;
    }
    auto c = std::make_unique<Conn>();
    c->fd = fd;
    c->peer = peer;
    Conn& ref = *c;
    c->worker = std::thread([this, &ref, mine] { work(ref, mine); });
    conns_.push_back(std::move(c));
}

Admitted Admission::run(int ls)
{
    if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0)
        throw SysError("pipe2", errno);

    const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(
                                             std::chrono::duration<double>(opt_.timeout_s));
    for (;;) {
        {
            std::lock_guard lk(mu_);
            if (admitted_)
                break;
        }
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
        if (left <= 0)
            break;
        pollfd p[2] = {{ls, POLLIN, 0}, {wake_[0], POLLIN, 0}};
        int rc = ::poll(p, 2, static_cast<int>(std::min<int64_t>(left, 50)));
        if (rc < 0 && errno != EINTR)
            throw SysError("poll on the listening socket", errno);
        if (rc > 0 && !(p[0].revents & POLLIN))
            rc = 0;  // only the wake-up
        // Reap finished workers, expire incomplete sessions.
        for (auto it = conns_.begin(); it != conns_.end();)
            if ((*it)->done)
                it = conns_.erase(it);
            else
                ++it;
        expire_sessions();
        if (rc > 0)
            accept_one(ls);
    }
    stop_all();
    std::lock_guard lk(mu_);
    if (!admitted_) {
        std::string why = fmt::format("receive: no sender was admitted on {} within --timeout {:g} s", opt_.listen,
                                      opt_.timeout_s);
        if (dropped_ && opt_.quiet)
            why += fmt::format(" ({} connection{} dropped, the last from {})", dropped_, dropped_ == 1 ? "" : "s",
                               last_drop_);
        else if (dropped_)  // each drop said why on its own line already
            why += fmt::format(" ({} connection{} dropped, said above)", dropped_, dropped_ == 1 ? "" : "s");
        throw Error(why, kExitNoSender);
    }
    Session& s = sessions_.at(*admitted_);
    Admitted a;
    a.channels = std::move(s.chans);
    a.header = std::move(*s.header);
    a.peer = s.peer;
    a.identity = s.identity;
    a.session = *admitted_;
    sessions_.erase(*admitted_);
    for (auto& [id, other] : sessions_)
        if (!opt_.quiet)
            fmt::print(stderr, "receive: dropped the connection{} from {}: a sender was admitted\n",
                       other.have == 1 ? "" : fmt::format("s ({})", other.have), other.peer);
    sessions_.clear();
    a.dropped = dropped_;
    return a;
}

}  // namespace

Admitted admit(int listen_fd, const AdmitOptions& opt)
{
    return Admission(opt).run(listen_fd);
}

// ---- receive(): the listener (or the socket, or the file) to the Receiver -----------------

namespace {

// A recovering sender's connections on `where` (postcopy recovery): only the
// paused migration's (its session in HELLO and RESUME), bounded as a first
// admission is; `taken` once a connection is in hand.
std::vector<std::unique_ptr<Transport>> take_recovering(const RecoverAt& at, uint64_t session, uint32_t channels,
                                                        const AdmitOptions& first, const ReceiveOptions& opt,
                                                        const std::function<void()>& taken)
{
    const std::string& where = at.uri;
    IoLimits l;
    l.idle_s = opt.io_timeout_s;
    std::vector<std::unique_ptr<Transport>> out;
    if (const int fd = parse_fd_uri("migrate-recover", where); fd >= 0) {
        if (channels != 1)
            throw Error(fmt::format("{} carries one channel, the paused migration has {}", where, channels));
        auto raw = std::make_unique<FdTransport>(fd, where);
        raw->set_limits(l);
        if (opt.pause_switch)
            opt.pause_switch->attach(raw.get());  // migrate-pause ends the wait below
        taken();
        std::unique_ptr<Transport> t;
        try {
            if (first.tls)
                t = first.tls->accept(std::move(raw)).transport;
            else
                t = std::move(raw);
            RecordReader rr(*t);
            Record hello = rr.read();
            const auto h = hello.type == RecordType::Hello ? Hello::decode(hello.payload) : std::nullopt;
            if (!h || h->session != session || h->channel != 0)
                throw Error(fmt::format("{}: not the paused migration's sender ({} first)", where,
                                        record_name(hello.type)));
            Record r = rr.read();
            if (r.type != RecordType::Resume || resume_session_of(r) != session)
                throw Error(fmt::format("{}: {} where the paused migration's RESUME belongs", where,
                                        record_name(r.type)));
        } catch (...) {
            if (opt.pause_switch)
                opt.pause_switch->detach_all();
            throw;
        }
        if (opt.pause_switch)
            opt.pause_switch->detach_all();
        out.push_back(std::move(t));
        return out;
    }
    const int ls = at.listen_fd >= 0 ? at.listen_fd : bind_listener(where);
    FdTransport guard(ls, "listener");
    if (::listen(ls, 64) != 0)
        throw SysError("listen", errno);
    fmt::print(stderr, "receive: waiting on {} for the paused migration's sender\n", where);
    AdmitOptions ao = first;
    ao.listen = where;
    ao.resume_session = session;
    if (opt.recover_timeout_s > 0)
        ao.timeout_s = opt.recover_timeout_s;
    Admitted a = admit(ls, ao);
    taken();
    if (a.channels.size() != channels)
        throw Error(fmt::format("the recovering sender has {} channels, the paused migration {}", a.channels.size(),
                                channels));
    for (auto& c : a.channels)
        c->set_limits(l);
    return std::move(a.channels);
}

}  // namespace

ReceiveReport receive(StressVm& dst, const ReceiveOptions& opt, const PhaseHook& on_phase)
{
    if (auto f = parse_file_uri("--listen", opt.listen))
        return restore_file(dst, *f, opt, on_phase);
    AdmitOptions ao;
    ao.listen = opt.listen;
    ao.timeout_s = opt.accept_timeout_s;
    ao.io_timeout_s = opt.io_timeout_s;
    if (opt.tls.enabled())
        ao.tls = tls::Context::server(opt.tls);  // files checked before the listener opens
    PageHashes before;
    Admitted a;
    if (const int fd = parse_fd_uri("--listen", opt.listen); fd >= 0) {
        // A connected socket (inherited, or QMP's getfd): the sender is the peer.
        before = PageHashes::of_memory(dst);
        fmt::print(stderr, "receive: reading the connected socket {}\n", opt.listen);
        auto raw = std::make_unique<FdTransport>(fd, opt.listen);
        if (ao.tls) {
            tls::Peer p = ao.tls->accept(std::move(raw));
            a.identity = std::move(p.identity);
            a.channels.push_back(std::move(p.transport));
        } else {
            a.channels.push_back(std::move(raw));
        }
        a.peer = opt.listen;
    } else {
        int ls = bind_listener(opt.listen);
        FdTransport guard(ls, "listener");  // closed once a sender is admitted: later ones are refused
        if (::listen(ls, 64) != 0)
            throw SysError("listen", errno);
        // Hashed while nobody waits: a sender's setup does not include it.
        before = PageHashes::of_memory(dst);
        fmt::print(stderr, "receive: listening on {}{}\n", opt.listen,
                   ao.tls ? fmt::format(" (TLS: {})", ao.tls->describe()) : "");
        a = admit(ls, ao);
    }
    // The admitted sender: every wait on it bounded by --io-timeout.
    IoLimits l;
    l.idle_s = opt.io_timeout_s;
    for (auto& c : a.channels)
        c->set_limits(l);
    std::optional<Record> header;  // read by admission; a connected socket's is read by the Receiver
    if (a.header.type == RecordType::Header)
        header = std::move(a.header);
    Recovery rec;
    rec.session = a.session;
    rec.pause = opt.pause_switch;
    if (opt.recover_listen)
        rec.reconnect = [&](uint64_t session, uint32_t channels, const std::function<void()>& taken) {
            const RecoverAt at = opt.recover_listen("postcopy paused");
            if (at.uri.empty())
                return std::vector<std::unique_ptr<Transport>>{};
            return take_recovering(at, session, channels, ao, opt, taken);
        };
    ReceiveReport r = receive_from(dst, std::move(a.channels), opt.post_run_s, on_phase, std::move(before),
                                   std::move(header), opt.on_postcopy, opt.wait_cont, false, &rec);
    r.peer = a.peer;
    r.peer_identity = a.identity;
    r.security = ao.tls ? (ao.tls->kind() == tls::Kind::X509 ? "tls-x509" : "tls-psk") : "none";
    r.dropped_connections = a.dropped;
    return r;
}

}  // namespace mvm::migration
