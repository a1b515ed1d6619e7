// migration/transport/fault.hpp - a damaged migration stream (test hook).
//
// MINIVMM_TEST_STREAM_FAULT=KIND:PHASE:OFFSET[@CHANNEL], read by `minivmm
// migrate` (cli/test_hooks.hpp) and handed to the sender as a
// TransportWrapper:
//   flip:PHASE:OFFSET[@CHANNEL]  flip one bit of the byte at OFFSET
//   cut:PHASE:OFFSET[@CHANNEL]   close the connection right before that byte
// OFFSET counts the bytes the channel (default 0) sent since PHASE (bulk,
// precopy or stop) began.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "migration/transport/wrapper.hpp"

namespace mvm::migration {

struct StreamFault {
    enum class Kind { Flip, Cut } kind = Kind::Flip;
    std::string phase;
    uint64_t offset = 0;
    uint32_t channel = 0;
};
// Throws UsageError naming MINIVMM_TEST_STREAM_FAULT.
StreamFault parse_stream_fault(const std::string& spec);

// The phase the migration is in, shared by an injector and its transport.
using SharedPhase = std::shared_ptr<std::atomic<const char*>>;

// Damages one channel's byte stream at a chosen offset of a phase.
class FaultInjectingTransport : public Transport {
public:
    FaultInjectingTransport(std::unique_ptr<Transport> inner, StreamFault f, SharedPhase phase);
    void write_all(const void* data, size_t len) override;
    void read_exact(void* data, size_t len) override { inner_->read_exact(data, len); }
    void shutdown() override { inner_->shutdown(); }

private:
    std::unique_ptr<Transport> inner_;
    StreamFault f_;
    SharedPhase phase_;
    const char* seen_ = nullptr;  // below: only the channel's (one) writer touches these
    uint64_t at_ = 0;
    bool fired_ = false;
};

// The sender's wrapper for a StreamFault: the fault's channel (which must
// exist) goes through a FaultInjectingTransport.
class StreamFaultInjector : public TransportWrapper {
public:
    explicit StreamFaultInjector(StreamFault f) : f_(std::move(f)) {}
    void check(uint32_t channels) override;
    std::unique_ptr<Transport> wrap(uint32_t channel, std::unique_ptr<Transport> t) override;
    void enter_phase(const char* phase) override { phase_->store(phase); }

private:
    StreamFault f_;
    SharedPhase phase_ = std::make_shared<std::atomic<const char*>>(nullptr);
};

}  // namespace mvm::migration
