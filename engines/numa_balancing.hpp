// engines/numa_balancing.hpp - `minivmm numa-balancing`: what the kernel's
// automatic NUMA balancing costs a running guest. The same guest runs four
// times: balancing off/on (/proc/sys/kernel/numa_balancing, set for the
// variant and restored) x memory bound (mbind MPOL_BIND to host nodes) /
// unbound (default policy). Per variant: KVM stat deltas (remote TLB flushes,
// page faults), guest progress and its longest stall, and the host's NUMA
// hinting counters from /proc/vmstat; then the relations between variants.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engines/run_report.hpp"
#include "vmm/config.hpp"

namespace mvm::engines {

// A sysctl/debugfs file set for this object's lifetime and restored after
// (also when an exception or a stop signal unwinds past it).
class KnobSetting {
public:
    KnobSetting() = default;
    ~KnobSetting() { restore(); }
    KnobSetting(const KnobSetting&) = delete;
    KnobSetting& operator=(const KnobSetting&) = delete;
    // Writes `value` to `path` (nothing when it already holds it). Returns ""
    // on success, else why not (absent, read-only, refused).
    std::string set(const std::string& path, const std::string& value);
    void restore();
    const std::string& old_value() const { return old_; }
    bool changed() const { return changed_; }  // written (and to be restored)

private:
    std::string path_, old_;
    bool changed_ = false;
};

// The host's NUMA balancing counters (/proc/vmstat numa_pte_updates,
// numa_huge_pte_updates, numa_hint_faults, numa_hint_faults_local,
// numa_pages_migrated); empty without CONFIG_NUMA_BALANCING.
std::map<std::string, uint64_t> read_numa_vmstat(const std::string& path = "/proc/vmstat");

struct BalancingVariant {
    bool balancing = false;  // numa_balancing=1 for the run, else 0
    bool bound = false;      // every virtual node's memory MPOL_BIND to host nodes
    std::string name() const;  // "on, unbound"
    std::string skipped;       // why it did not run; "" when it ran
    std::string policies;      // per virtual node: "bind:0 bind:1" / "default default"
    std::optional<RunReport> run;
    StatDelta vcpus_sum;                  // vCPU stat deltas summed over vCPUs
    std::map<std::string, int64_t> vmstat;  // /proc/vmstat numa_* deltas (whole host)

    int64_t vm_stat(const char* name) const;
    int64_t vcpu_stat(const char* name) const;
    int64_t hint(const char* name) const;  // 0 when absent
    uint64_t pages_written() const;
    double max_stall_ms() const;
    uint64_t watchdog_events() const;
    uint64_t mismatches() const;
};

struct NumaBalancingOptions {
    double duration_s = 3;
    bool progress = false;
    // Scan delay and period (ms) while balancing is on; nullopt: the kernel's.
    std::optional<uint32_t> scan_ms = 100;
    // A one-node host: run the "off" variants only (never write the sysctl).
    bool skip_on_single_node = true;
};

struct NumaBalancingReport {
    std::string sysctl_path = "/proc/sys/kernel/numa_balancing";
    std::string setting_before, setting_after;  // the sysctl's value before the first and after the last variant
    bool sysctl_written = false;                // some variant changed it (and restored it after)
    int host_nodes = 0;
    std::vector<std::string> scan_notes;  // "scan_delay_ms 1000 -> 100 while on (restored)" or why not
    std::vector<BalancingVariant> variants;
    std::vector<std::string> relations;   // one line per comparison
    bool interrupted = false;

    bool failed() const;  // a guest failed or a stamp mismatched
    std::string status() const;  // completed | partial (variants skipped) | failed | interrupted
};

// The variant's machine: `cfg` with each virtual node's memory bound to its
// host-nodes= (host node 0 when none was given) or left on the default
// policy. vCPU pinning is the same in both. As in every minivmm run, the
// vCPU threads run under their node's policy (set_mempolicy), so bound also
// means the threads' own policy is MPOL_BIND.
MachineConfig variant_config(const MachineConfig& cfg, bool bound);

// Runs the four variants (off first, so the "on" runs are not disturbed by
// pages the previous "on" run left behind). Throws Unsupported when the
// sysctl is absent.
NumaBalancingReport numa_balancing(const Kvm& kvm, const MachineConfig& cfg, const NumaBalancingOptions& opt);

// The comparisons the report prints, from its variants.
std::vector<std::string> balancing_relations(const std::vector<BalancingVariant>& variants);

nlohmann::json to_json(const NumaBalancingReport& r);
std::string to_table(const NumaBalancingReport& r);

}  // namespace mvm::engines
