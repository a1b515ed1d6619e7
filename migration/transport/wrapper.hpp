// migration/transport/wrapper.hpp - what a caller may put around every
// connection the sender opens to a remote destination: a damaged stream in
// the tests today (fault.hpp), TLS later.
#pragma once

#include <cstdint>
#include <memory>

#include "migration/stream.hpp"

namespace mvm::migration {

class TransportWrapper {
public:
    virtual ~TransportWrapper() = default;
    // Before the first connection: throws when it cannot serve a migration
    // over `channels` channels.
    virtual void check(uint32_t channels) { (void)channels; }
    // Channel `channel`'s connection as the sender will use it.
    virtual std::unique_ptr<Transport> wrap(uint32_t channel, std::unique_ptr<Transport> t) = 0;
    // The migration entered `phase` (setup, bulk, precopy, stop, destination).
    virtual void enter_phase(const char* phase) { (void)phase; }
};

}  // namespace mvm::migration
