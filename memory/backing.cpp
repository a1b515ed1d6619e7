#include "memory/backing.hpp"

#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm {

namespace {
struct KindInfo {
    BackingKind kind;
    std::string_view name;
    uint64_t page;
    uint64_t align;
};
constexpr uint64_t k4K = 4096, k2M = 2ull << 20, k1G = 1ull << 30;
constexpr KindInfo kKinds[] = {
    {BackingKind::Anon, "anon", k4K, k2M},           {BackingKind::Shm, "shm", k4K, k2M},
    {BackingKind::Thp, "thp", k4K, k2M},             {BackingKind::Hugetlb2M, "hugetlb2m", k2M, k2M},
    {BackingKind::Hugetlb1G, "hugetlb1g", k1G, k1G}, {BackingKind::Gmem, "gmem", k4K, k2M},
};
const KindInfo& info(BackingKind k)
{
    for (const auto& i : kKinds)
        if (i.kind == k)
            return i;
    return kKinds[0];
}
}  // namespace

std::string_view backing_name(BackingKind k) { return info(k).name; }
uint64_t backing_page_size(BackingKind k) { return info(k).page; }
uint64_t backing_alignment(BackingKind k) { return info(k).align; }
std::string_view backing_names() { return "anon|shm|thp|hugetlb2m|hugetlb1g|gmem"; }

std::optional<BackingKind> parse_backing(std::string_view s)
{
    for (const auto& i : kKinds)
        if (i.name == s)
            return i.kind;
    return std::nullopt;
}

Backing Backing::create(BackingKind kind, uint64_t size, const GuestMemfdFactory& gmem, const std::string& name)
{
    Backing b;
    b.kind_ = kind;
    b.size_ = size;
    const uint64_t page = backing_page_size(kind);
    if (size == 0 || size % page)
        throw UsageError(fmt::format("{}: size {} is not a multiple of the {} page size {}", name, size,
                                     backing_name(kind), page));

    // Reserve size + align of address space, then map the backing at an
    // aligned address inside it (MAP_FIXED replaces the reservation there), so
    // guest huge pages line up with host huge pages.
    const uint64_t align = backing_alignment(kind);
    Mapping reserve =
        Mapping::map(name + " reservation", size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
    auto base = reinterpret_cast<uintptr_t>(reserve.get());
    void* aligned = reinterpret_cast<void*>((base + align - 1) & ~(align - 1));
    const int prot = PROT_READ | PROT_WRITE;

    switch (kind) {
    case BackingKind::Anon:
    case BackingKind::Thp:
        b.map_ = Mapping::map(name, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0, aligned);
        if (kind == BackingKind::Thp && ::madvise(b.map_.get(), size, MADV_HUGEPAGE) != 0)
            throw SysError(fmt::format("madvise(MADV_HUGEPAGE) on {}", name), errno);
        break;
    case BackingKind::Shm:
    case BackingKind::Hugetlb2M:
    case BackingKind::Hugetlb1G: {
        unsigned flags = MFD_CLOEXEC;
        if (kind == BackingKind::Hugetlb2M)
            flags |= MFD_HUGETLB | MFD_HUGE_2MB;
        if (kind == BackingKind::Hugetlb1G)
            flags |= MFD_HUGETLB | MFD_HUGE_1GB;
        int fd = ::memfd_create(name.c_str(), flags);
        if (fd < 0)
            throw SysError(fmt::format("memfd_create({}) for {}", backing_name(kind), name), errno);
        b.fd_.reset(fd);
        if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
            throw SysError(fmt::format("ftruncate of {} to {} bytes", name, size), errno);
        b.map_ = Mapping::map(name, size, prot, MAP_SHARED | MAP_FIXED, fd, 0, aligned);
        break;
    }
    case BackingKind::Gmem: {
        if (!gmem)
            throw Error("gmem backing needs a VM to create its guest_memfd");
        b.fd_.reset(gmem(size));
        b.map_ = Mapping::map(name, size, prot, MAP_SHARED | MAP_FIXED, b.fd_.get(), 0, aligned);
        break;
    }
    }
    // map_ now owns [aligned, aligned + size); give back the reservation's
    // unused head and tail and forget the rest of it.
    reserve.release();
    uintptr_t lo = base, hi = base + size + align;
    uintptr_t mlo = reinterpret_cast<uintptr_t>(aligned), mhi = mlo + size;
    if (mlo > lo)
        ::munmap(reinterpret_cast<void*>(lo), mlo - lo);
    if (hi > mhi)
        ::munmap(reinterpret_cast<void*>(mhi), hi - mhi);
    return b;
}

void Backing::map_for_query() const
{
#ifndef MADV_POPULATE_READ
    constexpr int MADV_POPULATE_READ = 22;
#endif
    if (kind_ == BackingKind::Gmem && ::madvise(host(), size(), MADV_POPULATE_READ) != 0)
        throw SysError(fmt::format("MADV_POPULATE_READ on a guest_memfd mapping of {} bytes", size()), errno);
}

}  // namespace mvm
