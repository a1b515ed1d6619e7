// minivmm dirty-log-perf: the kernel's dirty_log_perf_test with our guest.
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "base/units.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "engines/dirty_log_perf.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

class DirtyLogPerf : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("dirty-log-perf", "the kernel's dirty_log_perf_test with minivmm's native guest: "
                                                       "populate, enable logging, N lock-step dirtying iterations "
                                                       "with a harvest after each, disable; same knobs and figures");
        c->add_option("-v", vcpus_, "vCPUs")->capture_default_str();
        c->add_option("-b", bytes_, "bytes dirtied by each vCPU, e.g. 256M")->capture_default_str();
        c->add_option("-i", iterations_, "iterations")->capture_default_str();
        c->add_option("-w", write_pct_, "percentage of pages written (the rest are read)")->capture_default_str();
        c->add_flag("-a", random_, "access memory in a random order");
        c->add_option("--fill", fill_, "what a written page holds besides its stamp (as for run)")
            ->capture_default_str();
        c->add_option("-x", slots_, "split the memory into this many memslots")->capture_default_str();
        c->add_option("-s", backing_, "backing: anon|thp|shm|hugetlb2m|hugetlb1g (selftest names accepted too)")
            ->capture_default_str();
        c->add_flag("-g", no_manual_, "no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG clears the log");
        c->add_flag("--no-initially-set", no_initially_set_, "manual protect without KVM_DIRTY_LOG_INITIALLY_SET");
        c->add_option("--ring", ring_, "use per-vCPU dirty rings of this many bytes (16 per entry), e.g. 64K");
        c->add_option("--clear-chunk", clear_chunk_, "bytes per KVM_CLEAR_DIRTY_LOG call (multiple of 256K)");
        c->add_option("--eager-split", eager_split_, "on|off: set eager_page_split for the run where writable");
        c->add_option("--json", json_, "also write the results as JSON to FILE, or - for stdout");
        return c;
    }

    int run() override
    {
        check_json_dest(json_);
        engines::PerfOptions o = parse_options();
        Kvm kvm(kvm_device());
        if (!ring_.empty()) {
            o.ring_bytes = parse_ring_size("--ring", ring_, kvm);
            if (no_manual_ || !clear_chunk_.empty())
                throw UsageError("--ring: -g and --clear-chunk are bitmap options; drop them with --ring");
        }
        o.progress = stderr_is_terminal();
        // The same checks as every VM: vCPU limit, memory, hugetlb pools.
        MachineConfig probe = single_node_config(o.vcpus, o.bytes_per_vcpu * o.vcpus, o.backing);
        probe.nodes[0].origin = "-b";
        probe.slots_per_node = o.slots;
        validate_config(probe, numa::host_topology());
        check_host_resources(probe, kvm);
        install_stop_signals();
        engines::PerfResult r = engines::run_dirty_log_perf(kvm, o);
        fmt::print(table_stream(json_), "{}", to_text(r));
        if (!json_.empty()) {
            nlohmann::json j = to_json(r);
            echo_config(j, r.machine);
            write_json(json_, j);
        }
        if (r.failure || (r.stamps && !r.stamps->ok()))
            return kExitFailure;
        return kExitOk;
    }

private:
    // Everything that needs no KVM.
    engines::PerfOptions parse_options() const
    {
        engines::PerfOptions o;
        o.vcpus = static_cast<uint32_t>(parse_uint("-v", vcpus_, 1, 1024));
        o.bytes_per_vcpu = parse_size_option("-b", bytes_);
        o.iterations = static_cast<uint32_t>(parse_uint("-i", iterations_, 1, 1000000));
        o.write_pct = static_cast<uint32_t>(parse_uint("-w", write_pct_, 0, 100));
        o.slots = static_cast<uint32_t>(parse_uint("-x", slots_, 1, 32000));
        o.random = random_;
        WorkloadConfig w;
        parse_fill(fill_, w);
        o.fill = w.fill;
        o.fill_ratio = w.fill_ratio;
        o.backing = parse_backing_option("-s", backing_);
        if (o.backing == BackingKind::Gmem)
            throw UsageError(
                "-s gmem: guest_memfd slots cannot be dirty-logged; use anon, thp, shm, hugetlb2m or hugetlb1g");
        o.manual_protect = !no_manual_;
        o.initially_set = !no_initially_set_;
        if (!clear_chunk_.empty()) {
            o.clear_chunk_bytes = parse_size_option("--clear-chunk", clear_chunk_);
            if (o.clear_chunk_bytes < 64 * 4096 || o.clear_chunk_bytes % (64 * 4096))
                throw UsageError(fmt::format("--clear-chunk {}: must be a multiple of 256K (64 pages, "
                                             "KVM_CLEAR_DIRTY_LOG's granule), e.g. 1M",
                                             clear_chunk_));
            if (no_manual_)
                throw UsageError("--clear-chunk needs manual protection (KVM_CLEAR_DIRTY_LOG); drop -g");
        }
        if (!eager_split_.empty()) {
            if (eager_split_ != "on" && eager_split_ != "off")
                throw UsageError(fmt::format("--eager-split: '{}' is not on or off", eager_split_));
            o.eager_split = eager_split_ == "on";
        }
        return o;
    }

    std::string vcpus_ = "1", bytes_ = "1G", iterations_ = "2", write_pct_ = "100", slots_ = "1", backing_ = "anon";
    std::string fill_ = "zero";
    bool random_ = false, no_manual_ = false, no_initially_set_ = false;
    std::string ring_, clear_chunk_, eager_split_, json_;
};

}  // namespace

std::unique_ptr<Command> dirty_log_perf_command() { return std::make_unique<DirtyLogPerf>(); }

}  // namespace mvm::cli
