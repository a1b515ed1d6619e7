// migration/migrate.hpp - live migration of a running minivmm guest.
//
// A migration thread owns the source while migrating: setup (tracking on,
// per node), a bulk pass, pre-copy rounds that harvest and send while the
// vCPUs run, stop-and-copy (guests parked, final harvest, guest_memfd slots
// whole, vCPU state), verification, and resume on the destination. Any
// failure turns tracking off and resumes the source, memory untouched.
// Destinations: a second VM in this process (memory copied directly), or a
// `minivmm receive` over TCP with one connection per virtual node.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "vmm/dirty/tracker.hpp"
#include "migration/stream.hpp"
#include "migration/vcpu_state.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::migration {

enum class Throttle { None, AutoConverge, DirtyLimit };

struct MigrateOptions {
    std::string to = "inproc";        // "inproc" or "tcp:HOST:PORT"
    dirty::Mode tracker = dirty::Mode::Bitmap;
    double max_downtime_ms = 300;
    uint32_t max_iterations = 30;
    double timeout_s = 120;
    uint64_t bandwidth = 0;           // bytes/s; 0 = unlimited
    Throttle throttle = Throttle::None;
    uint64_t dirty_limit = 0;         // pages/s per vCPU (dirty-limit)
    bool verify = true;
    double post_run_s = 2;            // destination runs this long before its stamp check
    uint32_t channels = 0;            // 0: one per virtual node
    bool progress = false;
    // Test hooks: make the destination fail in a phase ("bulk", "precopy", "stop").
    std::string fail_in;
    // ... or damage the TCP stream itself: see parse_stream_fault().
    std::string stream_fault;
};

// Fault injection on the sender's stream (test hook, `migrate --stream-fault`):
//   flip:PHASE:OFFSET[@CHANNEL]  flip one bit of the byte at OFFSET
//   cut:PHASE:OFFSET[@CHANNEL]   close the connection right before that byte
// OFFSET counts the bytes the channel (default 0) sent since PHASE (bulk,
// precopy or stop) began. Throws UsageError naming --stream-fault.
struct StreamFault {
    enum class Kind { Flip, Cut } kind = Kind::Flip;
    std::string phase;
    uint64_t offset = 0;
    uint32_t channel = 0;
};
StreamFault parse_stream_fault(const std::string& spec);

struct RoundReport {
    uint32_t round = 0;          // 0 is the bulk pass
    uint64_t pages = 0;          // sent this round
    uint64_t dirty_pages = 0;    // harvested for this round (0 for the bulk pass)
    double dirty_rate = 0;       // pages/s over the previous round
    uint64_t bytes = 0;
    double duration_s = 0;
    uint32_t throttle_pct = 0;   // auto-converge share in effect
    uint64_t dirty_limit = 0;    // per-vCPU cap in effect (dirty-limit)
};

struct MigrateReport {
    std::string status = "failed";  // completed | failed | cancelled
    std::string error;
    std::string phase;             // where it failed
    double total_ms = 0, setup_ms = 0, downtime_ms = 0, expected_downtime_ms = 0;
    uint64_t transferred_bytes = 0, remaining_bytes = 0, zero_pages = 0, pages = 0;
    double throughput = 0;          // bytes/s over pre-copy
    std::vector<RoundReport> rounds;
    std::vector<double> vcpu_stall_ms;  // longest no-progress gap per vCPU during pre-copy
    dirty::EnableReport enable;
    std::vector<std::pair<uint32_t, std::string>> untracked;
    // Verification
    bool verified = false;
    uint64_t switchover_pages_checked = 0, switchover_mismatches = 0;
    std::vector<uint64_t> switchover_mismatch_gpas;
    uint64_t pages_checked = 0, mismatches = 0;  // destination stamp check after resume
    std::string stamp_summary;
    bool destination_progressed = false;
    std::vector<uint32_t> refused_msrs;

    nlohmann::json to_json() const;
    std::string to_table() const;
};

// Migrates the running source. Cancelled when *cancel becomes non-zero.
// On success the source stays parked (its guest lives on at the destination).
MigrateReport migrate(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel);

// After a failed migration the source is the guest: whether it kept running
// (progress within 300 ms), then stopped and its stamps checked.
struct SourceCheck {
    bool running = false;
    StampCheck stamps;
};
SourceCheck stop_and_check_source(StressVm& src);

struct ReceiveOptions {
    std::string listen;  // tcp:ADDR:PORT
    double post_run_s = 2;
    double accept_timeout_s = 300;
    bool progress = false;
    std::string die_in;  // test hook: exit abruptly in bulk|precopy|stop
};

struct ReceiveReport {
    std::string status = "failed", error;
    uint64_t pages = 0, zero_pages = 0, bytes = 0;
    uint64_t pages_checked = 0, mismatches = 0;
    std::string stamp_summary;
    nlohmann::json to_json() const;
};

// Listens, takes one migration into `dst` (made with the same VM options,
// not started), resumes it, runs post_run_s, checks stamps, reports back.
ReceiveReport receive(StressVm& dst, const ReceiveOptions& opt);

// Same, from already-connected transports (channel 0 first): what the
// fuzzers and the in-memory tests drive.
ReceiveReport receive_from(StressVm& dst, std::vector<std::unique_ptr<Transport>> channels, double post_run_s,
                           const std::string& die_in = {});

// A TCP socket bound to --listen's tcp:ADDR:PORT (not yet listening); throws
// UsageError naming --listen for a bad address or one it cannot bind.
int bind_listener(const std::string& spec);

// "tcp:HOST:PORT" -> host, port; throws UsageError naming `option`.
std::pair<std::string, uint16_t> parse_tcp(const std::string& option, const std::string& spec);

}  // namespace mvm::migration
