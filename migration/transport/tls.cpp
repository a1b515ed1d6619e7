#include <poll.h>

#include <mutex>
#include "migration/transport/tls.hpp"
#include "migration/transport/tls_pipe.hpp"

#include <arpa/inet.h>
#include <fnmatch.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>
#include <fstream>
#include <map>
#include <mutex>

#include "base/error.hpp"

namespace mvm::migration::tls {

namespace {

bool exists(const std::string& path)
{
    struct stat st{};
    return ::stat(path.c_str(), &st) == 0;
}

bool is_ip(const std::string& host)
{
    in6_addr a6{};
    in_addr a4{};
    return inet_pton(AF_INET, host.c_str(), &a4) == 1 || inet_pton(AF_INET6, host.c_str(), &a6) == 1;
}

}  // namespace

struct Context::Impl {
    SSL_CTX* ctx = nullptr;
    std::string source;   // the directory or file, for messages
    std::string host;     // client: the name to verify
    std::vector<std::string> authz;
    // PSK: identity -> key (the client uses psk_identity).
    std::map<std::string, std::vector<uint8_t>> keys;
    std::string psk_identity;
    bool server = false;
    bool anonymous = false;   // an x509 client without a certificate
    bool verify_peer = true;  // QEMU's verify-peer
    ~Impl() { SSL_CTX_free(ctx); }
};

namespace {

int impl_index()
{
    static const int idx = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
    return idx;
}

const Context::Impl* impl_of(SSL* ssl)
{
    return static_cast<const Context::Impl*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), impl_index()));
}

unsigned psk_client_cb(SSL* ssl, const char*, char* identity, unsigned max_identity, unsigned char* psk,
                       unsigned max_psk)
{
    const auto* im = impl_of(ssl);
    const auto& key = im->keys.at(im->psk_identity);
    if (im->psk_identity.size() + 1 > max_identity || key.size() > max_psk)
        return 0;
    std::memcpy(identity, im->psk_identity.c_str(), im->psk_identity.size() + 1);
    std::memcpy(psk, key.data(), key.size());
    return static_cast<unsigned>(key.size());
}

unsigned psk_server_cb(SSL* ssl, const char* identity, unsigned char* psk, unsigned max_psk)
{
    const auto* im = impl_of(ssl);
    if (auto* noted = static_cast<std::string*>(SSL_get_app_data(ssl)))
        *noted = identity ? identity : "";
    auto it = im->keys.find(identity ? identity : "");
    if (it == im->keys.end() || it->second.size() > max_psk)
        return 0;
    std::memcpy(psk, it->second.data(), it->second.size());
    return static_cast<unsigned>(it->second.size());
}

// keys.psk: "username:hexkey" per line (QEMU's tls-creds-psk format).
std::map<std::string, std::vector<uint8_t>> read_psk(const std::string& opt, const std::string& file,
                                                     std::string* first)
{
    std::ifstream in(file);
    if (!in)
        throw UsageError(fmt::format("{} psk:{}: cannot read the file: {}; make one with scripts/make-tls-creds "
                                     "--psk {}",
                                     opt, file, errno_text(errno), file));
    std::map<std::string, std::vector<uint8_t>> keys;
    std::string line;
    int no = 0;
    while (std::getline(in, line)) {
        no++;
        if (!line.empty() && line.back() == '\r')
            line.pop_back();
        if (line.empty() || line[0] == '#')
            continue;
        const auto colon = line.find(':');
        const std::string user = colon == std::string::npos ? "" : line.substr(0, colon);
        const std::string hex = colon == std::string::npos ? "" : line.substr(colon + 1);
        long len = 0;
        unsigned char* buf = hex.empty() || hex.size() % 2 ? nullptr : OPENSSL_hexstr2buf(hex.c_str(), &len);
        if (user.empty() || !buf || len < 16 || len > 256 || hex.find(':') != std::string::npos) {
            OPENSSL_free(buf);
            ERR_clear_error();
            throw UsageError(fmt::format("{} psk:{}: line {} is not 'username:hexkey' with a key of 16 to 256 bytes "
                                         "in hex (QEMU's keys.psk format)",
                                         opt, file, no));
        }
        keys[user].assign(buf, buf + len);
        OPENSSL_free(buf);
        if (first && first->empty())
            *first = user;
    }
    if (keys.empty())
        throw UsageError(fmt::format("{} psk:{}: no 'username:hexkey' line in the file", opt, file));
    return keys;
}

}  // namespace

Context::Context(Kind k) : kind_(k), impl_(std::make_unique<Impl>()) {}
Context::~Context() = default;

// QEMU's directory layout into the context. A client without client-cert.pem
// and client-key.pem is anonymous (QEMU: they are optional for a client).
void load_x509(Context::Impl& im, const std::string& spec, const std::string& where, bool server, bool verify_peer)
{
    const std::string side = server ? "server" : "client";
    const std::string ca = where + "/ca-cert.pem", cert = where + "/" + side + "-cert.pem",
                      key = where + "/" + side + "-key.pem";
    const bool anonymous = !server && !exists(cert) && !exists(key);
    for (const auto& f : {ca, cert, key})
        if (!exists(f) && !(anonymous && f != ca))
            throw UsageError(fmt::format("--tls-creds {}: {} is missing (QEMU's layout: ca-cert.pem, "
                                         "{}-cert.pem, {}-key.pem); make them with scripts/make-tls-creds {}",
                                         spec, f, side, side, where));
    if (SSL_CTX_load_verify_locations(im.ctx, ca.c_str(), nullptr) != 1)
        throw UsageError(fmt::format("--tls-creds {}: {}: not a CA certificate ({})", spec, ca, ssl_reason()));
    if (!anonymous) {
        if (SSL_CTX_use_certificate_chain_file(im.ctx, cert.c_str()) != 1)
            throw UsageError(fmt::format("--tls-creds {}: {}: not a certificate ({})", spec, cert, ssl_reason()));
        if (SSL_CTX_use_PrivateKey_file(im.ctx, key.c_str(), SSL_FILETYPE_PEM) != 1)
            throw UsageError(fmt::format("--tls-creds {}: {}: not a private key ({})", spec, key, ssl_reason()));
        if (SSL_CTX_check_private_key(im.ctx) != 1)
            throw UsageError(fmt::format("--tls-creds {}: {} does not belong to {} ({})", spec, key, cert,
                                         ssl_reason()));
    }
    // By default the receiver insists on a client certificate from the same
    // CA and the sender checks the receiver's; verify-peer false drops that.
    if (!verify_peer)
        SSL_CTX_set_verify(im.ctx, SSL_VERIFY_NONE, nullptr);
    else
        SSL_CTX_set_verify(im.ctx, server ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT : SSL_VERIFY_PEER,
                           nullptr);
    im.anonymous = anonymous;
    im.verify_peer = verify_peer;
}

std::shared_ptr<Context> make_context(const Options& opts, bool server, const std::string& host)
{
    const std::string& spec = opts.creds;
    Kind kind;
    std::string where;
    if (spec.rfind("x509:", 0) == 0) {
        kind = Kind::X509;
        where = spec.substr(5);
    } else if (spec.rfind("psk:", 0) == 0) {
        kind = Kind::Psk;
        where = spec.substr(4);
    } else {
        throw UsageError(fmt::format("--tls-creds: '{}' is neither x509:DIR nor psk:FILE (e.g. x509:/etc/minivmm/tls, "
                                     "psk:/etc/minivmm/keys.psk)",
                                     spec));
    }
    if (where.empty())
        throw UsageError(fmt::format("--tls-creds {}: the {} is missing", spec, kind == Kind::X509 ? "directory" : "file"));
    auto c = std::shared_ptr<Context>(new Context(kind));
    Context::Impl& im = *c->impl_;
    im.source = where;
    im.server = server;
    im.host = host;
    im.authz = opts.authz;
    im.ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!im.ctx)
        throw Error("TLS: cannot make an OpenSSL context: " + ssl_reason());
    SSL_CTX_set_ex_data(im.ctx, impl_index(), &im);
    SSL_CTX_set_min_proto_version(im.ctx, TLS1_3_VERSION);
    SSL_CTX_set_ciphersuites(im.ctx, kSuites);
    SSL_CTX_set_options(im.ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_TICKET);
    SSL_CTX_set_read_ahead(im.ctx, 1);
    SSL_CTX_set_default_read_buffer_len(im.ctx, kReadBuffer);
    SSL_CTX_set_mode(im.ctx, SSL_MODE_AUTO_RETRY);
    if (kind == Kind::X509) {
        load_x509(im, spec, where, server, opts.verify_peer);
    } else {
        im.keys = read_psk("--tls-creds", where, &im.psk_identity);
        if (!opts.psk_user.empty()) {
            if (!im.keys.count(opts.psk_user))
                throw UsageError(fmt::format("--tls-creds {}: no key for user '{}' in the file", spec, opts.psk_user));
            im.psk_identity = opts.psk_user;
        }
        if (server)
            SSL_CTX_set_psk_server_callback(im.ctx, psk_server_cb);
        else
            SSL_CTX_set_psk_client_callback(im.ctx, psk_client_cb);
        SSL_CTX_set_verify(im.ctx, SSL_VERIFY_NONE, nullptr);
    }
    return c;
}

std::shared_ptr<Context> Context::client(const Options& opts, const std::string& host)
{
    if (!opts.authz.empty())
        throw UsageError("--tls-authz: the receiver's option (which senders it admits); migrate checks the receiver "
                         "by its certificate's name (--tls-hostname)");
    return make_context(opts, false, opts.hostname.empty() ? host : opts.hostname);
}

std::shared_ptr<Context> Context::server(const Options& opts)
{
    if (!opts.hostname.empty())
        throw UsageError("--tls-hostname: the sender's option (the name the receiver's certificate must carry)");
    return make_context(opts, true, "");
}

std::string Context::describe() const
{
    const Impl& im = *impl_;
    if (kind_ == Kind::X509 && im.server)
        return fmt::format("x509 {}{}", im.source,
                           !im.verify_peer ? ", any client, certificate or not (verify-peer off)"
                           : im.authz.empty()
                               ? ", any client the CA signed"
                               : fmt::format(", {} identit{} authorised", im.authz.size(), im.authz.size() == 1 ? "y" : "ies"));
    if (kind_ == Kind::X509)
        return fmt::format("x509 {}{}{}", im.source, im.anonymous ? ", no client certificate (anonymous)" : "",
                           im.verify_peer ? fmt::format(", receiver must be '{}'", im.host)
                                          : ", receiver's certificate unchecked (verify-peer off)");
    return fmt::format("psk {}{}", impl_->source,
                       impl_->server ? fmt::format(", {} identit{}", impl_->keys.size(),
                                                   impl_->keys.size() == 1 ? "y" : "ies")
                                     : fmt::format(" as '{}'", impl_->psk_identity));
}

namespace {

// Why a handshake failed, in one line for a person: the certificate check's
// verdict when there is one, else OpenSSL's reason, with the likely cause.
std::string handshake_failure(SSL* ssl, int rc, bool server, Kind kind, const std::string& source,
                              const std::string& host)
{
    const int saved = errno;
    const int e = SSL_get_error(ssl, rc);
    const long v = SSL_get_verify_result(ssl);
    std::string reason = ssl_reason();
    const std::string whose = server ? "the sender's certificate" : "the receiver's certificate";
    if (v != X509_V_OK && kind == Kind::X509) {
        std::string what = X509_verify_cert_error_string(v);
        switch (v) {
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
        case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
            return fmt::format("{}: {}: it is not signed by {}/ca-cert.pem (an unknown CA)", whose, what, source);
        case X509_V_ERR_CERT_HAS_EXPIRED:
            return fmt::format("{}: {} (renew it)", whose, what);
        case X509_V_ERR_CERT_NOT_YET_VALID:
            return fmt::format("{}: {} (check both clocks)", whose, what);
        case X509_V_ERR_HOSTNAME_MISMATCH:
        case X509_V_ERR_IP_ADDRESS_MISMATCH:
            return fmt::format("{} is not for '{}' ({}); connect by a name it carries or give --tls-hostname", whose,
                               host, what);
        default:
            return fmt::format("{}: {}", whose, what);
        }
    }
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ||
        (e == SSL_ERROR_SYSCALL && (saved == EAGAIN || saved == EWOULDBLOCK)))
        return "";  // the caller's limits: timed out
    if ((e == SSL_ERROR_SYSCALL && saved == 0) || reason == "unexpected eof while reading" ||
        (e == SSL_ERROR_SYSCALL && saved == ECONNRESET))
        return server ? "the sender closed the connection during the TLS handshake"
                      : "the receiver closed the connection during the TLS handshake: does it run with the same "
                        "kind of --tls-creds (or without TLS)?";
    if (kind == Kind::Psk && (reason.find("decrypt") != std::string::npos || reason.find("binder") != std::string::npos ||
                              reason.find("psk") != std::string::npos || reason.find("handshake failure") != std::string::npos ||
                              reason.find("illegal parameter") != std::string::npos))
        return fmt::format("the pre-shared key does not match the {}'s ({}): both sides need the same "
                           "'username:hexkey' line",
                           server ? "sender" : "receiver", reason);
    if (reason == "wrong version number" || reason == "packet length too long" || reason == "record layer failure")
        return server ? "the sender does not speak TLS (run migrate with --tls-creds)"
                      : "the receiver does not speak TLS (run receive with --tls-creds)";
    if (reason.find("certificate required") != std::string::npos || reason.find("peer did not return") != std::string::npos)
        return server ? "the sender sent no certificate (its --tls-creds must be x509 with client-cert.pem)"
                      : "the receiver wants a client certificate (use --tls-creds x509:DIR with client-cert.pem)";
    if (reason.find("alert") != std::string::npos)
        return fmt::format("the {} refused the handshake ({})", server ? "sender" : "receiver", reason);
    if (e == SSL_ERROR_SYSCALL)
        return errno_text(saved);
    return reason.empty() ? "failed" : reason;
}

}  // namespace

namespace {

// The handshake on `t` either way; throws Error with the reason in one line.
void handshake(TlsTransport& t, bool server, Kind kind, const std::string& source, const std::string& host)
{
    SSL* ssl = t.ssl();
    t.raw().arm(false);
    t.raw().arm(true);
    const int rc = server ? SSL_accept(ssl) : SSL_connect(ssl);
    if (rc == 1)
        return;
    const std::string why = handshake_failure(ssl, rc, server, kind, source, host);
    if (why.empty()) {
        try {
            t.raw().expired(false);
        } catch (const Error& e) {
            throw Error(fmt::format("TLS handshake: {}", e.what()));
        }
    }
    throw Error(server ? fmt::format("TLS handshake failed: {}", why)
                       : fmt::format("TLS handshake with {} failed: {}", t.raw().peer(), why));
}

std::unique_ptr<TlsTransport> wrap(SSL_CTX* ctx, std::unique_ptr<FdTransport> raw)
{
    SSL* ssl = SSL_new(ctx);
    if (!ssl)
        throw Error("TLS: SSL_new: " + ssl_reason());
    BIO* rb = BIO_new_socket(raw->fd(), BIO_NOCLOSE);
    BIO* wb = BIO_push(BIO_new(BIO_f_buffer()), BIO_new_socket(raw->fd(), BIO_NOCLOSE));
    BIO_set_write_buffer_size(wb, kWriteBuffer);
    SSL_set_bio(ssl, rb, wb);
    auto t = std::make_unique<TlsTransport>(std::move(raw), ssl);
    SSL_set_app_data(ssl, &t->psk_identity);
    return t;
}

std::string subject_of(SSL* ssl)
{
    X509* cert = SSL_get1_peer_certificate(ssl);
    if (!cert)
        return "";
    BIO* b = BIO_new(BIO_s_mem());
    X509_NAME_print_ex(b, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
    char* data = nullptr;
    const long n = BIO_get_mem_data(b, &data);
    std::string dn(data, static_cast<size_t>(n));
    BIO_free(b);
    X509_free(cert);
    return dn;
}

}  // namespace

Peer Context::connect(std::unique_ptr<FdTransport> raw) const
{
    auto t = wrap(impl_->ctx, std::move(raw));
    if (kind_ == Kind::X509) {
        if (is_ip(impl_->host)) {
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl()), impl_->host.c_str());
        } else {
            SSL_set1_host(t->ssl(), impl_->host.c_str());
            SSL_set_tlsext_host_name(t->ssl(), impl_->host.c_str());
        }
    }
    handshake(*t, false, kind_, impl_->source, impl_->host);
    // The receiver's verdict on us: in TLS 1.3 it checks a client certificate
    // after our side of the handshake ended, so wait for it (a RESULT, or its
    // alert) before sending anything.
    const Record rec = RecordReader(*t).read();
    if (rec.type != RecordType::Result)
        throw Error(fmt::format("{}: {} where the receiver's TLS verdict belongs", t->raw().peer(),
                                record_name(rec.type)));
    const ResultRecord verdict = ResultRecord::decode(rec.payload);
    if (!verdict.ok)
        throw Error("the destination refused the connection: " + verdict.text);
    std::string id = kind_ == Kind::Psk ? impl_->psk_identity : subject_of(t->ssl());
    return {std::move(t), std::move(id)};
}

Peer Context::accept(std::unique_ptr<FdTransport> raw) const
{
    auto t = wrap(impl_->ctx, std::move(raw));
    handshake(*t, true, kind_, impl_->source, "");
    std::string id;
    if (kind_ == Kind::Psk) {
        id = t->psk_identity;  // SSL_get_psk_identity() is empty in TLS 1.3
    } else {
        id = subject_of(t->ssl());
    }
    if (!impl_->authz.empty()) {
        const bool ok = std::any_of(impl_->authz.begin(), impl_->authz.end(),
                                    [&](const std::string& pat) { return ::fnmatch(pat.c_str(), id.c_str(), 0) == 0; });
        if (!ok) {
            // The sender reads a RESULT after its HEADER: it learns why.
            ResultRecord r;
            r.text = fmt::format("the receiver does not authorise '{}' (its --tls-authz)", id);
            try {
                RecordWriter(*t).write(RecordType::Result, r.encode());
            } catch (...) {
            }
            throw Error(fmt::format("TLS identity '{}' is not authorised (--tls-authz)", id));
        }
    }
    ResultRecord ok;
    ok.ok = 1;
    ok.text = "authenticated as '" + id + "'";
    RecordWriter(*t).write(RecordType::Result, ok.encode());
    return {std::move(t), std::move(id)};
}

bool looks_like_tls(const uint8_t* first, size_t n)
{
    // A TLS record: content type 22 (handshake), version 3.x.
    return n >= 3 && first[0] == 0x16 && first[1] == 0x03 && first[2] <= 0x04;
}

}  // namespace mvm::migration::tls
