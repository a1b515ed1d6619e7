// QMP migration parameters and capabilities (QEMU qapi/migration.json):
// migrate-set-parameters, query-migrate-parameters, migrate-set-capabilities,
// query-migrate-capabilities.
#include "cli/qmp/monitor_impl.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <iterator>
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "memory/backing.hpp"
#include "migration/transport/tcp.hpp"
#include "numa/placement.hpp"
#include "numa/policy.hpp"

namespace mvm::qmp {

using migration::Phase;

namespace {

// The capabilities QEMU 9.2 knows besides the eleven minivmm implements
// (Monitor::Capabilities; return-path and switchover-ack as settings only:
// minivmm's stream always has a return path, the destination's RESULT
// records, and nothing in its guest's state needs an ACK before the
// switchover: docs/qmp.md).
const char* const kOtherCaps[] = {"xbzrle",           "rdma-pin-all",       "zero-blocks",
                                  "x-colo",           "release-ram",
                                  "dirty-bitmaps",    "late-block-activate", "x-ignore-shared",
                                  "background-snapshot", "zero-copy-send"};
// QEMU parameters minivmm does not implement (setting one is an error naming it).
const char* const kOtherParams[] = {
    "announce-initial", "announce-max",     "announce-rounds",     "announce-step",     "throttle-trigger-threshold",
    "cpu-throttle-tailslow", "avail-switchover-bandwidth",
    "x-checkpoint-delay", "xbzrle-cache-size", "multifd-zlib-level", "multifd-qatzip-level",
    "block-bitmap-mapping", "mode"};

// QEMU's MultiFDCompression: none or zstd here (true: zstd); QmpError else.
bool multifd_zstd(const std::string& c)
{
    if (c == "none" || c == "zstd")
        return c == "zstd";
    if (c == "zlib" || c == "qpl" || c == "uadk" || c == "qatzip")
        throw QmpError(fmt::format("Parameter 'multifd-compression': '{}' is not supported by minivmm; use none or zstd",
                                   c));
    throw QmpError(fmt::format("Parameter 'multifd-compression' does not accept value '{}'", c));
}

// The parameters migrate-set-parameters takes.
constexpr const char* kKnownParams[] = {
    "max-bandwidth",          "downtime-limit",   "multifd-channels", "multifd-compression",
    "multifd-zstd-level",     "cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle",
    "vcpu-dirty-limit",       "x-minivmm-max-iterations", "x-minivmm-timeout", "x-minivmm-verify",
    "x-minivmm-post-run",     "zero-page-detection", "tls-creds", "tls-hostname", "tls-authz", "direct-io",
    "x-vcpu-dirty-limit-period", "max-postcopy-bandwidth"};

// Every member one minivmm takes; one QEMU has and minivmm does not is named so.
void check_parameter_names(const json& args)
{
    if (!args.is_object())
        throw QmpError("QMP input member 'arguments' must be an object");
    for (const auto& item : args.items()) {
        const std::string k = item.key();
        if (std::find_if(std::begin(kKnownParams), std::end(kKnownParams), [&](const char* n) { return k == n; }) !=
            std::end(kKnownParams))
            continue;
        for (const char* o : kOtherParams)
            if (k == o)
                throw QmpError(fmt::format("Parameter '{}' is not supported by minivmm (docs/qmp.md lists the "
                                           "parameters it takes)",
                                           k));
        throw QmpError(fmt::format("Parameter '{}' is unexpected", k));
    }
}

// tls-creds, tls-hostname, tls-authz: QEMU's StrOrNull, null being "" (off);
// the objects are looked up when a migration starts, as QEMU does.
void apply_tls_parameters(const Args& a, std::string& creds, std::string& hostname, std::string& authz)
{
    auto str_or_null = [&](const char* name, std::string& out) {
        if (!a.has(name))
            return;
        const json& v = a.raw(name);
        if (!v.is_null() && !v.is_string())
            throw QmpError(fmt::format("Invalid parameter type for '{}', expected: string", name));
        out = v.is_null() ? std::string() : v.get<std::string>();
    };
    str_or_null("tls-creds", creds);
    str_or_null("tls-hostname", hostname);
    str_or_null("tls-authz", authz);
}

}  // namespace

json Monitor::set_parameters(const json& args)
{
    check_parameter_names(args);
    // Check everything first, then apply: a bad member changes nothing.
    Args a(args, kKnownParams);
    auto ranged = [&](const char* name, int64_t lo, int64_t hi) {
        const int64_t v = a.integer(name);
        if (v < lo || v > hi)
            throw QmpError(fmt::format("Parameter '{}' expects {}", name,
                                       hi == INT64_MAX ? fmt::format("an integer >= {}", lo)
                                                       : fmt::format("an integer in [{}, {}]", lo, hi)));
        return v;
    };
    std::lock_guard lk(mu_);
    Params p = *params_;
    if (a.has("max-bandwidth"))
        p.max_bandwidth = static_cast<uint64_t>(ranged("max-bandwidth", 0, INT64_MAX));
    if (a.has("max-postcopy-bandwidth"))
        p.max_postcopy_bandwidth = static_cast<uint64_t>(ranged("max-postcopy-bandwidth", 0, INT64_MAX));
    if (a.has("downtime-limit"))
        p.downtime_limit_ms = static_cast<double>(ranged("downtime-limit", 0, 2000000));
    if (a.has("multifd-channels"))
        p.multifd_channels = static_cast<uint32_t>(ranged("multifd-channels", 1, 64));
    if (a.has("multifd-compression"))
        p.compression.zstd = multifd_zstd(a.str("multifd-compression"));
    if (a.has("zero-page-detection")) {
        // QEMU's ZeroPageDetection. minivmm finds zero pages in its channel
        // threads (multifd's way) and has no separate migration thread, so
        // legacy means the same; none sends them whole.
        const std::string z = a.str("zero-page-detection");
        if (z != "none" && z != "legacy" && z != "multifd")
            throw QmpError(fmt::format("Parameter 'zero-page-detection' does not accept value '{}'", z));
        p.compression.detect_zero = z != "none";
        p.zero_page_detection = z;
    }
    if (a.has("multifd-zstd-level"))
        p.compression.level = static_cast<int>(ranged("multifd-zstd-level", 0, 20));
    if (a.has("cpu-throttle-initial"))
        p.throttle_initial = static_cast<uint32_t>(ranged("cpu-throttle-initial", 1, 99));
    if (a.has("cpu-throttle-increment"))
        p.throttle_increment = static_cast<uint32_t>(ranged("cpu-throttle-increment", 1, 99));
    if (a.has("max-cpu-throttle"))
        p.throttle_max = static_cast<uint32_t>(ranged("max-cpu-throttle", 1, 99));
    if (a.has("vcpu-dirty-limit"))
        p.dirty_limit_pages = static_cast<uint64_t>(ranged("vcpu-dirty-limit", 1, 1 << 30)) * 256;
    if (a.has("x-minivmm-max-iterations"))
        p.max_iterations = static_cast<uint32_t>(ranged("x-minivmm-max-iterations", 1, 100000));
    if (a.has("x-minivmm-timeout"))
        p.timeout_s = static_cast<double>(ranged("x-minivmm-timeout", 1, 86400));
    if (a.has("x-minivmm-verify"))
        p.verify = a.boolean_or("x-minivmm-verify", true);
    if (a.has("x-vcpu-dirty-limit-period"))  // a setting: minivmm re-checks the rates at every harvest
        p.dirty_limit_period_ms = static_cast<uint32_t>(ranged("x-vcpu-dirty-limit-period", 1, 1000));
    if (a.has("direct-io"))
        p.direct_io = a.boolean_or("direct-io", false);
    if (a.has("x-minivmm-post-run"))
        p.post_run_s = static_cast<double>(ranged("x-minivmm-post-run", 0, 3600));
    apply_tls_parameters(a, p.tls_creds, p.tls_hostname, p.tls_authz);
    if (p.compression.zstd && p.compression.level == 0)
        p.compression.level = 1;
    *params_ = p;
    // A migration in flight takes the bandwidth and the downtime limit at
    // its next send batch / round; the others apply to the next migration.
    if (migrating_.load() && sender_) {
        if (a.has("max-bandwidth"))
            sender_->set_bandwidth(p.max_bandwidth);
        if (a.has("downtime-limit"))
            sender_->set_max_downtime_ms(p.downtime_limit_ms);
        if (a.has("max-postcopy-bandwidth"))
            sender_->set_postcopy_bandwidth(p.max_postcopy_bandwidth);
    }
    return json::object();
}

json Monitor::query_parameters() const
{
    std::lock_guard lk(mu_);
    const Params& p = *params_;
    return {{"max-bandwidth", p.max_bandwidth},
            {"max-postcopy-bandwidth", p.max_postcopy_bandwidth},
            {"downtime-limit", ms(p.downtime_limit_ms)},
            {"multifd-channels", p.multifd_channels},
            {"multifd-compression", p.compression.zstd ? "zstd" : "none"},
            {"multifd-zstd-level", p.compression.level},
            {"zero-page-detection", p.zero_page_detection},
            {"cpu-throttle-initial", p.throttle_initial},
            {"cpu-throttle-increment", p.throttle_increment},
            {"max-cpu-throttle", p.throttle_max},
            {"vcpu-dirty-limit", p.dirty_limit_pages / 256},
            {"x-vcpu-dirty-limit-period", p.dirty_limit_period_ms},
            {"tls-creds", p.tls_creds},
            {"tls-hostname", p.tls_hostname},
            {"tls-authz", p.tls_authz},
            {"direct-io", p.direct_io},
            {"x-minivmm-channels", p.channels},
            {"x-minivmm-max-iterations", p.max_iterations},
            {"x-minivmm-timeout", ms(p.timeout_s)},
            {"x-minivmm-verify", p.verify},
            {"x-minivmm-post-run", ms(p.post_run_s)}};
}

json Monitor::set_capabilities(const json& args)
{
    Args a(args, {"capabilities"});
    const json& list = a.array("capabilities");
    std::lock_guard lk(mu_);
    if (migrating_.load())
        throw QmpError("There's a migration process in progress");
    Capabilities c = *caps_;
    for (const json& e : list) {
        if (!e.is_object() || !e.contains("capability") || !e.contains("state") || !e["capability"].is_string() ||
            !e["state"].is_boolean() || e.size() != 2)
            throw QmpError("Parameter 'capabilities' expects a list of {\"capability\": NAME, \"state\": BOOL}");
        const std::string name = e["capability"].get<std::string>();
        const bool on = e["state"].get<bool>();
        bool known = false;
        c.each([&](const char* n, bool& v) {
            if (name == n) {
                v = on;
                known = true;
            }
        });
        if (known)
            continue;
        if (std::find_if(std::begin(kOtherCaps), std::end(kOtherCaps), [&](const char* n) { return name == n; }) !=
            std::end(kOtherCaps)) {
            if (on)
                throw QmpError(fmt::format("Capability '{}' is not supported by minivmm (docs/qmp.md lists the "
                                           "capabilities it implements)",
                                           name));
        } else
            throw QmpError(fmt::format("Parameter 'capability' does not accept value '{}'", name));
    }
    if (c.auto_converge && c.dirty_limit)
        throw QmpError("dirty-limit and auto-converge are mutually exclusive: enable one of them");
    if (c.mapped_ram && c.postcopy_ram)
        throw QmpError("Mapped-ram migration is incompatible with postcopy");
    if (c.postcopy_preempt && !c.postcopy_ram)
        throw QmpError("Postcopy preempt requires postcopy-ram");
    if (c.switchover_ack && !c.return_path)
        throw QmpError("Capability 'switchover-ack' requires capability 'return-path'");
    *caps_ = c;
    return json::object();
}

json Monitor::query_capabilities() const
{
    std::lock_guard lk(mu_);
    json v = json::array();
    Capabilities c = *caps_;
    c.each([&](const char* n, bool& on) { v.push_back({{"capability", n}, {"state", on}}); });
    for (const char* n : kOtherCaps)
        v.push_back({{"capability", n}, {"state", false}});
    return v;
}

}  // namespace mvm::qmp
