// minivmm numa-balancing: what the kernel's NUMA balancing costs a running
// guest, balancing off/on x memory bound/unbound.
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "engines/numa_balancing.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

// --scan-period MS|kernel: the scan delay and period while balancing is on.
std::optional<uint32_t> parse_scan_period(const std::string& v)
{
    if (v == "kernel")
        return std::nullopt;
    const double ms = parse_ms("--scan-period", v);
    if (ms < 1 || ms > 600000)
        throw UsageError(fmt::format("--scan-period: '{}' is out of range; use 1ms..600s, or 'kernel' to keep the "
                                     "kernel's scan delay and period",
                                     v));
    return static_cast<uint32_t>(ms);
}

class NumaBalancing : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("numa-balancing",
                                     "run the guest 4 times: kernel NUMA balancing off/on x memory bound/unbound; "
                                     "report KVM stats, guest progress and stalls, hinting faults (sets "
                                     "/proc/sys/kernel/numa_balancing per variant and restores it)");
        vm_.add_to(*c);
        c->add_option("--duration", duration_, "seconds each variant runs")->capture_default_str();
        c->add_option("--json", json_, "also write the report as JSON to FILE, or - for stdout");
        c->add_option("--scan-period", scan_,
                      "NUMA scan delay and period (debugfs sched/numa_balancing scan_delay_ms, scan_period_min/max_ms) "
                      "while balancing is on, restored after; 'kernel' keeps the kernel's")
            ->capture_default_str();
        return c;
    }

    int run() override
    {
        engines::NumaBalancingOptions opt;
        opt.duration_s = parse_seconds("--duration", duration_);
        if (opt.duration_s <= 0)
            throw UsageError("--duration: must be positive, e.g. 3");
        opt.scan_ms = parse_scan_period(scan_);
        check_json_dest(json_);
        MachineConfig cfg = vm_.parse(numa::host_topology());  // bad input refused before /dev/kvm is opened
        Kvm kvm(kvm_device());
        check_host_resources(cfg, kvm);
        if (cfg.workload.max_passes != 0)
            throw UsageError("--passes: numa-balancing runs each variant for --duration; drop --passes");
        install_stop_signals();
        cfg.show_progress = stderr_is_terminal();
        opt.progress = stderr_is_terminal();
        engines::NumaBalancingReport r = engines::numa_balancing(kvm, cfg, opt);
        fmt::print(table_stream(json_), "{}", to_table(r));
        if (!json_.empty()) {
            nlohmann::json j = to_json(r);
            echo_config(j, cfg);
            write_json(json_, j);
        }
        if (r.failed() || r.setting_after != r.setting_before)
            return kExitFailure;
        if (r.interrupted)
            return 128 + g_stop_signal.load();
        return kExitOk;
    }

private:
    VmOptions vm_;
    std::string duration_ = "3", json_, scan_ = "100ms";
};

}  // namespace

std::unique_ptr<Command> numa_balancing_command() { return std::make_unique<NumaBalancing>(); }

}  // namespace mvm::cli
