// minivmm receive: take one incoming migration, resume the guest, check it.
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fmt/format.h>
#include <thread>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "base/units.hpp"
#include "cli/command.hpp"
#include "cli/commands/link_options.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "cli/qmp/monitor.hpp"
#include "cli/qmp/options.hpp"
#include "cli/test_hooks.hpp"
#include "migration/file.hpp"
#include "migration/migrate.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

using namespace mvm::migration;

class Receive : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("receive", "wait for one incoming migration (same VM options as the sender), "
                                                "resume the guest, check its stamps");
        vm_.add_to(*c);
        c->add_option("--listen", listen_,
                      "tcp:ADDR:PORT or unix:PATH to listen on, fd:N (a connected socket to read the sender from), "
                      "file:PATH[,offset=BYTES] (restore what migrate --to file: wrote), or defer (with --qmp): wait "
                      "for QMP's migrate-incoming to name it");
        c->add_option("--post-run", post_run_, "seconds the guest runs here before its stamp check")
            ->capture_default_str();
        c->add_option("--timeout", timeout_,
                      "seconds to wait for a sender (with --listen defer: for migrate-incoming, then for the sender)")
            ->capture_default_str();
        c->add_option("--json", json_, "also write the report as JSON to FILE, or - for stdout");
        c->add_flag("--no-prealloc", no_prealloc_, "do not populate the guest memory before receiving");
        c->add_option("--postcopy-recover", postcopy_recover_,
                      "a connection cut in postcopy pauses instead of losing the guest: listen on --listen again for "
                      "up to SECONDS for the sender (migrate --postcopy-recover) to come back; 0 = a cut loses the "
                      "guest (with --qmp: QMP's migrate-recover names where)")
            ->capture_default_str();
        link_.add_to(*c, false);
        qmp_.add_to(*c);
        return c;
    }

    int run() override
    {
        check_json_dest(json_);
        ReceiveOptions o;
        const std::optional<qmp::Address> qaddr = qmp_.address();
        if (listen_.empty())
            throw UsageError("--listen is required: tcp:ADDR:PORT (e.g. tcp:0.0.0.0:4444), unix:PATH, or defer with --qmp");
        const bool deferred = listen_ == "defer";
        if (deferred && !qaddr)
            throw UsageError("--listen defer: needs --qmp (QMP's migrate-incoming names the address)");
        // receive binds --listen only once the guest's memory is ready: a bad
        // or busy address is found here, before anything is allocated.
        const auto file = deferred ? std::nullopt : migration::parse_file_uri("--listen", listen_);
        if (file)
            migration::check_restorable("--listen", *file);
        else if (!deferred && migration::parse_fd_uri("--listen", listen_) < 0)
            ::close(bind_listener(listen_));
        o.listen = listen_;
        o.post_run_s = parse_seconds("--post-run", post_run_);
        o.accept_timeout_s = parse_seconds("--timeout", timeout_);
        if (o.accept_timeout_s <= 0)
            throw UsageError("--timeout: must be positive, e.g. 300");
        o.io_timeout_s = link_.io_timeout_s();
        o.tls = link_.tls();
        const double recover_s = parse_seconds("--postcopy-recover", postcopy_recover_);
        if (recover_s < 0)
            throw UsageError("--postcopy-recover: seconds must be 0 or more, e.g. 60");
        if (recover_s > 0) {
            if (listen_.rfind("tcp:", 0) != 0 && listen_.rfind("unix:", 0) != 0)
                throw UsageError(fmt::format("--postcopy-recover: --listen {} cannot be listened on again; use "
                                             "tcp:ADDR:PORT or unix:PATH",
                                             listen_));
            o.recover_timeout_s = recover_s;
            o.recover_listen = [listen = listen_, recover_s,
                                until = std::optional<std::chrono::steady_clock::time_point>()](
                                   const std::string&) mutable -> migration::RecoverAt {
                const auto now = std::chrono::steady_clock::now();
                if (!until)
                    until = now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                      std::chrono::duration<double>(recover_s));
                return {now > *until ? std::string() : listen, -1};
            };
        }
        if (file && o.tls.enabled())
            throw UsageError(fmt::format("--tls-creds: --listen {} is a file, not a connection; drop --tls-creds",
                                         listen_));
        if (o.tls.enabled())
            migration::tls::Context::server(o.tls);  // read and checked before the guest's memory is made
        MachineConfig cfg = vm_.parse(numa::host_topology());  // bad input refused before /dev/kvm is opened
        Kvm kvm(kvm_device());
        check_host_resources(cfg, kvm);
        // Populate the memory before the sender connects, so the copy does not
        // fault page by page while the guest is stopped.
        if (!no_prealloc_)
            for (auto& n : cfg.nodes)
                n.prealloc = true;
        cfg.show_progress = stderr_is_terminal();
        StressVm dst(kvm, cfg);
        std::unique_ptr<qmp::Monitor> mon;
        PhaseHook hook = die_in(test_hook("DIE_IN"));
        if (const std::string phase = test_hook("STOP_IN"); !phase.empty())
            // A receiver that stops (SIGSTOP itself) in a phase: the sender's --timeout.
            hook = [phase, stopped = false](const char* p) mutable {
                if (!stopped && phase == p) {
                    stopped = true;
                    ::raise(SIGSTOP);
                }
            };
        if (qaddr) {
            install_stop_signals();
            mon = std::make_unique<qmp::Monitor>("--qmp", *qaddr, dst, qmp::Monitor::Role::Destination);
            qmp::serve(*mon);
            if (deferred) {
                o.listen = mon->wait_incoming(o.accept_timeout_s);
                if (o.listen.empty()) {
                    if (mon->quit_requested()) {
                        fmt::print(stderr, "receive: quit (QMP) before any migrate-incoming\n");
                        return kExitOk;
                    }
                    if (g_stop_signal.load())
                        return 128 + g_stop_signal.load();
                    // No sender came (none was even invited): exit 6, as at a --listen address.
                    fmt::print(stderr, "minivmm: receive: no sender was admitted: --timeout {:g} s passed without "
                                       "QMP's migrate-incoming\n",
                               o.accept_timeout_s);
                    return kExitNoSender;
                }
            }
            if (deferred && !o.tls.enabled())
                o.tls = mon->incoming_tls();  // QMP's tls-creds / tls-authz (object-add), as QEMU takes them
            mon->incoming_started(o.listen);
            o.on_postcopy = mon->incoming_postcopy_hook();
            if (!o.recover_listen)
                o.recover_listen = mon->incoming_recover_listen();  // QEMU: a cut in postcopy always pauses
            o.pause_switch = mon->incoming_pause_switch();
            o.wait_cont = mon->incoming_cont_gate();
            hook = [die = std::move(hook), mh = mon->incoming_hook()](const char* p) {
                mh(p);
                if (die)
                    die(p);
            };
        }
        ReceiveReport r;
        try {
            r = receive(dst, o, hook);
        } catch (const Error& e) {
            if (mon) {  // QMP's query-migrate says failed, with the reason
                r.error = e.what();
                mon->incoming_done(r);
                serve_until_quit(*mon, e.what());
            }
            throw;  // no sender admitted: exit 6; bad --listen: exit 2
        }
        if (mon)
            mon->incoming_done(r);
        std::FILE* out = table_stream(json_);
        fmt::print(out, "{}", r.to_table());
        if (!json_.empty()) {
            nlohmann::json j = r.to_json();
            echo_config(j, dst.config());
            write_json(json_, j);
        }
        if (r.status != "completed") {
            if (mon)
                serve_until_quit(*mon, r.error);
            fmt::print(stderr, "minivmm: receive failed: {}{}\n", r.error,
                       r.guest_lost ? " (postcopy broke off with pages missing here: the guest is lost, exit 7)" : "");
            return r.guest_lost ? kExitGuestLost : kExitMigration;
        }
        return kExitOk;
    }

private:
    // migrate-incoming with exit-on-error false: the failed destination stays,
    // answering QMP (query-migrate says failed), until quit or a signal.
    static void serve_until_quit(const qmp::Monitor& mon, const std::string& why)
    {
        if (mon.exit_on_error())
            return;
        fmt::print(stderr, "receive: the migration failed ({}); exit-on-error is false: QMP serves until quit\n", why);
        while (!mon.quit_requested() && !g_stop_signal.load())
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }

    // Test hook (cli/test_hooks.hpp): die like a killed receiver (no goodbye) in bulk|precopy|stop.
    static PhaseHook die_in(const std::string& phase)
    {
        if (phase.empty())
            return {};
        return [phase](const char* p) {
            if (phase == p) {
                fmt::print(stderr, "receive: dying in {} (test hook MINIVMM_TEST_DIE_IN)\n", p);
                std::fflush(stderr);
                ::_exit(9);
            }
        };
    }

    VmOptions vm_;
    LinkCliOptions link_;
    qmp::QmpOptions qmp_;
    std::string listen_, post_run_ = "2", timeout_ = "300", json_, postcopy_recover_ = "0";
    bool no_prealloc_ = false;
};

}  // namespace

std::unique_ptr<Command> receive_command() { return std::make_unique<Receive>(); }

}  // namespace mvm::cli
