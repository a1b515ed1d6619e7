#include "engines/huge_mapping_probe.hpp"

#include <chrono>
#include <cstdio>

#include <fmt/format.h>

#include "memory/hugetlb.hpp"
#include "vmm/config.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::engines {

namespace {

// THP's mode: "always", "madvise" (the thp backing madvises) or "never".
std::string thp_mode()
{
    FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f)
        return "";
    char buf[128] = {};
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    const std::string s(buf, n);
    const auto a = s.find('['), b = s.find(']');
    return a == std::string::npos || b == std::string::npos || b < a ? "" : s.substr(a + 1, b - a - 1);
}

}  // namespace

std::string HugeMappingProbe::summary() const
{
    if (verdict == "unknown")
        return "cannot tell: " + why;
    return fmt::format("{}: the guest wrote {} MiB of {} once; KVM's VM stats then said pages_2m {}, pages_4k {}{}",
                       verdict == "2M" ? "KVM maps 2 MiB pages" : "KVM maps 4 KiB pages only", bytes >> 20, backing,
                       pages_2m, pages_4k,
                       verdict == "2M" ? " (dirty logging splits them: eagerly on the TDP MMU, else on write faults)"
                                       : "");
}

nlohmann::json HugeMappingProbe::to_json() const
{
    nlohmann::json j = {{"verdict", verdict}, {"backing", backing}, {"bytes", bytes}};
    if (verdict == "unknown")
        j["why"] = why;
    else
        j.update({{"pages_2m", pages_2m}, {"pages_4k", pages_4k}});
    return j;
}

HugeMappingProbe probe_huge_mappings(const Kvm& kvm, uint64_t bytes)
{
    HugeMappingProbe r;
    r.bytes = bytes;
    BackingKind kind;
    const HugetlbPool pool = hugetlb_pool(2ull << 20);
    if (pool.page_bytes && pool.free >= bytes / (2ull << 20)) {
        kind = BackingKind::Hugetlb2M;
        r.backing = "hugetlb2m";
    } else if (const std::string thp = thp_mode(); thp == "always" || thp == "madvise") {
        kind = BackingKind::Thp;
        r.backing = "thp";
    } else {
        r.why = fmt::format("no 2 MiB-backed memory to try: the 2M hugetlb pool has {} free pages (needs {}) and "
                            "THP is '{}'",
                            pool.free, bytes / (2ull << 20), thp.empty() ? "missing" : thp);
        return r;
    }
    MachineConfig cfg = single_node_config(1, bytes, kind);
    cfg.nodes[0].origin = "huge mapping probe";
    cfg.workload.max_passes = 1;
    StressVm m(kvm, cfg);
    m.start();
    if (!m.wait_finished(std::chrono::seconds(60)) || m.failure()) {
        r.why = m.failure() ? "the probe's guest failed: " + m.failure()->reason : "the probe's guest did not finish in 60 s";
        return r;
    }
    const StatSnapshot s = m.vm_stats();
    if (!s.count("pages_2m") || !s.count("pages_4k")) {
        r.why = "KVM has no pages_2m/pages_4k VM stats here";
        return r;
    }
    r.pages_2m = static_cast<int64_t>(s.at("pages_2m"));
    r.pages_4k = static_cast<int64_t>(s.at("pages_4k"));
    r.verdict = r.pages_2m > 0 ? "2M" : r.pages_4k > 0 ? "4K" : "unknown";
    if (r.verdict == "unknown")
        r.why = "the guest's writes left no mapping in KVM's stats";
    return r;
}

}  // namespace mvm::engines
