// QMP migration on the destination (QEMU qapi/migration.json): migrate-incoming,
// the receive phases as statuses and events, query-migrate there.
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
#include "migration/file.hpp"
#include "migration/transport/tcp.hpp"
#include "numa/placement.hpp"
#include "numa/policy.hpp"

namespace mvm::qmp {

using migration::Phase;

json Monitor::migrate_incoming(const json& args)
{
    Args a(args, {"uri", "channels", "exit-on-error"});
    if (role_ == Role::Source)
        throw QmpError("migrate-incoming: this is a source; start the destination with minivmm receive --listen defer");
    std::string uri = migration_uri(a);
    {
        std::lock_guard lk(mu_);
        if (incoming_started_ || !incoming_uri_.empty())
            throw QmpError("The incoming migration has already been started");
    }
    if (uri.rfind("tcp:", 0) != 0 && uri.rfind("unix:", 0) != 0 && uri.rfind("fd:", 0) != 0 &&
        uri.rfind("file:", 0) != 0)
        throw QmpError(fmt::format("migrate-incoming: uri '{}' is not supported; use tcp:ADDR:PORT, unix:PATH, "
                                   "fd:NAME or file:PATH",
                                   uri));
    migration::tls::Options tls;
    {
        std::lock_guard lk(mu_);
        tls = tls_from_params(false);
    }
    if (tls.enabled()) {
        try {
            migration::tls::Context::server(tls);  // the files now, not when the sender comes
        } catch (const std::exception& e) {
            throw QmpError(fmt::format("migrate-incoming: {}", e.what()));
        }
    }
    // fd: the connected socket (or the file) receive reads; an fdset's file as fd: too.
    uri = take_fdset_uri(take_fd_uri(uri, "migrate-incoming"), false, "migrate-incoming");
    std::optional<migration::FileUri> file;
    try {
        file = migration::parse_file_uri("uri", uri);
        if (file)
            migration::check_restorable("migrate-incoming", *file);  // now, not on the receiving thread
    } catch (const std::exception& e) {
        throw QmpError(e.what());
    }
    if (!file && uri.rfind("fd:", 0) != 0) {
        try {
            ::close(migration::bind_listener(uri));  // bindable now (receive binds it again at once)
        } catch (const std::exception& e) {
            throw QmpError(fmt::format("migrate-incoming: {}", e.what()));
        }
    }
    std::lock_guard lk(mu_);
    incoming_uri_ = uri;
    incoming_tls_ = tls;
    exit_on_error_ = a.boolean_or("exit-on-error", true);
    cv_.notify_all();
    return json::object();
}

// QEMU's migrate-recover: a paused postcopy destination takes the source
// back on `uri` (runs out-of-band in QEMU; minivmm's monitor never blocks).
json Monitor::migrate_recover(const json& args)
{
    Args a(args, {"uri"});
    const std::string uri = a.str("uri");
    if (role_ == Role::Source)
        throw QmpError("migrate-recover: this is a source; resume it with migrate and resume: true");
    {
        std::lock_guard lk(mu_);
        if (status_ != "postcopy-paused")
            throw QmpError("Migrate recover can only be run when postcopy is paused.");
        if (!recover_at_.uri.empty())
            throw QmpError("Migrate recovery is triggered already");
    }
    if (uri.rfind("tcp:", 0) != 0 && uri.rfind("unix:", 0) != 0 && uri.rfind("fd:", 0) != 0)
        throw QmpError(fmt::format("migrate-recover: uri '{}' is not supported; use tcp:ADDR:PORT, unix:PATH or "
                                   "fd:NAME",
                                   uri));
    const std::string u = take_fd_uri(uri, "migrate-recover");
    int ls = -1;
    if (u.rfind("fd:", 0) != 0) {
        try {
            ls = migration::bind_listener(u);  // listening when this returns: the source may resume at once
            if (::listen(ls, 64) != 0)
                throw SysError("listen", errno);
        } catch (const std::exception& e) {
            if (ls >= 0)
                ::close(ls);
            throw QmpError(fmt::format("migrate-recover: {}", e.what()));
        }
    }
    std::lock_guard lk(mu_);
    recover_at_ = {u, ls};
    cv_.notify_all();
    return json::object();
}

std::function<migration::RecoverAt(const std::string&)> Monitor::incoming_recover_listen()
{
    return [this](const std::string&) {
        std::unique_lock lk(mu_);
        while (recover_at_.uri.empty() && !quit_.load() && !g_stop_signal.load())
            cv_.wait_for(lk, std::chrono::milliseconds(100));
        return std::exchange(recover_at_, migration::RecoverAt{});
    };
}

std::shared_ptr<migration::PauseSwitch> Monitor::incoming_pause_switch()
{
    std::lock_guard lk(mu_);
    if (!pause_switch_)
        pause_switch_ = std::make_shared<migration::PauseSwitch>();
    return pause_switch_;
}

std::string Monitor::wait_incoming(double timeout_s)
{
    std::unique_lock lk(mu_);
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (incoming_uri_.empty() && !quit_.load() && !g_stop_signal.load() &&
           std::chrono::steady_clock::now() < until)
        cv_.wait_for(lk, std::chrono::milliseconds(100));
    return incoming_uri_;
}

void Monitor::incoming_started(const std::string& listen)
{
    std::lock_guard lk(mu_);
    incoming_started_ = true;
    incoming_uri_ = listen;
    incoming_phase_ = "listening";
    status_ = "setup";
    if (caps_->events)
        server_.emit("MIGRATION", {{"status", "setup"}});
}

migration::PostcopyHook Monitor::incoming_postcopy_hook()
{
    return [this](const migration::PostcopyDestinationFigures& f) {
        std::lock_guard lk(mu_);
        incoming_postcopy_ = f;
    };
}

migration::ContGate Monitor::incoming_cont_gate()
{
    return [this] {
        std::unique_lock lk(mu_);
        held_for_cont_ = true;
        while (!cont_requested_ && !quit_.load() && !g_stop_signal.load())
            cv_.wait_for(lk, std::chrono::milliseconds(100));
        held_for_cont_ = false;
        return cont_requested_;
    };
}

migration::PhaseHook Monitor::incoming_hook()
{
    return [this](const char* p) {
        const std::string phase = p;
        bool resumed = false, stopped = false, completed = false;
        {
            std::lock_guard lk(mu_);
            if (phase == incoming_phase_)
                return;
            incoming_phase_ = phase;
            if (status_ == "setup" && (phase == "bulk" || phase == "precopy" || phase == "stop")) {
                status_ = "active";
                if (caps_->events)
                    server_.emit("MIGRATION", {{"status", "active"}});
            }
            if ((status_ == "active" || status_ == "postcopy-recover") && phase == "postcopy") {
                status_ = "postcopy-active";
                if (caps_->events)
                    server_.emit("MIGRATION", {{"status", "postcopy-active"}});
            }
            if (phase == "postcopy-paused" || phase == "postcopy-recover") {
                status_ = phase;
                if (caps_->events)
                    server_.emit("MIGRATION", {{"status", phase}});
            }
            if (phase == "paused") {  // a stopped source's guest: the migration is complete, the guest paused
                run_state_ = "paused";
                completed = status_ != "completed";
                status_ = "completed";
            }
            if (phase == "running") {
                run_state_ = "running";
                resumed = true;
            }
            if (phase == "stopped") {
                run_state_ = "shutdown";
                stopped = true;
            }
        }
        if (completed && caps_->events)
            server_.emit("MIGRATION", {{"status", "completed"}});
        if (resumed)
            server_.emit("RESUME");
        if (stopped)
            server_.emit("STOP");
    };
}

void Monitor::incoming_done(const migration::ReceiveReport& r)
{
    std::lock_guard lk(mu_);
    received_ = r;
    if (r.status != "completed")
        run_state_ = r.guest == "never started" ? "inmigrate" : "shutdown";
    const std::string s = r.status == "completed" ? "completed" : "failed";
    if (caps_->events && s != status_)
        server_.emit("MIGRATION", {{"status", s}});
    status_ = s;
    cv_.notify_all();
}

json Monitor::destination_migration_info() const
{
    std::lock_guard lk(mu_);
    if (status_.empty())
        return json::object();
    json j = {{"status", status_}};
    j["x-minivmm-phase"] = incoming_phase_;
    j["x-minivmm-listen"] = incoming_uri_;
    if (received_) {
        const migration::ReceiveReport& r = *received_;
        j["total-time"] = ms(r.total_ms);
        if (r.status != "completed")
            j["error-desc"] = r.error;
        j["x-minivmm-received"] = {{"pages", r.pages}, {"zero_pages", r.zero_pages}, {"bytes", r.bytes}};
        j["x-minivmm-verification"] = {{"verified", r.verified},
                                       {"switchover_pages_checked", r.verify_pages_checked},
                                       {"switchover_mismatches", r.verify_mismatches},
                                       {"stamp_pages_checked", r.pages_checked},
                                       {"stamp_mismatches", r.mismatches}};
        j["x-minivmm-guest"] = r.guest;
    }
    {
        if (incoming_postcopy_ && caps_->postcopy_blocktime) {
            // QEMU's destination figures (postcopy-blocktime capability; the
            // latency ones as QEMU 10.1 added them), once every page is here.
            const migration::PostcopyDestinationFigures& f = *incoming_postcopy_;
            std::vector<uint64_t> vb, vl;
            for (double b : f.vcpu_blocktime_ms)
                vb.push_back(static_cast<uint64_t>(std::llround(b)));
            for (double l : f.vcpu_latency_ns)
                vl.push_back(static_cast<uint64_t>(std::llround(l)));
            j["postcopy-blocktime"] = ms(f.blocktime_ms);
            j["postcopy-vcpu-blocktime"] = vb;
            j["postcopy-latency"] = static_cast<uint64_t>(std::llround(f.latency_ns));
            j["postcopy-vcpu-latency"] = vl;
            j["postcopy-non-vcpu-latency"] = static_cast<uint64_t>(std::llround(f.non_vcpu_latency_ns));
            j["postcopy-latency-dist"] = f.latency_dist;
        }
    }
    return j;
}

}  // namespace mvm::qmp
