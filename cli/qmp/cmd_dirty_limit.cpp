// QMP's vCPU dirty limit (QEMU qapi/migration.json, 8.0): set-vcpu-dirty-limit,
// cancel-vcpu-dirty-limit, query-vcpu-dirty-limit. The limit is the guest's
// own rate cap per vCPU (the same one migrate's dirty-limit throttle sets,
// docs/qmp.md), in MB/s as QEMU counts them (MiB: 256 pages of 4 KiB);
// current-rate is what the vCPU wrote over the last second, by its counters.
#include "cli/qmp/monitor_impl.hpp"

#include <cmath>
#include <fmt/format.h>

namespace mvm::qmp {

namespace {
constexpr uint64_t kPagesPerMb = 256;
}

// Under mu_: the vCPUs a command names (cpu-index, or all), checked.
std::vector<uint32_t> Monitor::limit_targets(const Args& a, const char* cmd) const
{
    if (role_ == Role::Destination)
        throw QmpError(fmt::format("{}: limits a source's guest; the destination's runs only for its post-run check",
                                   cmd));
    if (migrating_.load())
        throw QmpError(fmt::format("{}: a migration is in progress and its throttle sets the vCPUs' rates; "
                                   "migrate_cancel it or wait for it to end",
                                   cmd));
    std::vector<uint32_t> v;
    if (a.has("cpu-index")) {
        const int64_t i = a.integer("cpu-index");
        if (i < 0 || i >= static_cast<int64_t>(vm_.vcpu_count()))
            throw QmpError("incorrect cpu index specified");
        v.push_back(static_cast<uint32_t>(i));
    } else {
        for (uint32_t i = 0; i < vm_.vcpu_count(); i++)
            v.push_back(i);
    }
    return v;
}

json Monitor::set_vcpu_dirty_limit(const json& args)
{
    Args a(args, {"cpu-index", "dirty-rate"});
    std::lock_guard lk(mu_);
    const std::vector<uint32_t> v = limit_targets(a, "set-vcpu-dirty-limit");
    const int64_t rate = a.integer("dirty-rate");
    if (rate <= 0 || rate > (int64_t{1} << 30))
        throw QmpError("Parameter 'dirty-rate' expects an integer in [1, 1073741824] (MB/s)");
    vcpu_limit_mbs_.resize(vm_.vcpu_count(), 0);
    for (uint32_t i : v) {
        vcpu_limit_mbs_[i] = static_cast<uint64_t>(rate);
        vm_.set_rate(i, static_cast<uint64_t>(rate) * kPagesPerMb);
    }
    return json::object();
}

json Monitor::cancel_vcpu_dirty_limit(const json& args)
{
    Args a(args, {"cpu-index"});
    std::lock_guard lk(mu_);
    const std::vector<uint32_t> v = limit_targets(a, "cancel-vcpu-dirty-limit");
    vcpu_limit_mbs_.resize(vm_.vcpu_count(), 0);
    for (uint32_t i : v) {
        vcpu_limit_mbs_[i] = 0;
        vm_.set_rate(i, vm_.config().workload.rate_pages_per_s);
    }
    return json::object();
}

// QEMU's answer: every vCPU while any has a limit, else an empty list.
json Monitor::query_vcpu_dirty_limit() const
{
    std::lock_guard lk(mu_);
    json out = json::array();
    std::vector<uint64_t> limits = vcpu_limit_mbs_;
    if (migrating_.load() && sender_)  // a migration's dirty-limit caps every vCPU (as QEMU shows it)
        if (const uint64_t cap = sender_->live().dirty_limit; cap)
            limits.assign(vm_.vcpu_count(), cap / kPagesPerMb);
    if (std::none_of(limits.begin(), limits.end(), [](uint64_t l) { return l != 0; }))
        return out;
    const auto& w = progress_window_;
    const double s = w.size() >= 2 ? w.back().t_s - w.front().t_s : 0;
    for (uint32_t i = 0; i < vm_.vcpu_count(); i++) {
        uint64_t current = 0;
        if (s > 0.05)
            current = static_cast<uint64_t>(std::llround(
                static_cast<double>(w.back().pages[i] - w.front().pages[i]) / s / kPagesPerMb));
        out.push_back({{"cpu-index", i}, {"limit-rate", limits[i]}, {"current-rate", current}});
    }
    return out;
}

// Under mu_, on the tick: every vCPU's pages written, over the last second.
void Monitor::sample_progress()
{
    ProgressSample p;
    p.t_s = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    for (uint32_t i = 0; i < vm_.vcpu_count(); i++)
        p.pages.push_back(vm_.snapshot(i).pages_written);
    progress_window_.push_back(std::move(p));
    while (progress_window_.size() > 2 && progress_window_.back().t_s - progress_window_[1].t_s >= 1.0)
        progress_window_.pop_front();
}

// Under mu_: after a migration that gave the source back (its throttle
// reset every vCPU's rate), the limits set here hold again.
void Monitor::reapply_vcpu_limits()
{
    for (uint32_t i = 0; i < vcpu_limit_mbs_.size(); i++)
        if (vcpu_limit_mbs_[i])
            vm_.set_rate(i, vcpu_limit_mbs_[i] * kPagesPerMb);
}

}  // namespace mvm::qmp
