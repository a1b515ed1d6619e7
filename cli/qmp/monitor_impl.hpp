// cli/qmp/monitor_impl.hpp - what the Monitor's command files share (not
// part of the interface): its parameter, capability and dirty-rate state, the
// QAPI version it follows, and small helpers. One file per group of commands,
// as QEMU's schema files group them: cmd_run_state.cpp (run-state.json),
// cmd_migration.cpp and cmd_migration_incoming.cpp (migration.json: source and
// destination), cmd_migration_parameters.cpp (its parameters and
// capabilities), cmd_dirty_rate.cpp (calc-dirty-rate, query-dirty-rate),
// cmd_stats.cpp (stats.json), cmd_x_minivmm.cpp (minivmm's own x- commands);
// monitor.cpp registers them all in one table.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "cli/qmp/monitor.hpp"

namespace mvm::qmp {

// The QAPI schema whose names minivmm follows (query-version reports it).
inline constexpr int kQemuMajor = 9, kQemuMinor = 2, kQemuMicro = 0;

// query-version's answer, which the greeting carries too.
inline json qmp_version()
{
    return {{"qemu", {{"major", kQemuMajor}, {"minor", kQemuMinor}, {"micro", kQemuMicro}}},
            {"package", "minivmm (QMP with QEMU " + std::to_string(kQemuMajor) + "." + std::to_string(kQemuMinor) +
                            "'s names; a subset: docs/qmp.md)"}};
}

// QEMU's MigrationStatus for a Sender phase.
inline const char* status_of(migration::Phase p)
{
    switch (p) {
    case migration::Phase::Idle:
    case migration::Phase::Setup: return "setup";
    case migration::Phase::Bulk:
    case migration::Phase::Precopy: return "active";
    case migration::Phase::Postcopy: return "postcopy-active";
    case migration::Phase::Stop:
    case migration::Phase::Destination: return "device";
    case migration::Phase::Done: return "active";  // completed / failed / cancelled come from the report
    }
    return "active";
}

// The address of migrate / migrate-incoming: `uri`, or `channels` (one main
// channel: socket inet/unix/fd) as tcp:HOST:PORT, unix:PATH or fd:NAME; a
// QmpError with QEMU's wording when both, neither or an unsupported one.
std::string migration_uri(const Args& a);

inline int64_t ms(double v) { return static_cast<int64_t>(std::llround(v)); }

struct Monitor::Params {
    uint64_t max_bandwidth = 0;  // bytes/s, 0: unlimited
    uint64_t max_postcopy_bandwidth = 0;  // bytes/s in postcopy's background push, 0: unlimited (QEMU's)
    double downtime_limit_ms = 300;
    uint32_t multifd_channels = 2;
    migration::Compression compression;
    uint32_t throttle_initial = 20, throttle_increment = 10, throttle_max = 99;
    uint64_t dirty_limit_pages = 256;  // per vCPU, pages/s (vcpu-dirty-limit is MB/s: 256 pages per MiB)
    uint32_t dirty_limit_period_ms = 1000;  // QEMU's x-vcpu-dirty-limit-period: a setting (rates re-checked per harvest)
    uint32_t channels = 0;             // without multifd: the command line's --channels (0: one per virtual node)
    uint32_t max_iterations = 30;
    std::string zero_page_detection = "multifd";  // QEMU's default since 9.0
    double timeout_s = 120;
    bool verify = true;
    double post_run_s = 2;
    bool direct_io = false;  // mapped-ram's page writes with O_DIRECT
    std::string tls_creds, tls_hostname, tls_authz;  // object ids (object-add), "" none
};

// object-add's objects a migration uses (QEMU's tls-creds-psk, tls-creds-x509,
// authz-simple).
struct Monitor::QomObject {
    std::string type, endpoint, dir, username, identity;
    bool verify_peer = true;
};

struct Monitor::Capabilities {
    bool auto_converge = false, dirty_limit = false, multifd = false, events = false;
    bool postcopy_ram = false, postcopy_blocktime = false, pause_before_switchover = false;
    bool return_path = false, switchover_ack = false, validate_uuid = false, mapped_ram = false;
    bool postcopy_preempt = false;
    // Each one by QEMU's name, in query-migrate-capabilities' order.
    template <class F>
    void each(F f)
    {
        f("auto-converge", auto_converge);
        f("dirty-limit", dirty_limit);
        f("multifd", multifd);
        f("events", events);
        f("postcopy-ram", postcopy_ram);
        f("postcopy-blocktime", postcopy_blocktime);
        f("pause-before-switchover", pause_before_switchover);
        f("return-path", return_path);
        f("switchover-ack", switchover_ack);
        f("validate-uuid", validate_uuid);
        f("mapped-ram", mapped_ram);
        f("postcopy-preempt", postcopy_preempt);
    }
};

struct Monitor::DirtyRateJob {
    std::string status = "unstarted";  // unstarted | measuring | measured
    int64_t start_time = 0;            // seconds (CLOCK_REALTIME), as QEMU
    int64_t calc_time = 0;             // in calc_time_unit
    std::string unit = "second";
    uint64_t sample_pages = 512;
    std::string mode = "page-sampling";
    std::optional<engines::RateResult> result;
    std::string error;
};

}  // namespace mvm::qmp
