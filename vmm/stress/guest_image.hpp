// vmm/stress/guest_image.hpp - the stress guest embedded in this binary.
#pragma once

#include <cstdint>
#include <span>

#include "guest/abi.h"

namespace mvm {

std::span<const uint8_t> guest_image();
// Validated header of the embedded image (throws Error if the build is broken).
const mvm_image_header& guest_image_header();

}  // namespace mvm
