// cli/qmp/monitor.hpp - QEMU's migration commands over QMP, bound to the
// guest of one minivmm command (`run`, `migrate`, `receive` with --qmp):
// query-status, stop, cont, quit, query-version, query-commands, migrate,
// migrate-incoming, migrate_cancel, query-migrate, migrate-set-parameters /
// query-migrate-parameters, migrate-set-capabilities /
// query-migrate-capabilities, calc-dirty-rate / query-dirty-rate and
// query-stats, with QEMU's names, arguments and result members
// (qapi/migration.json, qapi/run-state.json, qapi/stats.json); what only
// minivmm reports is under x-minivmm-. docs/qmp.md has the table.
//
// A source runs each migration on a thread of the monitor's (the command's
// own thread keeps running the guest); query-migrate reads the Sender's
// LiveFigures and never waits for a round. A destination's receive runs on
// the command's thread; the monitor shows its state.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli/qmp/server.hpp"
#include "engines/dirty_rate.hpp"
#include "migration/migrate.hpp"

namespace mvm::qmp {

class Monitor {
public:
    enum class Role { Source, Destination };

    // Serves QMP at `addr` for `vm` (option names the flag in errors).
    Monitor(const std::string& option, const Address& addr, StressVm& vm, Role role);
    ~Monitor();  // shutdown(), then the socket goes
    Monitor(const Monitor&) = delete;
    Monitor& operator=(const Monitor&) = delete;

    // Source: migrations and logging-mode dirty rates use `tracker` (the
    // VM's, not enabled); `defaults` are the parameters' starting values.
    void set_source(dirty::Tracker* tracker, const migration::MigrateOptions& defaults,
                    migration::SenderHooks hooks = {});
    void start();  // serving from now on
    std::string bound() const { return server_.bound(); }

    // ---- source ----
    // What QMP's migrate does, for `migrate --qmp` (the command line's
    // migration, watched and steered over QMP). Throws QmpError.
    void start_migration(const migration::MigrateOptions& o);
    // Waits for the migration in flight, if any; the last one's report.
    std::optional<migration::MigrateReport> wait_migration();
    std::vector<migration::MigrateReport> finished_migrations() const;
    // A migration completed: the guest lives on at its destination, this
    // source stays parked for good.
    bool handed_over() const { return handed_over_.load(); }
    // The guest was stopped with QMP's stop (parked).
    bool stopped() const;

    // ---- destination ----
    // receive --listen defer: until migrate-incoming names the address (its
    // spec), quit, a stop signal or `timeout_s`; "" when none came.
    std::string wait_incoming(double timeout_s);
    // receive()'s phase hook: the monitor's status and events follow it.
    migration::PhaseHook incoming_hook();
    migration::PostcopyHook incoming_postcopy_hook();
    // A stopped source's guest waits here, paused, for QMP's cont (true) or
    // quit or a stop signal (false).
    migration::ContGate incoming_cont_gate();
    // What migrate-incoming's TLS parameters said (tls-creds, tls-authz).
    migration::tls::Options incoming_tls() const;
    void incoming_started(const std::string& listen);
    void incoming_done(const migration::ReceiveReport& r);
    // Postcopy recovery: until migrate-recover names the address ("" on quit
    // or a stop signal), and what migrate-pause cuts.
    std::function<migration::RecoverAt(const std::string&)> incoming_recover_listen();
    std::shared_ptr<migration::PauseSwitch> incoming_pause_switch();

    // ---- both ----
    bool quit_requested() const { return quit_.load(); }
    // migrate-incoming's exit-on-error (QEMU's default true): false keeps a
    // destination whose migration failed serving QMP until quit.
    bool exit_on_error() const { return exit_on_error_.load(); }
    // Cancels the migration or measurement in flight and waits for it (the
    // command then stops its guest); idempotent.
    void shutdown();
    // The run state QEMU names (running, paused, finish-migrate,
    // postmigrate, inmigrate, shutdown).
    void set_run_state(const std::string& s);

private:
    struct Params;
    struct Capabilities;
    struct DirtyRateJob;
    struct QomObject;
    struct Rates {  // query-migrate's mbps and pages-per-second while active: over the last second
        struct Sample {
            double t_ms;
            uint64_t bytes, pages;
        };
        std::deque<Sample> window;
        double mbps = 0, pages_per_s = 0;
    };

    void add_commands();
    json query_status() const;
    json stop_vm();
    json cont_vm();
    json query_version() const;
    json set_vcpu_dirty_limit(const json& args);
    json cancel_vcpu_dirty_limit(const json& args);
    json query_vcpu_dirty_limit() const;
    std::vector<uint32_t> limit_targets(const Args& a, const char* cmd) const;
    void sample_progress();
    void reapply_vcpu_limits();
    json object_add(const json& args);
    json object_del(const json& args);
    // The TLS options the parameters name, for a `client` (migrate) or a
    // server (migrate-incoming) endpoint; QmpError when they name nothing usable.
    migration::tls::Options tls_from_params(bool client) const;
    json getfd(const json& args);
    json closefd(const json& args);
    json add_fd(const json& args);
    json remove_fd(const json& args);
    json query_fdsets() const;
    // "file:/dev/fdset/N[,...]" -> "fd:K[,...]": K a duplicate (the caller's)
    // of a descriptor of fdset N open for writing (`write`) or reading; any
    // other URI as it is.
    std::string take_fdset_uri(const std::string& uri, bool write, const char* cmd);
    // "fd:NAME" -> "fd:N", the descriptor now the caller's (QEMU: a migration
    // takes its fd from the monitor); any other URI as it is.
    std::string take_fd_uri(const std::string& uri, const char* cmd);
    bool file_target(const std::string& uri) const;
    json migrate_cmd(const json& args);
    json migrate_incoming(const json& args);
    json migrate_cancel();
    json migrate_start_postcopy();
    json migrate_continue(const json& args);
    json migrate_resume(const std::string& uri);
    migration::SenderEvents sender_events();
    std::string wait_resume();
    json migrate_pause();
    json migrate_recover(const json& args);
    json query_migrate() const;
    json source_migration_info() const;
    void live_migration_info(json& j) const;
    void finished_migration_info(json& j, const migration::MigrateReport& r) const;
    json destination_migration_info() const;
    json set_parameters(const json& args);
    json query_parameters() const;
    json set_capabilities(const json& args);
    json query_capabilities() const;
    json calc_dirty_rate(const json& args);
    json query_dirty_rate(const json& args) const;
    json query_stats(const json& args) const;
    json query_placement(const json& args) const;
    json quit();
    void tick();
    void set_status(const std::string& status);  // MIGRATION event when it changes (events capability)
    void pre_switchover();                        // pause-before-switchover: waits for migrate-continue
    migration::MigrateOptions options_from_params(const std::string& uri) const;
    void join_migration();
    bool migration_active() const;

    StressVm& vm_;
    const Role role_;
    Server server_;
    dirty::Tracker* tracker_ = nullptr;
    migration::SenderHooks hooks_;

    mutable std::mutex mu_;  // everything below that two threads touch
    std::unique_ptr<Params> params_;
    std::unique_ptr<Capabilities> caps_;
    std::string run_state_ = "running";
    std::string status_;   // QEMU's MigrationStatus of the last migration ("" none yet)
    bool cancelling_ = false;
    bool continue_requested_ = false;  // migrate-continue in pre-switchover
    std::unique_ptr<migration::Sender> sender_;
    std::thread migration_thread_;
    std::atomic<bool> migrating_{false};
    std::vector<migration::MigrateReport> finished_;
    std::optional<migration::MigrateReport> last_;
    Rates rates_;
    std::atomic<bool> handed_over_{false};
    std::atomic<bool> quit_{false};
    std::atomic<bool> exit_on_error_{true};
    bool paused_ = false;
    // Destination.
    std::string incoming_uri_;
    bool incoming_started_ = false;
    bool held_for_cont_ = false, cont_requested_ = false;  // destination: a stopped guest, paused
    std::map<std::string, int> named_fds_;  // getfd's, until closefd or a migration takes one
    struct FdsetFd {
        int fd = -1;
        std::string opaque;
    };
    std::map<int64_t, std::vector<FdsetFd>> fdsets_;  // add-fd's, until remove-fd
    std::map<std::string, QomObject> objects_;  // object-add's
    std::vector<uint64_t> vcpu_limit_mbs_;      // set-vcpu-dirty-limit's, MB/s per vCPU (0: none)
    struct ProgressSample {
        double t_s;
        std::vector<uint64_t> pages;  // per vCPU, pages written
    };
    std::deque<ProgressSample> progress_window_;  // the last second, on the tick
    migration::tls::Options incoming_tls_;      // migrate-incoming's, from tls-creds and tls-authz
    std::string incoming_phase_;
    std::string resume_uri_;   // source: migrate resume:true's address, until the paused migration takes it
    migration::RecoverAt recover_at_;  // destination: migrate-recover's, until the paused receiver takes it
    std::shared_ptr<migration::PauseSwitch> pause_switch_;  // destination: migrate-pause
    std::optional<migration::ReceiveReport> received_;
    std::optional<migration::PostcopyDestinationFigures> incoming_postcopy_;
    std::condition_variable cv_;
    // calc-dirty-rate.
    std::unique_ptr<DirtyRateJob> rate_;
    std::thread rate_thread_;
    std::atomic<bool> rate_cancel_{false};
};

}  // namespace mvm::qmp
