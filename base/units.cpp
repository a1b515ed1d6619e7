#include "base/units.hpp"

#include <cctype>
#include <charconv>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm {

std::optional<uint64_t> parse_size(std::string_view s)
{
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back())))
        s.remove_suffix(1);
    if (s.empty() || !std::isdigit(static_cast<unsigned char>(s.front())))
        return std::nullopt;
    uint64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc())
        return std::nullopt;
    std::string_view suf(p, static_cast<size_t>(s.data() + s.size() - p));
    if (suf.ends_with("iB"))
        suf.remove_suffix(2);
    else if (suf.size() == 2 && (suf.back() == 'B' || suf.back() == 'b'))
        suf.remove_suffix(1);
    unsigned shift = 0;
    if (suf.empty() || suf == "B" || suf == "b")
        shift = 0;
    else if (suf.size() == 1) {
        switch (std::toupper(static_cast<unsigned char>(suf[0]))) {
        case 'K': shift = 10; break;
        case 'M': shift = 20; break;
        case 'G': shift = 30; break;
        case 'T': shift = 40; break;
        default: return std::nullopt;
        }
    } else
        return std::nullopt;
    if (shift && v > (~0ull >> shift))
        return std::nullopt;
    return v << shift;
}

uint64_t parse_size_option(std::string_view option, std::string_view value)
{
    auto v = parse_size(value);
    if (!v)
        throw UsageError(fmt::format("{}: '{}' is not a size; use a number with an optional K/M/G suffix, e.g. 256M",
                                     option, value));
    return *v;
}

std::string format_size(uint64_t b)
{
    const char* suf[] = {"", "K", "M", "G", "T"};
    int i = 0;
    while (i < 4 && b && b % 1024 == 0) {
        b /= 1024;
        i++;
    }
    return fmt::format("{}{}", b, suf[i]);
}

std::string human_bytes(double b)
{
    const char* suf[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (i < 4 && b >= 1024) {
        b /= 1024;
        i++;
    }
    return i == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.1f} {}", b, suf[i]);
}

}  // namespace mvm
