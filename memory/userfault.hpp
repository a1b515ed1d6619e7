// memory/userfault.hpp - userfaultfd(2) in missing mode over guest memory:
// what a postcopy destination needs from the kernel.
//
// Registered ranges fault to this object instead of filling themselves: a
// thread (a vCPU inside KVM_RUN, or the VMM reading guest memory) that
// touches a missing page blocks until a page is placed there atomically
// with UFFDIO_COPY (UFFDIO_ZEROPAGE for a zero 4 KiB page). Anonymous
// memory (and THP) needs no feature; memfd shmem needs
// UFFD_FEATURE_MISSING_SHMEM, hugetlbfs UFFD_FEATURE_MISSING_HUGETLBFS
// (and places whole huge pages); guest_memfd is refused (missing mode does
// not cover it). discard() turns present pages back into missing ones: the
// pages the source dirtied after it sent them.
//
// Measured on the PVM host: KVM's shadow MMU takes userfaults like any
// other GUP (the vCPU's thread is the faulting thread, UFFD_FEATURE_THREAD_ID
// names it), and a vCPU blocked on a missing page does not leave KVM_RUN
// for a non-fatal signal: the fault is retried until the page arrives. Only
// closing the userfaultfd (faults then fill normally) or a fatal signal
// releases it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/fd.hpp"
#include "memory/memslot.hpp"

namespace mvm {

struct Userfault {
    uintptr_t address = 0;  // the faulting address, page-aligned to 4 KiB
    pid_t tid = 0;          // the faulting thread
    bool write = false;
};

class UserfaultFd {
public:
    // Throws Error naming what is missing (no userfaultfd, no permission,
    // a feature this kernel lacks).
    explicit UserfaultFd(bool shmem, bool hugetlbfs);
    UserfaultFd(const UserfaultFd&) = delete;
    UserfaultFd& operator=(const UserfaultFd&) = delete;

    // "" when `r`'s backing can be registered in missing mode, else why not.
    static std::string unsupported(const MemoryRegion& r);
    // Registers the region (missing mode). Throws Error.
    void register_region(const MemoryRegion& r);
    void unregister_all();

    // Waits up to `timeout` for faults; returns those read (empty on timeout
    // or when wake() was called).
    std::vector<Userfault> wait(std::chrono::milliseconds timeout);
    // Makes a wait() in another thread return now.
    void wake();

    // Places `len` bytes (4 KiB or the huge page) at `dst` from `src` and
    // wakes its waiters. False when something was there already (EEXIST).
    bool copy(void* dst, const void* src, uint64_t len);
    // A zero page (4 KiB backings; hugetlb places zeros with copy()).
    bool zero(void* dst, uint64_t len);

    // The pages [host, host + len) of `r` become missing again (MADV_DONTNEED
    // for private memory, MADV_REMOVE, a hole punched in the file, for shared).
    static void discard(const MemoryRegion& r, uint8_t* host, uint64_t len);

    int fd() const { return fd_.get(); }

private:
    UniqueFd fd_;
    UniqueFd wake_r_, wake_w_;
    std::vector<std::pair<uintptr_t, uint64_t>> registered_;
};

}  // namespace mvm
