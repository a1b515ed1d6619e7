#include "cli/qmp/monitor.hpp"

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

namespace {

using migration::Phase;

// The QAPI schema whose names minivmm follows (query-version reports it).
constexpr int kQemuMajor = 9, kQemuMinor = 2, kQemuMicro = 0;

// Every capability QEMU 9.2 knows; minivmm implements the first six.
const char* const kSupportedCaps[] = {"auto-converge", "dirty-limit", "multifd", "events", "postcopy-ram",
                                      "postcopy-blocktime"};
const char* const kOtherCaps[] = {"xbzrle",           "rdma-pin-all",       "zero-blocks",
                                  "x-colo",           "release-ram",        "return-path",      "pause-before-switchover",
                                  "dirty-bitmaps",    "late-block-activate", "x-ignore-shared",
                                  "validate-uuid",    "background-snapshot", "zero-copy-send",  "postcopy-preempt",
                                  "switchover-ack",   "mapped-ram"};
// QEMU parameters minivmm does not implement (setting one is an error naming it).
const char* const kOtherParams[] = {
    "announce-initial", "announce-max",     "announce-rounds",     "announce-step",     "throttle-trigger-threshold",
    "cpu-throttle-tailslow", "tls-creds",   "tls-hostname",        "tls-authz",         "avail-switchover-bandwidth",
    "x-checkpoint-delay", "xbzrle-cache-size", "max-postcopy-bandwidth", "multifd-zlib-level", "multifd-qatzip-level",
    "block-bitmap-mapping", "x-vcpu-dirty-limit-period", "mode", "zero-page-detection", "direct-io"};

const char* status_of(Phase p)
{
    switch (p) {
    case Phase::Idle:
    case Phase::Setup: return "setup";
    case Phase::Bulk:
    case Phase::Precopy: return "active";
    case Phase::Postcopy: return "postcopy-active";
    case Phase::Stop:
    case Phase::Destination: return "device";
    case Phase::Done: return "active";  // completed / failed / cancelled come from the report
    }
    return "active";
}

int64_t ms(double v) { return static_cast<int64_t>(std::llround(v)); }

}  // namespace

struct Monitor::Params {
    uint64_t max_bandwidth = 0;  // bytes/s, 0: unlimited
    double downtime_limit_ms = 300;
    uint32_t multifd_channels = 2;
    migration::Compression compression;
    uint32_t throttle_initial = 20, throttle_increment = 10, throttle_max = 99;
    uint64_t dirty_limit_pages = 256;  // per vCPU, pages/s (vcpu-dirty-limit is MB/s: 256 pages per MiB)
    uint32_t channels = 0;             // without multifd: the command line's --channels (0: one per virtual node)
    uint32_t max_iterations = 30;
    double timeout_s = 120;
    bool verify = true;
    double post_run_s = 2;
};

struct Monitor::Capabilities {
    bool auto_converge = false, dirty_limit = false, multifd = false, events = false;
    bool postcopy_ram = false, postcopy_blocktime = false;
};

struct Monitor::DirtyRateJob {
    std::string status = "unstarted";  // unstarted | measuring | measured
    int64_t start_time = 0;            // seconds (CLOCK_REALTIME), as QEMU
    int64_t calc_time = 0;             // in calc_time_unit
    std::string unit = "second";
    uint64_t sample_pages = 512;
    std::string mode = "page-sampling";
    std::optional<engines::RateResult> result;
    std::string error;
};

Monitor::Monitor(const std::string& option, const Address& addr, StressVm& vm, Role role)
    : vm_(vm), role_(role),
      server_(option, addr,
              {{"qemu", {{"major", kQemuMajor}, {"minor", kQemuMinor}, {"micro", kQemuMicro}}},
               {"package", fmt::format("minivmm (QMP with QEMU {}.{}'s names; a subset: README \"QMP\")", kQemuMajor,
                                       kQemuMinor)}}),
      params_(std::make_unique<Params>()), caps_(std::make_unique<Capabilities>()),
      rate_(std::make_unique<DirtyRateJob>())
{
    run_state_ = role == Role::Source ? "running" : "inmigrate";
    add_commands();
    server_.on_tick([this] { tick(); });
}

Monitor::~Monitor()
{
    shutdown();
    server_.stop();
}

void Monitor::set_source(dirty::Tracker* tracker, const migration::MigrateOptions& d, migration::SenderHooks hooks)
{
    tracker_ = tracker;
    hooks_ = std::move(hooks);
    std::lock_guard lk(mu_);
    Params& p = *params_;
    p.max_bandwidth = d.bandwidth;
    p.downtime_limit_ms = d.max_downtime_ms;
    p.channels = d.channels;
    p.compression = d.compress;
    p.max_iterations = d.max_iterations;
    p.timeout_s = d.timeout_s;
    p.verify = d.verify;
    p.post_run_s = d.post_run_s;
    p.throttle_initial = d.throttle_initial;
    p.throttle_increment = d.throttle_increment;
    p.throttle_max = d.throttle_max;
    caps_->auto_converge = d.throttle == migration::Throttle::AutoConverge;
    caps_->dirty_limit = d.throttle == migration::Throttle::DirtyLimit;
    if (caps_->dirty_limit)
        p.dirty_limit_pages = d.dirty_limit;
}

void Monitor::start() { server_.start(); }

void Monitor::add_commands()
{
    // A command without arguments refuses any (QEMU's "Parameter 'x' is unexpected").
    auto no_args = [this](const char* name, auto fn) {
        server_.add(name, [fn](const json& a) {
            Args(a, {});
            return fn();
        });
    };
    auto member = [this](auto fn) { return [this, fn] { return (this->*fn)(); }; };
    no_args("query-status", member(&Monitor::query_status));
    no_args("stop", member(&Monitor::stop_vm));
    no_args("cont", member(&Monitor::cont_vm));
    no_args("quit", member(&Monitor::quit));
    no_args("query-version", member(&Monitor::query_version));
    no_args("query-commands", [this] {
        json v = json::array();
        for (const auto& n : server_.commands())
            v.push_back({{"name", n}});
        return v;
    });
    server_.add("migrate", [this](const json& a) { return migrate_cmd(a); });
    server_.add("migrate-incoming", [this](const json& a) { return migrate_incoming(a); });
    no_args("migrate_cancel", member(&Monitor::migrate_cancel));
    no_args("migrate-start-postcopy", member(&Monitor::migrate_start_postcopy));
    no_args("query-migrate", member(&Monitor::query_migrate));
    server_.add("migrate-set-parameters", [this](const json& a) { return set_parameters(a); });
    no_args("query-migrate-parameters", member(&Monitor::query_parameters));
    server_.add("migrate-set-capabilities", [this](const json& a) { return set_capabilities(a); });
    no_args("query-migrate-capabilities", member(&Monitor::query_capabilities));
    server_.add("calc-dirty-rate", [this](const json& a) { return calc_dirty_rate(a); });
    server_.add("query-dirty-rate", [this](const json& a) { return query_dirty_rate(a); });
    server_.add("query-stats", [this](const json& a) { return query_stats(a); });
    server_.add("x-minivmm-query-placement", [this](const json& a) { return query_placement(a); });
}

// ---- run state ----------------------------------------------------------------------

void Monitor::set_run_state(const std::string& s)
{
    std::lock_guard lk(mu_);
    run_state_ = s;
}

bool Monitor::stopped() const
{
    std::lock_guard lk(mu_);
    return paused_;
}

json Monitor::query_status() const
{
    std::lock_guard lk(mu_);
    return {{"running", run_state_ == "running"}, {"status", run_state_}};
}

json Monitor::stop_vm()
{
    if (role_ == Role::Destination)
        throw QmpError("stop: the destination's guest belongs to the incoming migration and its post-run check; "
                       "stop and cont act on a source");
    {
        std::lock_guard lk(mu_);
        if (migrating_.load())
            throw QmpError("stop: a migration is in progress and parks the guest itself; migrate_cancel it first");
        if (run_state_ == "postmigrate")
            throw QmpError("stop: the guest was migrated away; this source is parked for good");
        if (paused_)
            return json::object();
    }
    if (!vm_.park_guests(std::chrono::milliseconds(2000))) {
        vm_.unpark_guests();
        vm_.pause();  // a vCPU that does not park in time is paused by signal
    }
    {
        std::lock_guard lk(mu_);
        paused_ = true;
        run_state_ = "paused";
    }
    server_.emit("STOP");
    return json::object();
}

json Monitor::cont_vm()
{
    if (role_ == Role::Destination)
        throw QmpError("cont: the destination's guest runs by itself once the migration switched over");
    {
        std::lock_guard lk(mu_);
        if (run_state_ == "postmigrate")
            throw QmpError("cont: the guest runs on at its destination since the migration completed; resuming this "
                           "copy would run it twice");
        if (migrating_.load())
            throw QmpError("cont: a migration is in progress");
        if (!paused_)
            return json::object();
    }
    vm_.unpark_guests();
    if (vm_.paused())
        vm_.resume();
    {
        std::lock_guard lk(mu_);
        paused_ = false;
        run_state_ = "running";
    }
    server_.emit("RESUME");
    return json::object();
}

json Monitor::quit()
{
    if (role_ == Role::Destination) {
        std::lock_guard lk(mu_);
        if (incoming_started_ && !received_)
            throw QmpError("quit: a migration is being received; it ends by itself (or kill the process)");
    }
    quit_ = true;
    {
        std::lock_guard lk(mu_);
        if (migrating_.load() && sender_) {  // QEMU's quit ends the process and its migration: cancelled here
            cancelling_ = true;
            sender_->cancel();
        }
    }
    cv_.notify_all();
    server_.emit_after_reply("SHUTDOWN", {{"guest", false}, {"reason", "host-qmp-quit"}});
    return json::object();
}

json Monitor::query_version() const
{
    return {{"qemu", {{"major", kQemuMajor}, {"minor", kQemuMinor}, {"micro", kQemuMicro}}},
            {"package", fmt::format("minivmm (QMP with QEMU {}.{}'s names; a subset: README \"QMP\")", kQemuMajor,
                                    kQemuMinor)}};
}

// ---- migration: source ----------------------------------------------------------------

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
    o.post_run_s = p.post_run_s;
    o.channels = caps_->multifd ? p.multifd_channels : p.channels;
    o.compress = p.compression;
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
    return o;
}

json Monitor::migrate_cmd(const json& args)
{
    Args a(args, {"uri", "channels", "detach", "resume", "blk", "inc"});
    if (role_ == Role::Destination)
        throw QmpError("migrate: this is a destination (minivmm receive); migrate from the source");
    if (a.has("channels"))
        throw QmpError("migrate: the 'channels' form of the address is not supported; use 'uri': 'tcp:HOST:PORT'");
    if (a.boolean_or("resume", false))
        throw QmpError("migrate: resume is for a paused postcopy migration; minivmm does not recover one (a postcopy "
                       "that broke off loses the guest: README \"Postcopy\")");
    if (a.boolean_or("blk", false) || a.boolean_or("inc", false))
        throw QmpError("migrate: block migration is not supported (minivmm's guest has no disks)");
    const std::string uri = a.str("uri");
    if (uri.rfind("tcp:", 0) != 0)
        throw QmpError(fmt::format("migrate: uri '{}' is not supported; minivmm migrates over tcp:HOST:PORT", uri));
    try {
        migration::parse_tcp("uri", uri);
    } catch (const std::exception& e) {
        throw QmpError(fmt::format("migrate: {}", e.what()));
    }
    migration::MigrateOptions o;
    {
        std::lock_guard lk(mu_);
        o = options_from_params(uri);
    }
    start_migration(o);
    return json::object();
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
    if (paused_)
        throw QmpError("migrate: the guest is stopped; cont first (minivmm migrates a running guest)");
    if (rate_->status == "measuring" && rate_->mode != "page-sampling")
        throw QmpError("migrate: calc-dirty-rate is logging dirty pages; wait for query-dirty-rate to say measured");
    if (migration_thread_.joinable())
        throw QmpError("There's a migration process in progress");  // finishing, right now
    migration::SenderEvents ev;
    ev.on_phase = [this](Phase p) {
        if (p == Phase::Stop)
            set_run_state("finish-migrate");
        if (p != Phase::Done)
            set_status(status_of(p));
    };
    ev.on_sync = [this](uint64_t n) {
        bool events;
        {
            std::lock_guard lk2(mu_);
            events = caps_->events;
        }
        if (events)
            server_.emit("MIGRATION_PASS", {{"pass", n}});
    };
    ev.on_source = [this](bool running) {
        set_run_state(running ? "running" : "finish-migrate");
        server_.emit(running ? "RESUME" : "STOP");
    };
    // The Sender's constructor opens nothing (setup() connects): a bad
    // address is found on the migration's thread and reported as failed.
    sender_ = std::make_unique<migration::Sender>(vm_, *tracker_, o, &g_stop_signal, hooks_, std::move(ev));
    rates_ = Rates{};
    last_.reset();
    cancelling_ = false;
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
                run_state_ = "running";
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
    if (role_ == Role::Destination)
        throw QmpError("migrate_cancel: this is a destination; cancel on the source (the receive then ends)");
    if (!migrating_.load() || !sender_)
        return json::object();  // QEMU: nothing to cancel is not an error
    cancelling_ = true;
    sender_->cancel();
    if (status_ != "cancelling") {
        status_ = "cancelling";
        if (caps_->events)
            server_.emit("MIGRATION", {{"status", "cancelling"}});
    }
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
    const uint32_t ring_entries = vm_.config().dirty_ring_bytes / 16;
    if (migrating_.load() && sender_) {
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
                    {"postcopy-bytes", 0},
                    {"dirty-sync-missed-zero-copy", 0}};
        if (caps_->auto_converge)
            j["cpu-throttle-percentage"] = l.throttle_pct;
        if (caps_->dirty_limit && ring_entries && l.dirty_rate > 0) {
            // QEMU's estimate: how long a vCPU's ring takes to fill at the
            // current rate (per vCPU), and the idle the cap adds per fill.
            const double per_vcpu = l.dirty_rate / std::max<uint32_t>(1, vm_.vcpu_count());
            const double full_us = ring_entries / per_vcpu * 1e6;
            j["dirty-limit-ring-full-time"] = static_cast<uint64_t>(full_us);
            const double capped_us = l.dirty_limit ? ring_entries / static_cast<double>(l.dirty_limit) * 1e6 : 0;
            j["dirty-limit-throttle-time-per-round"] = static_cast<uint64_t>(std::max(0.0, capped_us - full_us));
        }
        j["x-minivmm-phase"] = migration::phase_name(l.phase);
        j["x-minivmm-rounds"] = l.rounds;
        return j;
    }
    if (!last_)
        return j;
    const migration::MigrateReport& r = *last_;
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
    return j;
}

// ---- migration: destination ------------------------------------------------------------

json Monitor::migrate_incoming(const json& args)
{
    Args a(args, {"uri", "channels", "exit-on-error"});
    if (role_ == Role::Source)
        throw QmpError("migrate-incoming: this is a source; start the destination with minivmm receive --listen defer");
    if (a.has("channels"))
        throw QmpError("migrate-incoming: the 'channels' form is not supported; use 'uri': 'tcp:ADDR:PORT'");
    const std::string uri = a.str("uri");
    std::lock_guard lk(mu_);
    if (incoming_started_ || !incoming_uri_.empty())
        throw QmpError("The incoming migration has already been started");
    if (uri.rfind("tcp:", 0) != 0)
        throw QmpError(fmt::format("migrate-incoming: uri '{}' is not supported; use tcp:ADDR:PORT", uri));
    try {
        ::close(migration::bind_listener(uri));  // bindable now (receive binds it again at once)
    } catch (const std::exception& e) {
        throw QmpError(fmt::format("migrate-incoming: {}", e.what()));
    }
    incoming_uri_ = uri;
    cv_.notify_all();
    return json::object();
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

migration::PhaseHook Monitor::incoming_hook()
{
    return [this](const char* p) {
        const std::string phase = p;
        bool resumed = false, stopped = false;
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
            if (status_ == "active" && phase == "postcopy") {
                status_ = "postcopy-active";
                if (caps_->events)
                    server_.emit("MIGRATION", {{"status", "postcopy-active"}});
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
    status_ = r.status == "completed" ? "completed" : "failed";
    if (caps_->events)
        server_.emit("MIGRATION", {{"status", status_}});
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

// ---- parameters and capabilities -------------------------------------------------------

json Monitor::set_parameters(const json& args)
{
    static constexpr const char* known[] = {
        "max-bandwidth",          "downtime-limit",   "multifd-channels", "multifd-compression",
        "multifd-zstd-level",     "cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle",
        "vcpu-dirty-limit",       "x-minivmm-max-iterations", "x-minivmm-timeout", "x-minivmm-verify",
        "x-minivmm-post-run"};
    if (!args.is_object())
        throw QmpError("QMP input member 'arguments' must be an object");
    for (const auto& item : args.items()) {
        const std::string k = item.key();
        if (std::find_if(std::begin(known), std::end(known), [&](const char* n) { return k == n; }) != std::end(known))
            continue;
        for (const char* o : kOtherParams)
            if (k == o)
                throw QmpError(fmt::format("Parameter '{}' is not supported by minivmm (README \"QMP\" lists the "
                                           "parameters it takes)",
                                           k));
        throw QmpError(fmt::format("Parameter '{}' is unexpected", k));
    }
    // Check everything first, then apply: a bad member changes nothing.
    Args a(args, known);
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
    if (a.has("downtime-limit"))
        p.downtime_limit_ms = static_cast<double>(ranged("downtime-limit", 0, 2000000));
    if (a.has("multifd-channels"))
        p.multifd_channels = static_cast<uint32_t>(ranged("multifd-channels", 1, 64));
    if (a.has("multifd-compression")) {
        const std::string c = a.str("multifd-compression");
        if (c == "none")
            p.compression.zstd = false;
        else if (c == "zstd")
            p.compression.zstd = true;
        else if (c == "zlib" || c == "qpl" || c == "uadk" || c == "qatzip")
            throw QmpError(fmt::format("Parameter 'multifd-compression': '{}' is not supported by minivmm; use none "
                                       "or zstd",
                                       c));
        else
            throw QmpError(fmt::format("Parameter 'multifd-compression' does not accept value '{}'", c));
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
    if (a.has("x-minivmm-post-run"))
        p.post_run_s = static_cast<double>(ranged("x-minivmm-post-run", 0, 3600));
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
    }
    return json::object();
}

json Monitor::query_parameters() const
{
    std::lock_guard lk(mu_);
    const Params& p = *params_;
    return {{"max-bandwidth", p.max_bandwidth},
            {"downtime-limit", ms(p.downtime_limit_ms)},
            {"multifd-channels", p.multifd_channels},
            {"multifd-compression", p.compression.zstd ? "zstd" : "none"},
            {"multifd-zstd-level", p.compression.level},
            {"cpu-throttle-initial", p.throttle_initial},
            {"cpu-throttle-increment", p.throttle_increment},
            {"max-cpu-throttle", p.throttle_max},
            {"vcpu-dirty-limit", p.dirty_limit_pages / 256},
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
        if (name == "auto-converge")
            c.auto_converge = on;
        else if (name == "dirty-limit")
            c.dirty_limit = on;
        else if (name == "multifd")
            c.multifd = on;
        else if (name == "events")
            c.events = on;
        else if (name == "postcopy-ram")
            c.postcopy_ram = on;
        else if (name == "postcopy-blocktime")
            c.postcopy_blocktime = on;
        else if (std::find_if(std::begin(kOtherCaps), std::end(kOtherCaps), [&](const char* n) { return name == n; }) !=
                 std::end(kOtherCaps)) {
            if (on)
                throw QmpError(fmt::format("Capability '{}' is not supported by minivmm (README \"QMP\" lists the "
                                           "capabilities it implements)",
                                           name));
        } else
            throw QmpError(fmt::format("Parameter 'capability' does not accept value '{}'", name));
    }
    if (c.auto_converge && c.dirty_limit)
        throw QmpError("dirty-limit and auto-converge are mutually exclusive: enable one of them");
    *caps_ = c;
    return json::object();
}

json Monitor::query_capabilities() const
{
    std::lock_guard lk(mu_);
    json v = json::array();
    const bool on[] = {caps_->auto_converge, caps_->dirty_limit, caps_->multifd,
                       caps_->events,        caps_->postcopy_ram, caps_->postcopy_blocktime};
    for (size_t i = 0; i < std::size(kSupportedCaps); i++)
        v.push_back({{"capability", kSupportedCaps[i]}, {"state", on[i]}});
    for (const char* n : kOtherCaps)
        v.push_back({{"capability", n}, {"state", false}});
    return v;
}

// ---- dirty rate -------------------------------------------------------------------------

json Monitor::calc_dirty_rate(const json& args)
{
    Args a(args, {"calc-time", "calc-time-unit", "sample-pages", "mode"});
    if (role_ == Role::Destination)
        throw QmpError("calc-dirty-rate: measures a source's guest; the destination's runs only for its post-run check");
    const int64_t t = a.integer("calc-time");
    const std::string unit = a.str_or("calc-time-unit", "s");
    if (unit != "s" && unit != "ms")
        throw QmpError(fmt::format("Parameter 'calc-time-unit' does not accept value '{}'", unit));
    const double seconds = unit == "s" ? static_cast<double>(t) : static_cast<double>(t) / 1e3;
    if (seconds < 0.1 || seconds > 60)
        throw QmpError("Parameter 'calc-time' is out of range: 0.1 to 60 seconds");
    const std::string mode = a.str_or("mode", "page-sampling");
    engines::RateMode m;
    if (mode == "page-sampling")
        m = engines::RateMode::Sampling;
    else if (mode == "dirty-ring")
        m = engines::RateMode::Ring;
    else if (mode == "dirty-bitmap")
        m = engines::RateMode::Bitmap;
    else
        throw QmpError(fmt::format("Parameter 'mode' does not accept value '{}'", mode));
    if (a.has("sample-pages") && m != engines::RateMode::Sampling)
        throw QmpError("Parameter 'sample-pages' applies to mode page-sampling only");
    const int64_t sample = a.int_or("sample-pages", 512);
    if (sample < 128 || sample > 4096)
        throw QmpError("Parameter 'sample-pages' is out of range [128, 4096]");
    if (m != engines::RateMode::Sampling) {
        const bool ring = tracker_ && tracker_->mode() == dirty::Mode::Ring;
        if (!tracker_)
            throw QmpError("calc-dirty-rate: this guest has no dirty tracker; use mode page-sampling");
        if (m == engines::RateMode::Ring && !ring)
            throw QmpError("mode dirty-ring is not enabled: start the guest with --ring SIZE (QEMU: -accel "
                           "kvm,dirty-ring-size=N), or use dirty-bitmap or page-sampling");
        if (m == engines::RateMode::Bitmap && ring)
            throw QmpError("mode dirty-bitmap is not enabled: this guest logs with dirty rings (--ring); use "
                           "dirty-ring or page-sampling");
    }
    std::lock_guard lk(mu_);
    if (rate_->status == "measuring")
        throw QmpError("the dirty rate is already being measured");
    if (m != engines::RateMode::Sampling && migrating_.load())
        throw QmpError("calc-dirty-rate: a migration is logging dirty pages; use mode page-sampling meanwhile");
    if (paused_ || run_state_ != "running")
        throw QmpError(fmt::format("calc-dirty-rate: the guest is not running ({})", run_state_));
    if (rate_thread_.joinable())
        rate_thread_.join();
    auto job = std::make_unique<DirtyRateJob>();
    job->status = "measuring";
    job->start_time = static_cast<int64_t>(::time(nullptr));
    job->calc_time = t;
    job->unit = unit == "s" ? "second" : "millisecond";
    job->sample_pages = static_cast<uint64_t>(sample);
    job->mode = mode;
    rate_ = std::move(job);
    rate_cancel_ = false;
    engines::RateOptions o;
    o.mode = m;
    o.period_s = seconds;
    o.baseline_s = 0;
    o.warmup_s = 0;
    o.sample_pages_per_gib = static_cast<uint64_t>(sample);
    o.running = true;
    o.tracker = m == engines::RateMode::Sampling ? nullptr : tracker_;
    o.cancel = &rate_cancel_;
    rate_thread_ = std::thread([this, o] {
        std::optional<engines::RateResult> r;
        std::string err;
        try {
            r = engines::measure_dirty_rate(vm_, o);
        } catch (const std::exception& e) {
            err = e.what();
        }
        std::lock_guard lk2(mu_);
        rate_->result = std::move(r);
        rate_->error = err;
        rate_->status = "measured";
    });
    return json::object();
}

json Monitor::query_dirty_rate(const json& args) const
{
    Args a(args, {"calc-time-unit"});
    const std::string unit = a.str_or("calc-time-unit", "");
    if (!unit.empty() && unit != "s" && unit != "ms")
        throw QmpError(fmt::format("Parameter 'calc-time-unit' does not accept value '{}'", unit));
    std::lock_guard lk(mu_);
    const DirtyRateJob& r = *rate_;
    int64_t calc_time = r.calc_time;
    std::string out_unit = r.unit;
    if (unit == "ms" && r.unit == "second") {
        calc_time *= 1000;
        out_unit = "millisecond";
    } else if (unit == "s" && r.unit == "millisecond") {
        calc_time /= 1000;
        out_unit = "second";
    }
    json j = {{"status", r.status},          {"start-time", r.start_time},     {"calc-time", calc_time},
              {"calc-time-unit", out_unit}, {"sample-pages", r.sample_pages}, {"mode", r.mode}};
    if (r.status == "measured" && r.result) {
        const engines::RateWindow& w = r.result->total;
        j["dirty-rate"] = static_cast<int64_t>(std::llround(w.mib_per_s));  // QEMU's MB/s: MiB per second
        if (r.mode == "dirty-ring") {
            json v = json::array();
            for (const auto& c : w.vcpus)
                v.push_back({{"id", c.vcpu}, {"dirty-rate", static_cast<int64_t>(std::llround(c.mib_per_s))}});
            j["vcpu-dirty-rate"] = v;
        }
        j["x-minivmm-saturated"] = w.lower_bound;  // every page that could be dirtied was: a lower bound
        j["x-minivmm-dirty-pages-per-s"] = w.pages_per_s;
        j["x-minivmm-report"] = engines::to_json(*r.result);
    }
    if (!r.error.empty())
        j["x-minivmm-error"] = r.error;
    return j;
}

// ---- KVM statistics ---------------------------------------------------------------------

json Monitor::query_stats(const json& args) const
{
    Args a(args, {"target", "providers", "vcpus"});
    const std::string target = a.str("target");
    if (target != "vm" && target != "vcpu")
        throw QmpError(target == "cryptodev" ? "query-stats: target cryptodev has no statistics in minivmm"
                                             : fmt::format("Parameter 'target' does not accept value '{}'", target));
    std::vector<std::string> names;
    bool kvm_wanted = true;
    if (a.has("providers")) {
        kvm_wanted = false;
        for (const json& p : a.array("providers")) {
            if (!p.is_object() || !p.contains("provider") || !p["provider"].is_string())
                throw QmpError("Parameter 'providers' expects a list of {\"provider\": NAME, \"names\": [...]}");
            if (p["provider"] != "kvm")
                continue;  // QEMU: other providers contribute nothing here
            kvm_wanted = true;
            if (p.contains("names"))
                for (const json& n : p["names"])
                    if (n.is_string())
                        names.push_back(n.get<std::string>());
        }
    }
    json out = json::array();
    if (!kvm_wanted)
        return out;
    auto stats = [&](const StatSnapshot& s) {
        json v = json::array();
        for (const auto& [name, value] : s)
            if (names.empty() || std::find(names.begin(), names.end(), name) != names.end())
                v.push_back({{"name", name}, {"value", value}});
        return v;
    };
    if (target == "vm") {
        out.push_back({{"provider", "kvm"}, {"stats", stats(vm_.vm_stats())}});
        return out;
    }
    std::vector<std::string> want;
    if (a.has("vcpus"))
        for (const json& p : a.array("vcpus"))
            if (p.is_string())
                want.push_back(p.get<std::string>());
    for (uint32_t i = 0; i < vm_.vcpu_count(); i++) {
        const std::string path = fmt::format("/machine/unattached/device[{}]", i);
        if (!want.empty() && std::find(want.begin(), want.end(), path) == want.end())
            continue;
        out.push_back({{"provider", "kvm"}, {"qom-path", path}, {"stats", stats(vm_.vcpu_stats(i))}});
    }
    return out;
}

// ---- vNUMA placement --------------------------------------------------------------------

// Where each virtual node's memory is on the host right now (move_pages on
// every page, or `sample-pages` spread over each node), against its policy:
// numa-check's placement figures for a guest that runs.
json Monitor::query_placement(const json& args) const
{
    Args a(args, {"sample-pages"});
    const int64_t sample = a.int_or("sample-pages", 4096);
    if (sample < 0)
        throw QmpError("Parameter 'sample-pages' expects an integer >= 0 (0: every page)");
    json out = json::array();
    for (const NodeConfig& n : vm_.config().nodes) {
        json nodes = json::object();
        uint64_t total = 0, queried = 0, present = 0, on_policy = 0, not_present = 0;
        bool sampled = false, readable = true;
        for (const auto& r : vm_.memslots().regions()) {
            if (r.vnode != static_cast<int>(n.id))
                continue;
            if (!r.host) {
                readable = false;  // guest_memfd without a mapping of ours
                continue;
            }
            const numa::Placement p =
                numa::query_placement(r.host, r.size, 4096, n.host_policy.nodes, static_cast<size_t>(sample));
            total += p.pages_total;
            queried += p.pages_queried;
            sampled = sampled || p.sampled;
            not_present += p.pages_not_present;
            for (const auto& [node, pages] : p.pages_per_node) {
                const std::string k = std::to_string(node);
                nodes[k] = nodes.value(k, uint64_t{0}) + pages;
                present += pages;
                if (n.host_policy.nodes.empty() ||
                    std::find(n.host_policy.nodes.begin(), n.host_policy.nodes.end(), node) != n.host_policy.nodes.end())
                    on_policy += pages;
            }
        }
        json v = {{"vnode", n.id},
                  {"backing", std::string(backing_name(n.backing))},
                  {"host_policy", numa::to_string(n.host_policy)},
                  {"pages", total},
                  {"pages_queried", queried},
                  {"sampled", sampled},
                  {"pages_per_host_node", nodes},
                  {"pages_not_present", not_present},
                  {"on_policy_pct", present ? 100.0 * static_cast<double>(on_policy) / static_cast<double>(present) : 0}};
        if (!readable)
            v["note"] = "guest_memfd pages without a host mapping of minivmm's are not queried";
        out.push_back(v);
    }
    return out;
}

// ---- the end -----------------------------------------------------------------------------

void Monitor::shutdown()
{
    {
        std::lock_guard lk(mu_);
        if (migrating_.load() && sender_) {
            cancelling_ = true;
            sender_->cancel();
        }
    }
    rate_cancel_ = true;
    join_migration();
    if (rate_thread_.joinable())
        rate_thread_.join();
    // A guest stopped with QMP's stop runs again, so its command can stop it the usual way.
    bool was_paused;
    {
        std::lock_guard lk(mu_);
        was_paused = paused_;
        paused_ = false;
    }
    if (was_paused) {
        vm_.unpark_guests();
        if (vm_.paused())
            vm_.resume();
    }
}

}  // namespace mvm::qmp
