// minivmm run: boot the stress guest, dirty memory, report.
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "cli/qmp/monitor.hpp"
#include "cli/qmp/options.hpp"
#include "engines/run.hpp"
#include "migration/file.hpp"
#include "migration/receiver.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

class Run : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("run", "boot the stress guest, dirty memory, report");
        vm_.add_to(*c);
        duration_opt_ = c->add_option("--duration", duration_, "seconds to run (with --qmp: until QMP's quit unless given)")
                            ->capture_default_str();
        c->add_option("--json", json_, "also write the report as JSON to FILE, or - for stdout");
        c->add_flag("--no-verify", no_verify_, "skip the stamp check after the run");
        c->add_option("--dirty-log", dirty_log_, "keep dirty logging on for the whole run: bitmap|ring");
        c->add_option("--ring", ring_,
                      "with --dirty-log ring: bytes per vCPU ring (default 64K); with --qmp: make the VM with dirty "
                      "rings, so QMP's migrations and calc-dirty-rate log with them (QEMU's dirty-ring-size)");
        c->add_option("--harvest-ms", harvest_ms_, "with --dirty-log: harvest period in ms")->capture_default_str();
        c->add_option("--restore", restore_,
                      "file:PATH[,offset=BYTES]: start from the guest migrate --to file: saved (every page checked "
                      "against the source's digests in the file), run --duration, check its stamps");
        qmp_.add_to(*c);
        return c;
    }

    int run() override
    {
        const std::optional<qmp::Address> qaddr = qmp_.address();
        double duration = parse_seconds("--duration", duration_);
        if (qaddr && duration_opt_->count() == 0)
            duration = 0;  // until QMP's quit or a signal, as QEMU runs until told
        check_json_dest(json_);
        if (qaddr && !dirty_log_.empty())
            throw UsageError("--dirty-log: not with --qmp (QMP's migrate and calc-dirty-rate turn logging on "
                             "themselves)");
        const auto restore_from = restore_file_uri(qaddr.has_value());
        MachineConfig cfg = vm_.parse(numa::host_topology());  // bad input refused before /dev/kvm is opened
        Kvm kvm(kvm_device());
        check_host_resources(cfg, kvm);
        if (restore_from)
            return restore(cfg, kvm, duration);
        if (duration <= 0 && cfg.workload.max_passes == 0 && !qaddr)
            throw UsageError("--duration: must be positive unless --passes is given");
        if (qaddr && !ring_.empty())
            cfg.dirty_ring_bytes = parse_ring_size("--ring", ring_, kvm);
        std::optional<engines::DirtyLogOptions> log;
        if (!dirty_log_.empty()) {
            log.emplace();
            log->mode = dirty::parse_mode_option("--dirty-log", dirty_log_);
            log->harvest_ms = parse_ms("--harvest-ms", harvest_ms_);
            if (log->harvest_ms <= 0)
                throw UsageError("--harvest-ms: must be positive, e.g. 100");
            if (log->mode == dirty::Mode::Ring)
                cfg.dirty_ring_bytes = parse_ring_size("--ring", ring_.empty() ? "64K" : ring_, kvm);
        }
        if (!ring_.empty() && (!log || log->mode != dirty::Mode::Ring) && !qaddr)
            throw UsageError("--ring: only with --dirty-log ring or --qmp");
        install_stop_signals();
        cfg.show_progress = stderr_is_terminal();
        StressVm m(kvm, cfg);
        engines::RunOptions opt;
        opt.duration_s = duration;
        opt.progress = stderr_is_terminal();
        opt.verify = !no_verify_;
        // --qmp: a guest a QMP client can stop, measure and migrate.
        std::unique_ptr<dirty::Tracker> tracker;
        std::unique_ptr<qmp::Monitor> mon;
        if (qaddr) {
            dirty::TrackerOptions to;
            to.mode = cfg.dirty_ring_bytes ? dirty::Mode::Ring : dirty::Mode::Bitmap;
            tracker = dirty::Tracker::create(m, to);
            mon = std::make_unique<qmp::Monitor>("--qmp", *qaddr, m, qmp::Monitor::Role::Source);
            migration::MigrateOptions d;
            d.tracker = to.mode;
            mon->set_source(tracker.get(), d);
            opt.on_started = [&] { qmp::serve(*mon); };
            opt.until = [&] { return mon->quit_requested(); };
            opt.before_stop = [&] { mon->shutdown(); };
            opt.parked_for_good = [&] { return mon->handed_over(); };
        }
        engines::RunResult res = engines::run_command(m, opt, log);
        const engines::RunReport& r = res.report;
        nlohmann::json j = to_json(r);
        std::string table = to_table(r);
        if (res.dirty_log) {
            j["dirty_log"] = res.dirty_log->json();
            table += res.dirty_log->table();
        }
        if (mon) {
            nlohmann::json ms = nlohmann::json::array();
            for (const auto& mr : mon->finished_migrations()) {
                ms.push_back(mr.to_json());
                table += "migration (QMP): " + mr.summary_line() + "\n";
            }
            j["migrations"] = ms;
            if (mon->handed_over())
                table += "the guest was migrated away: this source stayed parked since the switchover (its stamps "
                         "were checked as they froze)\n";
        }
        fmt::print(table_stream(json_), "{}", table);
        echo_config(j, m.config());
        if (!json_.empty())
            write_json(json_, j);
        if (r.failure || (r.stamps && !r.stamps->ok()))
            return kExitFailure;
        if (r.interrupted)
            return 128 + g_stop_signal.load();
        return kExitOk;
    }

private:
    // --restore's file, checked before anything is allocated.
    std::optional<migration::FileUri> restore_file_uri(bool qmp) const
    {
        if (restore_.empty())
            return std::nullopt;
        if (qmp)
            throw UsageError("--restore: not with --qmp; use receive --listen defer --qmp and QMP's migrate-incoming "
                             "file:PATH");
        if (!dirty_log_.empty())
            throw UsageError("--dirty-log: not with --restore");
        auto f = migration::parse_file_uri("--restore", restore_);
        if (!f)
            throw UsageError(fmt::format("--restore: '{}' is not file:PATH[,offset=BYTES] (or fd:N of a file)",
                                         restore_));
        migration::check_restorable("--restore", *f);
        return f;
    }

    // The saved guest, restored as receive --listen file: restores it, runs --duration.
    int restore(MachineConfig cfg, Kvm& kvm, double duration)
    {
        install_stop_signals();
        for (auto& n : cfg.nodes)
            n.prealloc = true;
        cfg.show_progress = stderr_is_terminal();
        StressVm dst(kvm, cfg);
        migration::ReceiveOptions o;
        o.listen = restore_;
        o.post_run_s = duration > 0 ? duration : 3;
        const migration::ReceiveReport r = migration::receive(dst, o);
        fmt::print(table_stream(json_), "{}", r.to_table());
        if (!json_.empty()) {
            nlohmann::json j = r.to_json();
            echo_config(j, dst.config());
            write_json(json_, j);
        }
        if (r.status != "completed") {
            fmt::print(stderr, "minivmm: run --restore failed: {}\n", r.error);
            return kExitMigration;
        }
        return kExitOk;
    }

    VmOptions vm_;
    qmp::QmpOptions qmp_;
    CLI::Option* duration_opt_ = nullptr;
    std::string duration_ = "3", json_, dirty_log_, ring_, harvest_ms_ = "100", restore_;
    bool no_verify_ = false;
};

}  // namespace

std::unique_ptr<Command> run_command() { return std::make_unique<Run>(); }

}  // namespace mvm::cli
