#include "migration/sender.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <stdexcept>

#include "base/error.hpp"
#include "base/units.hpp"
#include "vmm/stress/sampler.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::migration {

namespace {

constexpr uint64_t kDigestBytes = 2ull << 20;

double since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

uint32_t channel_count(const StressVm& src, const MigrateOptions& opt)
{
    return opt.channels ? opt.channels : static_cast<uint32_t>(std::max<size_t>(1, src.config().nodes.size()));
}

}  // namespace

const char* phase_name(Phase p)
{
    switch (p) {
    case Phase::Idle: return "idle";
    case Phase::Setup: return "setup";
    case Phase::Bulk: return "bulk";
    case Phase::Precopy: return "precopy";
    case Phase::Stop: return "stop";
    case Phase::Destination: return "destination";
    case Phase::Done: return "done";
    }
    return "?";
}

Sender::Sender(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel,
               SenderHooks hooks)
    : src_(src), tracker_(tracker), opt_(opt), cancel_signal_(cancel), hooks_(std::move(hooks)), t0_(clock::now()),
      channels_(src, channel_count(src, opt), opt.bandwidth),
      dest_(make_destination(src, opt.to, opt.verify, opt.post_run_s, hooks_.transport)),
      max_downtime_ms_(opt.max_downtime_ms)
{
    rep_.max_downtime_ms = opt.max_downtime_ms;
    rep_.config = config_echo(src, opt, channels_.count());
    rep_.source_state = "running (migration not started)";
    rep_.destination_state = "none";
}

Sender::~Sender() = default;

// ---- the phases ---------------------------------------------------------------------

void Sender::setup()
{
    require({Phase::Idle}, "setup");
    enter(Phase::Setup);
    rep_.source_state = "running";
    rep_.destination_state = "being set up";
    dest_->open(StreamHeader::of(src_, channels_.count()));
    rep_.setup_destination_ms = since(t0_) * 1e3;
    rep_.destination_state = "receiving";
    const auto t = clock::now();
    rep_.untracked = tracker_.untracked_slots();
    rep_.enable = tracker_.enable();
    tracking_ = true;
    last_harvest_ = clock::now();  // the first harvest holds what was dirtied since logging went on
    rep_.setup_tracking_ms = since(t) * 1e3;
    for (uint32_t id : tracker_.tracked_slots())
        if (src_.memslots().by_slot(id)->vnode >= 0)  // the guest's memory, not the system slot
            tracked_pages_ += src_.memslots().by_slot(id)->pages();
    for (const auto& [slot, why] : rep_.untracked)
        rep_.untracked_bytes += src_.memslots().by_slot(slot)->pages() * 4096;
    rep_.setup_ms = since(t0_) * 1e3;
    sampler_ = std::make_unique<ProgressSampler>(src_, 1000, false);
    sampler_->start();
    start_series();
}

// Every page of the tracked slots (logging is already on, so whatever
// changes meanwhile is in the first harvest).
void Sender::bulk()
{
    require({Phase::Setup}, "bulk");
    enter(Phase::Bulk);
    const auto start = bulk_start_ = clock::now();
    ChannelPages per = channels_.empty();
    uint64_t n = 0;
    for (uint32_t id : tracker_.tracked_slots()) {
        channels_.add_slot(per, id);
        n += src_.memslots().by_slot(id)->pages();
    }
    RoundReport rr = begin_round(0, "bulk", start);
    rr.pages = n;
    begin_send(rr, n);
    fault_point("bulk");
    rr.bytes = send(per);
    end_send();
    rr.duration_s = since(start);
    account(rr);
}

bool Sender::precopy_round()
{
    require({Phase::Bulk, Phase::Precopy}, "precopy_round");
    if (phase_ != Phase::Precopy)
        enter(Phase::Precopy);
    check_cancel();
    const auto start = clock::now();
    dirty::Harvest h = tracker_.harvest();
    const double interval_s = harvested();
    rep_.expected_downtime_ms = expected_downtime_ms(h.dirty_pages);
    const bool converged = bw_ > 0 && rep_.expected_downtime_ms <= max_downtime_ms_.load();
    if (converged || round_ > opt_.max_iterations) {
        rep_.converged = converged;
        rep_.forced_by = converged ? "" : "max-iterations";
        pending_ = std::move(h);
        pending_interval_s_ = interval_s;
        if (opt_.progress)
            fmt::print(stderr, "\r\033[K");
        return false;
    }
    RoundReport rr = begin_round(round_, "precopy", start);
    rr.dirty_pages = h.dirty_pages;
    rate(rr, h.dirty_pages, interval_s, guest_dirty(h, nullptr));
    begin_send(rr, h.dirty_pages);
    if (round_ == 2)
        fault_point("precopy");
    throttle(h, interval_s, rr);
    rr.bytes = send(channels_.split(h));
    end_send();
    rr.pages = h.dirty_pages;
    rr.duration_s = since(start);
    account(rr);
    print_progress(rr);
    round_++;
    return true;
}

void Sender::stop_and_copy()
{
    require({Phase::Bulk, Phase::Precopy}, "stop_and_copy");
    enter(Phase::Stop);
    rep_.vcpu_stall_ms = stop_sampler();
    if (!pending_)
        rep_.forced_by = "caller";  // stopped before pre-copy said it was done
    tdown_ = clock::now();
    rep_.stop_ms = since(t0_) * 1e3;
    park_source();
    rep_.source_state = "parked (stop-and-copy)";
    dirty::Harvest last = tracker_.harvest();
    const double interval_s = harvested() + pending_interval_s_;
    const ChannelPages per = final_pages(last);
    uint64_t n = 0;
    for (const auto& v : per)
        n += v.size();
    rep_.remaining_bytes = n * 4096;
    RoundReport fr = begin_round(static_cast<uint32_t>(rep_.rounds.size()), "stop", tdown_);
    fr.dirty_pages = n - rep_.untracked_bytes / 4096;  // distinct dirty pages of both last harvests
    rate(fr, fr.dirty_pages, interval_s, guest_dirty(last, pending_ ? &*pending_ : nullptr));
    begin_send(fr, n);
    fault_point("stop");
    final_bytes_ = send(per);
    end_send();
    fr.pages = n;
    fr.bytes = final_bytes_;
    fr.duration_s = since(tdown_);
    fr.throttle_pct = throttle_pct_;
    rep_.rounds.push_back(fr);
    rounds_++;
    const auto tv = clock::now();
    save_state();
    if (opt_.verify && dest_->wants_digests())
        rep_.verify_ms += since(tv) * 1e3;
}

void Sender::switchover()
{
    require({Phase::Stop}, "switchover");
    if (switched_over_)
        throw std::logic_error("Sender::switchover() called twice");
    ResultRecord sw = dest_->switchover(states_, digests_);
    rep_.downtime_ms = since(tdown_) * 1e3;
    rep_.total_ms = since(t0_) * 1e3;  // QEMU's total-time: the destination runs from here
    rep_.verify_ms += dest_->verify_seconds() * 1e3;
    rep_.switchover_pages_checked = sw.pages_checked;
    rep_.switchover_mismatches = sw.mismatches;
    rep_.switchover_mismatch_gpas = sw.mismatched_gpas;
    if (!sw.ok)
        throw Error("switchover check failed: " + sw.text);
    rep_.refused_msrs = dest_->refused_msrs();
    // The guest lives on at the destination now; the source stays parked.
    tracker_.disable();
    tracking_ = false;
    rep_.transferred_bytes = channels_.sent_bytes();
    rep_.zero_pages = channels_.zero_pages();
    rep_.throughput = precopy_s_ > 0 ? static_cast<double>(precopy_bytes_) / precopy_s_ : 0;
    fill_rates();
    rep_.source_state = "parked (handed over at the switchover)";
    rep_.destination_state = "running";
    switched_over_ = true;
}

void Sender::finish()
{
    require({Phase::Stop}, "finish");
    if (!switched_over_)
        throw std::logic_error("Sender::finish() called before switchover()");
    enter(Phase::Destination);
    const auto t = clock::now();
    fault_point("destination");  // the tests' hook: the destination lost after it resumed the guest
    ResultRecord fin = dest_->finish();
    rep_.post_run_ms = since(t) * 1e3;
    rep_.destination_state = "ran --post-run, stopped and checked";
    rep_.pages_checked = fin.pages_checked;
    rep_.mismatches = fin.mismatches;
    rep_.stamp_summary = fin.text;
    rep_.destination_progressed = fin.ok != 0 || fin.text.find("no progress") == std::string::npos;
    rep_.verified = opt_.verify;
    phase_ = Phase::Done;
    if (!fin.ok) {
        rep_.status = "failed";
        rep_.error = "destination check failed after resume: " + fin.text;
        return;
    }
    rep_.status = "completed";
    rep_.phase.clear();
}

void Sender::fail(const std::string& error)
{
    rep_.error = error;
    rep_.status = cancelled() ? "cancelled" : "failed";
    if (sampler_)
        sampler_->stop();
    stop_series();
    count_failure();
    try {
        dest_->abort();
    } catch (...) {
    }
    rep_.destination_state = switched_over_ ? "lost after it resumed the guest" : "aborted";
    if (switched_over_)  // the guest ran on at the destination: resuming the source would run it twice
        rep_.source_state = "parked since the switchover, not resumed (its guest was handed to the destination)";
    else {
        give_back_source();
        rep_.source_state = "running again (given back: logging and throttles off)";
    }
    if (!switched_over_)
        rep_.total_ms = since(t0_) * 1e3;  // start -> failure (after the switchover: -> destination running)
    phase_ = Phase::Done;
}

bool Sender::cancelled() const { return (cancel_signal_ && cancel_signal_->load()) || cancel_requested_.load(); }

// ---- steps of the phases --------------------------------------------------------------

void Sender::enter(Phase p)
{
    phase_ = p;
    rep_.phase = phase_name(p);
    dest_->enter_phase(phase_name(p));
}

void Sender::require(std::initializer_list<Phase> ok, const char* step) const
{
    if (std::find(ok.begin(), ok.end(), phase_.load()) == ok.end())
        throw std::logic_error(fmt::format("Sender::{}() called in phase {}", step, phase_name(phase_.load())));
}

void Sender::check_cancel() const
{
    if (cancel_signal_ && cancel_signal_->load())
        throw Error("cancelled by signal");
    if (cancel_requested_.load())
        throw Error("cancelled");
    if (since(t0_) > opt_.timeout_s)
        throw Error(fmt::format("--timeout {} s reached before the migration converged", opt_.timeout_s));
}

void Sender::fault_point(const char* phase)
{
    if (!hooks_.at_fault_point)
        return;
    try {
        hooks_.at_fault_point(phase);
    } catch (...) {
        dest_->abort();  // the destination goes away in this phase
        throw;
    }
}

uint64_t Sender::send(const ChannelPages& per)
{
    return channels_.send(*dest_, per, [this] {
        const Phase p = phase_.load();
        if (p == Phase::Bulk || p == Phase::Precopy) {
            check_cancel();  // --timeout too: a long bulk pass must not outrun it
            return;
        }
        if (cancel_signal_ && cancel_signal_->load())
            throw Error("cancelled by signal");
        if (cancel_requested_.load())
            throw Error("cancelled");
    });
}

// A bulk or pre-copy round: its pages count, and the bandwidth it measured.
void Sender::account(const RoundReport& rr)
{
    precopy_bytes_ += rr.bytes;
    precopy_s_ += rr.duration_s;
    bw_ = precopy_s_ > 0 ? static_cast<double>(precopy_bytes_) / precopy_s_ : 0;
    rep_.rounds.push_back(rr);
    rounds_++;
}

// Throttling for guests that dirty faster than the link.
void Sender::throttle(const dirty::Harvest& h, double prev_s, RoundReport& rr)
{
    if (opt_.throttle == Throttle::AutoConverge && round_ >= 2) {
        throttle_pct_ = throttle_pct_ ? std::min<uint32_t>(99, throttle_pct_ + 10) : 20;
        for (uint32_t i = 0; i < src_.vcpu_count(); i++)
            src_.set_throttle(i, throttle_pct_);
    }
    if (opt_.throttle == Throttle::DirtyLimit && prev_s > 0) {
        std::vector<double> per_vcpu(src_.vcpu_count(), 0);
        if (tracker_.mode() == dirty::Mode::Ring)
            for (uint32_t i = 0; i < src_.vcpu_count(); i++)
                per_vcpu[i] = static_cast<double>(h.per_vcpu[i]);
        else
            for (const auto& s : h.slots)
                s.for_each([&](uint64_t p) {
                    int o = owner_of_gpa(src_, s.gpa + p * 4096);
                    if (o >= 0)
                        per_vcpu[static_cast<size_t>(o)] += 1;
                });
        for (uint32_t i = 0; i < src_.vcpu_count(); i++)
            if (per_vcpu[i] / prev_s > static_cast<double>(opt_.dirty_limit))
                src_.set_rate(i, opt_.dirty_limit);
        rr.dirty_limit = opt_.dirty_limit;
    }
    rr.throttle_pct = throttle_pct_;
}

void Sender::print_progress(const RoundReport& rr) const
{
    if (!opt_.progress)
        return;
    fmt::print(stderr, "\r\033[Kmigrate: round {} sent {} pages ({}), {:.0f} dirty pages/s, expected downtime "
                       "{:.0f} ms, throttle {}%",
               rr.round, rr.pages, human_bytes(static_cast<double>(rr.bytes)), rr.dirty_rate, rep_.expected_downtime_ms,
               throttle_pct_);
}

// The longest no-progress gap per vCPU while the sampler ran.
std::vector<double> Sender::stop_sampler()
{
    sampler_->stop();
    stop_series();
    std::vector<double> longest(src_.vcpu_count(), 0);
    for (const Stall& s : sampler_->stalls(0))
        longest[s.vcpu] = std::max(longest[s.vcpu], s.len_ms);
    return longest;
}

void Sender::park_source()
{
    if (!src_.park_guests(std::chrono::milliseconds(2000))) {
        src_.unpark_guests();
        src_.pause();  // a guest that does not park in time is paused by signal
    }
    parked_ = true;
}

// What stop-and-copy sends: the last harvest, the one that ended pre-copy,
// and the guest_memfd slots (they cannot be logged) whole.
ChannelPages Sender::final_pages(const dirty::Harvest& last)
{
    ChannelPages per = channels_.split(last);
    if (pending_) {
        ChannelPages p2 = channels_.split(*pending_);
        for (uint32_t c = 0; c < channels_.count(); c++) {
            per[c].insert(per[c].end(), p2[c].begin(), p2[c].end());
            std::sort(per[c].begin(), per[c].end());
            per[c].erase(std::unique(per[c].begin(), per[c].end()), per[c].end());
        }
    }
    for (const auto& [slot, why] : tracker_.untracked_slots())
        channels_.add_slot(per, slot);
    return per;
}

// The parked source's vCPUs and, for a destination that checks them, digests of its memory.
void Sender::save_state()
{
    for (uint32_t i = 0; i < src_.vcpu_count(); i++)
        states_.push_back(save_vcpu(src_.kvm(), src_.vcpu(i)));
    if (!opt_.verify || !dest_->wants_digests())
        return;
    for (const auto& r : src_.memslots().regions())
        for (uint64_t off = 0; off < r.size; off += kDigestBytes) {
            const uint64_t len = std::min(kDigestBytes, r.size - off);
            digests_.push_back({r.gpa + off, len, digest64(src_.host_ptr(r.gpa + off, len), len)});
        }
}

// The source resumes as it was: tracking off, no throttle, running.
void Sender::give_back_source()
{
    try {
        if (tracking_)
            tracker_.disable();
    } catch (const std::exception& e) {
        rep_.error += fmt::format(" (and turning dirty logging off failed: {})", e.what());
    }
    tracking_ = false;
    for (uint32_t i = 0; i < src_.vcpu_count(); i++) {
        src_.set_throttle(i, 0);
        src_.set_rate(i, src_.config().workload.rate_pages_per_s);
    }
    if (parked_) {
        src_.unpark_guests();
        if (src_.paused())
            src_.resume();
        parked_ = false;
    }
}

}  // namespace mvm::migration
