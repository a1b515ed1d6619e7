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

Monitor::Monitor(const std::string& option, const Address& addr, StressVm& vm, Role role)
    : vm_(vm), role_(role),
      server_(option, addr, qmp_version()),
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
    no_args("query-uuid", [this] {  // QEMU's machine.json: all zeros without -uuid
        const std::string& u = vm_.config().uuid;
        return json{{"UUID", u.empty() ? std::string("00000000-0000-0000-0000-000000000000") : u}};
    });
    no_args("query-commands", [this] {
        json v = json::array();
        for (const auto& n : server_.commands())
            v.push_back({{"name", n}});
        return v;
    });
    server_.add("set-vcpu-dirty-limit", [this](const json& a) { return set_vcpu_dirty_limit(a); });
    server_.add("cancel-vcpu-dirty-limit", [this](const json& a) { return cancel_vcpu_dirty_limit(a); });
    no_args("query-vcpu-dirty-limit", member(&Monitor::query_vcpu_dirty_limit));
    server_.add("object-add", [this](const json& a) { return object_add(a); });
    server_.add("object-del", [this](const json& a) { return object_del(a); });
    server_.add("getfd", [this](const json& a) { return getfd(a); });
    server_.add("closefd", [this](const json& a) { return closefd(a); });
    server_.add("add-fd", [this](const json& a) { return add_fd(a); });
    server_.add("remove-fd", [this](const json& a) { return remove_fd(a); });
    server_.add("query-fdsets", [this](const json&) { return query_fdsets(); });
    server_.add("migrate", [this](const json& a) { return migrate_cmd(a); });
    server_.add("migrate-incoming", [this](const json& a) { return migrate_incoming(a); });
    no_args("migrate_cancel", member(&Monitor::migrate_cancel));
    no_args("migrate-start-postcopy", member(&Monitor::migrate_start_postcopy));
    server_.add("migrate-continue", [this](const json& a) { return migrate_continue(a); });
    no_args("migrate-pause", member(&Monitor::migrate_pause));
    server_.add("migrate-recover", [this](const json& a) { return migrate_recover(a); });
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

void Monitor::shutdown()
{
    {
        std::lock_guard lk(mu_);
        if (migrating_.load() && sender_) {
            cancelling_ = true;
            sender_->cancel();
            cv_.notify_all();  // a pre-switchover wait ends
        }
    }
    rate_cancel_ = true;
    join_migration();
    {
        std::lock_guard lk(mu_);
        for (const auto& [name, fd] : std::exchange(named_fds_, {}))
            ::close(fd);
        for (const auto& [id, fds] : std::exchange(fdsets_, {}))
            for (const auto& f : fds)
                ::close(f.fd);
    }
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
