// migration/sender_precopy.cpp - the Sender's phases while the source runs:
// setup, the bulk pass, pre-copy rounds (harvest, send, throttle), and
// the checks that end pre-copy (converged, postcopy due).
#include "migration/sender.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <stdexcept>

#include "base/error.hpp"
#include "base/units.hpp"
#include "migration/postcopy.hpp"
#include "migration/sender_impl.hpp"
#include "vmm/stress/sampler.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::migration {

void Sender::setup()
{
    require({Phase::Idle}, "setup");
    enter(Phase::Setup);
    rep_.source_state = opt_.source_stopped ? "stopped" : "running";
    rep_.destination_state = "setting-up";
    StreamHeader h = StreamHeader::of(src_, channels_.count());
    if (!opt_.validate_uuid)
        h.uuid.clear();
    h.guest_stopped = opt_.source_stopped;
    if (opt_.postcopy && opt_.postcopy_preempt) {
        h.preempt = true;
        h.nr_channels++;  // the last: requested pages only (sender_postcopy.cpp)
        rep_.postcopy.preempt = true;
    }
    dest_->open(h);
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
    publish([&](LiveFigures& l) { l.setup_ms = rep_.setup_ms; });
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
    synced(h.dirty_pages, interval_s);
    const bool converged = bw_ > 0 && rep_.expected_downtime_ms <= max_downtime_ms_.load();
    if (!converged && check_postcopy_due(h.dirty_pages, interval_s)) {
        postcopy_due_ = true;
        pending_ = std::move(h);
        pending_interval_s_ = interval_s;
        if (opt_.progress)
            fmt::print(stderr, "\r\033[K");
        return false;
    }
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

// The downtime window opens: the source parks and its last harvest is taken.
dirty::Harvest Sender::park_and_harvest()
{
    tdown_ = clock::now();
    rep_.stop_ms = since(t0_) * 1e3;
    park_source();
    park_mark_ = channels_.sent_bytes();
    rep_.split.park_ms = ms_since(tdown_);
    rep_.source_state = "parked";
    const auto t = clock::now();
    dirty::Harvest last = tracker_.harvest();
    rep_.split.final_harvest_ms = ms_since(t);
    return last;
}

// Postcopy instead of this round? (MigrateOptions::postcopy)
bool Sender::check_postcopy_due(uint64_t dirty_pages, double interval_s)
{
    if (!opt_.postcopy)
        return false;
    // Not converging: the dirty rate near the link rate (90%), or every
    // tracked page dirty (a saturated harvest only bounds the rate below).
    const double rate = interval_s > 0 ? static_cast<double>(dirty_pages) * 4096 / interval_s : 0;
    const bool saturated = tracked_pages_ > 0 && dirty_pages >= tracked_pages_;
    above_link_ = bw_ > 0 && (rate >= 0.9 * bw_ || saturated) ? above_link_ + 1 : 0;
    std::string why;
    if (postcopy_requested_.load())
        why = "requested (migrate-start-postcopy)";
    else if (opt_.postcopy_on_request)
        return false;
    else if (opt_.postcopy_after > 0 && round_ > opt_.postcopy_after)
        why = fmt::format("after {} pre-copy round{} (--postcopy-after)", opt_.postcopy_after,
                          opt_.postcopy_after == 1 ? "" : "s");
    else if (opt_.postcopy_after == 0 && above_link_ >= 2)
        why = fmt::format("the dirty rate ({}{}/s) stayed near or above the link rate ({}/s) for 2 harvests",
                          saturated ? ">= " : "", human_bytes(rate), human_bytes(bw_));
    else if (round_ > opt_.max_iterations)
        why = "pre-copy ran out of rounds (--max-iterations)";
    if (why.empty())
        return false;
    rep_.postcopy.trigger = why;
    rep_.postcopy.after_rounds = round_ - 1;
    rep_.forced_by = "postcopy";
    return true;
}

uint64_t Sender::send(ChannelPages per)
{
    inflight_per_ = std::move(per);
    return channels_.send(*dest_, inflight_per_, [this] {
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
    rep_.precopy_bytes = precopy_bytes_;
    rep_.rounds.push_back(rr);
    rounds_++;
}

// Throttling for guests that dirty faster than the link.
void Sender::throttle(const dirty::Harvest& h, double prev_s, RoundReport& rr)
{
    if (opt_.throttle == Throttle::AutoConverge && round_ >= 2) {
        throttle_pct_ = std::min(opt_.throttle_max,
                                 throttle_pct_ ? throttle_pct_ + opt_.throttle_increment : opt_.throttle_initial);
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
            if (per_vcpu[i] / prev_s > static_cast<double>(opt_.dirty_limit)) {
                src_.set_rate(i, opt_.dirty_limit);
                dirty_limit_cut_rate_ = std::max(dirty_limit_cut_rate_, per_vcpu[i] / prev_s);
            }
        rr.dirty_limit = opt_.dirty_limit;
    }
    rr.throttle_pct = throttle_pct_;
    publish([&](LiveFigures& l) {
        l.throttle_pct = throttle_pct_;
        l.dirty_limit = rr.dirty_limit;
        l.dirty_limit_cut_rate = dirty_limit_cut_rate_;
    });
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

}  // namespace mvm::migration
