// minivmm dirty-rate: how fast the running guest dirties memory.
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "engines/dirty_rate.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

// A tracker mode from the registry, or sampling (no tracker at all).
engines::RateMode parse_rate_mode(const std::string& value)
{
    if (value == "sampling")
        return engines::RateMode::Sampling;
    const dirty::Mode mode = dirty::parse_mode_option("--mode", value, "mode", "ring, bitmap or sampling");
    return mode == dirty::Mode::Ring ? engines::RateMode::Ring : engines::RateMode::Bitmap;
}

class DirtyRate : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("dirty-rate", "measure how fast the running guest dirties memory (like QEMU's "
                                                   "calc-dirty-rate): total and per vCPU");
        vm_.add_to(*c);
        c->add_option("--mode", mode_, "ring|bitmap|sampling")->capture_default_str();
        c->add_option("--period", period_, "seconds to measure over")->capture_default_str();
        c->add_option("--interval", interval_,
                      "also report a time series: one window every this many seconds (per vCPU and per node)");
        c->add_option("--baseline", baseline_,
                      "ring/bitmap: seconds of the guest's own write rate with logging off before logging goes on "
                      "(0: none)")
            ->capture_default_str();
        c->add_option("--warmup", warmup_, "seconds to run after the first pass before measuring")
            ->capture_default_str();
        c->add_option("--ring", ring_, "with --mode ring: bytes per vCPU ring (default 64K)");
        c->add_option("--sample-pages", sample_, "with --mode sampling: pages sampled per GiB")->capture_default_str();
        c->add_option("--json", json_, "also write the result as JSON to FILE, or - for stdout");
        return c;
    }

    int run() override
    {
        using engines::RateMode;
        check_json_dest(json_);
        engines::RateOptions o;
        o.mode = parse_rate_mode(mode_);
        o.period_s = parse_seconds("--period", period_);
        if (o.period_s <= 0)
            throw UsageError("--period: must be positive, e.g. 1");
        o.warmup_s = parse_seconds("--warmup", warmup_);
        o.baseline_s = parse_seconds("--baseline", baseline_);
        if (!interval_.empty()) {
            o.interval_s = parse_seconds("--interval", interval_);
            if (o.interval_s < 0.01 || o.interval_s > o.period_s)
                throw UsageError(fmt::format("--interval {}: must be between 0.01 and --period ({})", interval_, period_));
        }
        o.sample_pages_per_gib = parse_uint("--sample-pages", sample_, 1, 1u << 18);
        if (!ring_.empty() && o.mode != RateMode::Ring)
            throw UsageError("--ring: only with --mode ring");
        MachineConfig cfg = vm_.parse(numa::host_topology());  // bad input refused before /dev/kvm is opened
        Kvm kvm(kvm_device());
        check_host_resources(cfg, kvm);
        if (o.mode == RateMode::Ring)
            cfg.dirty_ring_bytes = parse_ring_size("--ring", ring_.empty() ? "64K" : ring_, kvm);
        cfg.show_progress = o.progress = stderr_is_terminal();
        install_stop_signals();
        StressVm m(kvm, cfg);
        engines::RateResult r = engines::measure_dirty_rate(m, o);
        fmt::print(table_stream(json_), "{}", to_table(r));
        if (!json_.empty()) {
            nlohmann::json j = to_json(r);
            echo_config(j, m.config());
            write_json(json_, j);
        }
        return m.failure() ? kExitFailure : kExitOk;
    }

private:
    VmOptions vm_;
    std::string mode_ = "bitmap", period_ = "1", warmup_ = "0.5", baseline_ = "0.5", interval_, ring_, sample_ = "512",
                json_;
};

}  // namespace

std::unique_ptr<Command> dirty_rate_command() { return std::make_unique<DirtyRate>(); }

}  // namespace mvm::cli
