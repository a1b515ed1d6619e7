// QMP run state (QEMU qapi/run-state.json, misc.json): query-status, stop, cont, quit, query-version.
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
    if (role_ == Role::Destination) {
        std::lock_guard lk(mu_);
        if (!held_for_cont_)
            throw QmpError("cont: the destination's guest runs by itself once the migration switched over (it waits "
                           "for cont only when the source's guest was stopped)");
        cont_requested_ = true;  // RESUME comes when it runs
        cv_.notify_all();
        return json::object();
    }
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
    return qmp_version();
}

}  // namespace mvm::qmp
