// migration/admission.hpp - who may send a guest to `minivmm receive` (and, in
// admission.cpp, receive() itself: listener, socket or file to the Receiver).
//
// The receiver listens until one sender is admitted: every connection of a
// migration arrived (grouped by the session number in their HELLOs), each
// authenticated first when TLS is on (and its identity authorised), and
// channel 0's HEADER read. Connections are taken in parallel, each with
// --io-timeout from its accept to be admitted, so a connection that sends
// nothing, sends junk, stalls after a valid-looking start, or fails TLS is
// dropped (one line on stderr each) without holding up a real sender arriving
// next to it. Once a sender is admitted the listener closes (later
// connections are refused by the kernel) and every other connection is
// dropped. Nothing reaches guest memory before admission.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "migration/stream.hpp"
#include "migration/transport/tls.hpp"

namespace mvm::migration {

struct AdmitOptions {
    std::string listen;             // for messages
    double timeout_s = 300;         // until a sender is admitted (--timeout)
    double io_timeout_s = 30;       // per connection, from accept to admission (--io-timeout)
    std::shared_ptr<const tls::Context> tls;  // null: plain TCP
    uint32_t max_pending = 128;     // connections being admitted at once; more are closed at accept
    bool quiet = false;             // no line per dropped connection
    // Postcopy recovery: only the paused migration's connections, channel 0
    // carrying RESUME with this session where a new one carries HEADER.
    std::optional<uint64_t> resume_session;
};

struct Admitted {
    std::vector<std::unique_ptr<Transport>> channels;  // channel 0 (control) first
    Record header;                                     // channel 0's HEADER (RESUME when recovering)
    uint64_t session = 0;                              // the HELLOs' session
    std::string peer;                                  // channel 0's address
    std::string identity;                              // its TLS identity ("" for plain TCP)
    uint32_t dropped = 0;                              // connections dropped before it
};

// Listens on `listen_fd` (bound and listening) until a sender is admitted;
// throws Error with kExitNoSender when none is within opt.timeout_s (saying
// how many connections were dropped and the last reason).
Admitted admit(int listen_fd, const AdmitOptions& opt);

}  // namespace mvm::migration
