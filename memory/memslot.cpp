#include "memory/memslot.hpp"

#include <algorithm>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm {

std::string MemoryRegion::describe() const
{
    return fmt::format("slot {} '{}' gpa [{:#x}, {:#x}) host {} {}", slot, name, gpa, gpa_end(),
                       static_cast<const void*>(host), backing_name(backing));
}

const MemoryRegion& MemslotRegistry::add(MemoryRegion r)
{
    if (regions_.size() >= max_slots_)
        throw UsageError(fmt::format("cannot add {}: KVM allows {} memslots (KVM_CAP_NR_MEMSLOTS) and all are used; "
                                     "use fewer memslots",
                                     r.describe(), max_slots_));
    if (r.size == 0 || r.size % 4096 || r.gpa % 4096)
        throw UsageError(fmt::format("cannot add {}: gpa and size must be non-zero multiples of 4 KiB", r.describe()));
    if (r.gpa + r.size < r.gpa)
        throw UsageError(fmt::format("cannot add {}: the range wraps around the guest-physical address space",
                                     r.describe()));
    for (const auto& o : regions_) {
        if (o.slot == r.slot)
            throw UsageError(fmt::format("duplicate memslot: {} and {}", o.describe(), r.describe()));
        if (r.gpa < o.gpa_end() && o.gpa < r.gpa_end())
            throw UsageError(fmt::format("overlapping guest-physical ranges: {} and {}", o.describe(), r.describe()));
        if (r.host && o.host && r.host < o.host + o.size && o.host < r.host + r.size)
            throw UsageError(fmt::format("overlapping host ranges: {} and {}", o.describe(), r.describe()));
    }
    auto it = std::upper_bound(regions_.begin(), regions_.end(), r.gpa,
                               [](uint64_t gpa, const MemoryRegion& m) { return gpa < m.gpa; });
    return *regions_.insert(it, std::move(r));
}

const MemoryRegion* MemslotRegistry::by_slot(uint32_t slot) const
{
    for (const auto& r : regions_)
        if (r.slot == slot)
            return &r;
    return nullptr;
}

const MemoryRegion* MemslotRegistry::by_gpa(uint64_t gpa) const
{
    auto it = std::upper_bound(regions_.begin(), regions_.end(), gpa,
                               [](uint64_t a, const MemoryRegion& m) { return a < m.gpa; });
    if (it == regions_.begin())
        return nullptr;
    --it;
    return it->contains_gpa(gpa) ? &*it : nullptr;
}

const MemoryRegion* MemslotRegistry::by_host(const void* p) const
{
    auto* b = static_cast<const uint8_t*>(p);
    for (const auto& r : regions_)
        if (r.host && b >= r.host && b < r.host + r.size)
            return &r;
    return nullptr;
}

uint8_t* MemslotRegistry::host_ptr(uint64_t gpa, uint64_t len) const
{
    const MemoryRegion* r = by_gpa(gpa);
    // gpa is inside r, so gpa_end() - gpa cannot wrap; comparing len to it
    // (not gpa + len to the end) keeps a huge len from wrapping past the check.
    if (!r || !r->host || len > r->gpa_end() - gpa)
        return nullptr;
    return r->host + (gpa - r->gpa);
}

void MemslotRegistry::set_flags(uint32_t slot, uint32_t flags)
{
    for (auto& r : regions_)
        if (r.slot == slot) {
            r.flags = flags;
            return;
        }
    throw Error(fmt::format("memslot {} does not exist", slot));
}

}  // namespace mvm
