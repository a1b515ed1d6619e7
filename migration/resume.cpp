#include "migration/resume.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <thread>

#include "numa/placement.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::migration {

namespace {

using clock = std::chrono::steady_clock;

uint64_t progress_of(const StressVm& m, uint32_t vcpu)
{
    return m.snapshot(vcpu).pages_written + m.snapshot(vcpu).pages_read;
}

bool all_progressed(const StressVm& m, const Resumed& at)
{
    for (uint32_t i = 0; i < m.vcpu_count(); i++)
        if (progress_of(m, i) <= at.progress[i] && m.snapshot(i).state != MVM_STATE_DONE)
            return false;
    return true;
}

}  // namespace

void reset_controls(StressVm& m)
{
    for (uint32_t i = 0; i < m.vcpu_count(); i++) {
        m.set_throttle(i, 0);
        m.set_rate(i, m.config().workload.rate_pages_per_s);
        m.mailbox(i)->park = 0;
    }
    m.set_pass_gate(0);  // VMM controls are the destination VMM's own
}

Resumed resume(StressVm& dst, const std::vector<VcpuState>& states, bool parked)
{
    const auto t0 = clock::now();
    Resumed r;
    for (uint32_t i = 0; i < dst.vcpu_count(); i++)
        r.parks.push_back(uint64_t{dst.mailbox(i)->parks});
    for (const auto& s : states)
        for (uint32_t m : restore_vcpu(dst.kvm(), dst.vcpu(s.id), s))
            r.refused_msrs.push_back(m);
    std::sort(r.refused_msrs.begin(), r.refused_msrs.end());  // each once, whichever vCPUs refused it
    r.refused_msrs.erase(std::unique(r.refused_msrs.begin(), r.refused_msrs.end()), r.refused_msrs.end());
    reset_controls(dst);
    if (parked)
        for (uint32_t i = 0; i < dst.vcpu_count(); i++)
            dst.mailbox(i)->park = 1;
    dst.start();
    r.restore_ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    for (uint32_t i = 0; i < dst.vcpu_count(); i++)
        r.progress.push_back(progress_of(dst, i));
    return r;
}

GuestGap guest_gap(const StressVm& dst, const Resumed& at, std::chrono::milliseconds wait)
{
    GuestGap g;
    const double tsc_per_ms = static_cast<double>(dst.tsc_khz());
    const auto deadline = clock::now() + wait;
    uint32_t backwards = 0, waiting = 0;
    for (uint32_t i = 0; i < dst.vcpu_count(); i++) {
        const mvm_mailbox* mb = dst.mailbox(i);
        if (at.parks[i] == 0 || mb->park_tsc == 0)
            continue;  // never parked at the source (finished, or paused by signal)
        while (mb->unparks < at.parks[i] && mb->state != MVM_STATE_DONE && clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        if (mb->unparks < at.parks[i]) {
            waiting++;
            continue;
        }
        const uint64_t park = mb->park_tsc, unpark = mb->unpark_tsc;
        if (unpark < park) {
            backwards++;
            continue;
        }
        g.max_ms = std::max(g.max_ms, static_cast<double>(unpark - park) / tsc_per_ms);
        g.vcpus++;
    }
    if (backwards)
        g.note += fmt::format("the guest's TSC went backwards across the move on {} vCPU(s); ", backwards);
    if (waiting)
        g.note += fmt::format("{} vCPU(s) had not left the park within {} ms; ", waiting, wait.count());
    if (!g.vcpus) {
        g.max_ms = -1;
        g.note += "no vCPU parked at the source and went on here";
    }
    return g;
}

AfterRun run_and_check(StressVm& dst, const Resumed& at, double post_run_s, std::chrono::milliseconds stop_wait,
                       std::chrono::milliseconds progress_wait)
{
    std::this_thread::sleep_for(std::chrono::duration<double>(post_run_s));
    // A destination that needs longer to show progress (a loaded host,
    // --post-run 0) is given it, bounded: the check is about progress, not speed.
    const auto deadline = clock::now() + progress_wait;
    while (!all_progressed(dst, at) && !dst.failure() && clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const bool progressed = all_progressed(dst, at);
    dst.request_stop();
    if (!dst.wait_finished(stop_wait))
        dst.kill();
    AfterRun out;
    ResultRecord& r = out.result;
    if (auto f = dst.failure()) {
        r.text = "destination guest failed: " + f->reason;
        return out;
    }
    StampCheck c = verify_stamps(dst);
    out.stamps_checked = true;
    r.pages_checked = c.pages_checked;
    r.mismatches = c.mismatches;
    for (const auto& m : c.first)
        r.mismatched_gpas.push_back(m.gpa);
    r.ok = c.ok() && progressed;
    if (auto pl = destination_placement(dst); !pl.empty())
        r.details = nlohmann::json{{"placement", pl}}.dump();
    r.text = progressed ? c.summary()
                        : fmt::format("the destination guest made no progress within {:.1f} s of resume; {}",
                                      post_run_s + std::chrono::duration<double>(progress_wait).count(), c.summary());
    return out;
}

nlohmann::json destination_placement(const StressVm& dst)
{
    nlohmann::json out = nlohmann::json::array();
    for (size_t i = 0; i < dst.config().nodes.size(); i++) {
        const NodeConfig& node = dst.config().nodes[i];
        if (node.host_policy.policy == numa::Policy::Default)
            continue;
        const Backing& b = dst.node_backing(i);
        b.map_for_query();
        const auto pl = numa::query_placement(b.host(), b.size(), b.page_size());
        nlohmann::json per = nlohmann::json::object();
        for (const auto& [n, pages] : pl.pages_per_node)
            per[std::to_string(n)] = pages;
        const std::vector<int>& expected = node.host_policy.nodes;  // as numa-check's policy_nodes
        out.push_back({{"vnode", node.id},
                       {"backing", backing_name(node.backing)},
                       {"policy", numa::to_string(node.host_policy)},
                       {"pages", pl.pages_queried},
                       {"page_bytes", b.page_size()},
                       {"on_policy_pct", numa::on_policy_pct(pl, expected)},
                       {"pages_per_host_node", per},
                       {"pages_not_present", pl.pages_not_present}});
    }
    return out;
}

std::string placement_summary(const nlohmann::json& placement)
{
    std::string s;
    for (const auto& n : placement)
        s += fmt::format("{}vnode {} ({}, {}) {:.1f}% on policy", s.empty() ? "" : "; ", n["vnode"].get<uint32_t>(),
                         n["backing"].get<std::string>(), n["policy"].get<std::string>(),
                         n["on_policy_pct"].get<double>());
    return s;
}

}  // namespace mvm::migration
