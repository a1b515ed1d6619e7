// libFuzzer driver: boot parameters, mailboxes and stamps as the host decodes them (targets.hpp).
#include "tests/fuzz/targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    return mvm::fuzz::guest_state_one(data, size);
}
