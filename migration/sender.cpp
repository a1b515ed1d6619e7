#include "migration/sender.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <stdexcept>

#include "base/error.hpp"
#include "base/units.hpp"
#include "migration/postcopy.hpp"
#include "vmm/stress/sampler.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::migration {

namespace {

double since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double ms_since(std::chrono::steady_clock::time_point t0) { return since(t0) * 1e3; }

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

// ---- the phases ---------------------------------------------------------------------

void Sender::setup()
{
    require({Phase::Idle}, "setup");
    enter(Phase::Setup);
    rep_.source_state = "running";
    rep_.destination_state = "setting-up";
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

// The downtime window opens here: every part is timed (DowntimeSplit).
void Sender::stop_and_copy()
{
    require({Phase::Bulk, Phase::Precopy}, "stop_and_copy");
    enter(Phase::Stop);
    rep_.vcpu_stall_ms = stop_sampler();
    if (!pending_)
        rep_.forced_by = "caller";  // stopped before pre-copy said it was done
    dirty::Harvest last = park_and_harvest();
    const double interval_s = harvested() + pending_interval_s_;
    synced(last.dirty_pages, 0);
    auto t = clock::now();
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
    rep_.split.final_send_ms = ms_since(t);
    rep_.downtime_bytes = final_bytes_;
    publish([&](LiveFigures& l) { l.downtime_bytes = final_bytes_; });
    fr.pages = n;
    fr.bytes = final_bytes_;
    fr.duration_s = since(tdown_);
    fr.throttle_pct = throttle_pct_;
    rep_.rounds.push_back(fr);
    rounds_++;
    t = clock::now();
    save_state();
    rep_.split.vcpu_state_ms = ms_since(t);
}

// The destination resumes: the downtime window closes. Verification runs
// after it, the destination running, the source still parked.
void Sender::switchover()
{
    require({Phase::Stop}, "switchover");
    if (switched_over_)
        throw std::logic_error("Sender::switchover() called twice");
    fault_point("switchover");  // every page sent, nothing resumed yet
    const auto t = clock::now();
    ResultRecord sw = dest_->switchover(states_);
    rep_.split.restore_ms = ms_since(t);
    rep_.downtime_ms = ms_since(tdown_);
    rep_.total_ms = since(t0_) * 1e3;  // QEMU's total-time: the destination runs from here
    rep_.split.destination_restore_ms = sw.restore_ms;
    rep_.refused_msrs = sw.refused_msrs;
    if (!sw.ok)
        throw Error("the destination did not resume: " + sw.text);
    switched_over_ = true;
    enter(Phase::Destination);
    handed_over();
}

// The guest lives on at the destination now, every page there; the source
// stays parked: logging off, the figures, then the verification.
void Sender::handed_over()
{
    tracker_.disable();
    tracking_ = false;
    rep_.transferred_bytes = channels_.sent_bytes();
    rep_.zero_pages = channels_.zero_pages();
    rep_.channels = channels_.count();
    const PageCounts pc = dest_->page_counts();
    rep_.compression.method = opt_.compress.name();
    rep_.compression.data_bytes = pc.data_bytes;
    rep_.compression.wire_bytes = pc.payload_bytes;
    rep_.compression.cpu_ms = pc.codec_cpu_s * 1e3;
    rep_.throughput = precopy_s_ > 0 ? static_cast<double>(precopy_bytes_) / precopy_s_ : 0;
    fill_rates();
    rep_.source_state = "parked";
    rep_.state_note = "the source is parked, its guest handed to the destination";
    rep_.destination_state = "running";
    verify_after_resume();
}

// The switch to postcopy: like stop-and-copy, but what is left is not sent:
// the destination drops those pages and resumes without them.
void Sender::postcopy_switch()
{
    require({Phase::Bulk, Phase::Precopy}, "postcopy_switch");
    if (!postcopy_due_)
        throw std::logic_error("Sender::postcopy_switch() while postcopy is not due");
    enter(Phase::Postcopy);
    rep_.vcpu_stall_ms = stop_sampler();
    dirty::Harvest last = park_and_harvest();
    synced(last.dirty_pages, 0);
    postcopy_pages_ = postcopy_units(src_, final_pages(last));
    std::vector<uint64_t> discard;
    for (const auto& c : postcopy_pages_)
        for (uint64_t u : c)
            for (uint64_t off = 0, len = FaultServer::unit_of(src_, u); off < len; off += 4096)
                discard.push_back(u + off);
    rep_.postcopy.discarded_pages = discard.size();
    rep_.remaining_bytes = discard.size() * 4096;
    auto t = clock::now();
    save_state();
    rep_.split.vcpu_state_ms = ms_since(t);
    fault_point("switchover");
    t = clock::now();
    dest_->begin_postcopy(states_, discard);
    // From here the destination may run the guest: the source may not resume.
    switched_over_ = true;
    rep_.postcopy.started = true;
    start_pushing();  // resuming touches guest memory: faults are served from now
    ResultRecord sw = dest_->postcopy_resumed();
    rep_.split.restore_ms = ms_since(t);
    rep_.downtime_ms = ms_since(tdown_);
    rep_.split.destination_restore_ms = sw.restore_ms;
    rep_.refused_msrs = sw.refused_msrs;
    if (!sw.ok)
        throw Error("the destination did not resume in postcopy: " + sw.text);
    postcopy_resumed_ = clock::now();
    rep_.destination_state = "running (postcopy)";
    rep_.state_note = "postcopy: the destination runs the guest and fetches the rest from the parked source";
}

// Pages per postcopy batch: 64 KiB, so a requested page waits behind at
// most that much of the background push on its channel (and its pacing).
constexpr size_t kPostcopyBatch = 16;

// Every page the destination lacks, requested ones first (PostcopySource),
// one thread per channel, and the return path.
void Sender::start_pushing()
{
    postcopy_start_ = clock::now();
    pcs_ = std::make_unique<PostcopySource>(src_, channels_.map(), postcopy_pages_);
    pc_bytes0_ = channels_.sent_bytes();
    for (uint32_t c = 0; c < channels_.count(); c++)
        pushers_.emplace_back([this, c] {
            try {
                std::optional<numa::ThreadPolicyScope> scope;
                channels_.map().enter(c, scope);
                bool first = true;
                while (!pc_stop_.load()) {
                    std::vector<uint64_t> batch = pcs_->next(c, kPostcopyBatch);
                    if (batch.empty())
                        break;
                    channels_.send_batch(*dest_, c, batch);
                    if (c == 0 && std::exchange(first, false))
                        fault_point("postcopy");  // the tests' hook: the connection lost mid-postcopy
                }
            } catch (...) {
                pushing_failed(std::current_exception());
            }
        });
    return_path_ = std::thread([this] {
        try {
            std::vector<uint64_t> g;
            bool more = true;
            while (more) {
                more = dest_->requests(g, std::chrono::milliseconds(100));
                for (uint64_t gpa : g)
                    pcs_->request(gpa);
                g.clear();
            }
        } catch (...) {
            if (!pc_stop_.load())
                pushing_failed(std::current_exception());
        }
    });
}

void Sender::pushing_failed(std::exception_ptr e)
{
    {
        std::lock_guard lk(pc_mu_);
        if (!pc_err_)
            pc_err_ = e;
    }
    pc_stop_ = true;
    dest_->abort();  // unblocks every channel and the return path
}

// The pushers first; the return path ends with the destination's last RESULT
// (or an abort). Then what postcopy sent, once, also after a failure.
void Sender::join_pushing()
{
    for (auto& t : pushers_)
        if (t.joinable())
            t.join();
    if (return_path_.joinable())
        return_path_.join();
    if (!pcs_ || counted_)
        return;
    counted_ = true;
    rep_.postcopy.requests = pcs_->requests();
    rep_.postcopy.requested_pages = pcs_->requested_pages();
    rep_.postcopy.bytes = channels_.sent_bytes() - pc_bytes0_;
    const uint64_t sent = rep_.postcopy.discarded_pages - pcs_->left();
    rep_.postcopy.pushed_pages = sent - std::min(sent, rep_.postcopy.requested_pages);
    RoundReport pr = begin_round(static_cast<uint32_t>(rep_.rounds.size()), "postcopy", postcopy_start_);
    pr.pages = sent;
    pr.bytes = rep_.postcopy.bytes;
    pr.duration_s = since(postcopy_start_);
    rep_.rounds.push_back(pr);
    rounds_++;
}

void Sender::postcopy()
{
    require({Phase::Postcopy}, "postcopy");
    for (auto& t : pushers_)
        t.join();
    ResultRecord done;
    bool have_err;
    {
        std::lock_guard lk(pc_mu_);
        have_err = pc_err_ != nullptr;
    }
    if (!have_err) {
        try {
            done = dest_->end_postcopy();
        } catch (...) {
            pushing_failed(std::current_exception());
        }
    }
    join_pushing();
    {
        std::lock_guard lk(pc_mu_);
        if (pc_err_)
            std::rethrow_exception(pc_err_);
    }
    if (!done.ok)
        throw Error("the destination failed in postcopy: " + done.text);
    if (!done.details.empty()) {
        rep_.postcopy.destination = PostcopyDestinationFigures::from_json(nlohmann::json::parse(done.details));
        rep_.postcopy.destination_reported = true;
    }
    rep_.postcopy.duration_ms = ms_since(postcopy_resumed_);
    postcopy_done_ = true;
    rep_.total_ms = since(t0_) * 1e3;  // QEMU's total-time: postcopy ends when the destination has every page
    enter(Phase::Destination);
    handed_over();
}

// The parked source hashes its frozen memory; the destination compares it
// with its pages as they landed. A mismatch fails the migration: the
// destination's copy is discarded and fail() resumes the intact source.
void Sender::verify_after_resume()
{
    const auto t = clock::now();
    std::optional<PageHashes> frozen;
    if (opt_.verify)
        frozen = PageHashes::of_memory(src_);
    ResultRecord v = dest_->verify(frozen ? &*frozen : nullptr);
    rep_.verify_ms = ms_since(t);
    rep_.downtime_guest_ms = v.guest_gap_ms;
    if (v.guest_gap_ms < 0)
        rep_.downtime_guest_note = v.text;
    rep_.switchover_pages_checked = v.pages_checked;
    rep_.switchover_mismatches = v.mismatches;
    rep_.switchover_mismatch_gpas = v.mismatched_gpas;
    if (!v.ok) {
        destination_discarded_ = true;
        rep_.destination_state = "discarded";
        rep_.state_note = "verification failed: the destination was stopped and its copy discarded";
        throw Error("verification after resume failed: " + v.text);
    }
}

void Sender::finish()
{
    require({Phase::Destination}, "finish");
    if (!switched_over_)
        throw std::logic_error("Sender::finish() called before switchover()");
    const auto t = clock::now();
    fault_point("destination");  // the tests' hook: the destination lost after it resumed the guest
    ResultRecord fin = dest_->finish();
    rep_.post_run_ms = since(t) * 1e3;
    rep_.destination_state = "checked";
    rep_.state_note = "the destination ran --post-run, was stopped and checked";
    rep_.pages_checked = fin.pages_checked;
    rep_.mismatches = fin.mismatches;
    rep_.stamp_summary = fin.text;
    if (auto d = nlohmann::json::parse(fin.details, nullptr, false); d.is_object() && d.contains("placement"))
        rep_.destination_placement = d["placement"];
    rep_.destination_progressed = fin.ok != 0 || fin.text.find("no progress") == std::string::npos;
    rep_.verified = opt_.verify;
    if (!fin.ok) {
        // The destination's copy is not the guest's: discard it, and (like
        // any failure, in fail()) the intact, parked source resumes.
        destination_discarded_ = true;
        rep_.destination_state = "discarded";
        rep_.state_note = "its post-run check failed: the destination was stopped and its copy discarded";
        throw Error("destination check failed after resume: " + fin.text);
    }
    rep_.status = "completed";
    enter(Phase::Done);
    rep_.phase.clear();
}

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
    rep_.precopy_bytes = precopy_bytes_;
    publish([&](LiveFigures& l) { l.precopy_bytes = precopy_bytes_; });
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
            if (per_vcpu[i] / prev_s > static_cast<double>(opt_.dirty_limit))
                src_.set_rate(i, opt_.dirty_limit);
        rr.dirty_limit = opt_.dirty_limit;
    }
    rr.throttle_pct = throttle_pct_;
    publish([&](LiveFigures& l) {
        l.throttle_pct = throttle_pct_;
        l.dirty_limit = rr.dirty_limit;
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
    if (events_.on_source)
        events_.on_source(false);
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

// The parked source's vCPUs.
void Sender::save_state()
{
    for (uint32_t i = 0; i < src_.vcpu_count(); i++)
        states_.push_back(save_vcpu(src_.kvm(), src_.vcpu(i)));
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
        if (events_.on_source)
            events_.on_source(true);
    }
    publish([](LiveFigures& l) {
        l.throttle_pct = 0;
        l.dirty_limit = 0;
    });
}

}  // namespace mvm::migration
