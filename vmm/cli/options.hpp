// vmm/cli/options.hpp - VM options shared by every command that boots a
// guest (run, and later numa-check, dirty-log-perf, migrate, lockup), and the
// parsers that turn bad values into one line naming the option and the fix.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <string_view>

#include "vmm/config.hpp"

namespace mvm::cli {

uint64_t parse_uint(std::string_view option, const std::string& value, uint64_t min, uint64_t max);
double parse_seconds(std::string_view option, const std::string& value);

// Raw strings from the command line; to_config() validates them.
struct VmOptions {
    std::string vcpus = "2";
    std::string mem = "256M";
    std::string backing = "anon";
    std::string pattern = "seq";
    std::string write_pct = "100";
    std::string touch = "qword";
    std::string rate = "0";
    std::string seed = "1";
    std::string watchdog_ms = "20";
    std::string passes = "0";
    std::string guest_fault;  // test hook: ud|pf|de|gp[:VCPU]

    void add_to(CLI::App& app);
    // Parses and validates against the host; throws UsageError first.
    MachineConfig to_config(const Kvm& kvm) const;
};

}  // namespace mvm::cli
