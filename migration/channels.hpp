// migration/channels.hpp - the sender's page traffic: which channel a
// page goes on (one of its virtual node's; system memory on channel 0),
// one sending thread per channel on its node's host CPUs and under its
// policy, and all channels paced together to a bandwidth.
//
// With more channels than virtual nodes (QEMU's multifd) channel c serves
// node c mod N and a node's pages are dealt to its channels by 2 MiB range,
// so a huge page travels on one channel; with fewer, node i goes on channel
// i mod C. The receiver maps channels to nodes the same way (ChannelMap).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "migration/destination.hpp"
#include "numa/policy.hpp"
#include "vmm/dirty/tracker.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

// GPAs to send, per channel.
using ChannelPages = std::vector<std::vector<uint64_t>>;

class ChannelMap {
public:
    ChannelMap(const StressVm& m, uint32_t channels);
    uint32_t count() const { return nch_; }
    uint32_t channel_of(uint32_t slot, uint64_t gpa) const { return pick(slot_.at(slot).ch, gpa); }
    // The channels of `slot` (one lookup per slot), then pick() per page.
    const std::vector<uint32_t>& channels_of(uint32_t slot) const { return slot_.at(slot).ch; }
    static uint32_t pick(const std::vector<uint32_t>& ch, uint64_t gpa)
    {
        return ch.size() == 1 ? ch[0] : ch[(gpa >> 21) % ch.size()];
    }
    // The virtual node whose memory channel c carries (null: none).
    const NodeConfig* node_of(uint32_t c) const;
    // Pins the calling thread to channel c's node's host CPUs and, when the
    // node has a policy, puts it under that policy for as long as `scope` lives.
    void enter(uint32_t c, std::optional<numa::ThreadPolicyScope>& scope) const;

private:
    struct SlotChannels {
        std::vector<uint32_t> ch;
    };
    uint32_t nch_;
    std::map<uint32_t, SlotChannels> slot_;
    std::vector<const NodeConfig*> node_;
};

class PageChannels {
public:
    PageChannels(const StressVm& src, uint32_t channels, uint64_t bandwidth);

    uint32_t count() const { return nch_; }
    ChannelPages empty() const { return ChannelPages(nch_); }
    // Every page of memslot `slot`, onto its channel.
    void add_slot(ChannelPages& per, uint32_t slot) const;
    // The harvest's dirty pages, each onto its slot's channel.
    ChannelPages split(const dirty::Harvest& h) const;

    // Sends `per` to `dest`, one thread per channel; returns the bytes sent.
    // `check` runs before every record (it throws to stop); the first
    // channel's error is rethrown once all have stopped.
    uint64_t send(Destination& dest, const ChannelPages& per, const std::function<void()>& check);

    // One batch on channel c from the calling thread (postcopy's pushers),
    // counted like send()'s and paced unless `paced` is false (the caller
    // paces); returns its bytes.
    uint64_t send_batch(Destination& dest, uint32_t c, std::span<const uint64_t> gpas, bool paced = true);
    const ChannelMap& map() const { return map_; }

    // bytes/s over all channels; 0 = unlimited. Safe while sending: the
    // pacing starts over from now at the new rate (no burst to catch up
    // after a raise, no long sleep after a cut).
    void set_bandwidth(uint64_t bytes_per_s);
    uint64_t bandwidth() const { return bandwidth_; }
    uint64_t zero_pages() const;
    // Everything sent so far over all send() calls, an interrupted one's
    // batches included (what a failure report counts). Safe while sending.
    uint64_t sent_bytes() const { return sent_bytes_.load(); }
    uint64_t sent_pages() const { return sent_pages_.load(); }
    // Pages of per[c] the last send() got out, from the front (a channel
    // sends its list in order): what an interrupted send() left is the rest.
    uint64_t channel_progress(uint32_t c) const { return progress_[c].load(); }

private:
    uint64_t send_channel(Destination& dest, uint32_t c, const std::vector<uint64_t>& pages,
                          const std::function<void()>& check);
    void pace(uint64_t bytes);

    const StressVm& src_;
    uint32_t nch_;
    ChannelMap map_;
    std::atomic<uint64_t> bandwidth_;
    mutable std::mutex mu_;  // guards the pacing state and zero_pages_
    std::chrono::steady_clock::time_point paced_since_;
    uint64_t paced_bytes_ = 0, zero_pages_ = 0;
    std::atomic<uint64_t> sent_bytes_{0}, sent_pages_{0};
    std::unique_ptr<std::atomic<uint64_t>[]> progress_;  // per channel, of the last send()
};

}  // namespace mvm::migration
