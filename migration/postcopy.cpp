#include "migration/postcopy.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fmt/format.h>

#include "base/error.hpp"
#include "vmm/stress/sampler.hpp"

namespace mvm::migration {

namespace {
using clock = std::chrono::steady_clock;
constexpr uint64_t k4K = 4096;

double ms_between(clock::time_point a, clock::time_point b)
{
    return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

// ---- the destination -------------------------------------------------------------------

uint64_t FaultServer::unit_of(const StressVm& m, uint64_t gpa)
{
    for (const auto& r : m.memslots().regions())
        if (r.contains_gpa(gpa))
            return backing_page_size(r.backing);
    return k4K;
}

std::string FaultServer::unsupported(const StressVm& m)
{
    for (const auto& r : m.memslots().regions())
        if (auto why = UserfaultFd::unsupported(r); !why.empty())
            return why;
    return "";
}

FaultServer::FaultServer(StressVm& dst, Request request) : dst_(dst), request_(std::move(request))
{
    bool shmem = false, hugetlb = false;
    std::vector<std::string> units{"4 KiB"};
    for (const auto& r : dst_.memslots().regions()) {
        shmem |= r.backing == BackingKind::Shm;
        if (r.backing == BackingKind::Hugetlb2M && !hugetlb) {
            hugetlb = true;
            units.push_back("2 MiB (hugetlb2m)");
        }
    }
    uffd_ = std::make_shared<UserfaultFd>(shmem, hugetlb);
    const uint32_t n = dst_.vcpu_count();
    blocked_.assign(n, 0);
    vcpu_lat_ns_.assign(n, 0);
    vcpu_faults_.assign(n, 0);
    fig_.vcpu_blocktime_ms.assign(n, 0);
    fig_.units = fmt::format("{}", fmt::join(units, " + "));
}

FaultServer::~FaultServer()
{
    stop_ = true;
    if (uffd_)
        uffd_->wake();
    if (thread_.joinable())
        thread_.join();
    stop_sampler();
}

void FaultServer::arm(std::span<const uint64_t> discard)
{
    for (const auto& r : dst_.memslots().regions())
        uffd_->register_region(r);
    // Each unit once, then adjacent units of a slot discarded in one call.
    std::vector<uint64_t> units;
    units.reserve(discard.size());
    for (uint64_t gpa : discard) {
        const uint64_t u = unit_of(dst_, gpa);
        units.push_back(gpa & ~(u - 1));
    }
    std::sort(units.begin(), units.end());
    units.erase(std::unique(units.begin(), units.end()), units.end());
    for (size_t i = 0; i < units.size();) {
        const MemoryRegion* r = nullptr;
        for (const auto& reg : dst_.memslots().regions())
            if (reg.contains_gpa(units[i]))
                r = &reg;
        if (!r)
            throw Error(fmt::format("postcopy: discard of GPA {:#x}, outside every memslot", units[i]));
        const uint64_t u = backing_page_size(r->backing);
        size_t j = i + 1;
        while (j < units.size() && units[j] == units[j - 1] + u && r->contains_gpa(units[j]))
            j++;
        const uint64_t len = (units[j - 1] + u) - units[i];
        UserfaultFd::discard(*r, dst_.host_ptr(units[i], len), len);
        for (size_t k = i; k < j; k++)
            missing_.insert(units[k]);
        fig_.discarded_pages += len / k4K;
        i = j;
    }
    resumed_ = clock::now();
    thread_ = std::thread([this] { loop(); });
}

void FaultServer::guest_started()
{
    {
        std::lock_guard lk(mu_);
        resumed_ = clock::now();
    }
    std::lock_guard lk(sampler_mu_);
    if (abandoned_sampler_)
        return;
    sampler_ = std::make_unique<ProgressSampler>(dst_, 1000, false);
    sampler_->start();
    series_ = std::make_unique<ProgressSampler>(dst_, static_cast<uint32_t>(kProgressSampleMs * 1000), true);
    series_->start();
}

void FaultServer::stop_sampler()
{
    std::lock_guard lk(sampler_mu_);
    abandoned_sampler_ = true;
    if (sampler_)
        sampler_->stop();
    if (series_)
        series_->stop();
}

int FaultServer::vcpu_of(pid_t tid)
{
    if (auto it = tids_.find(tid); it != tids_.end())
        return it->second;
    if (dst_.started())
        for (uint32_t i = 0; i < dst_.vcpu_count(); i++)
            if (dst_.vcpu_thread_info(i).tid == tid) {
                tids_[tid] = static_cast<int>(i);
                return static_cast<int>(i);
            }
    return -1;  // not (yet) known as a vCPU: the VMM's own thread
}

void FaultServer::loop()
{
    while (!stop_.load()) {
        std::vector<Userfault> faults = uffd_->wait(std::chrono::milliseconds(200));  // alive until joined
        if (faults.empty())
            continue;
        const auto now = clock::now();
        std::vector<uint64_t> ask;
        {
            std::lock_guard lk(mu_);
            for (const Userfault& f : faults) {
                const uint8_t* host = reinterpret_cast<const uint8_t*>(f.address);
                const MemoryRegion* r = dst_.memslots().by_host(host);
                if (!r)
                    continue;
                const uint64_t gpa = r->gpa + static_cast<uint64_t>(host - r->host);
                const uint64_t unit = gpa & ~(backing_page_size(r->backing) - 1);
                if (placed_.count(unit))
                    continue;  // placed between the fault and now: the copy woke it
                missing_.insert(unit);  // also a page missing for another reason (never sent)
                const int v = f.tid ? vcpu_of(f.tid) : -1;
                auto& w = waiting_[unit];
                w.push_back({v, now});
                if (v >= 0 && blocked_[static_cast<size_t>(v)]++ == 0 && ++all_blocked_ == blocked_.size())
                    all_blocked_since_ = now;
                if (requested_.insert(unit).second)
                    ask.push_back(unit);
            }
        }
        for (uint64_t unit : ask)
            request_(unit);
    }
}

std::shared_ptr<UserfaultFd> FaultServer::uffd() const
{
    std::lock_guard lk(mu_);
    if (!uffd_)
        throw Error("postcopy: the destination gave up on its missing pages");
    return uffd_;
}

bool FaultServer::place(uint64_t gpa, const uint8_t* data, uint64_t len)
{
    uint8_t* host = dst_.host_ptr(gpa, len);
    if (!host)
        throw Error(fmt::format("postcopy: page {:#x} (+{}) outside every memslot", gpa, len));
    const std::shared_ptr<UserfaultFd> u = uffd();
    const bool placed = data ? u->copy(host, data, len) : u->zero(host, len);
    resolve(gpa, clock::now());
    return placed;
}

void FaultServer::resolve(uint64_t unit, clock::time_point now)
{
    std::lock_guard lk(mu_);
    const uint64_t len = unit_of(dst_, unit);
    if (placed_.insert(unit).second)
        fig_.placed_pages += len / k4K;
    missing_.erase(unit);
    if (requested_.count(unit))
        fig_.requested_pages += len / k4K, requested_.erase(unit);
    if (missing_.empty() && fig_.duration_ms == 0)
        fig_.duration_ms = ms_between(resumed_, now);
    auto it = waiting_.find(unit);
    if (it == waiting_.end())
        return;
    for (const Waiter& w : it->second) {
        const double ms = ms_between(w.since, now);
        const double ns = ms * 1e6;
        fig_.faults++;
        fig_.max_latency_ms = std::max(fig_.max_latency_ms, ms);
        const double us = ms * 1e3;
        size_t b = us < 1 ? 0 : static_cast<size_t>(std::floor(std::log2(us)));
        fig_.latency_dist[std::min(b, PostcopyFigures::kLatencyBuckets - 1)]++;
        if (w.vcpu < 0) {
            non_vcpu_faults_++;
            non_vcpu_lat_sum_ns_ += ns;
            continue;
        }
        const auto v = static_cast<size_t>(w.vcpu);
        fig_.vcpu_faults++;
        vcpu_faults_[v]++;
        vcpu_lat_ns_[v] += ns;
        vcpu_lat_sum_ns_ += ns;
        fig_.vcpu_blocktime_ms[v] += ms;
        if (blocked_[v] == 0)
            continue;
        if (all_blocked_ == blocked_.size())
            fig_.blocktime_ms += ms_between(all_blocked_since_, now);
        if (--blocked_[v] == 0)
            all_blocked_--;
        else if (all_blocked_ == blocked_.size())
            all_blocked_since_ = now;  // still all blocked: the window goes on from here
    }
    waiting_.erase(it);
}

uint64_t FaultServer::missing() const
{
    std::lock_guard lk(mu_);
    return missing_.size();
}

std::vector<uint64_t> FaultServer::missing_units() const
{
    std::lock_guard lk(mu_);
    std::vector<uint64_t> v(missing_.begin(), missing_.end());
    std::sort(v.begin(), v.end());
    return v;
}

std::vector<uint64_t> FaultServer::waited_units() const
{
    std::lock_guard lk(mu_);
    std::vector<uint64_t> v;
    for (const auto& [unit, w] : waiting_)
        if (!w.empty() && !placed_.count(unit))
            v.push_back(unit);
    std::sort(v.begin(), v.end());
    return v;
}

void FaultServer::finish()
{
    if (finished_)
        return;
    finished_ = true;
    const uint64_t left = missing();
    stop_ = true;
    uffd()->wake();
    if (thread_.joinable())
        thread_.join();
    stop_sampler();
    if (sampler_) {
        std::vector<double> longest(dst_.vcpu_count(), 0);
        for (const Stall& s : sampler_->stalls(0))
            longest[s.vcpu] = std::max(longest[s.vcpu], s.len_ms);
        std::vector<ProgressPoint> progress;
        if (series_)
            for (const auto& [t, rate] : all_vcpus_rate(series_->samples(), kProgressBinMs, 400))
                progress.push_back({t, rate});
        std::lock_guard lk(mu_);
        fig_.vcpu_stall_ms = longest;
        fig_.guest_progress = std::move(progress);
    }
    if (left) {
        std::lock_guard lk(mu_);
        uint64_t first = *std::min_element(missing_.begin(), missing_.end());
        throw Error(fmt::format("postcopy ended with {} page(s) still missing at the destination (first: GPA {:#x})",
                                left, first));
    }
    uffd()->unregister_all();
}

void FaultServer::abandon()
{
    std::shared_ptr<UserfaultFd> u;
    {
        std::lock_guard lk(mu_);
        if (abandoned_)
            return;
        abandoned_ = true;
        u = uffd_;
    }
    stop_ = true;
    if (u)
        u->wake();
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id())
        thread_.join();
    {
        // Closed once no place() holds it: blocked threads go on (their pages
        // zero-filled; the caller kills the VM), the sampler among them.
        std::lock_guard lk(mu_);
        uffd_.reset();
    }
    u.reset();
    stop_sampler();
}

PostcopyFigures FaultServer::figures() const
{
    std::lock_guard lk(mu_);
    PostcopyFigures f = fig_;
    f.vcpu_latency_ns.assign(vcpu_lat_ns_.size(), 0);
    for (size_t v = 0; v < vcpu_lat_ns_.size(); v++)
        f.vcpu_latency_ns[v] = vcpu_faults_[v] ? vcpu_lat_ns_[v] / static_cast<double>(vcpu_faults_[v]) : 0;
    f.non_vcpu_latency_ns = non_vcpu_faults_ ? non_vcpu_lat_sum_ns_ / static_cast<double>(non_vcpu_faults_) : 0;
    f.latency_ns = f.faults ? (vcpu_lat_sum_ns_ + non_vcpu_lat_sum_ns_) / static_cast<double>(f.faults) : 0;
    if (!finished_ && !missing_.empty())
        f.duration_ms = ms_between(resumed_, clock::now());
    return f;
}

uint8_t* UnitPlacer::stage(size_t i, uint64_t)
{
    return stage_.data() + i * k4K;
}

void UnitPlacer::place(uint64_t gpa, const uint8_t* data)
{
    const uint64_t len = FaultServer::unit_of(m_, gpa);
    if (len == k4K) {
        faults_.place(gpa, data, k4K);
        return;
    }
    const uint64_t unit = gpa & ~(len - 1);
    Part& p = parts_[unit];
    if (p.data.empty())
        p.data.resize(len);
    if (data)
        std::memcpy(p.data.data() + (gpa - unit), data, k4K);
    else
        std::memset(p.data.data() + (gpa - unit), 0, k4K);
    if (++p.pages == len / k4K) {
        faults_.place(unit, p.data.data(), len);
        parts_.erase(unit);
    }
}

// ---- the source ----------------------------------------------------------------------------

ChannelPages postcopy_units(const StressVm& m, const ChannelPages& pages)
{
    ChannelPages out(pages.size());
    for (size_t c = 0; c < pages.size(); c++) {
        for (uint64_t gpa : pages[c])
            out[c].push_back(gpa & ~(FaultServer::unit_of(m, gpa) - 1));
        std::sort(out[c].begin(), out[c].end());
        out[c].erase(std::unique(out[c].begin(), out[c].end()), out[c].end());
    }
    return out;
}

PostcopySource::PostcopySource(const StressVm& src, const ChannelMap& map, ChannelPages remaining, bool preempt)
    : src_(src), map_(map), preempt_(preempt), ch_(remaining.size())
{
    ChannelPages units = postcopy_units(src, remaining);
    for (size_t c = 0; c < units.size(); c++) {
        ch_[c].pages = std::move(units[c]);
        for (uint64_t u : ch_[c].pages)
            left_ += FaultServer::unit_of(src_, u) / k4K;
    }
}

void PostcopySource::expand(uint64_t unit, std::vector<uint64_t>& out) const
{
    const uint64_t len = FaultServer::unit_of(src_, unit);
    for (uint64_t off = 0; off < len; off += k4K)
        out.push_back(unit + off);
}

void PostcopySource::request(uint64_t gpa)
{
    const uint64_t unit = gpa & ~(FaultServer::unit_of(src_, gpa) - 1);
    const MemoryRegion* r = src_.memslots().by_gpa(unit);
    if (!r)
        throw Error(fmt::format("postcopy: the destination asked for GPA {:#x}, outside every memslot", gpa));
    requests_++;
    std::lock_guard lk(mu_);
    if (sent_.count(unit))
        return;  // on its way already
    const uint32_t c = map_.channel_of(r->slot, unit);
    Channel& ch = ch_.at(c);
    (preempt_ ? urgent_ : ch.urgent).push_back(unit);
    // The background push goes on from here: pages near a fault come next.
    ch.cursor = static_cast<size_t>(std::lower_bound(ch.pages.begin(), ch.pages.end(), unit) - ch.pages.begin());
    cv_.notify_all();
}

std::vector<uint64_t> PostcopySource::next_urgent(size_t max_pages)
{
    std::unique_lock lk(mu_);
    const uint64_t w = wakes_;
    cv_.wait(lk, [&] { return !urgent_.empty() || closed_ || wakes_ != w; });
    std::vector<uint64_t> out;
    while (!urgent_.empty() && out.size() < max_pages) {
        const uint64_t u = urgent_.front();
        urgent_.erase(urgent_.begin());
        if (!sent_.insert(u).second)
            continue;  // pushed meanwhile
        const uint64_t before = out.size();
        expand(u, out);
        requested_pages_ += out.size() - before;
        left_ -= std::min<uint64_t>(left_, out.size() - before);
    }
    return out;
}

void PostcopySource::close()
{
    std::lock_guard lk(mu_);
    closed_ = true;
    cv_.notify_all();
}

bool PostcopySource::closed() const
{
    std::lock_guard lk(mu_);
    return closed_;
}

void PostcopySource::wait(uint32_t c, std::chrono::steady_clock::time_point until)
{
    std::unique_lock lk(mu_);
    const uint64_t w = wakes_;
    cv_.wait_until(lk, until, [&] { return !ch_.at(c).urgent.empty() || wakes_ != w; });
}

void PostcopySource::wake()
{
    std::lock_guard lk(mu_);
    wakes_++;
    cv_.notify_all();
}

uint64_t PostcopySource::resume(const std::vector<uint64_t>& missing)
{
    std::lock_guard lk(mu_);
    std::unordered_set<uint64_t> want;
    for (uint64_t gpa : missing) {
        const uint64_t unit = gpa & ~(FaultServer::unit_of(src_, gpa) - 1);
        const MemoryRegion* r = src_.memslots().by_gpa(unit);
        if (!r)
            throw Error(fmt::format("postcopy recovery: the destination lacks GPA {:#x}, outside every memslot", gpa));
        want.insert(unit);
        Channel& ch = ch_.at(map_.channel_of(r->slot, unit));
        auto it = std::lower_bound(ch.pages.begin(), ch.pages.end(), unit);
        if (it == ch.pages.end() || *it != unit)
            ch.pages.insert(it, unit);  // never sent in postcopy, yet missing there: it goes too
    }
    uint64_t resent = 0;
    left_ = 0;
    urgent_.clear();
    closed_ = false;
    for (Channel& ch : ch_) {
        ch.urgent.clear();  // the destination asks again for what its faults wait on
        ch.cursor = 0;
        for (uint64_t u : ch.pages) {
            const uint64_t pages = FaultServer::unit_of(src_, u) / k4K;
            if (!want.count(u)) {
                sent_.insert(u);
                continue;
            }
            if (sent_.erase(u))
                resent += pages;
            left_ += pages;
        }
    }
    return resent;
}

std::vector<uint64_t> PostcopySource::next(uint32_t c, size_t max_pages, bool* urgent)
{
    if (urgent)
        *urgent = false;
    std::unique_lock lk(mu_);
    Channel& ch = ch_.at(c);
    std::vector<uint64_t> out;
    {
        while (!ch.urgent.empty()) {
            const uint64_t u = ch.urgent.front();
            ch.urgent.erase(ch.urgent.begin());
            if (!sent_.insert(u).second)
                continue;
            const uint64_t before = out.size();
            expand(u, out);
            requested_pages_ += out.size() - before;
            left_ -= std::min<uint64_t>(left_, out.size() - before);
            if (out.size() >= max_pages) {
                if (urgent)
                    *urgent = true;
                return out;
            }
        }
        if (!out.empty()) {
            if (urgent)
                *urgent = true;
            return out;  // requested pages alone: they go now
        }
        // The background, wrapping once around from the cursor.
        const size_t n = ch.pages.size();
        for (size_t k = 0; k < n && out.size() < max_pages; k++) {
            const size_t i = (ch.cursor + k) % n;
            if (sent_.count(ch.pages[i]))
                continue;
            sent_.insert(ch.pages[i]);
            const uint64_t before = out.size();
            expand(ch.pages[i], out);
            left_ -= std::min<uint64_t>(left_, out.size() - before);
            ch.cursor = (i + 1) % n;
        }
        return out;  // empty: every page of this channel is on its way
    }
}

uint64_t PostcopySource::left() const
{
    std::lock_guard lk(mu_);
    return left_;
}

}  // namespace mvm::migration
