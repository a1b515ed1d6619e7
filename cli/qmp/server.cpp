#include "cli/qmp/server.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstring>
#include <utility>
#include <fmt/format.h>

#include "base/error.hpp"
#include "migration/transport/tcp.hpp"

namespace mvm::qmp {

namespace {

const json& empty_object()
{
    static const json e = json::object();
    return e;
}

bool is_loopback(const std::string& host)
{
    if (host == "localhost" || host == "::1")
        return true;
    in_addr a{};
    return inet_pton(AF_INET, host.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

json timestamp()
{
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(now).count();
    return {{"seconds", us / 1000000}, {"microseconds", us % 1000000}};
}

}  // namespace

// ---- arguments --------------------------------------------------------------------------

Args::Args(const json& args, std::span<const char* const> known) : a_(args.is_object() ? args : empty_object())
{
    if (!args.is_null() && !args.is_object())
        throw QmpError("QMP input member 'arguments' must be an object");
    for (const auto& [k, v] : a_.items()) {
        bool ok = false;
        for (const char* n : known)
            ok = ok || k == n;
        if (!ok)
            throw QmpError(fmt::format("Parameter '{}' is unexpected", k));
    }
}

const json& Args::need(const char* name) const
{
    if (!a_.contains(name))
        throw QmpError(fmt::format("Parameter '{}' is missing", name));
    return a_.at(name);
}

std::string Args::str(const char* name) const
{
    const json& v = need(name);
    if (!v.is_string())
        throw QmpError(fmt::format("Invalid parameter type for '{}', expected: string", name));
    return v.get<std::string>();
}

std::string Args::str_or(const char* name, const std::string& dflt) const { return has(name) ? str(name) : dflt; }

int64_t Args::integer(const char* name) const
{
    const json& v = need(name);
    if (!v.is_number_integer())
        throw QmpError(fmt::format("Invalid parameter type for '{}', expected: integer", name));
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        throw QmpError(fmt::format("Parameter '{}' expects an integer up to {}", name, INT64_MAX));
    return v.get<int64_t>();
}

int64_t Args::int_or(const char* name, int64_t dflt) const { return has(name) ? integer(name) : dflt; }

bool Args::boolean_or(const char* name, bool dflt) const
{
    if (!has(name))
        return dflt;
    const json& v = a_.at(name);
    if (!v.is_boolean())
        throw QmpError(fmt::format("Invalid parameter type for '{}', expected: boolean", name));
    return v.get<bool>();
}

const json& Args::array(const char* name) const
{
    const json& v = need(name);
    if (!v.is_array())
        throw QmpError(fmt::format("Invalid parameter type for '{}', expected: array", name));
    return v;
}

// ---- addresses --------------------------------------------------------------------------

Address parse_address(const std::string& option, const std::string& spec, bool allow_remote)
{
    Address a;
    a.spec = spec;
    if (spec.rfind("unix:", 0) == 0) {
        a.kind = Address::Unix;
        a.path = spec.substr(5);
        if (a.path.empty())
            throw UsageError(fmt::format("{}: unix: needs a path, e.g. unix:/tmp/minivmm.qmp", option));
        if (a.path.size() >= sizeof(sockaddr_un::sun_path))
            throw UsageError(fmt::format("{} {}: the path is longer than a unix socket allows ({} bytes); use a "
                                         "shorter one",
                                         option, spec, sizeof(sockaddr_un::sun_path) - 1));
        return a;
    }
    if (spec.rfind("tcp:", 0) != 0)
        throw UsageError(fmt::format("{}: '{}' is neither unix:PATH nor tcp:HOST:PORT", option, spec));
    const std::string rest = spec.substr(4);
    const size_t colon = rest.rfind(':');
    if (colon == std::string::npos || colon == 0)
        throw UsageError(fmt::format("{}: '{}' lacks HOST:PORT, e.g. tcp:127.0.0.1:4445", option, spec));
    a.kind = Address::Tcp;
    a.host = rest.substr(0, colon);
    if (a.host.size() > 2 && a.host.front() == '[' && a.host.back() == ']')
        a.host = a.host.substr(1, a.host.size() - 2);
    const std::string port = rest.substr(colon + 1);
    char* end = nullptr;
    const unsigned long p = std::strtoul(port.c_str(), &end, 10);
    if (port.empty() || *end || p > 65535)
        throw UsageError(fmt::format("{}: '{}' is not a port (0-65535)", option, port));
    a.port = static_cast<uint16_t>(p);
    if (!allow_remote && !is_loopback(a.host))
        throw UsageError(fmt::format("{} {}: a QMP socket controls the guest, so it binds a loopback address only "
                                     "(127.0.0.1, ::1, localhost); add --qmp-allow-remote to bind {} anyway",
                                     option, spec, a.host));
    return a;
}

// ---- the stream of JSON texts -------------------------------------------------------

std::vector<std::string> split_json_stream(std::string& buf)
{
    std::vector<std::string> out;
    auto space = [](char ch) { return ch == ' ' || ch == '\n' || ch == '\r' || ch == '\t'; };
    auto opens = [](char ch) { return ch == '{' || ch == '[' || ch == '"'; };
    size_t consumed = 0, start = std::string::npos;
    int depth = 0;
    bool in_str = false, esc = false;
    auto emit = [&](size_t end) {
        out.push_back(buf.substr(start, end + 1 - start));
        start = std::string::npos;
        consumed = end + 1;
        depth = 0;
    };
    for (size_t i = 0; i < buf.size(); i++) {
        const char ch = buf[i];
        if (start == std::string::npos) {
            if (space(ch)) {
                consumed = i + 1;
                continue;
            }
            start = i;
        }
        if (in_str) {
            if (esc)
                esc = false;
            else if (ch == '\\')
                esc = true;
            else if (ch == '"') {
                in_str = false;
                if (depth == 0)
                    emit(i);
            }
        } else if (ch == '"') {
            in_str = true;
        } else if (ch == '{' || ch == '[') {
            depth++;
        } else if (ch == '}' || ch == ']') {
            if (--depth <= 0)
                emit(i);  // a complete value, or a stray closing bracket (the parser says what is wrong)
        } else if (depth == 0 && i + 1 < buf.size() && (space(buf[i + 1]) || opens(buf[i + 1]))) {
            emit(i);  // a bare word or number at top level
        }
    }
    buf.erase(0, consumed);
    return out;
}

std::string parse_error_desc(const std::string& text)
{
    const bool word = !text.empty() && std::all_of(text.begin(), text.end(), [](char ch) {
        return std::isalpha(static_cast<unsigned char>(ch)) != 0;
    });
    return word ? fmt::format("JSON parse error, invalid keyword '{}'", text) : "JSON parse error, invalid JSON text";
}

// ---- the server ---------------------------------------------------------------------

Server::Server(const std::string& option, const Address& addr, json version) : addr_(addr), version_(std::move(version))
{
    if (addr.kind == Address::Unix) {
        listen_fd_ = migration::bind_unix(option, addr.path, true);
        bound_ = "unix:" + addr.path;
    } else {
        uint16_t port = 0;
        listen_fd_ = migration::bind_tcp(option, addr.host == "localhost" ? "127.0.0.1" : addr.host, addr.port, &port);
        bound_ = fmt::format("tcp:{}:{}", addr.host, port);
    }
    if (::listen(listen_fd_, 8) != 0) {
        const int err = errno;
        ::close(listen_fd_);
        throw SysError("listen", err);
    }
    if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) {
        const int err = errno;
        ::close(listen_fd_);
        throw SysError("pipe2", err);
    }
}

Server::~Server()
{
    stop();
    for (int& fd : wake_)
        if (fd >= 0)
            ::close(fd);
}

void Server::add(const std::string& name, Handler h) { handlers_[name] = std::move(h); }

std::vector<std::string> Server::commands() const
{
    std::vector<std::string> v{"qmp_capabilities"};
    for (const auto& [name, h] : handlers_)
        v.push_back(name);
    return v;
}

void Server::start() { thread_ = std::thread([this] { loop(); }); }

void Server::stop()
{
    if (stopping_.exchange(true))
        return;
    if (wake_[1] >= 0) {
        const char b = 1;
        [[maybe_unused]] auto n = ::write(wake_[1], &b, 1);
    }
    if (thread_.joinable())
        thread_.join();
    std::lock_guard lk(mu_);
    for (auto& c : clients_) {
        flush(*c);  // what is still owed (quit's SHUTDOWN), as far as the socket takes it
        ::close(c->fd);
    }
    clients_.clear();
    if (listen_fd_ >= 0) {
        ::close(listen_fd_);
        listen_fd_ = -1;
        if (addr_.kind == Address::Unix)
            ::unlink(addr_.path.c_str());
    }
}

void Server::emit(const std::string& event, const json& data)
{
    json msg = {{"event", event}};
    if (!data.is_null())
        msg["data"] = data;
    msg["timestamp"] = timestamp();
    std::lock_guard lk(mu_);
    for (auto& c : clients_)
        if (c->negotiated)
            send(*c, msg);
}

// Under mu_ (or from the loop before the client is shared). Never blocks:
// the message joins the client's output and as much as the socket takes
// goes now; the loop sends the rest when the socket is writable. A client
// that lets 16 MiB pile up (it does not read) is dropped by the loop.
void Server::send(Client& c, const json& msg)
{
    const bool was_empty = c.out.empty();
    c.out += msg.dump();
    c.out += "\r\n";
    flush(c);
    if (was_empty && !c.out.empty() && wake_[1] >= 0) {
        const char b = 1;  // the loop polls for POLLOUT from now on
        [[maybe_unused]] auto n = ::write(wake_[1], &b, 1);
    }
}

// Under mu_: what the socket takes without blocking.
void Server::flush(Client& c)
{
    size_t off = 0;
    while (off < c.out.size() && !c.dead) {
        const ssize_t n = ::send(c.fd, c.out.data() + off, c.out.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0) {
            c.dead = true;  // gone: the loop drops it
            break;
        }
        off += static_cast<size_t>(n);
    }
    c.out.erase(0, off);
    if (c.out.size() > (16u << 20))
        c.dead = true;
}

void Server::loop()
{
    auto last_tick = std::chrono::steady_clock::now();
    while (!stopping_.load()) {
        std::vector<pollfd> pf{{listen_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
        std::vector<Client*> order;
        {
            std::lock_guard lk(mu_);
            for (auto& c : clients_) {
                pf.push_back({c->fd, static_cast<short>(POLLIN | (c->out.empty() ? 0 : POLLOUT)), 0});
                order.push_back(c.get());
            }
        }
        const int rc = ::poll(pf.data(), pf.size(), 100);
        if (stopping_.load())
            break;
        if (rc > 0) {
            if (pf[1].revents & POLLIN) {
                char b[64];
                while (::read(wake_[0], b, sizeof(b)) > 0) {
                }
            }
            if (pf[0].revents & POLLIN)
                accept_client();
            std::vector<Client*> gone;
            for (size_t i = 0; i < order.size(); i++) {
                Client& c = *order[i];
                const short ev = pf[i + 2].revents;
                if (ev & POLLOUT) {
                    std::lock_guard lk(mu_);
                    flush(c);
                }
                if ((ev & (POLLIN | POLLHUP | POLLERR)) && !read_client(c)) {
                    std::lock_guard lk(mu_);
                    c.dead = true;
                }
            }
            std::lock_guard lk(mu_);
            for (auto& c : clients_)
                if (c->dead)
                    gone.push_back(c.get());
            for (Client* g : gone) {
                ::close(g->fd);
                std::erase_if(clients_, [g](const auto& c) { return c.get() == g; });
            }
        }
        const auto now = std::chrono::steady_clock::now();
        if (tick_ && now - last_tick >= std::chrono::milliseconds(100)) {
            last_tick = now;
            tick_();
        }
    }
}

void Server::accept_client()
{
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    auto c = std::make_unique<Client>();
    c->fd = fd;
    // The greeting (docs/interop/qmp-spec "Server Greeting"): out-of-band execution may be enabled.
    send(*c, {{"QMP", {{"version", version_}, {"capabilities", json::array({"oob"})}}}});
    std::lock_guard lk(mu_);
    clients_.push_back(std::move(c));
}

Server::Client::~Client()
{
    for (int f : fds)
        ::close(f);
}

int Server::take_fd()
{
    if (!current_ || current_->fds.empty())
        return -1;
    const int f = current_->fds.front();
    current_->fds.pop_front();
    return f;
}

// What the client sent, and the file descriptors it passed with it
// (SCM_RIGHTS, as QEMU's getfd and add-fd take them); at most 16 per read.
bool Server::read_client(Client& c)
{
    char buf[4096];
    alignas(cmsghdr) char ctrl[CMSG_SPACE(16 * sizeof(int))];
    iovec iov{buf, sizeof(buf)};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl;
    msg.msg_controllen = sizeof(ctrl);
    const ssize_t n = ::recvmsg(c.fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n > 0)
        for (cmsghdr* h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h))
            if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
                const size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < k; i++) {
                    int f;
                    std::memcpy(&f, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
                    c.fds.push_back(f);
                }
            }
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
        return false;
    if (n < 0)
        return true;
    c.in.append(buf, static_cast<size_t>(n));
    for (const std::string& text : split_json_stream(c.in))
        handle(c, text);
    if (c.in.size() > (1u << 20)) {
        std::lock_guard lk(mu_);
        send(c, {{"error", {{"class", "GenericError"}, {"desc", "JSON parse error, input exceeds 1 MiB"}}}});
        return false;
    }
    return true;
}

void Server::handle(Client& c, const std::string& text)
{
    json req = json::parse(text, nullptr, false);
    json reply;
    if (req.is_discarded()) {
        reply = {{"error", {{"class", "GenericError"}, {"desc", parse_error_desc(text)}}}};
    } else {
        try {
            current_ = &c;
            json ret = dispatch(c, req);
            current_ = nullptr;
            reply = {{"return", ret.is_null() ? json::object() : ret}};
        } catch (const QmpError& e) {
            current_ = nullptr;
            reply = {{"error", {{"class", e.error_class()}, {"desc", e.what()}}}};
        } catch (const std::exception& e) {
            current_ = nullptr;
            reply = {{"error", {{"class", "GenericError"}, {"desc", e.what()}}}};
        }
        if (req.is_object() && req.contains("id"))
            reply["id"] = req["id"];
    }
    {
        std::lock_guard lk(mu_);
        send(c, reply);
    }
    for (const auto& [event, data] : std::exchange(after_reply_, {}))
        emit(event, data);
}

void Server::emit_after_reply(const std::string& event, const json& data) { after_reply_.emplace_back(event, data); }

json Server::dispatch(Client& c, const json& req)
{
    if (!req.is_object())
        throw QmpError("QMP input must be a JSON object");
    for (const auto& [k, v] : req.items())
        if (k != "execute" && k != "exec-oob" && k != "arguments" && k != "id")
            throw QmpError(fmt::format("QMP input member '{}' is unexpected", k));
    // exec-oob (qmp-spec "Out-of-band execution"): once negotiated, for the
    // commands QEMU allows it for. minivmm's commands never block the
    // monitor, so an out-of-band one runs at once like any other.
    const bool oob = req.contains("exec-oob");
    if (oob && req.contains("execute"))
        throw QmpError("QMP input must not contain both 'execute' and 'exec-oob'");
    const char* const key = oob ? "exec-oob" : "execute";
    if (!req.contains(key))
        throw QmpError("QMP input lacks member 'execute'");
    if (!req[key].is_string())
        throw QmpError(fmt::format("QMP input member '{}' must be a string", key));
    if (req.contains("arguments") && !req["arguments"].is_object())
        throw QmpError("QMP input member 'arguments' must be an object");
    const std::string name = req[key].get<std::string>();
    if (oob) {
        if (!c.oob)
            throw QmpError("QMP input member 'exec-oob' is unexpected (enable capability 'oob' with qmp_capabilities)");
        if (name != "migrate-recover" && name != "migrate-pause" && name != "x-oob-test")
            throw QmpError(fmt::format("The command {} does not support OOB", name));
    }
    const json& args = req.contains("arguments") ? req["arguments"] : empty_object();
    if (name == "qmp_capabilities") {
        if (c.negotiated)
            throw QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound");
        Args a(args, {"enable"});
        bool want_oob = false;
        if (a.has("enable"))
            for (const json& cap : a.array("enable")) {
                if (cap != "oob")
                    throw QmpError(fmt::format("Capability '{}' not available", cap.is_string() ? cap.get<std::string>()
                                                                                               : cap.dump()));
                want_oob = true;
            }
        std::lock_guard lk(mu_);
        c.negotiated = true;
        c.oob = want_oob;
        return json::object();
    }
    if (!c.negotiated)
        throw QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound");
    auto it = handlers_.find(name);
    if (it == handlers_.end())
        throw QmpError(fmt::format("The command {} has not been found", name), "CommandNotFound");
    return it->second(args);
}

}  // namespace mvm::qmp
