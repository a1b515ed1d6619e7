// migration/transport/tls_pipe.hpp - the TLS byte pipe under tls.cpp's
// contexts: OpenSSL over a connected socket, safe for one reader and one
// writer at once (postcopy's return path reads channel 0 while pages go out).
#pragma once

#include <poll.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "migration/stream.hpp"

namespace mvm::migration::tls {

// The oldest queued OpenSSL error, as a lower-case reason ("" when none);
// the queue is left empty.
inline std::string ssl_reason()
{
    unsigned long first = 0, e;
    while ((e = ERR_get_error()) != 0)
        if (!first)
            first = e;
    if (!first)
        return "";
    const char* r = ERR_reason_error_string(first);
    return r ? r : fmt::format("OpenSSL error {:#x}", first);
}

constexpr const char* kSuites = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
constexpr int kReadBuffer = 256 << 10;   // read ahead: many records per read()
constexpr long kWriteBuffer = 256 << 10;  // records gathered into one write()

// The TLS byte pipe: OpenSSL over the socket of `raw`, whose limits bound
// every blocking call (the socket's timeouts make them return EAGAIN).
class TlsTransport : public Transport {
public:
    TlsTransport(std::unique_ptr<FdTransport> raw, SSL* ssl) : raw_(std::move(raw)), ssl_(ssl) {}
    ~TlsTransport() override { SSL_free(ssl_); }

    // One thread may read while another writes (postcopy's return path on
    // channel 0): OpenSSL's SSL object is not safe for that, so every call
    // into it holds ssl_mu_, and a reader waits for bytes without it.
    void write_all(const void* data, size_t len) override
    {
        std::lock_guard lk(ssl_mu_);
        put(static_cast<const uint8_t*>(data), len);
        flush();
    }

    // Adjacent pieces (staged pages, guest pages in GPA order) are written
    // as one span; spans of 64 KiB and more go to SSL_write straight from
    // where they are, smaller ones are gathered first (a 4 KiB page per
    // SSL_write would cost a record and a flush apiece).
    void writev_all(std::span<const iovec> iov) override
    {
        std::lock_guard lk(ssl_mu_);
        size_t i = 0;
        while (i < iov.size()) {
            const auto* base = static_cast<const uint8_t*>(iov[i].iov_base);
            size_t len = iov[i].iov_len;
            for (i++; i < iov.size() && static_cast<const uint8_t*>(iov[i].iov_base) == base + len; i++)
                len += iov[i].iov_len;
            if (len >= (64u << 10)) {
                put_gathered();
                put(base, len);
                continue;
            }
            while (len) {
                const size_t k = std::min(len, gather_.capacity() - gather_.size());
                gather_.insert(gather_.end(), base, base + k);
                base += k;
                len -= k;
                if (gather_.size() == gather_.capacity())
                    put_gathered();
            }
        }
        put_gathered();
        flush();
    }

    void read_exact(void* data, size_t len) override
    {
        auto* p = static_cast<uint8_t*>(data);
        while (len) {
            wait_readable();
            std::lock_guard lk(ssl_mu_);
            raw_->arm(false);
            size_t n = 0;
            if (SSL_read_ex(ssl_, p, len, &n) <= 0)
                fail(false);
            p += n;
            len -= n;
        }
    }

    // Until OpenSSL holds bytes already or the socket has some (or hung up),
    // without ssl_mu_: a writer goes on meanwhile. Past the idle limit the
    // read itself times out (its message names the limit).
    void wait_readable()
    {
        {
            std::lock_guard lk(ssl_mu_);
            if (SSL_has_pending(ssl_))
                return;
        }
        const auto since = std::chrono::steady_clock::now();
        const double idle_s = raw_->limits().idle_s;
        for (;;) {
            pollfd pf{raw_->fd(), POLLIN, 0};
            const int rc = ::poll(&pf, 1, 100);
            if (rc != 0)
                return;  // readable, hung up, or an error the read reports
            if (idle_s > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count() > idle_s)
                return;
        }
    }

    void shutdown() override { raw_->shutdown(); }
    void set_limits(const IoLimits& l) override { raw_->set_limits(l); }
    FdTransport& raw() { return *raw_; }
    SSL* ssl() { return ssl_; }
    std::string psk_identity;  // the server's PSK callback notes the identity it was offered

    [[noreturn]] void fail(bool sending)
    {
        const int saved = errno;
        const int e = SSL_get_error(ssl_, -1);
        const char* doing = sending ? "sending to" : "receiving from";
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ||
            (e == SSL_ERROR_SYSCALL && (saved == EAGAIN || saved == EWOULDBLOCK))) {
            ERR_clear_error();
            raw_->expired(sending);
        }
        if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && saved == 0)) {
            ERR_clear_error();
            throw Error(fmt::format("{} closed the connection mid-stream", raw_->peer()));
        }
        if (e == SSL_ERROR_SYSCALL)
            throw Error(fmt::format("{} {}: {}", doing, raw_->peer(), errno_text(saved)));
        std::string why = ssl_reason();
        for (const char* prefix : {"sslv3 alert ", "tlsv1 alert ", "tlsv13 alert "})
            if (why.rfind(prefix, 0) == 0)
                // TLS 1.3: a client certificate is checked after the client's
                // handshake ended, so a refusal arrives as an alert here.
                throw Error(fmt::format("{} {}: the peer ended the TLS session: {} (it refused our credentials)", doing,
                                        raw_->peer(), why.substr(std::strlen(prefix))));
        throw Error(fmt::format("{} {}: TLS: {}", doing, raw_->peer(), why.empty() ? "failed" : why));
    }

private:
    void put(const uint8_t* p, size_t len)
    {
        while (len) {
            raw_->arm(true);
            size_t n = 0;
            if (SSL_write_ex(ssl_, p, len, &n) <= 0)
                fail(true);
            p += n;
            len -= n;
        }
    }
    void put_gathered()
    {
        put(gather_.data(), gather_.size());
        gather_.clear();
    }
    void flush()
    {
        raw_->arm(true);
        BIO* w = SSL_get_wbio(ssl_);
        while (BIO_flush(w) <= 0) {
            if (!BIO_should_retry(w))
                fail(true);
            raw_->expired(true);  // a retry here is the socket's timeout
        }
    }

    std::unique_ptr<FdTransport> raw_;
    SSL* ssl_;
    std::mutex ssl_mu_;
    std::vector<uint8_t> gather_ = [] {
        std::vector<uint8_t> v;
        v.reserve(256 << 10);
        return v;
    }();
};


}  // namespace mvm::migration::tls
