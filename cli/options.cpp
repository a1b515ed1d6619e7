#include "cli/options.hpp"
#include "cli/test_hooks.hpp"
#include "vmm/stress/layout.hpp"  // the guest's pattern, fill and fault codes

#include <algorithm>
#include <cctype>
#include <charconv>
#include <set>
#include <cmath>
#include <fmt/format.h>
#include <optional>

#include "vmm/dirty/tracker.hpp"
#include "base/error.hpp"
#include "vmm/kvm/ioctl.hpp"
#include "vmm/kvm/kvm.hpp"
#include "base/units.hpp"

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

namespace {

// A number with an optional unit (us, ms, s, m), in seconds; `bare` is the
// unit of a number without one. nullopt when it is not that.
std::optional<double> parse_duration(std::string_view value, double bare)
{
    static const std::pair<std::string_view, double> units[] = {{"us", 1e-6}, {"ms", 1e-3}, {"s", 1.0}, {"m", 60.0}};
    double scale = bare;
    for (const auto& [suffix, unit] : units)
        if (value.size() > suffix.size() && value.ends_with(suffix) &&
            !std::isalpha(static_cast<unsigned char>(value[value.size() - suffix.size() - 1]))) {
            value.remove_suffix(suffix.size());
            scale = unit;
            break;
        }
    double v = 0;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    if (value.empty() || ec != std::errc() || p != value.data() + value.size() || !std::isfinite(v) || v < 0)
        return std::nullopt;
    return v * scale;
}

}  // namespace

double parse_seconds(std::string_view option, const std::string& value)
{
    auto v = parse_duration(value, 1.0);
    if (!v)
        throw UsageError(fmt::format("{}: '{}' is not a duration; use seconds (3, 0.5) or a unit (500ms, 2s, 1m)",
                                     option, value));
    return *v;
}

double parse_ms(std::string_view option, const std::string& value)
{
    auto v = parse_duration(value, 1e-3);
    if (!v)
        throw UsageError(fmt::format("{}: '{}' is not a duration; use milliseconds (300) or a unit (300ms, 0.3s)",
                                     option, value));
    // A bare fraction of a millisecond is almost always seconds meant as ms.
    const bool bare = !value.empty() && std::isdigit(static_cast<unsigned char>(value.back()));
    if (bare && *v > 0 && *v < 1e-3)
        throw UsageError(fmt::format("{}: '{}' would be {} ms; this option is in milliseconds: write {}ms, or {}s "
                                     "for seconds",
                                     option, value, value, value, value));
    return *v * 1e3;
}

namespace {

std::vector<int> parse_list(const std::string& where, const std::string& key, const std::string& v, int max)
{
    std::vector<int> out;
    try {
        out = numa::parse_cpu_list(v);
    } catch (const std::exception&) {
        throw UsageError(fmt::format("{}: {}='{}' is not a list like 0-3,5 (repeat the key for several ranges: "
                                     "{}=0-1,{}=4)",
                                     where, key, v, key, key));
    }
    if (out.empty())
        throw UsageError(fmt::format("{}: {}= is empty; give a list like 0-1", where, key));
    for (int x : out)
        if (x > max)
            throw UsageError(fmt::format("{}: {}={} is out of range; use values within 0-{}", where, key, x, max));
    return out;
}

bool parse_on_off(const std::string& where, const std::string& key, const std::string& v)
{
    if (v == "on" || v == "yes" || v == "true" || v == "1")
        return true;
    if (v == "off" || v == "no" || v == "false" || v == "0")
        return false;
    throw UsageError(fmt::format("{}: {}='{}' is not on or off", where, key, v));
}

// A --numa value while it is parsed: the node so far and what its keys gathered.
struct NodeDraft {
    NodeConfig n;
    bool have_mem = false, have_policy = false;
    std::vector<int> cpus, host_nodes, host_cpus;
};

// One key=value of a --numa option (`where` names it in errors).
void apply_numa_key(const std::string& where, const std::string& key, const std::string& v, NodeDraft& d)
{
    NodeConfig& n = d.n;
    if (key == "node" || key == "nodeid") {
        n.id = static_cast<uint32_t>(parse_uint(where + " node", v, 0, kMaxVnodes - 1));
        n.origin = fmt::format("--numa node={}", n.id);
    } else if (key == "cpus") {
        auto l = parse_list(where, key, v, 1023);
        d.cpus.insert(d.cpus.end(), l.begin(), l.end());
    } else if (key == "mem" || key == "size") {
        n.mem_bytes = parse_size_option(where + " mem", v);
        d.have_mem = true;
    } else if (key == "backing" || key == "memdev") {
        auto k = parse_backing(v);
        if (!k)
            throw UsageError(fmt::format("{}: backing='{}' is unknown; use one of {}", where, v, backing_names()));
        n.backing = *k;
    } else if (key == "host-nodes") {
        auto l = parse_list(where, key, v, 1023);
        d.host_nodes.insert(d.host_nodes.end(), l.begin(), l.end());
    } else if (key == "host-cpus") {
        auto l = parse_list(where, key, v, 65535);
        d.host_cpus.insert(d.host_cpus.end(), l.begin(), l.end());
    } else if (key == "policy") {
        auto p = numa::parse_policy(v);
        if (!p)
            throw UsageError(fmt::format("{}: policy='{}' is unknown; use bind, preferred, interleave or default",
                                         where, v));
        n.host_policy.policy = *p;
        d.have_policy = true;
    } else if (key == "prealloc") {
        n.prealloc = parse_on_off(where, key, v);
    } else {
        throw UsageError(fmt::format("{}: unknown key '{}'; use node, cpus, mem, backing, host-nodes, host-cpus, "
                                     "policy, prealloc",
                                     where, key));
    }
}

// The node of a fully parsed --numa option: mem= given, the lists sorted and
// checked, host-nodes alone meaning bind.
NodeConfig finish_node(NodeDraft d)
{
    NodeConfig& n = d.n;
    if (!d.have_mem)
        throw UsageError(fmt::format("{}: mem= is missing; every virtual node needs its size, e.g. mem=512M", n.origin));
    std::sort(d.cpus.begin(), d.cpus.end());
    if (std::adjacent_find(d.cpus.begin(), d.cpus.end()) != d.cpus.end())
        throw UsageError(fmt::format("{}: cpus= lists a vCPU twice", n.origin));
    for (int c : d.cpus)
        n.vcpus.push_back(static_cast<uint32_t>(c));
    std::sort(d.host_nodes.begin(), d.host_nodes.end());
    d.host_nodes.erase(std::unique(d.host_nodes.begin(), d.host_nodes.end()), d.host_nodes.end());
    n.host_policy.nodes = d.host_nodes;
    // host-nodes alone means bind, the policy people want for VMs.
    if (!d.have_policy && !d.host_nodes.empty())
        n.host_policy.policy = numa::Policy::Bind;
    if (d.have_policy && n.host_policy.policy != numa::Policy::Default && d.host_nodes.empty())
        throw UsageError(fmt::format("{}: policy={} needs host-nodes=, e.g. host-nodes=0", n.origin,
                                     numa::policy_name(n.host_policy.policy)));
    std::sort(d.host_cpus.begin(), d.host_cpus.end());
    d.host_cpus.erase(std::unique(d.host_cpus.begin(), d.host_cpus.end()), d.host_cpus.end());
    n.host_cpus = d.host_cpus;
    n.host_cpus_given = !d.host_cpus.empty();
    return n;
}

}  // namespace

NodeConfig parse_numa_option(const std::string& value, uint32_t index, BackingKind default_backing)
{
    const std::string where = fmt::format("--numa #{}", index + 1);
    NodeDraft d;
    d.n.id = index;
    d.n.backing = default_backing;
    d.n.origin = where;
    std::set<std::string> seen;
    size_t pos = 0;
    if (value.empty())
        throw UsageError(fmt::format("{}: empty; use e.g. node=0,cpus=0-1,mem=512M,host-nodes=0", where));
    while (pos <= value.size()) {
        size_t comma = value.find(',', pos);
        std::string item = value.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        pos = comma == std::string::npos ? value.size() + 1 : comma + 1;
        auto eq = item.find('=');
        if (item.empty() || eq == std::string::npos || eq == 0)
            throw UsageError(fmt::format("{}: '{}' is not key=value; use e.g. node=0,cpus=0-1,mem=512M", where, item));
        std::string key = item.substr(0, eq), v = item.substr(eq + 1);
        const bool repeatable = key == "cpus" || key == "host-nodes" || key == "host-cpus";
        if (!seen.insert(key).second && !repeatable)
            throw UsageError(fmt::format("{}: {}= is given twice", where, key));
        apply_numa_key(where, key, v, d);
    }
    return finish_node(std::move(d));
}

BackingKind parse_backing_option(std::string_view option, const std::string& value)
{
    static const std::pair<const char*, BackingKind> aliases[] = {
        {"anonymous", BackingKind::Anon},         {"anonymous_thp", BackingKind::Thp},
        {"anonymous_hugetlb", BackingKind::Hugetlb2M}, {"anonymous_hugetlb_2mb", BackingKind::Hugetlb2M},
        {"anonymous_hugetlb_1gb", BackingKind::Hugetlb1G}, {"shmem", BackingKind::Shm},
        {"shared_hugetlb", BackingKind::Hugetlb2M}};
    if (auto k = parse_backing(value))
        return *k;
    for (const auto& [name, kind] : aliases)
        if (value == name)
            return kind;
    throw UsageError(fmt::format("{}: unknown backing '{}'; use one of {}", option, value, backing_names()));
}

uint32_t parse_ring_size(std::string_view option, const std::string& value, const Kvm& kvm)
{
    const int cap = kvm.cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0 ? kvm.cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
                                                                : kvm.cap(KVM_CAP_DIRTY_LOG_RING);
    if (cap <= 0)
        throw UsageError(fmt::format("{}: this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING); use the bitmap "
                                     "(drop {})",
                                     option, option));
    const uint64_t bytes = parse_size_option(option, value);
    const uint32_t min = dirty::min_dirty_ring_bytes(kvm), max = static_cast<uint32_t>(cap);
    if (bytes < min || bytes > max || (bytes & (bytes - 1)))
        throw UsageError(fmt::format("{} {}: a dirty ring must be a power of two from {} to {} here ({} to {} entries "
                                     "of 16 bytes)",
                                     option, value, format_size(min), format_size(max), min / 16, max / 16));
    return static_cast<uint32_t>(bytes);
}

AccessConfig parse_access(const std::string& value)
{
    AccessConfig a;
    if (value == "local")
        return a;
    if (value == "remote") {
        a.mode = Access::Remote;
        a.remote_pct = 100;
        return a;
    }
    if (value.rfind("mixed:", 0) == 0) {
        a.mode = Access::Mixed;
        a.remote_pct = static_cast<uint32_t>(parse_uint("--access mixed:P", value.substr(6), 0, 100));
        return a;
    }
    throw UsageError(fmt::format("--access: unknown mode '{}'; use local, remote or mixed:P (P = remote %, 0..100)",
                                 value));
}

void parse_fill(const std::string& value, WorkloadConfig& w)
{
    w.fill_ratio = 0;
    if (value == "zero")
        w.fill = MVM_FILL_ZERO;
    else if (value == "stamp")
        w.fill = MVM_FILL_STAMP;
    else if (value == "random")
        w.fill = MVM_FILL_RANDOM;
    else if (value.rfind("ratio:", 0) == 0) {
        const std::string_view r = std::string_view(value).substr(6);
        double v = 0;
        auto [p, ec] = std::from_chars(r.data(), r.data() + r.size(), v);
        if (r.empty() || ec != std::errc() || p != r.data() + r.size() || !std::isfinite(v) || v < 1 || v > 512)
            throw UsageError(fmt::format("--fill {}: R must be a number from 1 to 512 (how much zstd shrinks a "
                                         "page), e.g. ratio:2 or ratio:3.5",
                                         value));
        w.fill = MVM_FILL_RATIO;
        w.fill_ratio = v;
    } else
        throw UsageError(
            fmt::format("--fill: unknown fill '{}'; use zero, stamp, random or ratio:R (R from 1 to 512)", value));
}

void VmOptions::add_to(CLI::App& app)
{
    app.add_option("--vcpus", vcpus, "number of vCPUs (with --numa: defaults to the highest cpus= + 1)")
        ->capture_default_str()
        ->each([this](const std::string&) { vcpus_given = true; });
    app.add_option("--mem", mem, "guest memory, e.g. 256M or 2G (with --numa: the sum of mem=, if given)")
        ->capture_default_str()
        ->each([this](const std::string&) { mem_given = true; });
    app.add_option("--numa", numa,
                   "a virtual node, once per node: node=N,cpus=LIST,mem=SIZE[,backing=KIND][,host-nodes=LIST]"
                   "[,policy=bind|preferred|interleave|default][,host-cpus=LIST][,prealloc=on]; host-nodes alone "
                   "means bind; vCPU threads are pinned to host-cpus or else to the CPUs of host-nodes")
        ->take_all();
    app.add_option("--access", access, "which nodes each vCPU touches: local|remote|mixed:P (P% on the next node)")
        ->capture_default_str();
    app.add_option("--backing", backing, std::string("backing store: ") + std::string(backing_names()))
        ->capture_default_str();
    app.add_option("--pattern", pattern, "page order in each pass: seq|random")->capture_default_str();
    app.add_option("--write-pct", write_pct, "share of visited pages written (reads for the rest)")->capture_default_str();
    app.add_option("--fill", fill,
                   "what a written page holds besides its stamp (qword 0): zero (the rest as it was), stamp (every "
                   "qword), random (incompressible), ratio:R (random start, zeros after: zstd compresses by ~R, "
                   "R >= 1); default zero");
    app.add_option("--touch", touch, "older spelling of --fill: qword = zero, page = stamp; default qword");
    app.add_option("--rate", rate, "cap in pages/s per vCPU (0 = unlimited)")->capture_default_str();
    app.add_option("--seed", seed, "seed of the random pattern")->capture_default_str();
    app.add_option("--watchdog-ms", watchdog_ms, "guest watchdog threshold in ms")->capture_default_str();
    app.add_option("--uuid", uuid,
                   "the VM's UUID, as QEMU's -uuid (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx): QMP query-uuid reports "
                   "it; with the validate-uuid capability a migration refuses a destination with another one");
    app.add_option("--passes", passes, "stop each vCPU after this many passes (0 = run for --duration)")
        ->capture_default_str();
}

namespace {

// The nodes of the --numa options, sorted by id; --mem must agree with the
// sum of their sizes. Without --vcpus, the highest cpus= + 1 vCPUs.
MachineConfig numa_config(const VmOptions& o, uint32_t vcpus, uint64_t bytes, BackingKind kind,
                          const numa::Topology& topo)
{
    MachineConfig cfg;
    cfg.vcpus = vcpus;
    uint64_t sum = 0;
    bool any_cpus = false;
    uint32_t max_cpu = 0;
    for (size_t i = 0; i < o.numa.size(); i++) {
        cfg.nodes.push_back(parse_numa_option(o.numa[i], static_cast<uint32_t>(i), kind));
        sum += cfg.nodes.back().mem_bytes;
        for (uint32_t c : cfg.nodes.back().vcpus) {
            any_cpus = true;
            max_cpu = std::max(max_cpu, c);
        }
    }
    std::sort(cfg.nodes.begin(), cfg.nodes.end(), [](const NodeConfig& a, const NodeConfig& b) { return a.id < b.id; });
    if (o.mem_given && sum != bytes)
        throw UsageError(fmt::format("--mem {} differs from the sum of the --numa mem= sizes ({}); drop --mem or "
                                     "make them agree",
                                     o.mem, format_size(sum)));
    if (!o.vcpus_given && any_cpus)
        cfg.vcpus = max_cpu + 1;
    if (!any_cpus) {
        // Like QEMU without cpus=: vCPUs split into contiguous blocks over the nodes.
        const uint32_t n = cfg.vcpus, k = static_cast<uint32_t>(cfg.nodes.size());
        for (uint32_t i = 0; i < k; i++)
            for (uint32_t v = n * i / k; v < n * (i + 1) / k; v++)
                cfg.nodes[i].vcpus.push_back(v);
    }
    // vCPU threads follow their node: pinned to the CPUs of its host nodes.
    for (auto& node : cfg.nodes)
        if (!node.host_cpus_given && node.host_policy.policy != numa::Policy::Default && !node.vcpus.empty()) {
            bool known = std::all_of(node.host_policy.nodes.begin(), node.host_policy.nodes.end(),
                                     [&](int h) { return topo.node(h) != nullptr; });
            if (known)
                node.host_cpus = numa::cpus_for_nodes(topo, node.host_policy.nodes);
        }
    return cfg;
}

// QEMU's -uuid: 8-4-4-4-12 hex digits; "" stays "" (not given).
std::string parse_uuid(std::string_view option, const std::string& v)
{
    if (v.empty())
        return v;
    bool ok = v.size() == 36;
    for (size_t i = 0; ok && i < v.size(); i++)
        ok = (i == 8 || i == 13 || i == 18 || i == 23) ? v[i] == '-' : std::isxdigit(static_cast<unsigned char>(v[i]));
    if (!ok)
        throw UsageError(fmt::format("{}: '{}' is not a UUID; give 8-4-4-4-12 hex digits, e.g. "
                                     "11111111-1111-1111-1111-111111111111",
                                     option, v));
    std::string out = v;
    for (char& c : out)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
}

// --fill, or --touch as its alias (qword = zero, page = stamp); both only when they agree.
void parse_fill_and_touch(const VmOptions& o, WorkloadConfig& w)
{
    std::string from_touch;
    if (o.touch == "qword")
        from_touch = "zero";
    else if (o.touch == "page")
        from_touch = "stamp";
    else if (!o.touch.empty())
        throw UsageError(fmt::format("--touch: unknown mode '{}'; use qword or page (or --fill)", o.touch));
    if (!o.fill.empty() && !from_touch.empty() && o.fill != from_touch)
        throw UsageError(fmt::format("--fill {} conflicts with --touch {} (that is --fill {}); give only --fill",
                                     o.fill, o.touch, from_touch));
    parse_fill(!o.fill.empty() ? o.fill : !from_touch.empty() ? from_touch : "zero", w);
}

// --pattern, --fill/--touch, --write-pct, --rate, --seed, --watchdog-ms, --passes.
void parse_workload(const VmOptions& o, WorkloadConfig& w)
{
    if (o.pattern == "seq" || o.pattern == "sequential")
        w.pattern = MVM_PATTERN_SEQ;
    else if (o.pattern == "random")
        w.pattern = MVM_PATTERN_RANDOM;
    else
        throw UsageError(fmt::format("--pattern: unknown pattern '{}'; use seq or random", o.pattern));
    parse_fill_and_touch(o, w);
    w.write_pct = static_cast<uint32_t>(parse_uint("--write-pct", o.write_pct, 0, 100));
    w.rate_pages_per_s = parse_uint("--rate", o.rate, 0, 1ull << 40);
    w.seed = parse_uint("--seed", o.seed, 0, ~0ull);
    w.watchdog_ms = parse_ms("--watchdog-ms", o.watchdog_ms);
    if (w.watchdog_ms <= 0)
        throw UsageError("--watchdog-ms: must be positive, e.g. 20");
    w.max_passes = parse_uint("--passes", o.passes, 0, 1ull << 40);
}

// Test hook (cli/test_hooks.hpp): make the guest fault, ud|pf|de|gp[:VCPU].
void apply_guest_fault_hook(WorkloadConfig& w, uint32_t vcpus)
{
    const std::string guest_fault = test_hook("GUEST_FAULT");
    if (guest_fault.empty())
        return;
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
        throw UsageError(fmt::format("MINIVMM_TEST_GUEST_FAULT: unknown fault '{}'; use ud, pf, de or gp", kindf));
    w.fault_vcpu = colon == std::string::npos
                       ? 0
                       : static_cast<int>(parse_uint("MINIVMM_TEST_GUEST_FAULT", guest_fault.substr(colon + 1), 0,
                                                     vcpus ? vcpus - 1 : 0));
}

}  // namespace

MachineConfig VmOptions::parse(const numa::Topology& topo, const Kvm* kvm) const
{
    const uint32_t n = static_cast<uint32_t>(parse_uint("--vcpus", vcpus, 0, 1u << 20));
    const uint64_t bytes = parse_size_option("--mem", mem);
    auto kind = parse_backing(backing);
    if (!kind)
        throw UsageError(fmt::format("--backing: unknown backing '{}'; use one of {}", backing, backing_names()));
    MachineConfig cfg = numa.empty() ? single_node_config(n, bytes, *kind) : numa_config(*this, n, bytes, *kind, topo);
    cfg.access = parse_access(access);
    cfg.uuid = parse_uuid("--uuid", uuid);
    parse_workload(*this, cfg.workload);
    apply_guest_fault_hook(cfg.workload, cfg.vcpus);
    if (kvm)
        check_kvm_vcpu_limit(cfg, *kvm);
    validate_config(cfg, topo);
    return cfg;
}

MachineConfig VmOptions::to_config(const Kvm& kvm) const
{
    MachineConfig cfg = parse(numa::host_topology(), &kvm);
    check_host_resources(cfg, kvm);
    return cfg;
}

}  // namespace mvm::cli
