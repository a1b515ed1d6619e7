#include "base/fd.hpp"

#include <cerrno>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm {

Mapping Mapping::map(const std::string& what, size_t size, int prot, int flags, int fd, off_t offset, void* hint)
{
    void* p = ::mmap(hint, size, prot, flags, fd, offset);
    if (p == MAP_FAILED)
        throw SysError(fmt::format("mmap of {} ({} bytes)", what, size), errno);
    return Mapping(p, size);
}

}  // namespace mvm
