// minivmm numa-check: where each virtual node's memory landed on the host.
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "cli/test_hooks.hpp"
#include "engines/numa_check.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

// MINIVMM_TEST_EXPECT_HOST_NODES=LIST: judge every node against these host
// nodes instead of its policy's.
engines::PlacementJudge judge_from_test_hook()
{
    const std::string list = test_hook("EXPECT_HOST_NODES");
    if (list.empty())
        return engines::policy_nodes;
    std::vector<int> nodes;
    try {
        nodes = numa::parse_cpu_list(list);
    } catch (const std::exception&) {
        throw UsageError(fmt::format("MINIVMM_TEST_EXPECT_HOST_NODES: '{}' is not a node list like 0-1", list));
    }
    return [nodes](const NodeConfig&) { return nodes; };
}

class NumaCheck : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("numa-check", "boot the VM, write every page once, then report where each virtual "
                                                   "node's memory landed on the host (exit 3 if off-policy)");
        vm_.add_to(*c);
        c->add_option("--json", json_, "also write the report as JSON to FILE, or - for stdout");
        c->add_option("--sample", sample_, "query at most this many pages per node, spread evenly (0 = every page)")
            ->capture_default_str();
        c->add_option("--enable-logging", enable_logging_,
                      "after the check, enable dirty logging once from: per-node (a thread per virtual node on its "
                      "host node, in parallel) | unbound (this thread) | host-node:N (one thread on host node N), and "
                      "report where KVM's page tables grew (SecPageTables per host node)");
        c->add_option("--eager-split", eager_split_, "on|off: eager_page_split for --enable-logging, where writable");
        return c;
    }

    int run() override
    {
        check_json_dest(json_);
        engines::NumaCheckOptions opt;
        opt.sample_pages = parse_uint("--sample", sample_, 0, 1ull << 40);
        engines::check_enable_logging(enable_logging_);
        opt.enable_logging = enable_logging_;
        if (!eager_split_.empty()) {
            if (eager_split_ != "on" && eager_split_ != "off")
                throw UsageError(fmt::format("--eager-split: '{}' is not on or off", eager_split_));
            if (enable_logging_.empty())
                throw UsageError("--eager-split: only with --enable-logging");
            opt.eager_split = eager_split_ == "on";
        }
        const engines::PlacementJudge judge = judge_from_test_hook();
        MachineConfig cfg = vm_.parse(numa::host_topology());  // bad input refused before /dev/kvm is opened
        Kvm kvm(kvm_device());
        check_host_resources(cfg, kvm);
        // One pass that writes every page: each page then exists where it was faulted.
        cfg.workload.max_passes = 1;
        cfg.workload.write_pct = 100;
        cfg.show_progress = stderr_is_terminal();
        opt.progress = cfg.show_progress;
        install_stop_signals();
        StressVm m(kvm, cfg);
        engines::NumaCheckReport r = engines::numa_check(m, opt, judge);
        fmt::print(table_stream(json_), "{}", to_table(r));
        if (!json_.empty()) {
            nlohmann::json j = to_json(r);
            echo_config(j, m.config());
            write_json(json_, j);
        }
        if (r.failure || (r.stamps && !r.stamps->ok()))
            return kExitFailure;
        if (r.interrupted)
            return 128 + g_stop_signal.load();
        if (!r.placement_ok()) {
            fmt::print(stderr, "minivmm: misplaced memory: {}\n", r.first_offender());
            return kExitMisplaced;
        }
        return kExitOk;
    }

private:
    VmOptions vm_;
    std::string json_, sample_ = "0", enable_logging_, eager_split_;
};

}  // namespace

std::unique_ptr<Command> numa_check_command() { return std::make_unique<NumaCheck>(); }

}  // namespace mvm::cli
