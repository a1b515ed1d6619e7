#include "vmm/cli/options.hpp"

#include <charconv>
#include <cmath>
#include <fmt/format.h>

#include "vmm/kvm/error.hpp"
#include "vmm/units.hpp"

namespace mvm::cli {

uint64_t parse_uint(std::string_view option, const std::string& value, uint64_t min, uint64_t max)
{
    uint64_t v = 0;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    if (value.empty() || ec == std::errc::invalid_argument || p != value.data() + value.size())
        throw UsageError(fmt::format("{}: '{}' is not a whole number; use a value in {}..{}", option, value, min, max));
    if (ec == std::errc::result_out_of_range || v < min || v > max)
        throw UsageError(fmt::format("{}: {} is out of range; use a value in {}..{}", option, value, min, max));
    return v;
}

double parse_seconds(std::string_view option, const std::string& value)
{
    double v = 0;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    if (value.empty() || ec != std::errc() || p != value.data() + value.size() || !std::isfinite(v) || v < 0)
        throw UsageError(fmt::format("{}: '{}' is not a number of seconds; use e.g. 3 or 0.5", option, value));
    return v;
}

void VmOptions::add_to(CLI::App& app)
{
    app.add_option("--vcpus", vcpus, "number of vCPUs")->capture_default_str();
    app.add_option("--mem", mem, "guest memory, e.g. 256M or 2G")->capture_default_str();
    app.add_option("--backing", backing, std::string("backing store: ") + std::string(backing_names()))
        ->capture_default_str();
    app.add_option("--pattern", pattern, "page order in each pass: seq|random")->capture_default_str();
    app.add_option("--write-pct", write_pct, "share of visited pages written (reads for the rest)")->capture_default_str();
    app.add_option("--touch", touch, "write one qword per page or the whole page: qword|page")->capture_default_str();
    app.add_option("--rate", rate, "cap in pages/s per vCPU (0 = unlimited)")->capture_default_str();
    app.add_option("--seed", seed, "seed of the random pattern")->capture_default_str();
    app.add_option("--watchdog-ms", watchdog_ms, "guest watchdog threshold in ms")->capture_default_str();
    app.add_option("--passes", passes, "stop each vCPU after this many passes (0 = run for --duration)")
        ->capture_default_str();
    app.add_option("--guest-fault", guest_fault, "test hook: make the guest fault: ud|pf|de|gp[:VCPU]")->group("");
}

MachineConfig VmOptions::to_config(const Kvm& kvm) const
{
    uint32_t n = static_cast<uint32_t>(parse_uint("--vcpus", vcpus, 0, 1u << 20));
    uint64_t bytes = parse_size_option("--mem", mem);
    auto kind = parse_backing(backing);
    if (!kind)
        throw UsageError(fmt::format("--backing: unknown backing '{}'; use one of {}", backing, backing_names()));
    MachineConfig cfg = single_node_config(n, bytes, *kind);
    WorkloadConfig& w = cfg.workload;
    if (pattern == "seq" || pattern == "sequential")
        w.pattern = MVM_PATTERN_SEQ;
    else if (pattern == "random")
        w.pattern = MVM_PATTERN_RANDOM;
    else
        throw UsageError(fmt::format("--pattern: unknown pattern '{}'; use seq or random", pattern));
    if (touch == "qword")
        w.touch = MVM_TOUCH_QWORD;
    else if (touch == "page")
        w.touch = MVM_TOUCH_PAGE;
    else
        throw UsageError(fmt::format("--touch: unknown mode '{}'; use qword or page", touch));
    w.write_pct = static_cast<uint32_t>(parse_uint("--write-pct", write_pct, 0, 100));
    w.rate_pages_per_s = parse_uint("--rate", rate, 0, 1ull << 40);
    w.seed = parse_uint("--seed", seed, 0, ~0ull);
    w.watchdog_ms = parse_seconds("--watchdog-ms", watchdog_ms);
    if (w.watchdog_ms <= 0)
        throw UsageError("--watchdog-ms: must be positive, e.g. 20");
    w.max_passes = parse_uint("--passes", passes, 0, 1ull << 40);
    if (!guest_fault.empty()) {
        auto colon = guest_fault.find(':');
        std::string kindf = guest_fault.substr(0, colon);
        if (kindf == "ud")
            w.fault = MVM_FAULT_UD;
        else if (kindf == "pf")
            w.fault = MVM_FAULT_PF;
        else if (kindf == "de")
            w.fault = MVM_FAULT_DE;
        else if (kindf == "gp")
            w.fault = MVM_FAULT_GP;
        else
            throw UsageError(fmt::format("--guest-fault: unknown fault '{}'; use ud, pf, de or gp", kindf));
        w.fault_vcpu = colon == std::string::npos
                           ? 0
                           : static_cast<int>(parse_uint("--guest-fault", guest_fault.substr(colon + 1), 0, n ? n - 1 : 0));
    }
    validate_config(cfg, kvm);
    return cfg;
}

}  // namespace mvm::cli
