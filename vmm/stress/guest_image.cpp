#include "vmm/stress/guest_image.hpp"

#include <fmt/format.h>

#include "base/error.hpp"

extern "C" const uint8_t mvm_guest_image_start[];
extern "C" const uint8_t mvm_guest_image_end[];

namespace mvm {

std::span<const uint8_t> guest_image()
{
    return {mvm_guest_image_start, static_cast<size_t>(mvm_guest_image_end - mvm_guest_image_start)};
}

const mvm_image_header& guest_image_header()
{
    auto img = guest_image();
    if (img.size() < sizeof(mvm_image_header))
        throw Error("embedded guest image is truncated");
    const auto* h = reinterpret_cast<const mvm_image_header*>(img.data());
    if (h->magic != MVM_IMAGE_MAGIC || h->abi_version != MVM_ABI_VERSION || h->load_gpa != MVM_IMAGE_GPA ||
        h->image_end - h->load_gpa < img.size() || img.size() > MVM_IMAGE_MAX)
        throw Error(fmt::format("embedded guest image has a bad header (magic {:#x}, abi {})", h->magic, h->abi_version));
    return *h;
}

}  // namespace mvm
