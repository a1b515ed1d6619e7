// migration/migrate.hpp - live migration of a running minivmm guest: the
// entry points the commands, tests and benchmarks use.
//
//   sender.hpp       the sending side, one phase at a time (Sender)
//   destination.hpp  where it sends: a second VM here, or minivmm receive over TCP
//   channels.hpp     which connection each page goes on, sending threads, pacing
//   receiver.hpp     the receiving side (minivmm receive)
//   resume.hpp       the destination VM from the switchover on (both sides)
//   stream.hpp       the stream's records and their encodings
//   transport/       TCP connections; a damaged stream for the tests
//   report.hpp       what both sides report
#pragma once

#include <atomic>

#include "migration/receiver.hpp"
#include "migration/report.hpp"
#include "migration/sender.hpp"
#include "migration/transport/tcp.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::migration {

// Migrates the running source, driving a Sender through its phases.
// Cancelled when *cancel becomes non-zero. On success the source stays
// parked (its guest lives on at the destination); on failure it runs again.
MigrateReport migrate(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel,
                      const SenderHooks& hooks = {});
// The same phases on a Sender made by the caller (a monitor keeps it to
// query, steer and cancel from other threads while this runs).
void run_phases(Sender& s);

// After a failed migration the source is the guest: whether it kept running
// (progress within 300 ms), then stopped and its stamps checked.
struct SourceCheck {
    bool running = false;
    StampCheck stamps;
};
SourceCheck stop_and_check_source(StressVm& src);

}  // namespace mvm::migration
