// tests/kvm/svm_test_util.hpp - helpers of the tests that only mean something
// inside the emulated SVM host (scripts/svm-host, run by `scripts/test svm`):
// SvmHost.* (kvm_amd npt=1, TDP MMU) and SvmShadow.* (npt=0, shadow MMU).
// On any other host they skip, saying why.
#pragma once

#include <sys/utsname.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dirty_intervals.hpp"
#include "kvm_test_util.hpp"
#include "numa/topology.hpp"

namespace mvm::test::svm {

inline constexpr const char* kNpt = "/sys/module/kvm_amd/parameters/npt";
inline constexpr const char* kTdpMmu = "/sys/module/kvm/parameters/tdp_mmu";
inline constexpr const char* kEagerSplit = "/sys/module/kvm/parameters/eager_page_split";

inline std::string read_word(const char* path)
{
    std::ifstream f(path);
    std::string w;
    f >> w;
    return w;
}

// Empty when kvm_amd runs with npt=Y (`want_npt`) or npt=N (!want_npt), else why not.
inline std::string why_not_svm(bool want_npt)
{
    const std::string npt = read_word(kNpt);
    if (npt.empty())
        return "needs kvm_amd (AMD SVM): no /sys/module/kvm_amd/parameters/npt here; "
               "run it on the emulated SVM host: scripts/test svm";
    if (npt != (want_npt ? "Y" : "N"))
        return fmt::format("needs kvm_amd npt={} (this host has npt={}); scripts/test-svm boots that host",
                           want_npt ? "Y" : "N", npt);
    return "";
}

// Empty when this is the emulated host's TDP MMU with eager_page_split ours to set, else why not.
inline std::string why_no_tdp_mmu()
{
    if (auto why = why_not_svm(true); !why.empty())
        return why;
    const std::string tdp = read_word(kTdpMmu);
    if (tdp != "Y")
        return fmt::format("needs KVM's TDP MMU (tdp_mmu={})", tdp.empty() ? "absent" : tdp);
    if (::access(kEagerSplit, W_OK) != 0)
        return "eager_page_split is read-only here";
    return "";
}

// The running kernel's major * 100 + minor (e.g. 601 for 6.1, 612 for 6.12).
inline int kernel_version()
{
    struct utsname u {};
    int major = 0, minor = 0;
    if (::uname(&u) == 0)
        std::sscanf(u.release, "%d.%d", &major, &minor);
    return major * 100 + minor;
}

inline int64_t vm_stat(const nlohmann::json& window, const char* name)
{
    const auto& vm = window["vm"];
    return vm.contains(name) ? vm[name].get<int64_t>() : 0;
}

inline int64_t vcpu_stat(const nlohmann::json& window, const char* name)
{
    const auto& v = window["vcpus_sum"];
    return v.contains(name) ? v[name].get<int64_t>() : 0;
}

inline nlohmann::json parse_json(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j.is_discarded() ? nlohmann::json::object() : j;
}

// `minivmm dirty-log-perf ARGS --eager-split EAGER --json -`, asserted to exit
// 0 with 0 stamp mismatches; its whole report ({} if it failed).
inline nlohmann::json dirty_log_perf(const std::string& args, const char* eager)
{
    auto r = run_minivmm(fmt::format("dirty-log-perf {} --eager-split {} --json -", args, eager));
    EXPECT_EQ(r.exit_code, 0) << args << ": " << r.err;
    if (r.exit_code != 0)
        return nlohmann::json::object();
    auto j = parse_json(r.out);
    EXPECT_EQ(j["verify"]["mismatches"], 0) << args << ": " << j.dump();
    EXPECT_GT(j["verify"]["pages_checked"].get<uint64_t>(), 0u) << args;
    return j;
}

// Every page the guest wrote in a harvest interval is in that interval's
// harvest, in each tracking mode: GET-clears, manual protect, INITIALLY_SET
// with a chunked clear, and the dirty ring at the host's smallest size (it
// fills). The guest (2 vCPUs, 32 MiB of `backing`) runs before logging is
// enabled, so enabling write-protects (and may split) live mappings. One
// line per mode on stdout.
inline void expect_no_missed_page_in_any_mode(const Kvm& kvm, BackingKind backing, const char* backing_name)
{
    struct Case {
        const char* name;
        dirty::Mode mode;
        bool manual, initially_set;
        uint64_t clear_chunk;
    };
    for (const Case& c : {Case{"bitmap GET clears", dirty::Mode::Bitmap, false, false, 0},
                          Case{"bitmap manual protect", dirty::Mode::Bitmap, true, false, 0},
                          Case{"bitmap INITIALLY_SET, 256K clears", dirty::Mode::Bitmap, true, true, 256 << 10},
                          Case{"ring", dirty::Mode::Ring, false, false, 0}}) {
        dirty::TrackerOptions to;
        to.mode = c.mode;
        to.manual_protect = c.manual;
        to.initially_set = c.initially_set;
        to.clear_chunk_bytes = c.clear_chunk;
        IntervalCheck ic;
        ic.backing = backing;
        ic.pattern = MVM_PATTERN_RANDOM;
        ic.ring_bytes = c.mode == dirty::Mode::Ring ? dirty::min_dirty_ring_bytes(kvm) : 0;
        // Longer intervals than on hardware: under TCG a write-protected
        // page's first write costs a fault exit of tens of microseconds.
        ic.harvests = 8;
        ic.min_interval_ms = 30;
        ic.interval_spread_ms = 40;
        ic.warmup_ms = 300;
        auto r = check_intervals(kvm, to, ic);
        EXPECT_GT(r.required, 100u) << c.name << ": the intervals must have seen writes to check";
        EXPECT_EQ(r.misses, 0u) << c.name << fmt::format(": first missed GPA {:#x}", r.first_miss_gpa) << " of "
                                << r.required << "; in the next harvest: " << r.late << ", not even there: " << r.never;
        if (c.mode == dirty::Mode::Ring) {
            EXPECT_EQ(r.entries, r.reset) << c.name;
        }
        std::cout << fmt::format("dirty tracking, {} on {}: {} harvests, {} pages written within intervals, {} "
                                 "missed{}\n",
                                 c.name, backing_name, r.harvests, r.required, r.misses,
                                 c.mode == dirty::Mode::Ring ? fmt::format(" ({} ring-full exits)", r.ring_full) : "");
    }
}

// Empty when the host has two NUMA nodes with a CPU each, else why not.
inline std::string why_not_two_nodes()
{
    const auto topo = numa::host_topology();
    if (topo.nodes.size() < 2 || !topo.node(0) || !topo.node(1) || topo.node(0)->cpus.empty() ||
        topo.node(1)->cpus.empty())
        return fmt::format("needs host NUMA nodes 0 and 1 with CPUs (this host has {}); run it on the two-node "
                           "emulated SVM host: scripts/test svm",
                           topo.nodes.size());
    return "";
}

// Two virtual nodes of `mb` MiB, vnode N bound to host node N, vCPU N on it.
inline std::string two_vnodes(int mb, const char* backing)
{
    return fmt::format("--numa node=0,cpus=0,mem={0}M,host-nodes=0,backing={1} "
                       "--numa node=1,cpus=1,mem={0}M,host-nodes=1,backing={1}",
                       mb, backing);
}

inline int64_t node_kib(const nlohmann::json& delta, int node)
{
    const auto& per = delta["per_host_node_kib"];
    const std::string k = std::to_string(node);
    return per.contains(k) ? per[k].get<int64_t>() : 0;
}

// `minivmm numa-check ARGS --json -`, asserted to exit `want_exit`; its report.
inline nlohmann::json numa_check(const std::string& args, int want_exit = 0)
{
    auto r = run_minivmm("numa-check " + args + " --json -");
    EXPECT_EQ(r.exit_code, want_exit) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << r.out << r.err;
    return j.is_discarded() ? nlohmann::json::object() : j;
}

}  // namespace mvm::test::svm
