// base/units.hpp - sizes with K/M/G suffixes, and their display.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace mvm {

// "4096", "4K", "256M", "2G", "1T" (binary units; optional trailing "B"/"iB").
std::optional<uint64_t> parse_size(std::string_view s);
// Throws UsageError "OPTION: 'VALUE' is not a size; use a number with an optional K/M/G suffix".
uint64_t parse_size_option(std::string_view option, std::string_view value);
// 268435456 -> "256M", 1536 -> "1536" (exact, the form parse_size accepts).
std::string format_size(uint64_t bytes);
// 268435456 -> "256.0 MiB"
std::string human_bytes(double bytes);

}  // namespace mvm
