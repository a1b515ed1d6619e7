// QMP migration on the source (QEMU qapi/migration.json): migrate, migrate_cancel,
// migrate-start-postcopy, query-migrate while it runs and after.
#include "cli/qmp/monitor_impl.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <iterator>
#include <cstdlib>
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "memory/backing.hpp"
#include "migration/transport/tcp.hpp"
#include "migration/file.hpp"
#include "numa/placement.hpp"
#include "numa/policy.hpp"

namespace mvm::qmp {

using migration::Phase;

migration::MigrateOptions Monitor::options_from_params(const std::string& uri) const
{
    const Params& p = *params_;
    migration::MigrateOptions o;
    o.to = uri;
    o.tracker = tracker_->mode();
    o.max_downtime_ms = p.downtime_limit_ms;
    o.max_iterations = p.max_iterations;
    o.timeout_s = p.timeout_s;
    o.bandwidth = p.max_bandwidth;
    o.verify = p.verify;
    o.validate_uuid = caps_->validate_uuid;
    o.tls = tls_from_params(true);
    o.post_run_s = p.post_run_s;
    o.channels = caps_->multifd ? p.multifd_channels : p.channels;
    o.compress = p.compression;
    o.mapped_ram = caps_->mapped_ram;
    o.direct_io = p.direct_io;
    o.throttle_initial = p.throttle_initial;
    o.throttle_increment = p.throttle_increment;
    o.throttle_max = p.throttle_max;
    if (caps_->auto_converge)
        o.throttle = migration::Throttle::AutoConverge;
    if (caps_->dirty_limit) {
        o.throttle = migration::Throttle::DirtyLimit;
        o.dirty_limit = p.dirty_limit_pages;
    }
    // QEMU's postcopy-ram: postcopy is possible, and starts only when
    // migrate-start-postcopy asks for it.
    o.postcopy = caps_->postcopy_ram;
    o.postcopy_on_request = true;
    o.postcopy_bandwidth = p.max_postcopy_bandwidth;
    o.postcopy_preempt = caps_->postcopy_ram && caps_->postcopy_preempt;
    return o;
}

json Monitor::migrate_cmd(const json& args)
{
    Args a(args, {"uri", "channels", "detach", "resume", "blk", "inc"});
    if (role_ == Role::Destination)
        throw QmpError("migrate: this is a destination (minivmm receive); migrate from the source");
    if (a.boolean_or("resume", false))
        return migrate_resume(migration_uri(a));
    if (a.boolean_or("blk", false) || a.boolean_or("inc", false))
        throw QmpError("migrate: block migration is not supported (minivmm's guest has no disks)");
    std::string uri = migration_uri(a);
    if (uri.rfind("tcp:", 0) != 0 && uri.rfind("unix:", 0) != 0 && uri.rfind("fd:", 0) != 0 &&
        uri.rfind("file:", 0) != 0)
        throw QmpError(fmt::format("migrate: uri '{}' is not supported; minivmm migrates over tcp:HOST:PORT, "
                                   "unix:PATH, fd:NAME or file:PATH",
                                   uri));
    const bool owned = uri.rfind("fd:", 0) == 0 || uri.rfind("file:/dev/fdset/", 0) == 0;
    uri = take_fdset_uri(take_fd_uri(uri, "migrate"), true, "migrate");
    try {
        const bool to_file = file_target(uri);
        if (!to_file) {
            try {
                migration::parse_endpoint("uri", uri, true);  // port 0 as in QEMU: the migration fails to connect
            } catch (const std::exception& e) {
                throw QmpError(fmt::format("migrate: {}", e.what()));
            }
        }
        migration::MigrateOptions o;
        {
            std::lock_guard lk(mu_);
            if (owned && caps_->postcopy_preempt && caps_->postcopy_ram)
                throw QmpError("migrate: postcopy-preempt over fd: is not supported: a socket descriptor carries "
                               "one channel, preempt needs a second; use tcp: or unix:");
            if (owned && caps_->multifd && !(to_file && caps_->mapped_ram))
                throw QmpError("migrate: multifd over fd: is not supported: a socket descriptor carries one channel; "
                               "turn the multifd capability off");
            o = options_from_params(uri);
            if (owned && !(to_file && caps_->mapped_ram))
                o.channels = 1;
        }
        start_migration(o);
    } catch (...) {
        if (owned)  // the descriptor is the migration's: one that did not start closes it
            ::close(std::atoi(uri.c_str() + 3));
        throw;
    }
    return json::object();
}

// A file: URI (or fd: naming a file): true, once what QEMU refuses with one
// is refused; mapped-ram without one is refused too.
bool Monitor::file_target(const std::string& uri) const
{
    std::optional<migration::FileUri> f;
    try {
        f = migration::parse_file_uri("uri", uri);
    } catch (const std::exception& e) {
        throw QmpError(e.what());  // QEMU's "file URI has bad offset ..."
    }
    std::lock_guard lk(mu_);
    if (!f) {
        if (caps_->mapped_ram)
            throw QmpError("Mapped-ram migration requires a file: URI (capability mapped-ram is on)");
        return false;
    }
    if (caps_->postcopy_ram)
        throw QmpError("migrate: postcopy-ram: a file has no return path for the pages the guest asks for; turn the "
                       "capability off");
    if (caps_->multifd && !caps_->mapped_ram)
        throw QmpError("Migration requires multi-channel URIs (e.g. tcp): multifd to a file needs capability "
                       "mapped-ram");
    if (caps_->mapped_ram && params_->compression.zstd)
        throw QmpError("Mapped-ram migration is incompatible with multifd compression");
    if (params_->direct_io && !caps_->mapped_ram)
        throw QmpError("direct-io needs capability mapped-ram");
    if (!params_->tls_creds.empty())
        throw QmpError(fmt::format("migrate: tls-creds '{}': a file is not a connection; set tls-creds to null",
                                   params_->tls_creds));
    return true;
}

// What the migrating thread tells the monitor: statuses and events as QEMU's,
// pre-switchover's wait, postcopy's pauses (mu_ held by the caller).
migration::SenderEvents Monitor::sender_events()
{
    migration::SenderEvents ev;
    const bool pause = caps_->pause_before_switchover;
    ev.on_phase = [this, pause](Phase p) {
        if (p == Phase::Stop)
            set_run_state("finish-migrate");
        // pre-switchover comes first, then device; postcopy-active once its pages flow (on_postcopy_status)
        bool after_postcopy;
        {
            std::lock_guard lk2(mu_);
            after_postcopy = status_ == "postcopy-active";  // QEMU: postcopy-active, then completed
        }
        if (p != Phase::Done && p != Phase::Postcopy && !(p == Phase::Stop && pause) &&
            !(p == Phase::Destination && after_postcopy))
            set_status(status_of(p));
    };
    if (pause)
        ev.before_switchover = [this] { pre_switchover(); };
    ev.on_sync = [this](uint64_t n) {
        bool events;
        {
            std::lock_guard lk2(mu_);
            events = caps_->events;
        }
        if (events)
            server_.emit("MIGRATION_PASS", {{"pass", n}});
    };
    ev.postcopy_paused = [this](const std::string&) { return wait_resume(); };
    ev.on_postcopy_status = [this](const char* st) {
        if (*st)
            set_status(st);
    };
    ev.on_source = [this](bool running) {
        set_run_state(running ? "running" : "finish-migrate");
        server_.emit(running ? "RESUME" : "STOP");
    };
    return ev;
}

void Monitor::start_migration(const migration::MigrateOptions& o)
{
    if (!tracker_)
        throw QmpError("migrate: this command's guest cannot be migrated");
    if (!migrating_.load())
        join_migration();  // the previous one, finished (its thread may still be saying so)
    std::lock_guard lk(mu_);
    if (migrating_.load())
        throw QmpError("There's a migration process in progress");
    if (run_state_ == "postmigrate")
        throw QmpError("migrate: the guest was migrated away already; this source is parked for good");
    if (rate_->status == "measuring" && rate_->mode != "page-sampling")
        throw QmpError("migrate: calc-dirty-rate is logging dirty pages; wait for query-dirty-rate to say measured");
    if (migration_thread_.joinable())
        throw QmpError("There's a migration process in progress");  // finishing, right now
    migration::SenderEvents ev = sender_events();
    // The Sender's constructor opens nothing (setup() connects): a bad
    // address is found on the migration's thread and reported as failed.
    migration::MigrateOptions opt = o;
    opt.source_stopped = paused_;  // sent as it stands; the destination holds it paused until cont
    sender_ = std::make_unique<migration::Sender>(vm_, *tracker_, opt, &g_stop_signal, hooks_, std::move(ev));
    rates_ = Rates{};
    last_.reset();
    cancelling_ = false;
    continue_requested_ = false;
    status_ = "setup";
    migrating_ = true;
    migration_thread_ = std::thread([this] {
        migration::run_phases(*sender_);
        migration::MigrateReport r = sender_->report();
        const bool completed = r.status == "completed";
        {
            std::lock_guard lk2(mu_);
            finished_.push_back(r);
            last_ = r;
            if (completed) {
                handed_over_ = true;
                run_state_ = "postmigrate";
            } else if (r.source_state == "parked") {
                run_state_ = "postmigrate";  // lost after the switchover: parked, not resumed
                handed_over_ = true;
            } else {
                run_state_ = paused_ ? "paused" : "running";  // given back as it was
                reapply_vcpu_limits();
            }
            migrating_ = false;
        }
        set_status(r.status);  // completed | failed | cancelled
        cv_.notify_all();
    });
    // The first MIGRATION event: setup.
    bool events = caps_->events;
    if (events)
        server_.emit("MIGRATION", {{"status", "setup"}});
}

void Monitor::set_status(const std::string& status)
{
    bool changed, events;
    {
        std::lock_guard lk(mu_);
        std::string s = status;
        if (cancelling_ && (s == "active" || s == "device" || s == "setup"))
            s = "cancelling";
        changed = s != status_;
        status_ = s;
        events = caps_->events;
        if (changed && events)
            server_.emit("MIGRATION", {{"status", s}});
    }
}

std::optional<migration::MigrateReport> Monitor::wait_migration()
{
    std::unique_lock lk(mu_);
    cv_.wait(lk, [this] { return !migrating_.load(); });
    lk.unlock();
    join_migration();
    std::lock_guard lk2(mu_);
    return last_;
}

void Monitor::join_migration()
{
    std::thread t;
    {
        std::lock_guard lk(mu_);
        if (!migration_thread_.joinable())
            return;
        t = std::move(migration_thread_);
    }
    t.join();
}

std::vector<migration::MigrateReport> Monitor::finished_migrations() const
{
    std::lock_guard lk(mu_);
    return finished_;
}

bool Monitor::migration_active() const { return migrating_.load(); }

json Monitor::migrate_cancel()
{
    std::lock_guard lk(mu_);
    // On a destination there is no outgoing migration: nothing to cancel, as in QEMU.
    if (role_ == Role::Destination || !migrating_.load() || !sender_)
        return json::object();  // QEMU: nothing to cancel is not an error
    cancelling_ = true;
    sender_->cancel();
    cv_.notify_all();  // a pre-switchover wait ends
    if (status_ != "cancelling") {
        status_ = "cancelling";
        if (caps_->events)
            server_.emit("MIGRATION", {{"status", "cancelling"}});
    }
    return json::object();
}

// QEMU's pause-before-switchover: the source is parked, the migration waits in
// pre-switchover for migrate-continue (or a cancel), then goes on to device.
void Monitor::pre_switchover()
{
    set_status("pre-switchover");
    std::unique_lock lk(mu_);
    // A signal (Ctrl-C) ends the wait too; the Sender then sees it as a cancel.
    while (!cv_.wait_for(lk, std::chrono::milliseconds(100),
                         [this] { return continue_requested_ || cancelling_ || g_stop_signal.load(); })) {
    }
    continue_requested_ = false;
    const bool go_on = !cancelling_ && !g_stop_signal.load();
    lk.unlock();
    if (go_on)
        set_status("device");
}

// QEMU's migrate-continue: leaves the state the migration paused in.
json Monitor::migrate_continue(const json& args)
{
    Args a(args, {"state"});
    const std::string state = a.str("state");
    static const char* const kStates[] = {"none",      "setup",          "cancelling", "cancelled",
                                          "active",    "postcopy-active", "postcopy-paused",
                                          "postcopy-recover-setup",      "postcopy-recover",
                                          "completed", "failed",         "colo",       "pre-switchover",
                                          "device",    "wait-unplug"};
    if (std::find(std::begin(kStates), std::end(kStates), state) == std::end(kStates))
        throw QmpError(fmt::format("Parameter 'state' does not accept value '{}'", state));
    std::lock_guard lk(mu_);
    const std::string now = status_.empty() ? "none" : status_;
    if (now != state || !migrating_.load())
        throw QmpError(fmt::format("Migration not in expected state: {}", now));
    continue_requested_ = true;
    cv_.notify_all();
    return json::object();
}

// QEMU's migrate with resume: true: a paused postcopy goes on over `uri`.
json Monitor::migrate_resume(const std::string& uri)
{
    if (role_ == Role::Destination)
        throw QmpError("migrate: this is a destination; recover it with migrate-recover, resume on the source");
    {
        std::lock_guard lk(mu_);
        if (!migrating_.load() || !sender_ || sender_->postcopy_status() != "postcopy-paused")
            throw QmpError("Cannot resume if there is no paused migration");
    }
    if (uri.rfind("tcp:", 0) != 0 && uri.rfind("unix:", 0) != 0 && uri.rfind("fd:", 0) != 0)
        throw QmpError(fmt::format("migrate: uri '{}': a paused postcopy resumes over tcp:HOST:PORT, unix:PATH or "
                                   "fd:NAME",
                                   uri));
    const std::string u = take_fd_uri(uri, "migrate");
    try {
        migration::parse_endpoint("uri", u, true);
    } catch (const std::exception& e) {
        if (u.rfind("fd:", 0) == 0)
            ::close(std::atoi(u.c_str() + 3));
        throw QmpError(fmt::format("migrate: {}", e.what()));
    }
    std::lock_guard lk(mu_);
    resume_uri_ = u;
    cv_.notify_all();
    return json::object();
}

// The migrating thread, paused in postcopy: until migrate resume:true names
// an address ("" on quit or a stop signal: the guest is lost).
std::string Monitor::wait_resume()
{
    std::unique_lock lk(mu_);
    while (resume_uri_.empty() && !quit_.load() && !g_stop_signal.load())
        cv_.wait_for(lk, std::chrono::milliseconds(100));
    return std::exchange(resume_uri_, std::string());
}

// QEMU's migrate-pause: cuts postcopy's connection as a network failure
// would; both sides pause (postcopy-paused), nothing is lost.
json Monitor::migrate_pause()
{
    const char* const kOnly = "migrate-pause is currently only supported during postcopy-active or postcopy-recover "
                              "state";
    std::lock_guard lk(mu_);
    if (role_ == Role::Destination) {
        if ((status_ != "postcopy-active" && status_ != "postcopy-recover") || !pause_switch_ ||
            !pause_switch_->pause())
            throw QmpError(kOnly);
        return json::object();
    }
    if (!migrating_.load() || !sender_ || !sender_->pause_postcopy())
        throw QmpError(kOnly);
    return json::object();
}

// QEMU's migrate-start-postcopy: the next pre-copy round switches to postcopy.
json Monitor::migrate_start_postcopy()
{
    std::lock_guard lk(mu_);
    if (role_ == Role::Destination)
        throw QmpError("migrate-start-postcopy: this is a destination; start postcopy on the source");
    if (!caps_->postcopy_ram)
        throw QmpError("Enable postcopy with migrate-set-capabilities before the start of migration");
    if (!migrating_.load() || !sender_)
        throw QmpError("Postcopy must be started after migration has been started");
    sender_->start_postcopy();
    return json::object();
}

// query-migrate's mbps and pages-per-second while a migration runs. QEMU
// computes them over its last 100 ms (migration_update_counters, every
// BUFFER_DELAY); minivmm's sent counters move by whole batches (up to 1 MiB
// per channel), so a 100 ms window would read 0 or a burst at a paced
// bandwidth: these are over the last second instead (from the first 100 ms on).
void Monitor::tick()
{
    std::lock_guard lk(mu_);
    if (role_ == Role::Source)
        sample_progress();
    if (!migrating_.load() || !sender_)
        return;
    const migration::LiveFigures l = sender_->live();
    auto& w = rates_.window;
    w.push_back({l.elapsed_ms, l.transferred_bytes, l.sent_pages});
    while (w.size() > 2 && l.elapsed_ms - w[1].t_ms >= 1000)
        w.pop_front();
    const double s = (w.back().t_ms - w.front().t_ms) / 1e3;
    if (s >= 0.09) {
        rates_.mbps = static_cast<double>(w.back().bytes - w.front().bytes) * 8 / 1e6 / s;
        rates_.pages_per_s = static_cast<double>(w.back().pages - w.front().pages) / s;
    }
}

json Monitor::query_migrate() const
{
    return role_ == Role::Source ? source_migration_info() : destination_migration_info();
}

json Monitor::source_migration_info() const
{
    std::lock_guard lk(mu_);
    if (status_.empty())
        return json::object();  // no migration yet: QEMU answers {}
    json j;
    j["status"] = status_;
    if (migrating_.load() && sender_)
        live_migration_info(j);
    else if (last_)
        finished_migration_info(j, *last_);
    return j;
}

// While it runs: the Sender's live figures (under mu_).
void Monitor::live_migration_info(json& j) const
{
    const uint32_t ring_entries = vm_.config().dirty_ring_bytes / 16;
    const migration::LiveFigures l = sender_->live();
    const uint64_t normal = l.sent_pages - std::min(l.sent_pages, l.zero_pages);
    j["total-time"] = ms(l.elapsed_ms);
    if (l.setup_ms >= 0)
        j["setup-time"] = ms(l.setup_ms);
    j["expected-downtime"] = ms(l.expected_downtime_ms);
    j["ram"] = {{"transferred", l.transferred_bytes},
                {"remaining", l.remaining_pages * 4096},
                {"total", l.total_bytes},
                {"duplicate", l.zero_pages},
                {"normal", normal},
                {"normal-bytes", normal * 4096},
                {"dirty-pages-rate", static_cast<int64_t>(l.dirty_rate)},
                {"mbps", rates_.mbps},
                {"dirty-sync-count", l.dirty_syncs},
                {"postcopy-requests", 0},
                {"page-size", 4096},
                {"multifd-bytes", caps_->multifd ? l.transferred_bytes : 0},
                {"pages-per-second", static_cast<uint64_t>(rates_.pages_per_s)},
                {"precopy-bytes", l.precopy_bytes},
                {"downtime-bytes", l.downtime_bytes},
                {"postcopy-bytes", l.postcopy_bytes},
                {"dirty-sync-missed-zero-copy", 0}};
    if (caps_->auto_converge)
        j["cpu-throttle-percentage"] = l.throttle_pct;
    if (caps_->dirty_limit && ring_entries && l.dirty_rate > 0) {
        // QEMU's figures: how long a vCPU's ring takes to fill at the rate
        // it dirtied at before the cap (the current one if none was cut),
        // and the idle the cap adds per fill for the vCPU it cut most.
        const double natural = l.dirty_limit_cut_rate > 0 ? l.dirty_limit_cut_rate
                                                         : l.dirty_rate / std::max<uint32_t>(1, vm_.vcpu_count());
        const double full_us = ring_entries / natural * 1e6;
        j["dirty-limit-ring-full-time"] = static_cast<uint64_t>(full_us);
        const double capped_us = l.dirty_limit ? ring_entries / static_cast<double>(l.dirty_limit) * 1e6 : 0;
        j["dirty-limit-throttle-time-per-round"] = static_cast<uint64_t>(std::max(0.0, capped_us - full_us));
    }
    j["x-minivmm-phase"] = migration::phase_name(l.phase);
    j["x-minivmm-rounds"] = l.rounds;
}

// After it ended: the last report's figures (under mu_).
void Monitor::finished_migration_info(json& j, const migration::MigrateReport& r) const
{
    const uint64_t normal = r.pages - std::min(r.pages, r.zero_pages);
    j["total-time"] = ms(r.total_ms);
    j["setup-time"] = ms(r.setup_ms);
    if (r.status == "completed")
        j["downtime"] = ms(r.downtime_ms);
    else
        j["error-desc"] = r.error;
    j["expected-downtime"] = ms(r.expected_downtime_ms);
    j["ram"] = {{"transferred", r.transferred_bytes},
                {"remaining", r.status == "completed" ? 0 : r.remaining_bytes},  // the report's is the stop set
                {"total", sender_ ? sender_->live().total_bytes : 0},
                {"duplicate", r.zero_pages},
                {"normal", normal},
                {"normal-bytes", normal * 4096},
                {"dirty-pages-rate", static_cast<int64_t>(r.rounds.empty() ? 0 : r.rounds.back().dirty_rate)},
                {"mbps", r.mbps},
                {"dirty-sync-count", r.dirty_syncs},
                {"postcopy-requests", r.postcopy.requests},
                {"page-size", 4096},
                {"multifd-bytes", caps_->multifd ? r.transferred_bytes : 0},
                {"pages-per-second", static_cast<uint64_t>(r.pages_per_second)},
                {"precopy-bytes", r.precopy_bytes},
                {"downtime-bytes", r.downtime_bytes},
                {"postcopy-bytes", r.postcopy.bytes},
                {"dirty-sync-missed-zero-copy", 0}};
    if (caps_->auto_converge && !r.rounds.empty())
        j["cpu-throttle-percentage"] = r.rounds.back().throttle_pct;
    j["x-minivmm-phase"] = r.status == "completed" ? "done" : r.phase;
    j["x-minivmm-rounds"] = r.rounds.size();
    j["x-minivmm-source-state"] = r.source_state;
    j["x-minivmm-destination-state"] = r.destination_state;
    j["x-minivmm-verification"] = {{"verified", r.verified},
                                   {"switchover_pages_checked", r.switchover_pages_checked},
                                   {"switchover_mismatches", r.switchover_mismatches},
                                   {"stamp_pages_checked", r.pages_checked},
                                   {"stamp_mismatches", r.mismatches}};
    if (r.downtime_guest_ms >= 0)
        j["x-minivmm-downtime-guest-ms"] = r.downtime_guest_ms;
    j["x-minivmm-vcpu-stall-ms"] = r.vcpu_stall_ms;  // longest no-progress gap per vCPU during pre-copy
}

}  // namespace mvm::qmp
