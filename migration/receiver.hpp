// migration/receiver.hpp - the receiving side of a live migration (`minivmm
// receive`): accept the sender's connections, check the stream's layout
// against this VM's before any memory, take the pages on every channel, the
// vCPU states and digests, check them, resume the guest, run it a while,
// check its stamps and report each step back to the sender.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
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

// QMP's migrate-pause on a destination: shuts down the connections postcopy
// (or its recovery) reads now, so the receiver pauses as after a cut.
class PauseSwitch {
public:
    bool pause();  // false: nothing to pause (no postcopy connection)
    void attach(Transport* t);
    void detach_all();

private:
    std::mutex mu_;
    std::vector<Transport*> t_;
};

// Where a paused receiver takes its sender back: tcp:, unix: or fd:, with
// the listening socket already bound when the caller made it (QMP's
// migrate-recover listens before it returns, as QEMU's), else -1.
struct RecoverAt {
    std::string uri;
    int listen_fd = -1;  // owned by the receiver once returned
};

// Postcopy recovery on the receiving side (stream.hpp: RESUME, MISSING).
struct Recovery {
    // Blocks until the paused migration's sender connected again: its
    // channels, channel 0's HELLO and RESUME read and checked. `taken` is
    // called once a connection is in hand (QEMU's postcopy-recover). Empty:
    // given up (the guest is lost). Throws Error for an attempt that failed
    // (the receiver stays paused and asks again).
    std::function<std::vector<std::unique_ptr<Transport>>(uint64_t session, uint32_t channels,
                                                          const std::function<void()>& taken)>
        reconnect;
    std::shared_ptr<PauseSwitch> pause;  // may be null
    uint64_t session = 0;                // the admitted sender's (0: channel 0's HELLO says)
};

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
    // Postcopy recovery: empty, a cut in postcopy loses the guest (exit 7).
    // Else, once a cut paused postcopy here, where the sender comes back
    // (QMP's migrate-recover, the CLI's own --listen again); an empty uri
    // gives up. Waits as long as it likes.
    std::function<RecoverAt(const std::string& why)> recover_listen;
    std::shared_ptr<PauseSwitch> pause_switch;  // QMP's migrate-pause
    double recover_timeout_s = 0;  // each wait for the sender to come back (0: accept_timeout_s)
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
                           const ContGate& wait_cont = {}, bool from_file = false,
                           const Recovery* recovery = nullptr);

}  // namespace mvm::migration
