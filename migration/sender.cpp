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

const char* phase_name(Phase p)
{
    switch (p) {
    case Phase::Idle: return "idle";
    case Phase::Setup: return "setup";
    case Phase::Bulk: return "bulk";
    case Phase::Precopy: return "precopy";
    case Phase::Stop: return "stop";
    case Phase::Postcopy: return "postcopy";
    case Phase::Destination: return "destination";
    case Phase::Done: return "done";
    }
    return "?";
}

// A remote destination's connections: --compress, --io-timeout, and --timeout
// from the start of the migration as their deadline up to the switchover.
static LinkOptions link_options(const MigrateOptions& opt, std::shared_ptr<TransportWrapper> wrapper,
                                std::chrono::steady_clock::time_point t0)
{
    LinkOptions l;
    l.compression = opt.compress;
    l.io_timeout_s = opt.io_timeout_s;
    if (opt.timeout_s > 0 && opt.timeout_s < 1e9) {
        l.deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(opt.timeout_s));
        l.deadline_what = fmt::format("--timeout {:g} s", opt.timeout_s);
    }
    l.tls = opt.tls;
    l.mapped_ram = opt.mapped_ram;
    l.direct_io = opt.direct_io;
    l.wrapper = std::move(wrapper);
    return l;
}

Sender::Sender(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel,
               SenderHooks hooks, SenderEvents events)
    : src_(src), tracker_(tracker), opt_(opt), cancel_signal_(cancel), hooks_(std::move(hooks)),
      events_(std::move(events)), t0_(clock::now()),
      channels_(src, channel_count(src, opt), opt.bandwidth),
      dest_(make_destination(src, opt.to, opt.verify, opt.post_run_s, link_options(opt, hooks_.transport, t0_))),
      max_downtime_ms_(opt.max_downtime_ms)
{
    rep_.max_downtime_ms = opt.max_downtime_ms;
    rep_.config = config_echo(src, opt, channels_.count());
    rep_.source_state = "running";
    rep_.destination_state = "none";
    rep_.postcopy.enabled = opt.postcopy;
    if (opt.postcopy && opt.postcopy_preempt && (!dest_->can_recover() || opt.to.rfind("fd:", 0) == 0))
        throw UsageError(fmt::format("--postcopy-preempt: --to {} has no room for a second connection; use "
                                     "tcp:HOST:PORT or unix:PATH",
                                     opt.to));
    if (dest_->one_way() && opt.postcopy)
        throw UsageError(fmt::format("--postcopy: {} is a file; postcopy needs a destination that asks for pages",
                                     opt.to));
    for (const auto& slot : src.memslots().regions())
        live_.total_bytes += slot.pages() * 4096;
}

Sender::~Sender()
{
    if (!pushers_.empty() || return_path_.joinable()) {
        pc_stop_ = true;
        dest_->abort();
        join_pushing();
    }
}

// The phases live beside this file: sender_precopy.cpp (setup, bulk, pre-copy),
// sender_switchover.cpp (stop-and-copy to the end), sender_postcopy.cpp.

void Sender::fail(const std::string& error)
{
    if (!pushers_.empty() || return_path_.joinable()) {
        pc_stop_ = true;
        try {
            dest_->abort();
        } catch (...) {
        }
        join_pushing();
    }
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
    if (rep_.postcopy.started && !postcopy_done_) {
        // Postcopy broke off: the destination ran the guest without some of
        // its pages, and only the parked source holds them. Neither side has
        // the whole guest, and the source may not resume a guest that ran on.
        rep_.guest_lost = true;
        rep_.destination_state = "lost";
        rep_.source_state = "parked";
        rep_.state_note = "postcopy broke off: the destination ran the guest without pages only the parked source "
                          "holds; the source may not resume it: the guest is lost";
    } else if (switched_over_ && !destination_discarded_) {
        // The destination may still run the guest: resuming the source could
        // run it twice (QEMU's source stays paused in postmigrate too).
        rep_.destination_state = "lost";
        rep_.source_state = "parked";
        rep_.state_note = "the destination was lost after it resumed the guest; the source stays parked since the "
                          "switchover, not resumed";
    } else {
        // Before the switchover, or the destination stopped and discarded its
        // copy: the intact source is the guest; it runs on.
        give_back_source();
        if (!switched_over_)
            rep_.destination_state = "aborted";
        rep_.source_state = switched_over_ ? "resumed" : "running";
        if (switched_over_)
            rep_.state_note += "; the intact source resumed: the guest runs on there";
        else
            rep_.state_note = "the source runs again (given back: logging and throttles off)";
    }
    if (!switched_over_ || rep_.guest_lost)
        rep_.total_ms = since(t0_) * 1e3;  // start -> failure (after the switchover: -> destination running)
    const std::string failed_in = rep_.phase;
    enter(Phase::Done);
    rep_.phase = failed_in;
}

bool Sender::cancelled() const { return (cancel_signal_ && cancel_signal_->load()) || cancel_requested_.load(); }

// ---- steps of the phases --------------------------------------------------------------

void Sender::enter(Phase p)
{
    phase_ = p;
    rep_.phase = phase_name(p);
    publish([p](LiveFigures& l) { l.phase = p; });
    if (p != Phase::Done)
        dest_->enter_phase(phase_name(p));
    if (events_.on_phase)
        events_.on_phase(p);
}

void Sender::publish(const std::function<void(LiveFigures&)>& f)
{
    std::lock_guard lk(live_mu_);
    f(live_);
}

// A harvest: QEMU's dirty sync (dirty-sync-count, dirty-pages-rate, MIGRATION_PASS).
void Sender::synced(uint64_t dirty_pages, double interval_s)
{
    rep_.dirty_syncs++;
    publish([&](LiveFigures& l) {
        l.dirty_syncs = rep_.dirty_syncs;
        if (interval_s > 0)
            l.dirty_rate = static_cast<double>(dirty_pages) / interval_s;
        l.expected_downtime_ms = rep_.expected_downtime_ms;
    });
    if (events_.on_sync)
        events_.on_sync(rep_.dirty_syncs);
}

LiveFigures Sender::live() const
{
    LiveFigures l;
    uint64_t round_pages, base;
    bool inflight;
    {
        std::lock_guard lk(live_mu_);
        l = live_;
        round_pages = live_round_pages_;
        base = live_round_base_;
        inflight = live_inflight_;
    }
    l.elapsed_ms = since(t0_) * 1e3;
    l.transferred_bytes = channels_.sent_bytes();
    l.sent_pages = channels_.sent_pages();
    l.zero_pages = channels_.zero_pages();
    l.rounds = rounds_.load();
    // QEMU's precopy/downtime/postcopy-bytes split what was sent by when:
    // they add up to transferred at every poll, not only at the end.
    const uint64_t t = l.transferred_bytes, park = park_mark_.load(), resume = resume_mark_.load();
    l.precopy_bytes = std::min(t, park);
    l.downtime_bytes = t > park ? std::min(t, resume) - park : 0;
    l.postcopy_bytes = t > resume ? t - resume : 0;
    const uint64_t done = l.sent_pages - std::min(l.sent_pages, base);
    l.remaining_pages = inflight ? round_pages - std::min(round_pages, done) : l.remaining_pages;
    return l;
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

}  // namespace mvm::migration
