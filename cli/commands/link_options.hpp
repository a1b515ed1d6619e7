// cli/commands/link_options.hpp - the options migrate and receive share for
// the connection between them: TLS (QEMU's tls-creds-x509 / tls-creds-psk,
// tls-hostname, tls-authz) and how long either waits on the other.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "base/error.hpp"
#include "cli/options.hpp"
#include "migration/transport/tls.hpp"

namespace mvm::cli {

struct LinkCliOptions {
    std::string tls_creds, tls_hostname, io_timeout = "30";
    std::vector<std::string> tls_authz;

    void add_to(CLI::App& c, bool sender)
    {
        c.add_option("--tls-creds", tls_creds,
                     "encrypt and authenticate every channel: x509:DIR (QEMU's layout: ca-cert.pem, "
                     "server-cert.pem/-key.pem, client-cert.pem/-key.pem) or psk:FILE (QEMU's keys.psk, "
                     "username:hexkey lines); scripts/make-tls-creds makes both");
        if (sender)
            c.add_option("--tls-hostname", tls_hostname,
                         "the name the receiver's certificate must carry (default: the host of --to)");
        else
            c.add_option("--tls-authz", tls_authz,
                         "admit only this sender identity (x509: its certificate's subject DN, e.g. "
                         "'CN=src.example.com,O=Example'; psk: its username); a shell glob; repeatable")
                ->take_all();
        c.add_option("--io-timeout", io_timeout,
                     sender ? "seconds any wait on the receiver may go without progress (a send it does not "
                              "take, a reply it does not send)"
                            : "seconds a connection has to be admitted (TLS, HELLO, HEADER), and then any wait on the "
                              "admitted sender")
            ->capture_default_str();
    }

    migration::tls::Options tls() const
    {
        migration::tls::Options t;
        t.creds = tls_creds;
        t.hostname = tls_hostname;
        t.authz = tls_authz;
        if (!t.enabled() && !tls_hostname.empty())
            throw UsageError("--tls-hostname: needs --tls-creds x509:DIR");
        if (!t.enabled() && !tls_authz.empty())
            throw UsageError("--tls-authz: needs --tls-creds (x509:DIR or psk:FILE)");
        return t;
    }

    double io_timeout_s() const
    {
        const double s = parse_seconds("--io-timeout", io_timeout);
        if (s <= 0)
            throw UsageError("--io-timeout: must be positive, e.g. 30");
        return s;
    }
};

}  // namespace mvm::cli
