// migration/transport/tcp.hpp - the migration's socket connections: the
// tcp:HOST:PORT and unix:PATH syntax, the sender's connections, the receiver's listening
// socket and its accepts. The byte pipe over a socket is FdTransport
// (migration/stream.hpp).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "migration/stream.hpp"

namespace mvm::migration {

// "tcp:HOST:PORT" -> host, port; throws UsageError naming `option`.
// port0_ok: port 0 passes (QMP's migrate takes it, and the migration then fails).
std::pair<std::string, uint16_t> parse_tcp(const std::string& option, const std::string& spec,
                                           bool port0_ok = false);

// A migration address: tcp:HOST:PORT, unix:PATH, or fd:N (a connected
// socket this process holds: inherited, or QMP's getfd; it carries one
// channel and is closed once used).
struct Endpoint {
    std::string host;  // tcp
    uint16_t port = 0;
    std::string path;  // unix
    int fd = -1;       // fd
    bool is_unix() const { return !path.empty(); }
    bool is_fd() const { return fd >= 0; }
    std::string str() const;  // as it was written
};

// tcp:HOST:PORT, unix:PATH or fd:N; throws UsageError naming `option`.
Endpoint parse_endpoint(const std::string& option, const std::string& spec, bool port0_ok = false);

// TLS to `ep`: over unix: or fd: there is no host to check an x509
// certificate against, so x509 needs `hostname` there (QEMU's tls-hostname);
// PSK needs none. Throws UsageError naming `option` when it cannot apply.
void check_tls_over(const std::string& option, const std::string& creds, const std::string& hostname,
                    const Endpoint& ep);

// fd:N: N when it is an open stream socket; -1 when `spec` is not fd:;
// UsageError naming `option` when N is not a number or not a stream socket.
int parse_fd_uri(const std::string& option, const std::string& spec);

// A connected stream socket to `ep` (fd:N: N itself, once), given up at
// `deadline`; throws Error naming --to.
int connect_endpoint(const Endpoint& ep, IoLimits::time_point deadline = IoLimits::time_point::max());

// A connected socket (TCP_NODELAY) to host:port, given up at `deadline`;
// throws Error naming --to.
int connect_tcp(const std::string& host, uint16_t port, IoLimits::time_point deadline = IoLimits::time_point::max());

// A TCP socket (SO_REUSEADDR, not yet listening) bound to host:port, an IPv4
// or IPv6 literal ("0.0.0.0" or "*" for every interface); throws UsageError
// naming `option` for a bad address or one it cannot bind. bound_port, when
// given, receives the port bound (port 0 picks a free one).
int bind_tcp(const std::string& option, const std::string& host, uint16_t port, uint16_t* bound_port = nullptr);

// A unix stream socket (not yet listening) bound to `path`. A socket file
// nobody serves is replaced; a live one, or a path that is not a socket, is
// a UsageError naming `option`. owner_only: the file is created 0600.
int bind_unix(const std::string& option, const std::string& path, bool owner_only = false);

// A bound (not yet listening) socket for --listen's tcp:ADDR:PORT or unix:PATH
// (a socket file nobody listens on is replaced, as QEMU does).
int bind_listener(const std::string& spec);

// The next connection on listening socket `fd`, or nullptr when none comes
// within timeout_s; throws SysError when polling or accepting fails.
std::unique_ptr<FdTransport> accept_within(int fd, double timeout_s, std::string peer);

}  // namespace mvm::migration
