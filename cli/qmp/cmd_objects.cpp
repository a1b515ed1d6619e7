// QMP objects a migration uses (QEMU qapi/qom.json, crypto.json, authz.json):
// object-add / object-del of tls-creds-psk, tls-creds-x509 and authz-simple,
// named by the tls-creds and tls-authz migration parameters.
#include "cli/qmp/monitor_impl.hpp"

#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm::qmp {

json Monitor::object_add(const json& args)
{
    if (!args.is_object() || !args.contains("qom-type") || !args["qom-type"].is_string())
        throw QmpError("Parameter 'qom-type' is missing");
    const std::string type = args["qom-type"].get<std::string>();
    QomObject o;
    o.type = type;
    std::string id;
    if (type == "tls-creds-psk" || type == "tls-creds-x509") {
        Args a(args, {"qom-type", "id", "endpoint", "dir", "username", "verify-peer", "priority", "sanity-check"});
        id = a.str("id");
        o.endpoint = a.str_or("endpoint", "client");
        if (o.endpoint != "client" && o.endpoint != "server")
            throw QmpError(fmt::format("Parameter 'endpoint' does not accept value '{}'", o.endpoint));
        o.dir = a.str("dir");
        o.username = a.str_or("username", "");
        if (type == "tls-creds-x509" && !o.username.empty())
            throw QmpError("Property 'tls-creds-x509.username' not found");
        o.verify_peer = a.boolean_or("verify-peer", true);
        if (a.has("priority"))
            throw QmpError("tls-creds 'priority' is not supported by minivmm (TLS 1.3, OpenSSL's default ciphers)");
    } else if (type == "authz-simple") {
        Args a(args, {"qom-type", "id", "identity"});
        id = a.str("id");
        o.identity = a.str("identity");
    } else {
        Args(args, {"qom-type", "id"});
        throw QmpError(fmt::format("object type '{}' is not supported by minivmm (tls-creds-psk, tls-creds-x509, "
                                   "authz-simple)",
                                   type));
    }
    std::lock_guard lk(mu_);
    if (objects_.count(id))
        throw QmpError(fmt::format("attempt to add duplicate property '{}' to object (type 'container')", id));
    objects_[id] = o;
    return json::object();
}

json Monitor::object_del(const json& args)
{
    Args a(args, {"id"});
    const std::string id = a.str("id");
    std::lock_guard lk(mu_);
    if (!objects_.erase(id))
        throw QmpError(fmt::format("object '{}' not found", id));
    return json::object();
}

// Under mu_.
migration::tls::Options Monitor::tls_from_params(bool client) const
{
    const Params& p = *params_;
    migration::tls::Options t;
    if (p.tls_creds.empty()) {
        if (!p.tls_authz.empty() && !client)
            throw QmpError("tls-authz needs tls-creds: set the server's TLS credentials first");
        return t;
    }
    auto it = objects_.find(p.tls_creds);
    if (it == objects_.end() || it->second.type.rfind("tls-creds-", 0) != 0)
        throw QmpError(fmt::format("No TLS credentials with id '{}'", p.tls_creds));
    const QomObject& c = it->second;
    if (c.endpoint != (client ? "client" : "server"))
        throw QmpError(fmt::format("Expected TLS credentials for a {} endpoint", client ? "client" : "server"));
    if (c.type == "tls-creds-psk") {
        t.creds = "psk:" + c.dir + "/keys.psk";
        t.psk_user = c.username.empty() ? "qemu" : c.username;  // QEMU's default PSK username
    } else {
        t.creds = "x509:" + c.dir;
        t.verify_peer = c.verify_peer;
    }
    if (client) {
        t.hostname = p.tls_hostname;
    } else if (!p.tls_authz.empty()) {
        auto az = objects_.find(p.tls_authz);
        if (az == objects_.end() || az->second.type != "authz-simple")
            throw QmpError(fmt::format("No authorization object with id '{}'", p.tls_authz));
        t.authz = {az->second.identity};
    }
    return t;
}

migration::tls::Options Monitor::incoming_tls() const
{
    std::lock_guard lk(mu_);
    return incoming_tls_;
}

}  // namespace mvm::qmp
