// vmm/kvm/ioctl.hpp - the ioctl ladder, after the KVM selftests:
//   kvm_ioctl_raw()  returns the raw result (rc, errno untouched);
//   KVM_IOCTL()      checks it and throws SysError naming the ioctl.
#pragma once

#include <sys/ioctl.h>

#include <cerrno>

#include "base/error.hpp"

namespace mvm {

template <typename Arg>
inline int kvm_ioctl_raw(int fd, unsigned long req, Arg arg) noexcept
{
    return ::ioctl(fd, req, arg);
}

// Checked ioctl. EINTR is retried: every ioctl we issue through this path is
// documented as restartable (KVM_RUN, which is not, has its own loop).
template <typename Arg>
inline int kvm_ioctl_checked(const char* name, int fd, unsigned long req, Arg arg)
{
    int rc;
    do {
        rc = ::ioctl(fd, req, arg);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0)
        throw SysError(name, rc, errno);
    return rc;
}

#define KVM_IOCTL(fd, req, arg) ::mvm::kvm_ioctl_checked(#req, (fd), (req), (arg))

}  // namespace mvm
