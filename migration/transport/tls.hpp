// migration/transport/tls.hpp - TLS on the migration's connections, as QEMU
// secures its migration: x509 credentials in QEMU's directory layout
// (tls-creds-x509: ca-cert.pem, server-cert.pem, server-key.pem,
// client-cert.pem, client-key.pem) or pre-shared keys in QEMU's keys.psk
// format (tls-creds-psk: "username:hexkey" lines), the receiver verifying
// the sender (its client certificate, or its PSK identity) and admitting
// only the identities --tls-authz names (QEMU's tls-authz), the sender
// checking the receiver's certificate against --tls-hostname or the host of
// --to. TLS 1.3 on OpenSSL (measured: AES-128-GCM as fast as GnuTLS's on
// this host, docs/tls.md), every channel its own session.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "migration/stream.hpp"

namespace mvm::migration::tls {

enum class Kind { X509, Psk };

// What --tls-creds, --tls-hostname and --tls-authz say.
struct Options {
    std::string creds;                // x509:DIR or psk:FILE ("" = plain TCP)
    std::string hostname;             // sender: the name the receiver's certificate must carry
    std::vector<std::string> authz;   // receiver: identities allowed to send (globs); empty = any verified peer
    std::string psk_user;             // sender with psk: the identity to use (default: the file's first)
    // x509 (QEMU's verify-peer): false on the receiver admits senders without
    // a certificate (anonymous clients); false on the sender takes any
    // receiver's certificate unchecked. A sender whose directory has no
    // client-cert.pem and client-key.pem is anonymous.
    bool verify_peer = true;
    bool enabled() const { return !creds.empty(); }
};

class Context;

// A connection after its handshake: the peer's identity (the client
// certificate's subject DN as RFC 4514 prints it, or the PSK username).
struct Peer {
    std::unique_ptr<Transport> transport;
    std::string identity;
};

// One side's credentials, loaded and checked once (the files named in one
// line when missing or unreadable: UsageError naming the option). Shared by
// every channel of a migration, from several threads.
class Context {
public:
    // The sender's: verifies the receiver's certificate for `host` (the host
    // of --to, or opts.hostname when given).
    static std::shared_ptr<Context> client(const Options& opts, const std::string& host);
    // The receiver's: verifies every sender and applies opts.authz.
    static std::shared_ptr<Context> server(const Options& opts);
    ~Context();

    Kind kind() const { return kind_; }
    std::string describe() const;  // e.g. "x509 (/etc/minivmm/tls)", "psk (keys.psk)"

    // The handshake over `raw` (its limits bound it), then the receiver's
    // verdict: accept() sends the sender a RESULT (authenticated, or why it is
    // not authorised), connect() waits for it before the stream starts.
    // Throws Error with one line saying what failed (unknown CA, expired,
    // wrong host, wrong key, a plain peer, not authorised), naming the peer.
    Peer connect(std::unique_ptr<FdTransport> raw) const;
    Peer accept(std::unique_ptr<FdTransport> raw) const;

    struct Impl;

private:
    friend std::shared_ptr<Context> make_context(const Options& opts, bool server, const std::string& host);
    explicit Context(Kind k);
    Kind kind_;
    std::unique_ptr<Impl> impl_;
};

// True when `first` (a connection's first bytes, at least 3) begin a TLS
// handshake record: how a plain receiver recognises a TLS sender.
bool looks_like_tls(const uint8_t* first, size_t n);

}  // namespace mvm::migration::tls
