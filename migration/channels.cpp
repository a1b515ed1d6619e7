#include "migration/channels.hpp"

#include <algorithm>
#include <exception>
#include <optional>
#include <span>
#include <thread>

#include "numa/policy.hpp"

namespace mvm::migration {

ChannelMap::ChannelMap(const StressVm& m, uint32_t channels) : nch_(std::max<uint32_t>(1, channels))
{
    const MachineConfig& cfg = m.config();
    const size_t nodes = std::max<size_t>(1, cfg.nodes.size());
    node_.assign(nch_, nullptr);
    for (uint32_t c = 0; c < nch_ && !cfg.nodes.empty(); c++)
        if (nch_ >= nodes || c < cfg.nodes.size())
            node_[c] = &cfg.nodes[c % nodes];
    for (const auto& r : m.memslots().regions()) {
        SlotChannels sc;
        size_t idx = 0;
        for (size_t i = 0; i < cfg.nodes.size(); i++)
            if (static_cast<int>(cfg.nodes[i].id) == r.vnode)
                idx = i;
        if (r.vnode < 0)
            sc.ch = {0};
        else if (nch_ >= nodes)
            for (uint32_t c = static_cast<uint32_t>(idx); c < nch_; c += static_cast<uint32_t>(nodes))
                sc.ch.push_back(c);
        else
            sc.ch = {static_cast<uint32_t>(idx % nch_)};
        slot_[r.slot] = std::move(sc);
    }
}

const NodeConfig* ChannelMap::node_of(uint32_t c) const { return c < node_.size() ? node_[c] : nullptr; }

void ChannelMap::enter(uint32_t c, std::optional<numa::ThreadPolicyScope>& scope) const
{
    const NodeConfig* node = node_of(c);
    if (node && !node->host_cpus.empty())
        numa::pin_current_thread(node->host_cpus);
    if (node && node->host_policy.policy != numa::Policy::Default)
        scope.emplace(node->host_policy);
}

PageChannels::PageChannels(const StressVm& src, uint32_t channels, uint64_t bandwidth)
    : src_(src), nch_(channels), map_(src, channels), bandwidth_(bandwidth),
      progress_(std::make_unique<std::atomic<uint64_t>[]>(channels))
{
}

void PageChannels::add_slot(ChannelPages& per, uint32_t slot) const
{
    const MemoryRegion* r = src_.memslots().by_slot(slot);
    const auto& ch = map_.channels_of(slot);
    for (uint64_t off = 0; off < r->size; off += 4096)
        per[ChannelMap::pick(ch, r->gpa + off)].push_back(r->gpa + off);
}

ChannelPages PageChannels::split(const dirty::Harvest& h) const
{
    ChannelPages per(nch_);
    for (const auto& s : h.slots) {
        const auto& ch = map_.channels_of(s.slot);
        s.for_each([&](uint64_t page) {
            const uint64_t gpa = s.gpa + page * 4096;
            per[ChannelMap::pick(ch, gpa)].push_back(gpa);
        });
    }
    return per;
}

uint64_t PageChannels::zero_pages() const
{
    std::lock_guard lk(mu_);
    return zero_pages_;
}

uint64_t PageChannels::send(Destination& dest, const ChannelPages& per, const std::function<void()>& check)
{
    {
        std::lock_guard lk(mu_);
        paced_since_ = std::chrono::steady_clock::now();
        paced_bytes_ = 0;
    }
    for (uint32_t c = 0; c < nch_; c++)
        progress_[c] = 0;
    std::vector<uint64_t> bytes(nch_, 0);
    std::vector<std::thread> threads;
    std::mutex emu;
    std::exception_ptr err;
    for (uint32_t c = 0; c < nch_; c++) {
        if (per[c].empty())
            continue;
        threads.emplace_back([&, c] {
            try {
                bytes[c] = send_channel(dest, c, per[c], check);
            } catch (...) {
                std::lock_guard lk(emu);
                if (!err)
                    err = std::current_exception();
            }
        });
    }
    for (auto& t : threads)
        t.join();
    if (err)
        std::rethrow_exception(err);
    uint64_t total = 0;
    for (uint64_t b : bytes)
        total += b;
    return total;
}

// On channel c's thread.
uint64_t PageChannels::send_channel(Destination& dest, uint32_t c, const std::vector<uint64_t>& pages,
                                    const std::function<void()>& check)
{
    std::optional<numa::ThreadPolicyScope> scope;
    map_.enter(c, scope);
    uint64_t sent = 0, zeros = 0;
    for (size_t i = 0; i < pages.size(); i += kBatchPages) {
        check();
        auto part = std::span<const uint64_t>(pages).subspan(i, std::min(kBatchPages, pages.size() - i));
        uint64_t b = 0;
        dest.send(c, part, b, zeros);
        sent += b;
        sent_bytes_ += b;
        sent_pages_ += part.size();
        progress_[c] += part.size();
        pace(b);
    }
    std::lock_guard lk(mu_);
    zero_pages_ += zeros;
    return sent;
}

uint64_t PageChannels::send_batch(Destination& dest, uint32_t c, std::span<const uint64_t> gpas, bool paced)
{
    uint64_t b = 0, zeros = 0;
    dest.send(c, gpas, b, zeros);
    sent_bytes_ += b;
    sent_pages_ += gpas.size();
    {
        std::lock_guard lk(mu_);
        zero_pages_ += zeros;
    }
    if (paced)
        pace(b);
    return b;
}

// Paces all channels together to the bandwidth.
void PageChannels::set_bandwidth(uint64_t bytes_per_s)
{
    std::lock_guard lk(mu_);
    bandwidth_ = bytes_per_s;
    paced_since_ = std::chrono::steady_clock::now();
    paced_bytes_ = 0;
}

void PageChannels::pace(uint64_t bytes)
{
    const uint64_t bw = bandwidth_.load();
    if (!bw)
        return;
    std::unique_lock lk(mu_);
    paced_bytes_ += bytes;
    const double due = static_cast<double>(paced_bytes_) / static_cast<double>(bw);
    const double ahead = due - std::chrono::duration<double>(std::chrono::steady_clock::now() - paced_since_).count();
    lk.unlock();
    if (ahead > 0)
        std::this_thread::sleep_for(std::chrono::duration<double>(ahead));
}

}  // namespace mvm::migration

