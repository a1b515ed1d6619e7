// cli/output.hpp - what every command does with its report and its host:
// where the table and the JSON go, checking output paths before a guest is
// booted for them, and which KVM device to open.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "vmm/config.hpp"

namespace mvm::cli {

// Writes `j` to the file `dest`, or to stdout for "-".
void write_json(const std::string& dest, const nlohmann::json& j);

// Every report's JSON says what it ran with: config.machine (vCPUs, ring
// size, workload, per virtual node backing and policy) and config.host
// (kernel, KVM module parameters as `caps` reads them, THP, numa_balancing).
void echo_config(nlohmann::json& report, const MachineConfig& cfg);

// An output file (--json, --timeline) must be writable before a guest is
// booted for it. Checked without opening it: bad input must neither create
// the file nor touch one that is there.
void check_output_path(std::string_view option, const std::string& dest, std::string_view fix);
void check_json_dest(const std::string& dest);

// Where a command prints its table: stderr when the JSON goes to stdout.
std::FILE* table_stream(const std::string& json_dest);

// The KVM device; MINIVMM_KVM_DEVICE overrides it (tests use it to show the
// message a host without KVM gets).
std::string kvm_device();

// Whether progress lines belong on stderr (a terminal).
bool stderr_is_terminal();

}  // namespace mvm::cli
