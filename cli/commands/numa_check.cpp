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
        return c;
    }

    int run() override
    {
        check_json_dest(json_);
        engines::NumaCheckOptions opt;
        opt.sample_pages = parse_uint("--sample", sample_, 0, 1ull << 40);
        const engines::PlacementJudge judge = judge_from_test_hook();
        Kvm kvm(kvm_device());
        MachineConfig cfg = vm_.to_config(kvm);
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
    std::string json_, sample_ = "0";
};

}  // namespace

std::unique_ptr<Command> numa_check_command() { return std::make_unique<NumaCheck>(); }

}  // namespace mvm::cli
