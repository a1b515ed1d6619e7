#include "base/sysfs.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace mvm {

bool param_file_writable(const std::string& path)
{
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !(st.st_mode & S_IWUSR))
        return false;
    const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ::close(fd);
    return true;
}

}  // namespace mvm
