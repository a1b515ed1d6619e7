// migration/sender_postcopy.cpp - the Sender's postcopy: the switch (the
// destination runs before it has every page), the pushers with requested
// pages first, and the end once every page is there.
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
    resume_mark_ = channels_.sent_bytes();
    rep_.postcopy.started = true;
    start_pushing();  // resuming touches guest memory: faults are served from now
    ResultRecord sw;
    bool cut = false;
    try {
        sw = dest_->postcopy_resumed();
    } catch (...) {
        // Cut before the destination said it resumed: with recovery on,
        // postcopy() pauses and takes it up again (the guest may run there).
        if (!events_.postcopy_paused || !dest_->can_recover())
            throw;
        pushing_failed(std::current_exception());
        cut = true;
    }
    rep_.split.restore_ms = ms_since(t);
    rep_.downtime_ms = ms_since(tdown_);
    rep_.split.destination_restore_ms = sw.restore_ms;
    rep_.refused_msrs = sw.refused_msrs;
    if (!cut && !sw.ok)
        throw Error("the destination did not resume in postcopy: " + sw.text);
    postcopy_resumed_ = clock::now();
    rep_.postcopy.resumed_ms = ms_since(t0_);
    rep_.destination_state = "running (postcopy)";
    rep_.state_note = "postcopy: the destination runs the guest and fetches the rest from the parked source";
    if (cut)
        rep_.state_note += "; the connection was cut before the destination said it resumed: the downtime is up to "
                           "the cut, the destination's restore time unknown";
}

// Pages per postcopy batch: 64 KiB, so a requested page waits behind at
// most that much of the background push on its channel (and its pacing).
constexpr size_t kPostcopyBatch = 16;

// Every page the destination lacks, requested ones first (PostcopySource),
// one thread per channel, and the return path.
void Sender::start_pushing()
{
    postcopy_start_ = clock::now();
    pcs_ = std::make_unique<PostcopySource>(src_, channels_.map(), postcopy_pages_, rep_.postcopy.preempt);
    pc_bytes0_ = channels_.sent_bytes();
    if (opt_.postcopy_bandwidth && !pc_bw_set_.load())
        set_postcopy_bandwidth(*opt_.postcopy_bandwidth);
    set_pc_status(1);
    launch_pushers();
}

void Sender::launch_pushers()
{
    const bool first = !std::exchange(pc_launched_, true);
    for (uint32_t c = 0; c < channels_.count(); c++)
        pushers_.emplace_back([this, c, first] {
            try {
                std::optional<numa::ThreadPolicyScope> scope;
                channels_.map().enter(c, scope);
                push(c, c == 0 && first);
            } catch (...) {
                pushing_failed(std::current_exception());
            }
        });
    if (rep_.postcopy.preempt)
        pushers_.emplace_back([this] {  // last: push_and_end() joins it once the background is sent
            try {
                push_urgent();
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

// Channel c's pages until none is left; requested ones unpaced.
void Sender::push(uint32_t c, bool hook)
{
    bool hooked = !hook;
    while (!pc_stop_.load()) {
        bool urgent = false;
        std::vector<uint64_t> batch = pcs_->next(c, kPostcopyBatch, &urgent);
        if (batch.empty())
            break;
        const uint64_t b = channels_.send_batch(*dest_, c, batch, false);
        if (!std::exchange(hooked, true))
            fault_point("postcopy");  // the tests' hook: the connection lost mid-postcopy
        if (!urgent)
            pace_postcopy(c, b);
    }
}

// Postcopy-preempt: requested pages alone, on the connection after the
// data channels, as soon as they are asked for.
void Sender::push_urgent()
{
    const uint32_t pc = channels_.count();
    while (!pc_stop_.load()) {
        std::vector<uint64_t> batch = pcs_->next_urgent(kPostcopyBatch);
        if (batch.empty()) {
            if (pcs_->closed())
                break;
            continue;
        }
        channels_.send_batch(*dest_, pc, batch, false);
    }
}

// The background push at max-postcopy-bandwidth (else the pre-copy
// bandwidth), all channels together; a request or a pause ends the wait.
void Sender::pace_postcopy(uint32_t c, uint64_t bytes)
{
    const uint64_t bw = pc_bw_set_.load() ? pc_bw_.load() : channels_.bandwidth();
    if (!bw)
        return;
    clock::time_point due;
    {
        std::lock_guard lk(pc_pace_mu_);
        pc_paced_bytes_ += bytes;
        due = pc_paced_since_ + std::chrono::duration_cast<clock::duration>(
                                    std::chrono::duration<double>(static_cast<double>(pc_paced_bytes_) / bw));
    }
    if (due > clock::now())
        pcs_->wait(c, due);
}

void Sender::set_postcopy_bandwidth(uint64_t bytes_per_s)
{
    {
        std::lock_guard lk(pc_pace_mu_);
        pc_bw_ = bytes_per_s;
        pc_bw_set_ = true;
        pc_paced_since_ = clock::now();
        pc_paced_bytes_ = 0;
    }
    if (pc_status_.load() != 0)  // pcs_ is made before the status leaves 0 (another thread may be asking)
        pcs_->wake();
}

void Sender::set_pc_status(int st)
{
    static const char* const kNames[] = {"", "postcopy-active", "postcopy-paused", "postcopy-recover-setup",
                                         "postcopy-recover"};
    if (pc_status_.exchange(st) != st && events_.on_postcopy_status)
        events_.on_postcopy_status(kNames[st]);
}

std::string Sender::postcopy_status() const
{
    static const char* const kNames[] = {"", "postcopy-active", "postcopy-paused", "postcopy-recover-setup",
                                         "postcopy-recover"};
    return kNames[pc_status_.load()];
}

bool Sender::pause_postcopy()
{
    const int st = pc_status_.load();
    if (st != 1 && st != 4)
        return false;
    {
        std::lock_guard lk(pc_mu_);
        if (!pc_err_)
            pc_err_ = std::make_exception_ptr(Error("migrate-pause"));
    }
    pc_stop_ = true;
    if (pcs_)
        pcs_->wake();
    dest_->abort();
    return true;
}

void Sender::pushing_failed(std::exception_ptr e)
{
    {
        std::lock_guard lk(pc_mu_);
        if (!pc_err_)
            pc_err_ = e;
    }
    pc_stop_ = true;
    if (pcs_)
        pcs_->wake();
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
    const uint64_t sent = rep_.postcopy.discarded_pages - pcs_->left() + rep_.postcopy.resent_pages;
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
    ResultRecord done;
    for (;;) {
        std::exception_ptr err = push_and_end(done);
        if (!err)
            break;
        if (!recover_after(err)) {
            join_pushing();
            std::rethrow_exception(err);
        }
    }
    join_pushing();
    set_pc_status(0);
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

// The pushers to their end, then the destination's "postcopy complete";
// the return path stopped either way. The error that cut it short, if any.
std::exception_ptr Sender::push_and_end(ResultRecord& done)
{
    for (size_t i = 0; i < pushers_.size(); i++) {
        if (i == channels_.count())
            pcs_->close();  // the background is sent: the preempt channel's thread ends
        pushers_[i].join();
    }
    pushers_.clear();
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
    if (return_path_.joinable())
        return_path_.join();
    std::lock_guard lk(pc_mu_);
    return std::exchange(pc_err_, nullptr);
}

// A cut in postcopy with recovery on: QEMU's postcopy-paused until an address
// to resume on, postcopy-recover-setup while connecting, postcopy-recover
// until the destination said what it lacks, then postcopy-active again.
// False: no recovery here, or it was given up (the guest is lost).
bool Sender::recover_after(std::exception_ptr cut)
{
    if (!events_.postcopy_paused || !dest_->can_recover())
        return false;
    std::string why = what_of(cut, "the connection broke");
    const auto t = clock::now();
    set_pc_status(2);
    fmt::print(stderr, "migrate: postcopy paused ({}): {} page(s) not yet sent; the source stays parked\n", why,
               pcs_->left());
    for (;;) {
        const std::string uri = events_.postcopy_paused(why);
        if (uri.empty())
            return false;
        set_pc_status(3);
        try {
            dest_->reconnect(uri);
            set_pc_status(4);
            const std::vector<uint64_t> missing = dest_->resume_postcopy();
            rep_.postcopy.resent_pages += pcs_->resume(missing);
        } catch (const std::exception& e) {
            why = e.what();
            fmt::print(stderr, "migrate: postcopy recovery on {} failed: {}; still paused\n", uri, why);
            dest_->abort();
            set_pc_status(2);
            continue;
        }
        rep_.postcopy.pauses++;
        rep_.postcopy.paused_ms += ms_since(t);
        fmt::print(stderr, "migrate: postcopy recovered on {} after {:.0f} ms: {} page(s) left\n", uri, ms_since(t),
                   pcs_->left());
        pc_stop_ = false;
        {
            std::lock_guard lk(pc_mu_);
            pc_err_ = nullptr;  // a pause during the handshake
        }
        set_pc_status(1);
        launch_pushers();
        return true;
    }
}

}  // namespace mvm::migration
