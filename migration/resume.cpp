#include "migration/resume.hpp"

#include <thread>

#include "vmm/stress/workload.hpp"

namespace mvm::migration {

namespace {

constexpr std::chrono::seconds kProgressWait{5};

uint64_t progress_of(const StressVm& m, uint32_t vcpu)
{
    return m.snapshot(vcpu).pages_written + m.snapshot(vcpu).pages_read;
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

Resumed resume(StressVm& dst, const std::vector<VcpuState>& states)
{
    Resumed r;
    for (const auto& s : states)
        for (uint32_t m : restore_vcpu(dst.kvm(), dst.vcpu(s.id), s))
            r.refused_msrs.push_back(m);
    reset_controls(dst);
    dst.start();
    for (uint32_t i = 0; i < dst.vcpu_count(); i++)
        r.progress.push_back(progress_of(dst, i));
    return r;
}

AfterRun run_and_check(StressVm& dst, const Resumed& at, double post_run_s, std::chrono::milliseconds stop_wait)
{
    std::this_thread::sleep_for(std::chrono::duration<double>(post_run_s));
    // A guest just resumed (--post-run 0) may not have run a batch yet: it
    // gets up to kProgressWait to show progress on every vCPU before it is
    // called stuck (issue 14: 3 of 10 runs failed at --post-run 0).
    const auto deadline = std::chrono::steady_clock::now() + kProgressWait;
    bool progressed = false;
    for (;;) {
        progressed = true;
        for (uint32_t i = 0; i < dst.vcpu_count(); i++)
            progressed &= progress_of(dst, i) > at.progress[i];
        if (progressed || dst.failure() || std::chrono::steady_clock::now() >= deadline)
            break;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
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
    r.text = progressed ? c.summary() : "the destination guest made no progress within --post-run + 5 s of resume; " + c.summary();
    return out;
}

}  // namespace mvm::migration
