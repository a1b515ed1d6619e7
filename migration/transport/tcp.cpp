#include "migration/transport/tcp.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <tuple>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm::migration {

std::pair<std::string, uint16_t> parse_tcp(const std::string& option, const std::string& spec, bool port0_ok)
{
    if (spec.rfind("tcp:", 0) != 0)
        throw UsageError(fmt::format("{}: '{}' is not tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444)", option, spec));
    std::string rest = spec.substr(4);
    auto colon = rest.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == rest.size())
        throw UsageError(fmt::format("{}: '{}' is not tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444)", option, spec));
    std::string host = rest.substr(0, colon), port = rest.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    uint64_t p = 0;
    for (char c : port) {
        if (c < '0' || c > '9' || p > 65535)
            throw UsageError(fmt::format("{}: port '{}' is not a number in 1..65535", option, port));
        p = p * 10 + static_cast<uint64_t>(c - '0');
    }
    if ((p == 0 && !port0_ok) || p > 65535)
        throw UsageError(fmt::format("{}: port '{}' is not a number in 1..65535", option, port));
    return {host, static_cast<uint16_t>(p)};
}

std::string Endpoint::str() const
{
    if (is_fd())
        return fmt::format("fd:{}", fd);
    return is_unix() ? "unix:" + path : fmt::format("tcp:{}:{}", host, port);
}

void check_tls_over(const std::string& option, const std::string& creds, const std::string& hostname,
                    const Endpoint& ep)
{
    if (creds.empty() || (!ep.is_unix() && !ep.is_fd()) || creds.rfind("psk:", 0) == 0 || !hostname.empty())
        return;
    throw UsageError(fmt::format("{}: x509 over {} has no host name to check the receiver's certificate against; give "
                                 "--tls-hostname (QMP: tls-hostname), or use psk",
                                 option, ep.is_fd() ? "a connected socket (fd:)" : "a unix socket"));
}

int parse_fd_uri(const std::string& option, const std::string& spec)
{
    if (spec.rfind("fd:", 0) != 0)
        return -1;
    const std::string n = spec.substr(3);
    int fd = -1;
    const auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), fd);
    if (n.empty() || ec != std::errc() || end != n.data() + n.size() || fd < 0)
        throw UsageError(fmt::format("{}: '{}' is not fd:N with N a file descriptor number (QMP: getfd names one)",
                                     option, spec));
    struct stat st {};
    int type = 0;
    socklen_t len = sizeof(type);
    if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode) ||
        ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
        throw UsageError(fmt::format("{}: '{}': file descriptor {} is not an open stream socket; pass a connected "
                                     "socket",
                                     option, spec, fd));
    return fd;
}

Endpoint parse_endpoint(const std::string& option, const std::string& spec, bool port0_ok)
{
    Endpoint ep;
    if ((ep.fd = parse_fd_uri(option, spec)) >= 0)
        return ep;
    if (spec.rfind("unix:", 0) == 0) {
        ep.path = spec.substr(5);
        if (ep.path.empty() || ep.path.size() >= sizeof(sockaddr_un::sun_path))
            throw UsageError(fmt::format("{}: '{}' is not unix:PATH with a path of 1..{} bytes", option, spec,
                                         sizeof(sockaddr_un::sun_path) - 1));
        return ep;
    }
    if (spec.rfind("tcp:", 0) != 0)
        throw UsageError(fmt::format("{}: '{}' is not tcp:HOST:PORT, unix:PATH, fd:N or file:PATH (e.g. tcp:127.0.0.1:4444)", option,
                                     spec));
    std::tie(ep.host, ep.port) = parse_tcp(option, spec, port0_ok);
    return ep;
}

namespace {

// connect() on `fd`, given up at `deadline`; 0 or the errno.
int connect_by(int fd, const sockaddr* addr, socklen_t len, IoLimits::time_point deadline)
{
    const int flags = ::fcntl(fd, F_GETFL);
    ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int err = 0;
    if (::connect(fd, addr, len) != 0) {
        err = errno;
        while (err == EINPROGRESS || err == EINTR) {
            int ms = -1;
            if (deadline != IoLimits::time_point::max()) {
                const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now());
                if (left.count() <= 0) {
                    err = ETIMEDOUT;
                    break;
                }
                ms = static_cast<int>(std::min<int64_t>(left.count(), INT32_MAX));
            }
            pollfd p{fd, POLLOUT, 0};
            const int rc = ::poll(&p, 1, ms);
            if (rc < 0) {
                err = errno;
                continue;
            }
            if (rc == 0)
                continue;  // the deadline, checked above
            socklen_t el = sizeof(err);
            ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
            break;
        }
    }
    ::fcntl(fd, F_SETFL, flags);
    return err;
}

}  // namespace

int connect_tcp(const std::string& host, uint16_t port, IoLimits::time_point deadline)
{
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res); rc != 0)
        throw Error(fmt::format("--to tcp:{}:{}: cannot resolve {}: {}", host, port, host, gai_strerror(rc)));
    int fd = -1, err = 0;
    for (addrinfo* a = res; a; a = a->ai_next) {
        fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        err = connect_by(fd, a->ai_addr, a->ai_addrlen, deadline);
        if (err == 0)
            break;
        ::close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        throw Error(fmt::format("--to tcp:{}:{}: cannot connect: {}; is 'minivmm receive --listen tcp:...:{}' running "
                                "there?",
                                host, port, errno_text(err), port));
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

namespace {

sockaddr_un unix_address(const std::string& path)
{
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
    return a;
}

}  // namespace

int connect_endpoint(const Endpoint& ep, IoLimits::time_point deadline)
{
    if (ep.is_fd())
        return ep.fd;
    if (!ep.is_unix())
        return connect_tcp(ep.host, ep.port, deadline);
    const sockaddr_un a = unix_address(ep.path);
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        throw SysError("socket", errno);
    if (int err = connect_by(fd, reinterpret_cast<const sockaddr*>(&a), sizeof(a), deadline); err != 0) {
        ::close(fd);
        throw Error(fmt::format("--to unix:{}: cannot connect: {}; is 'minivmm receive --listen unix:{}' running?",
                                ep.path, errno_text(err), ep.path));
    }
    return fd;
}

int bind_unix(const std::string& option, const std::string& path, bool owner_only)
{
    const sockaddr_un a = unix_address(path);
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            throw UsageError(fmt::format("{} unix:{}: the path exists and is not a socket; pick another path", option,
                                         path));
        // A socket file: in use if something answers there, else left by a process that ended.
        int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        const bool live = probe >= 0 && ::connect(probe, reinterpret_cast<const sockaddr*>(&a), sizeof(a)) == 0;
        if (probe >= 0)
            ::close(probe);
        if (live)
            throw UsageError(fmt::format("{} unix:{}: another process is serving this socket; pick another path",
                                         option, path));
        ::unlink(path.c_str());
    }
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        throw SysError("socket", errno);
    // Owner-only from the start: the socket file gets the umask's bits at bind.
    const mode_t old = owner_only ? ::umask(0077) : 0;
    const int rc = ::bind(fd, reinterpret_cast<const sockaddr*>(&a), sizeof(a));
    const int err = errno;
    if (owner_only)
        ::umask(old);
    if (rc != 0) {
        ::close(fd);
        throw UsageError(fmt::format("{} unix:{}: cannot bind: {}; use a path in a writable directory", option, path,
                                     errno_text(err)));
    }
    if (owner_only)
        ::chmod(path.c_str(), 0600);
    return fd;
}

int bind_tcp(const std::string& option, const std::string& host, uint16_t port, uint16_t* bound_port)
{
    sockaddr_storage ss{};
    socklen_t sl;
    if (host.find(':') != std::string::npos) {
        auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host.c_str(), &a->sin6_addr) != 1)
            throw UsageError(fmt::format("{}: '{}' is not an IPv6 address; use e.g. tcp:[::1]:{}", option, host, port));
        sl = sizeof(*a);
    } else {
        auto* a = reinterpret_cast<sockaddr_in*>(&ss);
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (host == "0.0.0.0" || host == "*")
            a->sin_addr.s_addr = INADDR_ANY;
        else if (inet_pton(AF_INET, host.c_str(), &a->sin_addr) != 1)
            throw UsageError(fmt::format("{}: '{}' is not an IPv4 address; use e.g. tcp:127.0.0.1:{} (tcp:0.0.0.0:{} "
                                         "for every interface)",
                                         option, host, port, port));
        sl = sizeof(*a);
    }
    int fd = ::socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        throw SysError("socket", errno);
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), sl) != 0) {
        const int err = errno;
        ::close(fd);
        throw UsageError(fmt::format("{} tcp:{}:{}: cannot bind: {}; {}", option, host, port, errno_text(err),
                                     err == EADDRINUSE ? "pick a free port" : "use an address of this host"));
    }
    if (bound_port) {
        socklen_t len = sizeof(ss);
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
        *bound_port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                                     : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    }
    return fd;
}

int bind_listener(const std::string& spec)
{
    const Endpoint ep = parse_endpoint("--listen", spec);
    if (ep.is_fd())
        throw UsageError(fmt::format("--listen {}: a connected socket is not listened on (receive takes it as the "
                                     "sender's connection)",
                                     spec));
    return ep.is_unix() ? bind_unix("--listen", ep.path) : bind_tcp("--listen", ep.host, ep.port);
}

std::unique_ptr<FdTransport> accept_within(int fd, double timeout_s, std::string peer)
{
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(timeout_s * 1000));
    if (rc == 0)
        return nullptr;
    if (rc < 0)
        throw SysError("poll on the listening socket", errno);
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    int conn = ::accept4(fd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC);
    if (conn < 0)
        throw SysError("accept", errno);
    return std::make_unique<FdTransport>(conn, std::move(peer));
}

}  // namespace mvm::migration
