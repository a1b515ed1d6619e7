// libFuzzer driver: the migration receiver (targets.hpp), with the
// structure-aware mutator so mutants get past the record checksums.
#include "tests/fuzz/targets.hpp"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) { return mvm::fuzz::stream_one(data, size); }

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed)
{
    return mvm::fuzz::stream_mutate(data, size, max_size, seed, LLVMFuzzerMutate);
}
