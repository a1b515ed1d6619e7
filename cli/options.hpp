// cli/options.hpp - VM options shared by every command that boots a
// guest (run, and later numa-check, dirty-log-perf, migrate, lockup), and the
// parsers that turn bad values into one line naming the option and the fix.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "vmm/config.hpp"

namespace mvm::cli {

uint64_t parse_uint(std::string_view option, const std::string& value, uint64_t min, uint64_t max);
// Durations: a number with an optional unit (us, ms, s, m). parse_seconds
// reads a bare number as seconds and returns seconds; parse_ms reads it as
// milliseconds and returns milliseconds (refusing a bare 0 < x < 1, which is
// seconds written where ms are asked for).
double parse_seconds(std::string_view option, const std::string& value);
double parse_ms(std::string_view option, const std::string& value);

// After every command registered its options: names each option's kind of
// value in --help (SIZE, MS, SECONDS, N, LIST, ...) from one table, so the
// same option reads the same everywhere. Options it does not know keep
// CLI11's TEXT (tests/unit/test_options.cpp fails on any).
void label_value_kinds(CLI::App& app);
const char* value_kind(std::string_view option_name);  // nullptr when unknown

// One --numa value, in the spirit of QEMU's -numa node + memory-backend:
//   node=0,cpus=0-1,mem=512M,backing=hugetlb2m,host-nodes=0,policy=bind,prealloc=on
// plus host-cpus= to pin the node's vCPU threads to other CPUs than those of
// host-nodes. cpus= and host-nodes= may repeat (cpus=0-1,cpus=4). `index` is
// the 0-based position among the --numa options (the default node id) and
// names the option in errors ("--numa #2"). `default_backing` is --backing.
// Throws UsageError naming the key and the fix.
NodeConfig parse_numa_option(const std::string& value, uint32_t index, BackingKind default_backing);

// A backing name, also the selftests' (anonymous, anonymous_thp,
// anonymous_hugetlb, shmem, shared_hugetlb).
BackingKind parse_backing_option(std::string_view option, const std::string& value);

// A dirty ring size in bytes: a power of two between the host's minimum
// (probed once) and KVM_CAP_DIRTY_LOG_RING's maximum.
uint32_t parse_ring_size(std::string_view option, const std::string& value, const Kvm& kvm);

// --access local|remote|mixed:P
AccessConfig parse_access(const std::string& value);

// --fill zero|stamp|random|ratio:R into w.fill (and w.fill_ratio).
void parse_fill(const std::string& value, WorkloadConfig& w);

// Raw strings from the command line; to_config() validates them.
struct VmOptions {
    std::string vcpus = "2";
    std::string mem = "256M";
    std::string backing = "anon";
    std::string pattern = "seq";
    std::string write_pct = "100";
    std::string touch;  // "": not given (qword); an alias of fill
    std::string fill;   // "": not given (zero, or what --touch says)
    std::string rate = "0";
    std::string seed = "1";
    std::string watchdog_ms = "20";
    std::string passes = "0";
    std::vector<std::string> numa;  // one per virtual node
    std::string access = "local";
    std::string uuid;  // --uuid, QEMU's -uuid
    bool vcpus_given = false, mem_given = false;  // spelled out on the command line

    void add_to(CLI::App& app);
    // Parses and checks against `topo` (no KVM, no host resources): what
    // tests with a supplied topology call.
    // With `kvm`, its vCPU limit is checked first (it is the one users hit).
    MachineConfig parse(const numa::Topology& topo, const Kvm* kvm = nullptr) const;
    // parse() against the host's topology, then check_host_resources().
    MachineConfig to_config(const Kvm& kvm) const;
};

}  // namespace mvm::cli
