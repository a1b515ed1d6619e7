#include "vmm/host_info.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <filesystem>
#include <fmt/format.h>

#include "memory/hugetlb.hpp"
#include "memory/backing.hpp"
#include "numa/policy.hpp"
#include "numa/topology.hpp"
#include "vmm/config.hpp"
#include "vmm/kvm/caps.hpp"
#include "vmm/kvm/kvm.hpp"
#include "base/units.hpp"
#include "base/sysfs.hpp"

namespace mvm {

namespace {

std::string read_line(const std::string& path)
{
    std::ifstream f(path);
    std::string s;
    std::getline(f, s);
    return s;
}

// "always [madvise] never" -> "madvise"
std::string bracketed(const std::string& s)
{
    auto a = s.find('['), b = s.find(']');
    return a != std::string::npos && b != std::string::npos ? s.substr(a + 1, b - a - 1) : s;
}

nlohmann::json module_params()
{
    nlohmann::json out = nlohmann::json::array();
    for (const char* mod : {"kvm", "kvm_intel", "kvm_amd"}) {
        std::string dir = fmt::format("/sys/module/{}/parameters", mod);
        DIR* d = ::opendir(dir.c_str());
        if (!d)
            continue;
        // A module with no initstate file is built into the kernel: its
        // parameters can only change at runtime if sysfs marks them writable.
        bool builtin = ::access(fmt::format("/sys/module/{}/initstate", mod).c_str(), F_OK) != 0;
        std::vector<std::string> names;
        while (dirent* e = ::readdir(d))
            if (e->d_name[0] != '.')
                names.emplace_back(e->d_name);
        ::closedir(d);
        std::sort(names.begin(), names.end());
        for (const auto& n : names) {
            std::string path = dir + "/" + n;
            const bool writable = param_file_writable(path);
            out.push_back({{"module", mod}, {"name", n}, {"value", read_line(path)}, {"writable", writable},
                           {"builtin", builtin}});
        }
    }
    return out;
}

}  // namespace

nlohmann::json host_echo()
{
    utsname u{};
    ::uname(&u);
    nlohmann::json params = nlohmann::json::object();
    for (const auto& p : module_params())
        params[p["module"].get<std::string>() + "." + p["name"].get<std::string>()] = p["value"];
    std::string bal = read_line("/proc/sys/kernel/numa_balancing");
    return {{"kernel", std::string(u.release)},
            {"kvm_module_params", params},
            {"thp_enabled", bracketed(read_line("/sys/kernel/mm/transparent_hugepage/enabled"))},
            {"numa_balancing", bal.empty() ? "unavailable" : bal}};
}

nlohmann::json machine_echo(const MachineConfig& cfg)
{
    nlohmann::json nodes = nlohmann::json::array();
    for (const auto& n : cfg.nodes)
        nodes.push_back({{"vnode", n.id},
                         {"vcpus", n.vcpus},
                         {"mem_bytes", n.mem_bytes},
                         {"backing", std::string(backing_name(n.backing))},
                         {"host_policy", numa::to_string(n.host_policy)},
                         {"host_cpus", numa::format_cpu_list(n.host_cpus)},
                         {"prealloc", n.prealloc}});
    const auto& w = cfg.workload;
    return {{"vcpus", cfg.vcpus},
            {"dirty_ring_bytes", cfg.dirty_ring_bytes},
            {"slots_per_node", cfg.slots_per_node},
            {"workload",
             {{"pattern", w.pattern}, {"fill", fill_name(w)}, {"write_pct", w.write_pct},
              {"rate_pages_per_s", w.rate_pages_per_s}, {"seed", w.seed}}},
            {"nodes", nodes}};
}

std::string kvm_module_param(const std::string& name)
{
    for (const char* mod : {"kvm", "kvm_intel", "kvm_amd"}) {
        std::string path = fmt::format("/sys/module/{}/parameters/{}", mod, name);
        if (::access(path.c_str(), R_OK) == 0)
            return read_line(path);
    }
    return "";
}

GuestMmu guest_mmu()
{
    GuestMmu m;
    const std::string tdp = kvm_module_param("tdp_mmu");
    if (tdp.empty())
        return m;
    // The vendor module's two-dimensional paging switch, where there is one.
    std::string vendor, tdp_paging;
    for (const auto& [mod, param] : {std::pair{"kvm_amd", "npt"}, std::pair{"kvm_intel", "ept"}}) {
        const std::string path = fmt::format("/sys/module/{}/parameters/{}", mod, param);
        if (::access(path.c_str(), R_OK) == 0) {
            vendor = fmt::format("{} {}", mod, param);
            tdp_paging = read_line(path);
        }
    }
    const bool paging = tdp_paging == "Y" || tdp_paging == "1";
    m.name = tdp == "Y" && paging ? "tdp" : "shadow";
    if (!vendor.empty()) {
        m.why = fmt::format("{}={}, kvm.tdp_mmu={}", vendor, tdp_paging, tdp);
        return m;
    }
    std::string others;  // a vendor module without two-dimensional paging, e.g. kvm_pvm
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/sys/module", ec)) {
        const std::string n = e.path().filename().string();
        if (n.rfind("kvm_", 0) == 0)
            others += (others.empty() ? "" : ", ") + n;
    }
    m.why = fmt::format("kvm.tdp_mmu={}, {}", tdp, others.empty() ? "no vendor module" : others);
    return m;
}

namespace {

// Every hugetlb pool, global and per node, with the backing that uses it.
nlohmann::json hugetlb_json()
{
    nlohmann::json pools = nlohmann::json::array();
    for (const auto& p : hugetlb_pools())
        pools.push_back({{"page_bytes", p.page_bytes},
                         {"node", p.node},
                         {"nr", p.nr},
                         {"free", p.free},
                         {"in_use", p.nr > p.free ? p.nr - p.free : 0},
                         {"resv", p.resv},
                         {"surplus", p.surplus},
                         {"backing", p.page_bytes == (2ull << 20)   ? "hugetlb2m"
                                     : p.page_bytes == (1ull << 30) ? "hugetlb1g"
                                                                    : ""},
                         {"sysfs", p.nr_path}});
    return pools;
}

// The host's NUMA nodes and its numa_balancing setting.
nlohmann::json numa_json()
{
    nlohmann::json nodes = nlohmann::json::array();
    auto topo = numa::host_topology();
    for (size_t i = 0; i < topo.nodes.size(); i++) {
        const auto& n = topo.nodes[i];
        nodes.push_back({{"node", n.id}, {"cpus", numa::format_cpu_list(n.cpus)}, {"mem_total_bytes", n.mem_total_bytes},
                         {"mem_free_bytes", n.mem_free_bytes}, {"distances", topo.distance[i]}});
    }
    const std::string bal = read_line("/proc/sys/kernel/numa_balancing");
    return {{"nodes", nodes}, {"numa_balancing", bal.empty() ? "unavailable" : bal}};
}

}  // namespace

nlohmann::json host_info(const Kvm& kvm)
{
    nlohmann::json j;
    j["kvm"]["api_version"] = kvm.api_version();
    Vm vm = kvm.create_vm();
    nlohmann::json caps = nlohmann::json::array();
    for (const auto& c : known_caps()) {
        int v = c.vm_scoped ? vm.cap(c.number) : kvm.cap(c.number);
        caps.push_back({{"name", c.name}, {"number", c.number}, {"value", v}, {"used_for", c.used_for},
                        {"scope", c.vm_scoped ? "vm" : "system"}});
    }
    j["kvm"]["capabilities"] = caps;
    int ring = vm.cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
    if (ring <= 0)
        ring = vm.cap(KVM_CAP_DIRTY_LOG_RING);
    j["kvm"]["limits"] = {{"max_vcpus", vm.cap(KVM_CAP_MAX_VCPUS)},
                          {"recommended_vcpus", vm.cap(KVM_CAP_NR_VCPUS)},
                          {"max_vcpu_id", vm.cap(KVM_CAP_MAX_VCPU_ID)},
                          {"memslots", vm.cap(KVM_CAP_NR_MEMSLOTS)},
                          {"dirty_ring_max_bytes", ring},
                          {"dirty_ring_max_entries", ring > 0 ? ring / 16 : 0}};
    int gflags = vm.cap(KVM_CAP_GUEST_MEMFD_FLAGS);
    nlohmann::json gm = nlohmann::json::array();
    if (gflags & GUEST_MEMFD_FLAG_MMAP)
        gm.push_back("MMAP");
    if (gflags & GUEST_MEMFD_FLAG_INIT_SHARED)
        gm.push_back("INIT_SHARED");
    j["kvm"]["guest_memfd"] = {{"supported", vm.cap(KVM_CAP_GUEST_MEMFD) > 0}, {"flags", gm}, {"flags_value", gflags}};
    int types = kvm.cap(KVM_CAP_VM_TYPES);
    nlohmann::json vt = nlohmann::json::array();
    const char* names[] = {"DEFAULT", "SW_PROTECTED", "SEV", "SEV_ES", "SNP", "TDX"};
    for (int t = 0; t < 6; t++)
        if (types & (1 << t))
            vt.push_back(names[t]);
    if (types <= 0)
        vt.push_back("DEFAULT");
    j["kvm"]["vm_types"] = vt;
    int manual = vm.cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    j["kvm"]["manual_dirty_log_protect"] = {{"value", manual},
                                           {"enable", (manual & 1) != 0},
                                           {"initially_set", (manual & 2) != 0}};
    j["kvm"]["module_params"] = module_params();
    std::string eager = kvm_module_param("eager_page_split"), tdp = kvm_module_param("tdp_mmu");
    const GuestMmu mmu = guest_mmu();
    j["kvm"]["mmu"] = {{"name", mmu.name.empty() ? "unknown" : mmu.name}, {"why", mmu.why}};
    const std::string eager_path = "/sys/module/kvm/parameters/eager_page_split";
    const bool writable = !eager.empty() && param_file_writable(eager_path);
    std::string note;
    if (!mmu.tdp())
        note = fmt::format("guests run on the shadow MMU ({}); upstream KVM splits eagerly only on the TDP MMU",
                           mmu.why);
    else if (!writable)
        note = "eager_page_split is read-only here: it stays " + eager;
    j["kvm"]["eager_page_split"] = {{"eager_page_split", eager},
                                    {"tdp_mmu", tdp},
                                    {"writable", writable},
                                    {"effective", eager == "Y" && mmu.tdp()},
                                    {"can_take_effect", mmu.tdp() && (eager == "Y" || writable)},
                                    {"note", note}};

    j["thp"] = {{"enabled", bracketed(read_line("/sys/kernel/mm/transparent_hugepage/enabled"))},
                {"defrag", bracketed(read_line("/sys/kernel/mm/transparent_hugepage/defrag"))}};
    j["hugetlb_pools"] = hugetlb_json();
    j["numa"] = numa_json();
    return j;
}

std::string host_info_table(const nlohmann::json& j)
{
    std::string o;
    const auto& k = j["kvm"];
    o += fmt::format("KVM API version {}\n\nCapabilities\n", k["api_version"].get<int>());
    for (const auto& c : k["capabilities"])
        o += fmt::format("  {:<38} {:>8}  {}\n", c["name"].get<std::string>(), c["value"].get<int>(),
                         c["used_for"].get<std::string>());
    const auto& l = k["limits"];
    o += fmt::format("\nLimits\n  vCPUs: max {} (recommended {}), memslots {}, dirty ring up to {} bytes ({} entries) per vCPU\n",
                     l["max_vcpus"].get<int>(), l["recommended_vcpus"].get<int>(), l["memslots"].get<int>(),
                     l["dirty_ring_max_bytes"].get<int>(), l["dirty_ring_max_entries"].get<int>());
    std::string gflags;
    for (const auto& f : k["guest_memfd"]["flags"])
        gflags += (gflags.empty() ? "" : "|") + f.get<std::string>();
    o += fmt::format("  guest_memfd: {}{}\n", k["guest_memfd"]["supported"].get<bool>() ? "yes" : "no",
                     gflags.empty() ? "" : ", flags " + gflags);
    if (k["guest_memfd"].contains("mempolicy_summary"))  // caps' probe (engines/gmem_policy_probe)
        o += fmt::format("  guest_memfd mempolicy (mbind on its mapping): {}\n",
                         k["guest_memfd"]["mempolicy_summary"].get<std::string>());
    if (k.contains("huge_mappings_summary"))  // caps' probe (engines/huge_mapping_probe)
        o += fmt::format("  huge mappings (probe): {}\n", k["huge_mappings_summary"].get<std::string>());
    if (k["guest_memfd"].contains("dirty_logging"))
        o += fmt::format("  guest_memfd slots dirty-logged: {}\n", k["guest_memfd"]["dirty_logging"].get<std::string>());
    std::string vt;
    for (const auto& t : k["vm_types"])
        vt += (vt.empty() ? "" : ", ") + t.get<std::string>();
    o += fmt::format("  VM types: {}\n", vt);
    o += fmt::format("  manual dirty-log protect: {}{}\n",
                     k["manual_dirty_log_protect"]["enable"].get<bool>() ? "yes" : "no",
                     k["manual_dirty_log_protect"]["initially_set"].get<bool>() ? " (INITIALLY_SET)" : "");
    o += fmt::format("  guest MMU: {} ({})\n", k["mmu"]["name"].get<std::string>() == "tdp" ? "TDP MMU" : "shadow MMU",
                     k["mmu"]["why"].get<std::string>());
    const auto& e = k["eager_page_split"];
    o += fmt::format("  eager page split: eager_page_split={} ({}) -> {}\n", e["eager_page_split"].get<std::string>(),
                     e["writable"].get<bool>() ? "writable" : "read-only",
                     e["effective"].get<bool>()          ? "in effect"
                     : e["can_take_effect"].get<bool>() ? "off, can be turned on (--eager-split on)"
                                                        : "cannot take effect");
    if (!e["note"].get<std::string>().empty())
        o += fmt::format("    ({})\n", e["note"].get<std::string>());
    o += "\nKVM module parameters\n";
    for (const auto& p : k["module_params"])
        o += fmt::format("  {:<10} {:<34} {:<10} {}\n", p["module"].get<std::string>(), p["name"].get<std::string>(),
                         p["value"].get<std::string>(),
                         p["writable"].get<bool>() ? "writable" : "read-only");
    o += fmt::format("\nTHP: enabled [{}] defrag [{}]\n", j["thp"]["enabled"].get<std::string>(),
                     j["thp"]["defrag"].get<std::string>());
    o += "\nhugetlb pools\n";
    o += fmt::format("  {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<10} {}\n", "page", "node", "nr", "free", "in use",
                     "resv", "surplus", "backing", "resize with");
    for (const auto& p : j["hugetlb_pools"]) {
        int node = p["node"].get<int>();
        o += fmt::format("  {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<10} {}\n",
                         format_size(p["page_bytes"].get<uint64_t>()),
                         node < 0 ? std::string("all") : std::to_string(node), p["nr"].get<uint64_t>(),
                         p["free"].get<uint64_t>(), p["in_use"].get<uint64_t>(),
                         node < 0 ? std::to_string(p["resv"].get<uint64_t>()) : std::string("-"),
                         p["surplus"].get<uint64_t>(), p["backing"].get<std::string>(), p["sysfs"].get<std::string>());
    }
    o += "\nNUMA nodes\n";
    for (const auto& n : j["numa"]["nodes"])
        o += fmt::format("  node {}: cpus {}, {} total, {} free\n", n["node"].get<int>(), n["cpus"].get<std::string>(),
                         human_bytes(static_cast<double>(n["mem_total_bytes"].get<uint64_t>())),
                         human_bytes(static_cast<double>(n["mem_free_bytes"].get<uint64_t>())));
    std::string bal = j["numa"]["numa_balancing"].get<std::string>();
    o += fmt::format("  numa_balancing: {}{}\n", bal,
                     bal == "1" ? " (advice: bind guest memory to nodes or disable balancing for VMs)" : "");
    return o;
}

}  // namespace mvm
