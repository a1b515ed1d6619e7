#include "memory/userfault.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm {

UserfaultFd::UserfaultFd(bool shmem, bool hugetlbfs)
{
    int fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    if (fd < 0) {
        const int e = errno;
        if (e == EPERM)
            throw Error("userfaultfd: not permitted (run as root, or set vm.unprivileged_userfaultfd=1)", kExitUsage);
        throw SysError("userfaultfd (postcopy needs CONFIG_USERFAULTFD)", e);
    }
    fd_.reset(fd);
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_THREAD_ID | (shmem ? UFFD_FEATURE_MISSING_SHMEM : 0) |
                   (hugetlbfs ? UFFD_FEATURE_MISSING_HUGETLBFS : 0);
    if (::ioctl(fd, UFFDIO_API, &api) != 0)
        throw SysError(fmt::format("UFFDIO_API (features {:#x}: thread id{}{})", static_cast<uint64_t>(api.features),
                                   shmem ? ", shmem" : "", hugetlbfs ? ", hugetlbfs" : ""),
                       errno);
    int p[2];
    if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0)
        throw SysError("pipe2", errno);
    wake_r_.reset(p[0]);
    wake_w_.reset(p[1]);
}

std::string UserfaultFd::unsupported(const MemoryRegion& r)
{
    if (r.is_gmem())
        return fmt::format("{} is guest_memfd: userfaultfd's missing mode cannot register it (guest_memfd has no "
                           "page faults to intercept; use anon, thp, shm or hugetlb2m for postcopy)",
                           r.name);
    if (r.backing == BackingKind::Hugetlb1G)
        return fmt::format("{} is hugetlb1g: a postcopy fault would move 1 GiB at once; use hugetlb2m", r.name);
    return "";
}

void UserfaultFd::register_region(const MemoryRegion& r)
{
    if (auto why = unsupported(r); !why.empty())
        throw Error("postcopy: " + why, kExitUsage);
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<uintptr_t>(r.host);
    reg.range.len = r.size;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(fd_.get(), UFFDIO_REGISTER, &reg) != 0)
        throw SysError(fmt::format("UFFDIO_REGISTER (missing) of {} ({})", r.name, backing_name(r.backing)), errno);
    if (!(reg.ioctls & (1ull << _UFFDIO_COPY)))
        throw Error(fmt::format("postcopy: UFFDIO_COPY is not available on {} ({})", r.name, backing_name(r.backing)));
    registered_.emplace_back(reg.range.start, reg.range.len);
}

void UserfaultFd::unregister_all()
{
    for (auto [start, len] : registered_) {
        uffdio_range range{start, len};
        ::ioctl(fd_.get(), UFFDIO_UNREGISTER, &range);
    }
    registered_.clear();
}

std::vector<Userfault> UserfaultFd::wait(std::chrono::milliseconds timeout)
{
    std::vector<Userfault> out;
    pollfd p[2] = {{fd_.get(), POLLIN, 0}, {wake_r_.get(), POLLIN, 0}};
    const int n = ::poll(p, 2, static_cast<int>(timeout.count()));
    if (n < 0 && errno != EINTR)
        throw SysError("poll on the userfaultfd", errno);
    if (n <= 0)
        return out;
    if (p[1].revents) {
        char buf[64];
        while (::read(wake_r_.get(), buf, sizeof(buf)) > 0) {
        }
    }
    uffd_msg msgs[64];
    for (;;) {
        const ssize_t got = ::read(fd_.get(), msgs, sizeof(msgs));
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            throw SysError("read from the userfaultfd", errno);
        }
        for (size_t i = 0; i < static_cast<size_t>(got) / sizeof(uffd_msg); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            Userfault f;
            f.address = msgs[i].arg.pagefault.address & ~uint64_t{4095};
            f.tid = static_cast<pid_t>(msgs[i].arg.pagefault.feat.ptid);
            f.write = msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE;
            out.push_back(f);
        }
        if (static_cast<size_t>(got) < sizeof(msgs))
            break;
    }
    return out;
}

void UserfaultFd::wake()
{
    const char c = 1;
    (void)!::write(wake_w_.get(), &c, 1);
}

bool UserfaultFd::copy(void* dst, const void* src, uint64_t len)
{
    uffdio_copy c{};
    c.dst = reinterpret_cast<uintptr_t>(dst);
    c.src = reinterpret_cast<uintptr_t>(src);
    c.len = len;
    for (;;) {
        if (::ioctl(fd_.get(), UFFDIO_COPY, &c) == 0)
            return true;
        if (errno == EEXIST)
            return false;
        if (errno == EAGAIN && c.copy > 0 && static_cast<uint64_t>(c.copy) < len) {
            // A partial copy: go on with the rest.
            c.dst += static_cast<uint64_t>(c.copy);
            c.src += static_cast<uint64_t>(c.copy);
            c.len -= static_cast<uint64_t>(c.copy);
            c.copy = 0;
            continue;
        }
        if (errno == EAGAIN || errno == EINTR)
            continue;
        throw SysError(fmt::format("UFFDIO_COPY of {} bytes at {}", len, dst), errno);
    }
}

bool UserfaultFd::zero(void* dst, uint64_t len)
{
    uffdio_zeropage z{};
    z.range.start = reinterpret_cast<uintptr_t>(dst);
    z.range.len = len;
    for (;;) {
        if (::ioctl(fd_.get(), UFFDIO_ZEROPAGE, &z) == 0)
            return true;
        if (errno == EEXIST)
            return false;
        if (errno == EAGAIN || errno == EINTR) {
            z.zeropage = 0;
            continue;
        }
        throw SysError(fmt::format("UFFDIO_ZEROPAGE of {} bytes at {}", len, dst), errno);
    }
}

void UserfaultFd::discard(const MemoryRegion& r, uint8_t* host, uint64_t len)
{
    const bool shared = r.backing == BackingKind::Shm || r.backing == BackingKind::Hugetlb2M ||
                        r.backing == BackingKind::Hugetlb1G;
    const int advice = shared ? MADV_REMOVE : MADV_DONTNEED;
    if (::madvise(host, len, advice) != 0)
        throw SysError(fmt::format("madvise({}) of {} bytes of {} ({})", shared ? "MADV_REMOVE" : "MADV_DONTNEED", len,
                                   r.name, backing_name(r.backing)),
                       errno);
}

}  // namespace mvm
