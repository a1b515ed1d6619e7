// migration/postcopy.hpp - postcopy: the guest runs at the destination
// before all of its memory is there, and each page it touches is fetched on
// demand (QEMU's postcopy-ram).
//
// At the switch the source parks, sends the vCPU states and the list of
// pages dirtied since they were sent (DISCARD); the destination makes those
// pages missing (UserfaultFd::discard), registers its memory with
// userfaultfd in missing mode and resumes. From then on:
//   destination  a fault thread reads each userfault, asks the source for
//                its page over the return path (REQUEST on channel 0, or a
//                call in-process) and times the fault until the page is
//                placed (UFFDIO_COPY / UFFDIO_ZEROPAGE) by whichever thread
//                received it: QEMU's blocktime and latency figures.
//   source       one thread per channel pushes what is left in the background
//                (PostcopySource): a requested page jumps the queue, and the
//                background push goes on from the requested address (pages
//                near recent faults first).
// A huge page (hugetlb2m) moves and lands whole: discards, requests and
// placements are in units of the backing's page size.
//
// A broken connection in postcopy pauses both sides where they can recover
// (QEMU's postcopy-paused: QMP always, the CLI with --postcopy-recover): the
// destination's guest runs on, a fault on a missing page waits, and the
// source parks until it reconnects (stream.hpp: RESUME, MISSING); then the
// pages the destination still lacks (those in flight at the cut among them)
// are pushed again, the waited ones first. Without recovery, or once it is
// given up, the guest is lost: the destination lacks pages only the parked
// source holds, and the source may not resume a guest that ran on
// elsewhere. Both sides say so and exit with kExitGuestLost; nothing
// reports success with a page missing.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "memory/userfault.hpp"
#include "migration/channels.hpp"
#include "migration/page_codec.hpp"
#include "migration/report.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm {
class ProgressSampler;
}

namespace mvm::migration {

using PostcopyFigures = PostcopyDestinationFigures;

// The destination's side: owns the userfaultfd and the fault thread.
class FaultServer {
public:
    // Asks the source for the page (unit) at gpa; called on the fault thread.
    using Request = std::function<void(uint64_t gpa)>;
    FaultServer(StressVm& dst, Request request);
    ~FaultServer();
    FaultServer(const FaultServer&) = delete;
    FaultServer& operator=(const FaultServer&) = delete;

    // The backing page size around gpa (4 KiB, or 2 MiB for hugetlb2m).
    static uint64_t unit_of(const StressVm& m, uint64_t gpa);
    // "" when every memslot of m can take postcopy, else why not.
    static std::string unsupported(const StressVm& m);

    // Before the guest runs: registers every memslot (missing mode), makes
    // the `discard` pages (widened to units) missing, starts the fault thread.
    void arm(std::span<const uint64_t> discard);
    // After the guest resumed: vCPU threads are told from the VMM's own
    // faults, and the guest's stall sampler runs.
    void guest_started();
    // Places one unit (len = unit_of) at gpa: data, or zeros when null.
    // Thread-safe (the channels' threads). False: it was there already.
    bool place(uint64_t gpa, const uint8_t* data, uint64_t len);
    uint64_t missing() const;  // units not placed yet
    // Postcopy recovery: the units not placed yet (sorted), and those of
    // them a fault waits on (asked for; the request may have been lost).
    std::vector<uint64_t> missing_units() const;
    std::vector<uint64_t> waited_units() const;
    // Every page placed: stops the thread and the sampler, unregisters.
    // Throws Error when a page is still missing.
    void finish();
    // The source is gone: stops the thread; closing the userfaultfd releases
    // blocked threads (their pages fill with zeros: the caller kills the VM
    // and discards it).
    void abandon();
    PostcopyFigures figures() const;

private:
    struct Waiter {
        int vcpu;  // -1: not a vCPU
        std::chrono::steady_clock::time_point since;
    };
    void loop();
    int vcpu_of(pid_t tid);
    void resolve(uint64_t unit, std::chrono::steady_clock::time_point now);

    StressVm& dst_;
    Request request_;
    std::shared_ptr<UserfaultFd> uffd_;  // reset by abandon(): copied under mu_ by place()
    std::shared_ptr<UserfaultFd> uffd() const;
    bool abandoned_ = false;
    std::thread thread_;
    std::atomic<bool> stop_{false};
    void stop_sampler();
    std::mutex sampler_mu_;  // guest_started() against abandon() from a channel's thread
    bool abandoned_sampler_ = false;
    std::unique_ptr<ProgressSampler> sampler_;  // 1 kHz: the longest stall per vCPU
    std::unique_ptr<ProgressSampler> series_;   // kProgressSampleMs, kept: the guest's progress series
    std::chrono::steady_clock::time_point resumed_;
    mutable std::mutex mu_;
    std::unordered_set<uint64_t> missing_, placed_, requested_;
    std::unordered_map<uint64_t, std::vector<Waiter>> waiting_;
    std::unordered_map<pid_t, int> tids_;
    std::vector<uint32_t> blocked_;  // per vCPU: faults it waits on
    uint32_t all_blocked_ = 0;
    std::chrono::steady_clock::time_point all_blocked_since_;
    double vcpu_lat_sum_ns_ = 0, non_vcpu_lat_sum_ns_ = 0;
    std::vector<double> vcpu_lat_ns_;
    std::vector<uint64_t> vcpu_faults_;
    uint64_t non_vcpu_faults_ = 0;
    PostcopyFigures fig_;
    bool finished_ = false;
};

// A channel's postcopy pages, as PageDecoder reads them, placed through the
// FaultServer: 4 KiB pages one by one, a huge page once all of it arrived.
class UnitPlacer : public PageTarget {
public:
    UnitPlacer(const StressVm& m, FaultServer& faults) : m_(m), faults_(faults), stage_(kBatchPages * 4096) {}
    uint8_t* stage(size_t i, uint64_t gpa) override;
    void place(uint64_t gpa, const uint8_t* data) override;
    // Huge pages begun but not complete (a broken stream).
    size_t partial() const { return parts_.size(); }

private:
    struct Part {
        std::vector<uint8_t> data;
        uint64_t pages = 0;
    };
    const StressVm& m_;
    FaultServer& faults_;
    std::vector<uint8_t> stage_;
    std::map<uint64_t, Part> parts_;
};

// The source's side: what is left to push, per channel, with requested
// pages first. Thread-safe.
class PostcopySource {
public:
    // `remaining`: the pages not on the destination (its discards), per channel.
    // `preempt`: requested pages wait for next_urgent() (their own channel),
    // next() gives the background only.
    PostcopySource(const StressVm& src, const ChannelMap& map, ChannelPages remaining, bool preempt = false);
    // Postcopy-preempt: the next requested pages (whole units, at most
    // max_pages unless one unit is larger); waits for one. Empty once
    // close() or wake() was called with nothing requested.
    std::vector<uint64_t> next_urgent(size_t max_pages);
    void close();  // every background page sent: next_urgent() stops waiting
    bool closed() const;
    // A fault at the destination wants gpa: its unit goes first on its channel.
    void request(uint64_t gpa);
    // Channel c's next pages (whole units, at most max_pages unless one unit
    // is larger), requested ones first. Empty: every page of c is sent (a
    // later request for one of them is already on its way).
    // *urgent: the batch is requested pages (they are never paced).
    std::vector<uint64_t> next(uint32_t c, size_t max_pages, bool* urgent = nullptr);
    // Pacing (max-postcopy-bandwidth): waits until `until`, or less once a
    // request for channel c comes in or wake() is called.
    void wait(uint32_t c, std::chrono::steady_clock::time_point until);
    void wake();
    // Postcopy recovery: `missing` (units) is what the destination still
    // lacks; everything else is there. Returns the 4 KiB pages sent before
    // the cut that must go again (they were in flight).
    uint64_t resume(const std::vector<uint64_t>& missing);
    uint64_t requests() const { return requests_.load(); }          // requests received (QEMU's postcopy-requests)
    uint64_t requested_pages() const { return requested_pages_.load(); }  // pages sent because of one
    uint64_t left() const;  // 4 KiB pages not sent yet

private:
    struct Channel {
        std::vector<uint64_t> pages;  // units' first pages, sorted
        size_t cursor = 0;
        std::vector<uint64_t> urgent;
    };
    void expand(uint64_t unit, std::vector<uint64_t>& out) const;
    const StressVm& src_;
    const ChannelMap& map_;
    mutable std::mutex mu_;
    std::condition_variable cv_;  // wait(): a request came, or wake()
    uint64_t wakes_ = 0;
    const bool preempt_;
    std::vector<uint64_t> urgent_;  // preempt: requested units, every channel's
    bool closed_ = false;
    std::vector<Channel> ch_;
    std::unordered_set<uint64_t> sent_;  // units
    uint64_t left_ = 0;
    std::atomic<uint64_t> requests_{0}, requested_pages_{0};
};

// The units of a harvest's pages, deduplicated: a dirty 4 KiB page of a
// hugetlb2m slot stands for its whole 2 MiB page (its first GPA).
ChannelPages postcopy_units(const StressVm& m, const ChannelPages& pages);

}  // namespace mvm::migration
