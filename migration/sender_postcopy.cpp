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
    ResultRecord sw = dest_->postcopy_resumed();
    rep_.split.restore_ms = ms_since(t);
    rep_.downtime_ms = ms_since(tdown_);
    rep_.split.destination_restore_ms = sw.restore_ms;
    rep_.refused_msrs = sw.refused_msrs;
    if (!sw.ok)
        throw Error("the destination did not resume in postcopy: " + sw.text);
    postcopy_resumed_ = clock::now();
    rep_.postcopy.resumed_ms = ms_since(t0_);
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

}  // namespace mvm::migration
