// migration/transport/tcp.hpp - the migration's TCP connections: the
// tcp:HOST:PORT syntax, the sender's connections, the receiver's listening
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
std::pair<std::string, uint16_t> parse_tcp(const std::string& option, const std::string& spec);

// A connected socket (TCP_NODELAY) to host:port; throws Error naming --to.
int connect_tcp(const std::string& host, uint16_t port);

// A TCP socket bound to --listen's tcp:ADDR:PORT (not yet listening); throws
// UsageError naming --listen for a bad address or one it cannot bind.
int bind_listener(const std::string& spec);

// The next connection on listening socket `fd`, or nullptr when none comes
// within timeout_s; throws SysError when polling or accepting fails.
std::unique_ptr<FdTransport> accept_within(int fd, double timeout_s, std::string peer);

}  // namespace mvm::migration
