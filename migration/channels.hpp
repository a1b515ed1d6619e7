// migration/channels.hpp - the sender's page traffic: which channel a
// memslot's pages go on (its virtual node's; system memory on channel 0),
// one sending thread per channel on its node's host CPUs and under its
// policy, and all channels paced together to a bandwidth.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <vector>

#include "migration/destination.hpp"
#include "vmm/dirty/tracker.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

// GPAs to send, per channel.
using ChannelPages = std::vector<std::vector<uint64_t>>;

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

    // bytes/s over all channels; 0 = unlimited. Safe while sending.
    void set_bandwidth(uint64_t bytes_per_s) { bandwidth_ = bytes_per_s; }
    uint64_t bandwidth() const { return bandwidth_; }
    uint64_t zero_pages() const;
    // Everything sent so far over all send() calls, an interrupted one's
    // batches included (what a failure report counts). Safe while sending.
    uint64_t sent_bytes() const { return sent_bytes_.load(); }
    uint64_t sent_pages() const { return sent_pages_.load(); }

private:
    uint64_t send_channel(Destination& dest, uint32_t c, const std::vector<uint64_t>& pages,
                          const std::function<void()>& check);
    void pace(uint64_t bytes);

    const StressVm& src_;
    uint32_t nch_;
    std::map<uint32_t, uint32_t> slot_channel_;
    std::map<uint32_t, const NodeConfig*> channel_node_;
    std::atomic<uint64_t> bandwidth_;
    mutable std::mutex mu_;  // guards the pacing state and zero_pages_
    std::chrono::steady_clock::time_point paced_since_;
    uint64_t paced_bytes_ = 0, zero_pages_ = 0;
    std::atomic<uint64_t> sent_bytes_{0}, sent_pages_{0};
};

}  // namespace mvm::migration
