#include "engines/numa_balancing.hpp"

#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <fmt/format.h>
#include <fstream>
#include <memory>
#include <sstream>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "engines/run.hpp"
#include "numa/topology.hpp"
#include "base/sysfs.hpp"

namespace mvm::engines {

namespace {

constexpr const char* kDebugfs = "/sys/kernel/debug";
constexpr const char* kScanDir = "/sys/kernel/debug/sched/numa_balancing";

std::string read_word(const std::string& path)
{
    std::ifstream f(path);
    std::string v;
    f >> v;
    return v;
}

bool exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// debugfs mounted for the scan knobs while this lives, when it was not.
class DebugfsMount {
public:
    // "" when the scan knobs are there (mounting debugfs if needed), else why not.
    std::string ensure()
    {
        if (exists(kScanDir))
            return "";
        if (::mount("debugfs", kDebugfs, "debugfs", 0, nullptr) == 0)
            mounted_ = true;
        if (exists(kScanDir))
            return "";
        return fmt::format("{} is absent (debugfs not mountable here, or a kernel without it)", kScanDir);
    }
    ~DebugfsMount()
    {
        if (mounted_)
            ::umount(kDebugfs);
    }

private:
    bool mounted_ = false;
};

// Shortens the scan delay and period while it lives; the notes say what it did.
class ScanKnobs {
public:
    void shorten(uint32_t ms, std::vector<std::string>& notes)
    {
        if (auto why = debugfs_.ensure(); !why.empty()) {
            notes.push_back("scan delay/period left as they are: " + why);
            return;
        }
        // max first: the kernel keeps min <= max only by convention, but the
        // scan period is clamped between them.
        for (const char* knob : {"scan_period_max_ms", "scan_period_min_ms", "scan_delay_ms"}) {
            auto& k = knobs_.emplace_back(std::make_unique<KnobSetting>());
            const std::string path = fmt::format("{}/{}", kScanDir, knob);
            const std::string old = read_word(path);
            if (auto why = k->set(path, std::to_string(ms)); !why.empty())
                notes.push_back(fmt::format("{} left at {}: {}", knob, old, why));
            else
                notes.push_back(fmt::format("{} {} -> {} for the run (restored)", knob, old, ms));
        }
    }

private:
    DebugfsMount debugfs_;  // destroyed after the knobs are restored
    std::vector<std::unique_ptr<KnobSetting>> knobs_;
};

std::string policies_of(const MachineConfig& cfg)
{
    std::string s;
    for (const auto& n : cfg.nodes)
        s += (s.empty() ? "" : " ") + numa::to_string(n.host_policy);
    return s;
}

std::map<std::string, int64_t> vmstat_delta(const std::map<std::string, uint64_t>& before,
                                            const std::map<std::string, uint64_t>& after)
{
    std::map<std::string, int64_t> d;
    for (const auto& [k, v] : after) {
        auto it = before.find(k);
        d[k] = static_cast<int64_t>(v - (it == before.end() ? 0 : it->second));
    }
    return d;
}

// Why this variant cannot run here ("" when it can).
std::string why_not(const BalancingVariant& v, int host_nodes, const NumaBalancingOptions& opt)
{
    if (v.balancing && host_nodes < 2 && opt.skip_on_single_node)
        return fmt::format("the host has {} NUMA node: balancing has no other node to move memory to; "
                           "run it on a 2-node host, e.g. scripts/svm-host --nodes 2",
                           host_nodes);
    return "";
}

void run_variant(const Kvm& kvm, const MachineConfig& cfg, const NumaBalancingOptions& opt, BalancingVariant& v,
                 const std::string& sysctl, bool& written)
{
    KnobSetting setting;
    if (auto why = setting.set(sysctl, v.balancing ? "1" : "0"); !why.empty()) {
        v.skipped = why;
        return;
    }
    written = written || setting.changed();
    MachineConfig c = variant_config(cfg, v.bound);
    v.policies = policies_of(c);
    StressVm m(kvm, c);
    StatsBaseline before = read_stats(m);
    auto hint_before = read_numa_vmstat();
    RunOptions ro;
    ro.duration_s = opt.duration_s;
    ro.progress = opt.progress;
    v.run = run_workload(m, ro);
    v.vmstat = vmstat_delta(hint_before, read_numa_vmstat());
    v.vcpus_sum = sum_vcpu_stats(before.vcpus, m);
}

}  // namespace

std::string KnobSetting::set(const std::string& path, const std::string& value)
{
    if (!exists(path))
        return fmt::format("{} is absent", path);
    const std::string old = read_word(path);
    if (old == value)
        return "";
    if (!param_file_writable(path))
        return fmt::format("{} is {} and not writable here", path, old);
    {
        std::ofstream f(path);
        f << value;
        f.flush();
        if (!f)
            return fmt::format("{}: writing {} was refused (it stays {})", path, value, old);
    }
    if (read_word(path) != value)
        return fmt::format("{}: wrote {} but it reads {}", path, value, read_word(path));
    path_ = path;
    old_ = old;
    changed_ = true;
    return "";
}

void KnobSetting::restore()
{
    if (!changed_)
        return;
    std::ofstream f(path_);
    f << old_;
    changed_ = false;
}

std::map<std::string, uint64_t> read_numa_vmstat(const std::string& path)
{
    static const char* kNames[] = {"numa_pte_updates", "numa_huge_pte_updates", "numa_hint_faults",
                                   "numa_hint_faults_local", "numa_pages_migrated"};
    std::map<std::string, uint64_t> m;
    std::ifstream f(path);
    std::string name;
    uint64_t value = 0;
    while (f >> name >> value)
        if (std::find_if(std::begin(kNames), std::end(kNames), [&](const char* n) { return name == n; }) !=
            std::end(kNames))
            m[name] = value;
    return m;
}

std::string BalancingVariant::name() const
{
    return fmt::format("{}, {}", balancing ? "on" : "off", bound ? "bound" : "unbound");
}

int64_t BalancingVariant::vm_stat(const char* name) const
{
    if (!run)
        return 0;
    auto it = run->vm_stats.find(name);
    return it == run->vm_stats.end() ? 0 : it->second;
}

int64_t BalancingVariant::vcpu_stat(const char* name) const
{
    auto it = vcpus_sum.find(name);
    return it == vcpus_sum.end() ? 0 : it->second;
}

int64_t BalancingVariant::hint(const char* name) const
{
    auto it = vmstat.find(name);
    return it == vmstat.end() ? 0 : it->second;
}

uint64_t BalancingVariant::pages_written() const
{
    uint64_t n = 0;
    if (run)
        for (const auto& c : run->vcpus)
            n += c.pages_written;
    return n;
}

double BalancingVariant::max_stall_ms() const
{
    double s = 0;
    if (run)
        for (const auto& c : run->vcpus)
            s = std::max(s, c.max_stall_ms);
    return s;
}

uint64_t BalancingVariant::watchdog_events() const
{
    uint64_t n = 0;
    if (run)
        for (const auto& c : run->vcpus)
            n += c.watchdog_events;
    return n;
}

uint64_t BalancingVariant::mismatches() const
{
    return run && run->stamps ? run->stamps->mismatches : 0;
}

bool NumaBalancingReport::failed() const
{
    return std::any_of(variants.begin(), variants.end(), [](const BalancingVariant& v) {
        return v.run && (v.run->failure || (v.run->stamps && !v.run->stamps->ok()));
    });
}

std::string NumaBalancingReport::status() const
{
    if (failed())
        return "failed";
    if (interrupted)
        return "interrupted";
    const bool skipped =
        std::any_of(variants.begin(), variants.end(), [](const BalancingVariant& v) { return !v.skipped.empty(); });
    return skipped ? "partial" : "completed";
}

MachineConfig variant_config(const MachineConfig& cfg, bool bound)
{
    MachineConfig c = cfg;
    for (auto& n : c.nodes) {
        if (!bound) {
            n.host_policy = {};
            continue;
        }
        std::vector<int> nodes = n.host_policy.nodes.empty() ? std::vector<int>{0} : n.host_policy.nodes;
        n.host_policy = {numa::Policy::Bind, nodes};
    }
    return c;
}

NumaBalancingReport numa_balancing(const Kvm& kvm, const MachineConfig& cfg, const NumaBalancingOptions& opt)
{
    NumaBalancingReport r;
    if (!exists(r.sysctl_path))
        throw Unsupported(fmt::format("numa-balancing: {} is absent: this kernel has no automatic NUMA balancing "
                                      "(CONFIG_NUMA_BALANCING)",
                                      r.sysctl_path));
    r.host_nodes = static_cast<int>(numa::host_topology().nodes.size());
    r.setting_before = read_word(r.sysctl_path);
    for (bool on : {false, true})
        for (bool bound : {false, true}) {
            BalancingVariant v;
            v.balancing = on;
            v.bound = bound;
            v.skipped = why_not(v, r.host_nodes, opt);
            r.variants.push_back(v);
        }
    const bool any_on = std::any_of(r.variants.begin(), r.variants.end(),
                                    [](const BalancingVariant& v) { return v.balancing && v.skipped.empty(); });
    ScanKnobs scan;
    if (any_on && opt.scan_ms)
        scan.shorten(*opt.scan_ms, r.scan_notes);
    else if (any_on)
        r.scan_notes.push_back("scan delay/period: the kernel's (--scan-period kernel)");
    for (auto& v : r.variants) {
        if (!v.skipped.empty())
            continue;
        if (g_stop_signal.load()) {
            v.skipped = "interrupted before it started";
            r.interrupted = true;
            continue;
        }
        run_variant(kvm, cfg, opt, v, r.sysctl_path, r.sysctl_written);
        if (v.run && v.run->interrupted)
            r.interrupted = true;
        if (v.run && v.run->failure)
            break;
    }
    r.setting_after = read_word(r.sysctl_path);
    r.relations = balancing_relations(r.variants);
    return r;
}

}  // namespace mvm::engines
