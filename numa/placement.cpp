#include "numa/placement.hpp"

#include <numaif.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <cerrno>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm::numa {

namespace {
constexpr size_t kBatch = 16384;

// Classifies pages by their frame's flags: pagemap gives the PFN (bit 63:
// present, bits 0-54: PFN, zero without CAP_SYS_ADMIN), kpageflags the flags.
class PageKindReader {
public:
    PageKindReader()
        : pagemap_(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)),
          kpageflags_(::open("/proc/kpageflags", O_RDONLY | O_CLOEXEC))
    {
        if (pagemap_ < 0 || kpageflags_ < 0)
            error_ = fmt::format("cannot open {}: {}", pagemap_ < 0 ? "/proc/self/pagemap" : "/proc/kpageflags",
                                 std::strerror(errno));
    }
    ~PageKindReader()
    {
        if (pagemap_ >= 0)
            ::close(pagemap_);
        if (kpageflags_ >= 0)
            ::close(kpageflags_);
    }
    PageKindReader(const PageKindReader&) = delete;
    PageKindReader& operator=(const PageKindReader&) = delete;

    const std::string& error() const { return error_; }

    // Counts the page at `addr` into `k`; false (and error()) when it cannot.
    bool classify(uintptr_t addr, PageKinds& k)
    {
        constexpr uint64_t kPresent = 1ull << 63, kPfnMask = (1ull << 55) - 1;
        constexpr uint64_t kHuge = 1ull << 17, kThp = 1ull << 22;  // KPF_HUGE, KPF_THP
        uint64_t entry = 0, flags = 0;
        if (::pread(pagemap_, &entry, 8, static_cast<off_t>(addr / 4096 * 8)) != 8)
            return fail(fmt::format("reading /proc/self/pagemap: {}", std::strerror(errno)));
        const uint64_t pfn = entry & kPfnMask;
        if (!(entry & kPresent) || pfn == 0)
            return fail("/proc/self/pagemap shows no page frame numbers (needs CAP_SYS_ADMIN)");
        if (::pread(kpageflags_, &flags, 8, static_cast<off_t>(pfn * 8)) != 8)
            return fail(fmt::format("reading /proc/kpageflags: {}", std::strerror(errno)));
        if (flags & kHuge)
            k.huge++;
        else if (flags & kThp)
            k.thp++;
        else
            k.small++;
        return true;
    }

private:
    bool fail(std::string why)
    {
        error_ = std::move(why);
        return false;
    }
    int pagemap_, kpageflags_;
    std::string error_;
};

}  // namespace

Placement query_placement(const void* addr, size_t len, size_t page_size, const std::vector<int>& expected_nodes,
                          size_t max_pages, bool split_kinds) {
    if (page_size == 0) throw UsageError("query_placement: page size must not be 0");
    Placement pl;
    pl.pages_total = (len + page_size - 1) / page_size;
    uint64_t total = pl.pages_total;
    uint64_t count = total;
    if (max_pages != 0 && max_pages < total) {
        count = max_pages;
        pl.sampled = true;
    }
    pl.pages_queried = count;
    auto base = reinterpret_cast<uintptr_t>(addr);
    // Page index of the i-th queried page: evenly spread when sampling.
    auto index_of = [&](uint64_t i) -> uint64_t {
        if (!pl.sampled) return i;
        return i * (total / count) + (i * (total % count)) / count;
    };

    std::optional<PageKindReader> kinds;
    if (split_kinds) {
        kinds.emplace();
        pl.kinds_error = kinds->error();
    }
    std::vector<void*> pages;
    std::vector<int> status;
    pages.reserve(std::min<uint64_t>(count, kBatch));
    status.reserve(std::min<uint64_t>(count, kBatch));
    for (uint64_t start = 0; start < count; start += kBatch) {
        uint64_t n = std::min<uint64_t>(kBatch, count - start);
        pages.resize(n);
        status.assign(n, 0);
        for (uint64_t i = 0; i < n; ++i) pages[i] = reinterpret_cast<void*>(base + index_of(start + i) * page_size);
        if (move_pages(0, n, pages.data(), nullptr, status.data(), 0) != 0)
            throw SysError(fmt::format("move_pages(query {:#x}+{:#x})", base + index_of(start) * page_size,
                                       n * page_size),
                           errno);
        for (uint64_t i = 0; i < n; ++i) {
            const int s = status[i];
            const uint64_t off = index_of(start + i) * page_size;
            // The stride between queried pages (page_size unless sampled).
            const uint64_t stride = start + i + 1 < count ? index_of(start + i + 1) * page_size - off : page_size;
            if (s < 0) {
                ++pl.pages_not_present;
                if (pl.first_not_present_offset == ~uint64_t{0})
                    pl.first_not_present_offset = off;
                if (off == pl.first_not_present_offset + pl.first_not_present_len)
                    pl.first_not_present_len += stride;
                continue;
            }
            ++pl.pages_per_node[s];
            if (kinds && pl.kinds_error.empty() && !kinds->classify(base + off, pl.kinds_per_node[s])) {
                pl.kinds_error = kinds->error();
                pl.kinds_per_node.clear();
            }
            if (expected_nodes.empty() ||
                std::find(expected_nodes.begin(), expected_nodes.end(), s) != expected_nodes.end())
                continue;
            if (pl.first_unexpected_offset == ~uint64_t{0}) {
                pl.first_unexpected_offset = off;
                pl.first_unexpected_node = s;
            }
            if (s == pl.first_unexpected_node && off == pl.first_unexpected_offset + pl.first_unexpected_len)
                pl.first_unexpected_len += stride;
        }
    }
    return pl;
}

double on_policy_pct(const Placement& pl, const std::vector<int>& expected)
{
    uint64_t good = 0;
    for (const auto& [node, pages] : pl.pages_per_node)
        if (expected.empty() || std::find(expected.begin(), expected.end(), node) != expected.end())
            good += pages;
    return pl.pages_queried ? 100.0 * static_cast<double>(good) / static_cast<double>(pl.pages_queried) : 0;
}

}  // namespace mvm::numa
