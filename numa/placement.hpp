// numa/placement.hpp - where the pages of a range actually are (move_pages(2)).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mvm::numa {

// What backs a present page, as numastat -p splits it: a hugetlb page, part
// of a transparent huge page, or a base page (read from /proc/self/pagemap and
// /proc/kpageflags; both need root for page frame numbers).
struct PageKinds {
    uint64_t huge = 0, thp = 0, small = 0;  // queried pages of each kind
};

struct Placement {
    uint64_t pages_total = 0;    // pages in the range
    uint64_t pages_queried = 0;  // pages actually asked about (< total when sampled)
    bool sampled = false;
    std::map<int, uint64_t> pages_per_node;  // of the queried, present pages
    uint64_t pages_not_present = 0;          // queried pages with a negative status (-ENOENT, ...)
    uint64_t first_unexpected_offset = ~uint64_t{0};  // bytes; ~0 if none / no expectation
    uint64_t first_unexpected_len = 0;   // bytes of the run of queried pages from there on the same wrong node
    int first_unexpected_node = -1;      // the node they are on
    uint64_t first_not_present_offset = ~uint64_t{0};  // bytes; ~0 if every queried page is present
    uint64_t first_not_present_len = 0;  // bytes of the run of not-present queried pages from there
    // With split_kinds: per host node, what the queried present pages are;
    // kinds_error says why there is no split (empty map) when it failed.
    std::map<int, PageKinds> kinds_per_node;
    std::string kinds_error;
};

// The share (0-100) of `pl`'s queried pages that are on one of `expected`
// (every present page when `expected` is empty: any node is right). Absent
// pages count as off policy: a page that is not there is not placed.
double on_policy_pct(const Placement& pl, const std::vector<int>& expected);

// Queries the node of each page of [addr, addr+len) with move_pages(2) in
// batches. max_pages == 0 queries every page; otherwise at most max_pages
// pages spread evenly over the range are queried and `sampled` is set.
// With expected_nodes non-empty, first_unexpected_offset is the offset of the
// first present queried page on another node. Throws SysError on failure.
// With split_kinds, each queried present page is also classified (PageKinds).
Placement query_placement(const void* addr, size_t len, size_t page_size = 4096,
                          const std::vector<int>& expected_nodes = {}, size_t max_pages = 0, bool split_kinds = false);

}  // namespace mvm::numa
