// memory/prealloc.hpp - populate guest memory before boot
// (MADV_POPULATE_WRITE), one thread per virtual node, each pinned to the
// node's host CPUs and running under its memory policy, all in parallel.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "numa/policy.hpp"

namespace mvm {

struct PreallocJob {
    std::string name;           // "node0", for errors and reports
    uint8_t* addr = nullptr;
    uint64_t len = 0;
    uint64_t page_size = 4096;  // chunks are whole pages of this size
    std::vector<int> cpus;      // pin to these; empty: leave affinity alone
    numa::NodePolicy policy;    // thread policy while populating (the VMA's own policy still wins)
};

struct PreallocResult {
    std::string name;
    uint64_t bytes = 0;
    double seconds = 0;
};

// Runs every job on its own thread and waits for all. `progress(done, total)`
// is called on the calling thread about every 200 ms while they run. Throws
// SysError naming the first job that failed (e.g. a hugetlb pool ran dry).
std::vector<PreallocResult> prealloc_parallel(const std::vector<PreallocJob>& jobs,
                                              const std::function<void(uint64_t, uint64_t)>& progress = {});

}  // namespace mvm
