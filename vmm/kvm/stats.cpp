#include "vmm/kvm/stats.hpp"

#include <linux/kvm.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "base/error.hpp"
#include "vmm/kvm/kvm_abi.h"

namespace mvm {

bool StatDesc::cumulative() const { return (flags & KVM_STATS_TYPE_MASK) == KVM_STATS_TYPE_CUMULATIVE; }
bool StatDesc::instant_or_peak() const
{
    uint32_t t = flags & KVM_STATS_TYPE_MASK;
    return t == KVM_STATS_TYPE_INSTANT || t == KVM_STATS_TYPE_PEAK;
}

static void pread_all(int fd, void* buf, size_t len, uint64_t off, const char* what)
{
    auto* p = static_cast<uint8_t*>(buf);
    while (len) {
        ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            throw SysError(fmt::format("pread of KVM stats {}", what), n, n < 0 ? errno : EIO);
        p += n;
        len -= static_cast<size_t>(n);
        off += static_cast<uint64_t>(n);
    }
}

StatsReader::StatsReader(UniqueFd fd) : fd_(std::move(fd))
{
    kvm_stats_header h{};
    pread_all(fd_.get(), &h, sizeof h, 0, "header");
    // Each descriptor is followed by its name of h.name_size bytes.
    size_t desc_size = sizeof(abi::stats_desc_header) + h.name_size;
    std::vector<uint8_t> raw(desc_size * h.num_desc);
    if (!raw.empty())
        pread_all(fd_.get(), raw.data(), raw.size(), h.desc_offset, "descriptors");
    uint32_t end = 0;
    for (uint32_t i = 0; i < h.num_desc; i++) {
        const uint8_t* rec = raw.data() + i * desc_size;
        abi::stats_desc_header d0;
        std::memcpy(&d0, rec, sizeof d0);
        const auto* nm = reinterpret_cast<const char*>(rec + sizeof d0);
        std::string name(nm, strnlen(nm, h.name_size));
        const auto* d = &d0;
        descs_.push_back({name, d->flags, d->size, d->offset});
        end = std::max<uint32_t>(end, d->offset + d->size * 8u);
    }
    data_offset_ = h.data_offset;
    data_bytes_ = end;
}

StatSnapshot StatsReader::read() const
{
    StatSnapshot s;
    if (!fd_)
        return s;
    std::vector<uint64_t> data((data_bytes_ + 7) / 8);
    if (!data.empty())
        pread_all(fd_.get(), data.data(), data_bytes_, data_offset_, "data");
    for (const auto& d : descs_) {
        uint64_t sum = 0;
        for (uint32_t k = 0; k < d.size; k++)
            sum += data[d.offset / 8 + k];
        s[d.name] = sum;
    }
    return s;
}

StatDelta stat_delta(const StatSnapshot& before, const StatSnapshot& after)
{
    StatDelta d;
    for (const auto& [name, v] : after) {
        auto it = before.find(name);
        uint64_t b = it == before.end() ? 0 : it->second;
        d[name] = static_cast<int64_t>(v - b);
    }
    return d;
}

}  // namespace mvm
