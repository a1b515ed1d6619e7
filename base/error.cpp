#include "base/error.hpp"

#include <cstring>
#include <fmt/format.h>

namespace mvm {

std::string errno_text(int err)
{
    const char* text = ::strerrordesc_np(err);  // thread-safe, unlike strerror()
    return text ? text : fmt::format("Unknown error {}", err);
}

std::string one_line(const std::string& text)
{
    std::string out;
    out.reserve(text.size());
    for (unsigned char c : text) {
        if (c == '\n')
            out += "\\n";
        else if (c == '\t')
            out += ' ';
        else if (c < 0x20 || c == 0x7f)
            out += fmt::format("\\x{:02x}", c);
        else
            out += static_cast<char>(c);
    }
    return out;
}

SysError::SysError(const std::string& call, long rc, int err)
    : Error(fmt::format("{} failed, rc: {} errno: {} ({})", call, rc, err, errno_text(err))), errno_(err) {}

}  // namespace mvm
