// memory/hugetlb.hpp - hugetlb pools as sysfs shows them, globally and per
// NUMA node, and a guard that raises a pool and restores it when done.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mvm {

struct HugetlbPool {
    uint64_t page_bytes = 0;
    int node = -1;  // -1: the global pool
    uint64_t nr = 0, free = 0, surplus = 0;
    uint64_t resv = 0;    // reserved by mappings but not yet faulted (global pools only)
    std::string nr_path;  // the file to write to resize it
};

// Every size, global (node -1) then per node.
std::vector<HugetlbPool> hugetlb_pools();
// The global pool of one size; page_bytes 0 when the size is not supported.
HugetlbPool hugetlb_pool(uint64_t page_bytes, int node = -1);

// Makes sure `pages` free pages of `page_bytes` exist (on `node`, or
// globally), raising nr_hugepages if needed; restores the old value on
// destruction. ok() tells whether the pool could be filled.
class HugetlbReservation {
public:
    HugetlbReservation(uint64_t page_bytes, uint64_t pages, int node = -1);
    ~HugetlbReservation();
    HugetlbReservation(const HugetlbReservation&) = delete;
    HugetlbReservation& operator=(const HugetlbReservation&) = delete;
    bool ok() const { return ok_; }
    const std::string& why_not() const { return why_not_; }

private:
    std::string path_;
    uint64_t old_nr_ = 0;
    bool changed_ = false, ok_ = false;
    std::string why_not_;
};

}  // namespace mvm
