// libFuzzer driver: the option parsers (targets.hpp).
#include "tests/fuzz/targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return mvm::fuzz::options_one(data, size); }
