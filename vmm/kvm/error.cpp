#include "vmm/kvm/error.hpp"

#include <cstring>
#include <fmt/format.h>

namespace mvm {

std::string errno_text(int err)
{
    const char* text = ::strerrordesc_np(err);  // thread-safe, unlike strerror()
    return text ? text : fmt::format("Unknown error {}", err);
}

SysError::SysError(const std::string& call, long rc, int err)
    : Error(fmt::format("{} failed, rc: {} errno: {} ({})", call, rc, err, errno_text(err))), errno_(err) {}

}  // namespace mvm
