// migration/sender_switchover.cpp - the Sender from stop-and-copy to the end:
// the source parked, the last pages and the vCPU states, the destination
// resumed and verified, the source handed over or given back.
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

// The downtime window opens here: every part is timed (DowntimeSplit).
void Sender::stop_and_copy()
{
    require({Phase::Bulk, Phase::Precopy}, "stop_and_copy");
    enter(Phase::Stop);
    rep_.vcpu_stall_ms = stop_sampler();
    if (!pending_)
        rep_.forced_by = "caller";  // stopped before pre-copy said it was done
    dirty::Harvest last = park_and_harvest();
    const auto t_split = clock::now();
    const ChannelPages per = final_pages(last);
    const double split_ms = ms_since(t_split);  // part of the final send, before any pause-before-switchover wait
    uint64_t n = 0;
    for (const auto& v : per)
        n += v.size();
    publish([n](LiveFigures& l) { l.remaining_pages = n; });  // what pre-switchover's query-migrate says remains
    if (events_.before_switchover) {
        events_.before_switchover();
        check_cancel();
    }
    const double interval_s = harvested() + pending_interval_s_;
    synced(last.dirty_pages, 0);
    auto t = clock::now();
    rep_.remaining_bytes = n * 4096;
    RoundReport fr = begin_round(static_cast<uint32_t>(rep_.rounds.size()), "stop", tdown_);
    fr.dirty_pages = n - rep_.untracked_bytes / 4096;  // distinct dirty pages of both last harvests
    rate(fr, fr.dirty_pages, interval_s, guest_dirty(last, pending_ ? &*pending_ : nullptr));
    begin_send(fr, n);
    fault_point("stop");
    final_bytes_ = send(per);
    end_send();
    rep_.split.final_send_ms = split_ms + ms_since(t);
    rep_.downtime_bytes = final_bytes_;
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
    rep_.destination_state = dest_->one_way() ? "file" : opt_.source_stopped ? "paused" : "running";
    verify_after_resume();
}

// The destination's copy is not the guest's: it was stopped and is dropped;
// (like any failure, in fail()) the intact, parked source resumes.
void Sender::discard_destination(const std::string& why, const std::string& error)
{
    destination_discarded_ = true;
    rep_.destination_state = "discarded";
    rep_.state_note = why + ": the destination was stopped and its copy discarded";
    throw Error(error);
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
    if (!v.ok)
        discard_destination("verification failed", "verification after resume failed: " + v.text);
}

void Sender::finish()
{
    require({Phase::Destination}, "finish");
    if (!switched_over_)
        throw std::logic_error("Sender::finish() called before switchover()");
    if (dest_->one_way()) {
        // A file: complete once it is on disk; the guest runs again where it
        // is restored, which checks it against the digests in the file.
        ResultRecord fin = dest_->finish();
        rep_.destination_state = "file";
        rep_.state_note = fin.text + "; the restore (receive --listen, run --restore, QMP migrate-incoming) checks "
                                     "every page against the source's digests in it; the source stays parked";
        rep_.verified = false;
        rep_.status = "completed";
        enter(Phase::Done);
        rep_.phase.clear();
        return;
    }
    if (opt_.source_stopped) {
        // The destination holds the guest paused until cont; its post-run
        // stamp check comes after that and is in its own report.
        rep_.destination_state = "paused";
        rep_.state_note = "the guest was stopped: the destination holds it paused until cont, then runs --post-run "
                          "and checks its stamps (its own report)";
        rep_.verified = opt_.verify;
        rep_.status = "completed";
        enter(Phase::Done);
        rep_.phase.clear();
        return;
    }
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
    if (!fin.ok)
        discard_destination("its post-run check failed", "destination check failed after resume: " + fin.text);
    rep_.status = "completed";
    enter(Phase::Done);
    rep_.phase.clear();
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
    if (opt_.source_stopped) {  // parked already by whoever stopped it: no STOP to tell
        parked_ = true;
        return;
    }
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
    if (parked_ && opt_.source_stopped) {
        parked_ = false;  // it stays stopped, as it was before the migration
    } else if (parked_) {
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
