// minivmm caps: the host as minivmm sees it.
#include <fmt/format.h>

#include "base/error.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "engines/gmem_policy_probe.hpp"
#include "engines/huge_mapping_probe.hpp"
#include "engines/ring_probe.hpp"
#include "vmm/host_info.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

class Caps : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("caps", "the host as minivmm sees it: KVM capabilities, module parameters, "
                                             "THP, hugetlb pools, NUMA");
        // --json alone (stdout), like the other commands' --json FILE|-.
        c->add_option("--json", json_, "write the report as JSON to FILE, or - (or nothing) for stdout instead "
                                        "of the table")
            ->expected(0, 1)
            ->default_str("-");
        c->add_option("--probe-ring-reset", probe_,
                      "also probe for SECONDS whether dirty-log entries are lost when a signal is pending at "
                      "KVM_RESET_DIRTY_RINGS (unguarded, then as minivmm resets), e.g. 2");
        return c;
    }

    int run() override
    {
        check_json_dest(json_);
        double probe_s = 0;
        if (!probe_.empty()) {
            probe_s = parse_seconds("--probe-ring-reset", probe_);
            if (probe_s <= 0 || probe_s > 600)
                throw UsageError("--probe-ring-reset: seconds in (0, 600], e.g. 2");
        }
        Kvm kvm(kvm_device());
        auto info = host_info(kvm);
        // mbind's return value is not a placement: whether KVM honours the
        // gmem mapping's policy, from where a probe's pages landed.
        // A probe that cannot run is reported as such; caps still answers.
        engines::GmemPolicyProbe gp;
        try {
            gp = engines::probe_gmem_mempolicy(kvm);
        } catch (const std::exception& e) {
            gp.why = std::string("the probe failed: ") + e.what();
        }
        info["kvm"]["guest_memfd"]["mempolicy"] = gp.to_json();
        info["kvm"]["guest_memfd"]["mempolicy_summary"] = gp.summary();
        try {
            info["kvm"]["guest_memfd"]["dirty_logging"] = engines::probe_gmem_dirty_logging(kvm);
        } catch (const std::exception& e) {
            info["kvm"]["guest_memfd"]["dirty_logging"] = std::string("unknown: the probe failed: ") + e.what();
        }
        // How KVM maps huge pages here (docs quote this, not a belief).
        engines::HugeMappingProbe hp;
        try {
            hp = engines::probe_huge_mappings(kvm);
        } catch (const std::exception& e) {
            hp.why = std::string("the probe failed: ") + e.what();
        }
        info["kvm"]["huge_mappings"] = hp.to_json();
        info["kvm"]["huge_mappings_summary"] = hp.summary();
        std::string probe_table;
        if (probe_s > 0)
            probe_table = probe_ring_reset(kvm, probe_s, info);
        fmt::print(table_stream(json_), "{}{}", host_info_table(info), probe_table);
        if (!json_.empty())
            write_json(json_, info);
        return kExitOk;
    }

private:
    // Both probes into info["ring_reset_probe"]; returns the table lines.
    static std::string probe_ring_reset(const Kvm& kvm, double seconds, nlohmann::json& info)
    {
        std::string out = "\ndirty ring reset with a signal pending in the resetting thread:\n";
        for (bool guarded : {false, true}) {
            engines::RingProbeOptions o;
            o.guarded = guarded;
            o.storm_s = seconds;
            engines::RingProbeResult r = engines::probe_reset_under_signals(kvm, o);
            info["ring_reset_probe"][guarded ? "guarded" : "unguarded"] = r.to_json();
            out += fmt::format("  {}\n", r.summary());
            if (!r.skipped.empty())
                break;
        }
        const auto& u = info["ring_reset_probe"]["unguarded"];
        if (u["skipped"].get<std::string>().empty())
            out += u["unlogged"].get<uint64_t>() > 0
                       ? "  -> this host loses ring entries to signals pending at reset; minivmm blocks every signal "
                         "around each reset (the kernel fix: docs/kernel-fix.md)\n"
                       : fmt::format("  -> no loss seen in {:.1f} s (the loss is intermittent where it exists; probe "
                                     "longer to be surer)\n",
                                     seconds);
        return out;
    }

    std::string json_, probe_;
};

}  // namespace

std::unique_ptr<Command> caps_command() { return std::make_unique<Caps>(); }

}  // namespace mvm::cli
