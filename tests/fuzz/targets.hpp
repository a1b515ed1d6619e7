// tests/fuzz/targets.hpp - the fuzzed entry points, one per attack surface.
//
// Each takes arbitrary bytes and must return without crashing, hanging or
// tripping a sanitizer; an exception outside the documented ones is a
// finding (it aborts). The libFuzzer drivers (fuzz_*.cpp, clang builds) and
// the corpus/regression replay test (kvm_tests, every build) both call these,
// so a crash file committed under regressions/ is a test from then on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "vmm/config.hpp"

namespace mvm::fuzz {

// The migration receiver, through receive_from() as `minivmm receive` calls
// it after accepting its connections, into a real (small) VM. The input is
// the bytes that arrive; a HELLO record switches the connection the bytes
// that follow arrive on (the first HELLO of a connection is part of its
// bytes, as on a socket). RESULT payloads in the input also go through the
// sender's decoder. Needs /dev/kvm.
int stream_one(const uint8_t* data, size_t size);
// The VM the stream is received into (seeds are made from one like it).
MachineConfig stream_rig_config();

// Option parsers: sizes, --numa, --access, CPU lists, policies, and whole
// VM option sets against a 4-node topology. The first byte picks which.
int options_one(const uint8_t* data, size_t size);

// Host-side decoding of what lives in guest memory: boot parameters checked
// against the host's copy, mailbox progress driving the stamp check over
// fuzzed page contents, and the watchdog ring.
int guest_state_one(const uint8_t* data, size_t size);

// Structure-aware mutation for the stream: mutates inside one record (or
// drops, repeats or retypes one) and then fixes the frame's length and CRC,
// so mutants get past the checksum and reach the decoders behind it. Every
// few calls it leaves the frame alone, so the framing checks stay fuzzed.
using Mutator = std::function<size_t(uint8_t* data, size_t size, size_t max)>;
size_t stream_mutate(uint8_t* data, size_t size, size_t max_size, unsigned seed, const Mutator& mutate);

}  // namespace mvm::fuzz
