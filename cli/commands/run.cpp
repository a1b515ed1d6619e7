// minivmm run: boot the stress guest, dirty memory, report.
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "engines/run.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

class Run : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("run", "boot the stress guest, dirty memory, report");
        vm_.add_to(*c);
        c->add_option("--duration", duration_, "seconds to run")->capture_default_str();
        c->add_option("--json", json_, "also write the report as JSON to FILE, or - for stdout");
        c->add_flag("--no-verify", no_verify_, "skip the stamp check after the run");
        c->add_option("--dirty-log", dirty_log_, "keep dirty logging on for the whole run: bitmap|ring");
        c->add_option("--ring", ring_, "with --dirty-log ring: bytes per vCPU ring (default 64K)");
        c->add_option("--harvest-ms", harvest_ms_, "with --dirty-log: harvest period in ms")->capture_default_str();
        return c;
    }

    int run() override
    {
        const double duration = parse_seconds("--duration", duration_);
        check_json_dest(json_);
        Kvm kvm(kvm_device());
        MachineConfig cfg = vm_.to_config(kvm);
        if (duration <= 0 && cfg.workload.max_passes == 0)
            throw UsageError("--duration: must be positive unless --passes is given");
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
        if (!ring_.empty() && (!log || log->mode != dirty::Mode::Ring))
            throw UsageError("--ring: only with --dirty-log ring");
        install_stop_signals();
        cfg.show_progress = stderr_is_terminal();
        StressVm m(kvm, cfg);
        engines::RunOptions opt;
        opt.duration_s = duration;
        opt.progress = stderr_is_terminal();
        opt.verify = !no_verify_;
        engines::RunResult res = engines::run_command(m, opt, log);
        const engines::RunReport& r = res.report;
        nlohmann::json j = to_json(r);
        std::string table = to_table(r);
        if (res.dirty_log) {
            j["dirty_log"] = res.dirty_log->json();
            table += res.dirty_log->table();
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
    VmOptions vm_;
    std::string duration_ = "3", json_, dirty_log_, ring_, harvest_ms_ = "100";
    bool no_verify_ = false;
};

}  // namespace

std::unique_ptr<Command> run_command() { return std::make_unique<Run>(); }

}  // namespace mvm::cli
