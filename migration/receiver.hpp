// migration/receiver.hpp - the receiving side of a live migration (`minivmm
// receive`): accept the sender's connections, check the stream's layout
// against this VM's before any memory, take the pages on every channel, the
// vCPU states and digests, check them, resume the guest, run it a while,
// check its stamps and report each step back to the sender.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "migration/report.hpp"
#include "migration/stream.hpp"
#include "migration/transport/tls.hpp"
#include "migration/verify.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

// Told the destination's postcopy figures once every page arrived (a
// monitor's query-migrate), from the receiving thread.
using PostcopyHook = std::function<void(const PostcopyDestinationFigures&)>;

using ContGate = std::function<bool()>;  // ReceiveOptions::wait_cont

struct ReceiveOptions {
    std::string listen;  // tcp:ADDR:PORT, unix:PATH, fd:N, or a file to restore (file.hpp: file:PATH, fd:N)
    double post_run_s = 2;
    double accept_timeout_s = 300;  // until a sender is admitted (admission.hpp)
    double io_timeout_s = 30;       // a connection's admission; then each wait on the admitted sender
    tls::Options tls;               // --tls-creds, --tls-authz
    bool progress = false;
    PostcopyHook on_postcopy;
    // A stopped source's guest (QEMU: the destination does not autostart):
    // called once the migration completed, the guest loaded and parked; true
    // when it may run (QMP cont), false when it never will (quit). Without it
    // such a guest runs at once.
    ContGate wait_cont;
};

// Told where the stream is, from the thread of the channel that got there:
// "bulk" after every PAGES record, "precopy" once more pages arrived than
// the layout holds, "stop" at every CHANNEL_DONE (the tests' hook); then
// from the receiving thread "running" once the guest runs here and
// "stopped" after its post-run check (a monitor's run state). A stopped
// source's guest says "paused" once it is loaded and verified (the migration
// is complete), then "running" after cont.
using PhaseHook = std::function<void(const char* phase)>;

// Listens, admits one sender (admission.hpp: throws Error with kExitNoSender
// when none comes within accept_timeout_s), takes its migration into `dst`
// (made with the same VM options, not started), resumes it, runs
// post_run_s, checks stamps, reports back.
ReceiveReport receive(StressVm& dst, const ReceiveOptions& opt, const PhaseHook& on_phase = {});

// Same, from already-connected transports (channel 0 first): what the
// fuzzers and the in-memory tests drive.
// `before`: the hashes of dst's memory as it is now, when the caller took
// them already (else they are taken once the layout is accepted).
// `header`: channel 0's HEADER when admission read it already.
// `from_file`: a restore (file.hpp): nobody reads the answers, and the guest's
// gap since it stopped is how long the file lay, not a downtime.
ReceiveReport receive_from(StressVm& dst, std::vector<std::unique_ptr<Transport>> channels, double post_run_s,
                           const PhaseHook& on_phase = {}, PageHashes before = {},
                           std::optional<Record> header = std::nullopt, const PostcopyHook& on_postcopy = {},
                           const ContGate& wait_cont = {}, bool from_file = false);

}  // namespace mvm::migration
