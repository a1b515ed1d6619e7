// QMP dirty-rate measurement (QEMU qapi/migration.json): calc-dirty-rate, query-dirty-rate.
#include "cli/qmp/monitor_impl.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <iterator>
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "memory/backing.hpp"
#include "migration/transport/tcp.hpp"
#include "numa/placement.hpp"
#include "numa/policy.hpp"

namespace mvm::qmp {

using migration::Phase;

namespace {

// QEMU's TimeUnit: "second" or "millisecond" (minivmm also takes s and ms);
// "" stays "" (not given). QmpError for anything else.
std::string time_unit(const std::string& u)
{
    if (u.empty() || u == "second" || u == "millisecond")
        return u;
    if (u == "s" || u == "ms")
        return u == "s" ? "second" : "millisecond";
    throw QmpError(fmt::format("Parameter 'calc-time-unit' does not accept value '{}'", u));
}

}  // namespace

json Monitor::calc_dirty_rate(const json& args)
{
    Args a(args, {"calc-time", "calc-time-unit", "sample-pages", "mode"});
    if (role_ == Role::Destination)
        throw QmpError("calc-dirty-rate: measures a source's guest; the destination's runs only for its post-run check");
    const int64_t t = a.integer("calc-time");
    const std::string unit = time_unit(a.str_or("calc-time-unit", "second"));
    const double seconds = unit == "second" ? static_cast<double>(t) : static_cast<double>(t) / 1e3;
    if (seconds < 0.1 || seconds > 60)
        throw QmpError("Parameter 'calc-time' is out of range: 0.1 to 60 seconds");
    const std::string mode = a.str_or("mode", "page-sampling");
    engines::RateMode m;
    if (mode == "page-sampling")
        m = engines::RateMode::Sampling;
    else if (mode == "dirty-ring")
        m = engines::RateMode::Ring;
    else if (mode == "dirty-bitmap")
        m = engines::RateMode::Bitmap;
    else
        throw QmpError(fmt::format("Parameter 'mode' does not accept value '{}'", mode));
    if (a.has("sample-pages") && m != engines::RateMode::Sampling)
        throw QmpError("Parameter 'sample-pages' applies to mode page-sampling only");
    const int64_t sample = a.int_or("sample-pages", 512);
    if (sample < 128 || sample > 4096)
        throw QmpError("Parameter 'sample-pages' is out of range [128, 4096]");
    if (m != engines::RateMode::Sampling) {
        const bool ring = tracker_ && tracker_->mode() == dirty::Mode::Ring;
        if (!tracker_)
            throw QmpError("calc-dirty-rate: this guest has no dirty tracker; use mode page-sampling");
        if (m == engines::RateMode::Ring && !ring)
            throw QmpError("mode dirty-ring is not enabled: start the guest with --ring SIZE (QEMU: -accel "
                           "kvm,dirty-ring-size=N), or use dirty-bitmap or page-sampling");
        if (m == engines::RateMode::Bitmap && ring)
            throw QmpError("mode dirty-bitmap is not enabled: this guest logs with dirty rings (--ring); use "
                           "dirty-ring or page-sampling");
    }
    std::lock_guard lk(mu_);
    if (rate_->status == "measuring")
        throw QmpError("the dirty rate is already being measured");
    if (m != engines::RateMode::Sampling && migrating_.load())
        throw QmpError("calc-dirty-rate: a migration is logging dirty pages; use mode page-sampling meanwhile");
    if (paused_ || run_state_ != "running")
        throw QmpError(fmt::format("calc-dirty-rate: the guest is not running ({})", run_state_));
    if (rate_thread_.joinable())
        rate_thread_.join();
    auto job = std::make_unique<DirtyRateJob>();
    job->status = "measuring";
    job->start_time = static_cast<int64_t>(::time(nullptr));
    job->calc_time = t;
    job->unit = unit;
    job->sample_pages = static_cast<uint64_t>(sample);
    job->mode = mode;
    rate_ = std::move(job);
    rate_cancel_ = false;
    engines::RateOptions o;
    o.mode = m;
    o.period_s = seconds;
    o.baseline_s = 0;
    o.warmup_s = 0;
    o.sample_pages_per_gib = static_cast<uint64_t>(sample);
    o.running = true;
    o.tracker = m == engines::RateMode::Sampling ? nullptr : tracker_;
    o.cancel = &rate_cancel_;
    rate_thread_ = std::thread([this, o] {
        std::optional<engines::RateResult> r;
        std::string err;
        try {
            r = engines::measure_dirty_rate(vm_, o);
        } catch (const std::exception& e) {
            err = e.what();
        }
        std::lock_guard lk2(mu_);
        rate_->result = std::move(r);
        rate_->error = err;
        rate_->status = "measured";
    });
    return json::object();
}

json Monitor::query_dirty_rate(const json& args) const
{
    Args a(args, {"calc-time-unit"});
    const std::string unit = time_unit(a.str_or("calc-time-unit", ""));
    std::lock_guard lk(mu_);
    const DirtyRateJob& r = *rate_;
    int64_t calc_time = r.calc_time;
    std::string out_unit = r.unit;
    if (unit == "millisecond" && r.unit == "second") {
        calc_time *= 1000;
        out_unit = "millisecond";
    } else if (unit == "second" && r.unit == "millisecond") {
        calc_time /= 1000;
        out_unit = "second";
    }
    json j = {{"status", r.status},          {"start-time", r.start_time},     {"calc-time", calc_time},
              {"calc-time-unit", out_unit}, {"sample-pages", r.sample_pages}, {"mode", r.mode}};
    if (r.status == "measured" && r.result) {
        const engines::RateWindow& w = r.result->total;
        j["dirty-rate"] = static_cast<int64_t>(std::llround(w.mib_per_s));  // QEMU's MB/s: MiB per second
        if (r.mode == "dirty-ring") {
            json v = json::array();
            for (const auto& c : w.vcpus)
                v.push_back({{"id", c.vcpu}, {"dirty-rate", static_cast<int64_t>(std::llround(c.mib_per_s))}});
            j["vcpu-dirty-rate"] = v;
        }
        j["x-minivmm-saturated"] = w.lower_bound;  // every page that could be dirtied was: a lower bound
        j["x-minivmm-dirty-pages-per-s"] = w.pages_per_s;
        j["x-minivmm-report"] = engines::to_json(*r.result);
    }
    if (!r.error.empty())
        j["x-minivmm-error"] = r.error;
    return j;
}

}  // namespace mvm::qmp
