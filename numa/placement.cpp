#include "numa/placement.hpp"

#include <numaif.h>

#include <algorithm>
#include <cerrno>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm::numa {

namespace {
constexpr size_t kBatch = 16384;
}

Placement query_placement(const void* addr, size_t len, size_t page_size, const std::vector<int>& expected_nodes,
                          size_t max_pages) {
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

}  // namespace mvm::numa
