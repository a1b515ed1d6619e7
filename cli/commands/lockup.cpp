// minivmm lockup: reproduce soft-lockup reports under dirty logging.
#include <algorithm>
#include <chrono>
#include <fmt/format.h>
#include <thread>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "base/units.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "cli/test_hooks.hpp"
#include "engines/lockup.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

// --variants: a comma list of known variants, each once ('' runs none).
std::vector<std::string> parse_variants(const std::string& v)
{
    std::vector<std::string> out;
    for (size_t pos = 0; pos <= v.size();) {
        size_t c = v.find(',', pos);
        std::string name = v.substr(pos, c == std::string::npos ? std::string::npos : c - pos);
        pos = c == std::string::npos ? v.size() + 1 : c + 1;
        const auto& known = engines::lockup_variant_names();
        if (std::find(known.begin(), known.end(), name) == known.end()) {
            std::string list;
            for (const auto& k : known)
                list += (list.empty() ? "" : ",") + k;
            throw UsageError(fmt::format("--variants: unknown variant '{}'; use some of {}", name, list));
        }
        if (std::find(out.begin(), out.end(), name) != out.end())
            throw UsageError(fmt::format("--variants: '{}' is listed twice; list each variant once", name));
        out.push_back(name);
    }
    return out;
}

// MINIVMM_TEST_PAUSE_MS=MS: pause every vCPU this long mid-logging (phase
// "test-pause"), a stall of known length for the detector.
engines::MidLoggingAction pause_from_test_hook()
{
    const std::string ms = test_hook("PAUSE_MS");
    if (ms.empty())
        return {};
    const double pause_ms = parse_ms("MINIVMM_TEST_PAUSE_MS", ms);
    return {"test-pause", [pause_ms](StressVm& m) {
                m.pause();
                std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(pause_ms));
                m.resume();
            }};
}

class Lockup : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("lockup", "reproduce soft-lockup reports: per variant, enable dirty logging on a "
                                               "write-heavy guest and record which vCPUs stall, when, how long, in "
                                               "which phase");
        vm_.add_to(*c);
        c->add_option("--variants", variants_,
                      "comma list of bitmap,bitmap-initially-set,ring,per-node-parallel-enable,eager-split-on,"
                      "eager-split-off (default: all)")
            ->each([this](const std::string&) { variants_given_ = true; });
        c->add_option("--threshold-ms", threshold_, "a gap without progress longer than this is a stall")
            ->capture_default_str();
        c->add_option("--steady", steady_, "seconds measured before logging")->capture_default_str();
        c->add_option("--logging", logging_, "seconds of harvesting with logging on")->capture_default_str();
        c->add_option("--harvest-ms", harvest_ms_, "harvest period")->capture_default_str();
        c->add_option("--clear-chunk", clear_chunk_, "bitmap-initially-set: bytes per KVM_CLEAR_DIRTY_LOG")
            ->capture_default_str();
        c->add_option("--ring", ring_, "ring: bytes per vCPU ring")->capture_default_str();
        c->add_flag("--no-harvester-priority", no_priority_,
                    "leave the harvesting thread at normal priority (default: SCHED_FIFO, as a VMM's migration "
                    "thread; a starved harvester makes the verdict inconclusive)");
        c->add_option("--json", json_, "also write the report as JSON to FILE, or - for stdout");
        c->add_option("--timeline", timeline_, "write the per-vCPU progress timeline as CSV");
        return c;
    }

    int run() override
    {
        check_json_dest(json_);
        engines::LockupOptions o;
        if (variants_given_)
            o.variants = parse_variants(variants_);
        o.threshold_ms = parse_ms("--threshold-ms", threshold_);
        if (o.threshold_ms <= 0)
            throw UsageError("--threshold-ms: must be positive, e.g. 20");
        o.steady_s = parse_seconds("--steady", steady_);
        o.logging_s = parse_seconds("--logging", logging_);
        o.harvest_ms = parse_ms("--harvest-ms", harvest_ms_);
        if (o.harvest_ms <= 0)
            throw UsageError("--harvest-ms: must be positive, e.g. 100");
        o.clear_chunk_bytes = parse_size_option("--clear-chunk", clear_chunk_);
        if (o.clear_chunk_bytes < 256 * 1024 || o.clear_chunk_bytes % (256 * 1024))
            throw UsageError(fmt::format("--clear-chunk {}: must be a multiple of 256K, e.g. 1M", clear_chunk_));
        engines::MidLoggingAction pause = pause_from_test_hook();
        // MINIVMM_TEST_HARVEST_DELAY_MS=MS: the harvester sleeps this long
        // after every harvest (a starved harvester, on purpose).
        if (const std::string d = test_hook("HARVEST_DELAY_MS"); !d.empty()) {
            const double delay_ms = parse_ms("MINIVMM_TEST_HARVEST_DELAY_MS", d);
            pause.after_each_harvest = [delay_ms] {
                std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay_ms));
            };
        }
        check_output_path("--timeline", timeline_, "give a writable path for the CSV");
        MachineConfig cfg = vm_.parse(numa::host_topology());  // bad input refused before /dev/kvm is opened
        Kvm kvm(kvm_device());
        o.ring_bytes = parse_ring_size("--ring", ring_, kvm);
        check_host_resources(cfg, kvm);
        cfg.workload.watchdog_ms = o.threshold_ms;
        cfg.show_progress = o.progress = stderr_is_terminal();
        o.keep_samples = !timeline_.empty();
        o.harvester_priority = !no_priority_;
        install_stop_signals();
        o.stop = &g_stop_signal;
        engines::LockupReport r = engines::run_lockup(kvm, cfg, o, pause);
        std::FILE* out = table_stream(json_);
        fmt::print(out, "{}", r.to_table());
        if (!timeline_.empty()) {
            r.write_timeline(timeline_);
            fmt::print(out, "timeline written to {} (plot it with scripts/plot-timeline {})\n", timeline_, timeline_);
        }
        if (!json_.empty()) {
            nlohmann::json j = r.to_json();
            echo_config(j, cfg);
            write_json(json_, j);
        }
        if (r.interrupted)
            fmt::print(out, "interrupted: stopped cleanly; the report above is partial\n");
        return r.interrupted ? 128 + g_stop_signal.load() : kExitOk;
    }

private:
    VmOptions vm_;
    std::string variants_, threshold_ = "20", steady_ = "0.5", logging_ = "2", harvest_ms_ = "100",
                           clear_chunk_ = "1M", ring_ = "64K", json_, timeline_;
    bool variants_given_ = false;  // even as --variants ''
    bool no_priority_ = false;
};

}  // namespace

std::unique_ptr<Command> lockup_command() { return std::make_unique<Lockup>(); }

}  // namespace mvm::cli
