// vmm/kvm/stats.hpp - KVM binary statistics (KVM_GET_STATS_FD): the header and
// descriptors are read once; snapshots pread() only the data block.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "base/fd.hpp"

namespace mvm {

struct StatDesc {
    std::string name;
    uint32_t flags;   // KVM_STATS_TYPE_* | KVM_STATS_UNIT_* | KVM_STATS_BASE_*
    uint32_t size;    // number of u64 values (histograms have several)
    uint32_t offset;  // of its first value within the data block, in bytes
    bool cumulative() const;
    bool instant_or_peak() const;
};

// Scalar view of one snapshot: name -> value (histograms summed).
using StatSnapshot = std::map<std::string, uint64_t>;

class StatsReader {
public:
    StatsReader() = default;
    explicit StatsReader(UniqueFd fd);
    StatSnapshot read() const;
    const std::vector<StatDesc>& descriptors() const { return descs_; }
    explicit operator bool() const { return static_cast<bool>(fd_); }

private:
    UniqueFd fd_;
    std::vector<StatDesc> descs_;
    uint64_t data_offset_ = 0;
    size_t data_bytes_ = 0;
};

// after - before for every stat. Instant stats (pages_4k, ...) may shrink, so
// deltas are signed.
using StatDelta = std::map<std::string, int64_t>;
StatDelta stat_delta(const StatSnapshot& before, const StatSnapshot& after);

}  // namespace mvm
