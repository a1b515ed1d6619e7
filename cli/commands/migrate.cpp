// minivmm migrate: boot the guest, let it dirty memory, live-migrate it.
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <fmt/format.h>
#include <thread>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "base/units.hpp"
#include "cli/command.hpp"
#include "cli/commands/link_options.hpp"
#include "migration/postcopy.hpp"
#include "cli/options.hpp"
#include "cli/output.hpp"
#include "cli/qmp/monitor.hpp"
#include "cli/qmp/options.hpp"
#include "cli/test_hooks.hpp"
#include "migration/file.hpp"
#include "migration/migrate.hpp"
#include "migration/transport/fault.hpp"
#include "numa/topology.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

using namespace mvm::migration;

// --throttle auto-converge | dirty-limit:PAGES_PER_S
void parse_throttle(const std::string& v, MigrateOptions& o)
{
    if (v.empty())
        return;
    if (v == "auto-converge")
        o.throttle = Throttle::AutoConverge;
    else if (v.rfind("dirty-limit:", 0) == 0) {
        o.throttle = Throttle::DirtyLimit;
        o.dirty_limit = parse_uint("--throttle dirty-limit:RATE", v.substr(12), 1, 1ull << 40);
    } else
        throw UsageError(fmt::format("--throttle: '{}' is not auto-converge or dirty-limit:PAGES_PER_S", v));
}

class Migrate : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("migrate", "boot the guest, let it dirty memory, live-migrate it (pre-copy "
                                                "rounds while it runs, stop-and-copy, resume on the destination), "
                                                "verify");
        vm_.add_to(*c);
        c->add_option("--to", to_, "inproc (a second VM here), tcp:HOST:PORT or unix:PATH (minivmm receive there), fd:N (a "
                                "connected socket this process inherited; one channel), or file:PATH[,offset=BYTES] "
                                "(restored later by receive --listen file:PATH or run --restore)");
        c->add_flag("--mapped-ram", mapped_ram_,
                    "with --to file: every page at a fixed place in the file, rewritten in place when dirtied again; "
                    "--channels N writers (QEMU's mapped-ram)");
        c->add_flag("--direct-io", direct_io_, "with --mapped-ram: write the pages with O_DIRECT (QEMU's direct-io)");
        c->add_option("--tracker", tracker_, "ring|bitmap")->capture_default_str();
        c->add_option("--ring", ring_, "with --tracker ring: bytes per vCPU ring (default 256K)");
        c->add_option("--max-downtime", max_downtime_, "ms the stop-and-copy may take at the measured bandwidth")
            ->capture_default_str();
        c->add_option("--bandwidth", bandwidth_, "cap in bytes/s, e.g. 100M (0 = unlimited)")->capture_default_str();
        c->add_option("--max-iterations", max_iterations_, "pre-copy rounds before stop-and-copy regardless")
            ->capture_default_str();
        c->add_option("--timeout", timeout_, "seconds before giving up (the source resumes)")->capture_default_str();
        c->add_option("--throttle", throttle_, "auto-converge or dirty-limit:PAGES_PER_S (per vCPU)");
        c->add_option("--warmup", warmup_, "seconds the guest runs before migrating")->capture_default_str();
        c->add_option("--post-run", post_run_,
                      "seconds the destination runs before its stamp check (and up to 5 s more until every vCPU "
                      "showed progress)")
            ->capture_default_str();
        c->add_option("--channels", channels_,
                      "connections (copy threads in-process); 0 = one per virtual node; more than the nodes: each "
                      "node's pages dealt to its channels by 2 MiB range (QEMU's multifd)")
            ->capture_default_str();
        c->add_option("--compress", compress_, "compress page data over TCP: none or zstd[:LEVEL] (level 1 default)")
            ->capture_default_str();
        c->add_flag("--no-verify", no_verify_, "skip the switchover compare and the destination stamp check");
        c->add_flag("--postcopy", postcopy_,
                    "when pre-copy does not converge, switch the guest over early and fetch the rest on demand "
                    "(userfaultfd; QEMU's postcopy-ram)");
        c->add_option("--postcopy-after", postcopy_after_,
                      "with --postcopy: start it after N pre-copy rounds; 0 = once the dirty rate stays above the "
                      "link rate or pre-copy runs out of rounds")
            ->capture_default_str();
        c->add_flag("--postcopy-preempt", postcopy_preempt_,
                    "with --postcopy: one more connection that carries only the pages the destination's faults ask "
                    "for, so they never queue behind the background push (QEMU's postcopy-preempt)");
        c->add_option("--postcopy-recover", postcopy_recover_,
                      "with --postcopy: a connection cut in postcopy pauses instead of losing the guest, and the "
                      "source connects to --to again every second for up to SECONDS (receive needs the same option); "
                      "0 = a cut loses the guest")
            ->capture_default_str();
        link_.add_to(*c, true);
        c->add_option("--json", json_, "also write the report as JSON to FILE, or - for stdout");
        qmp_.add_to(*c);
        return c;
    }

    int run() override
    {
        check_json_dest(json_);
        const std::optional<qmp::Address> qaddr = qmp_.address();
        MigrateOptions o = parse_options();
        check_destination(o.to);
        MachineConfig cfg = vm_.parse(numa::host_topology());  // bad input refused before /dev/kvm is opened
        Kvm kvm(kvm_device());
        check_host_resources(cfg, kvm);
        if (o.to == "inproc")
            check_room_for_second_vm(cfg, "--to inproc");
        if (o.tracker == dirty::Mode::Ring)
            cfg.dirty_ring_bytes = parse_ring_size("--ring", ring_.empty() ? "256K" : ring_, kvm);
        cfg.show_progress = o.progress = stderr_is_terminal();
        install_stop_signals();
        StressVm src(kvm, cfg);
        if (o.postcopy)
            if (auto why = migration::FaultServer::unsupported(src); !why.empty())
                throw UsageError("--postcopy: " + why);
        dirty::TrackerOptions to;
        to.mode = o.tracker;
        auto tracker = dirty::Tracker::create(src, to);
        src.start();
        // Warm up: every vCPU through its first pass, then --warmup seconds.
        auto t0 = std::chrono::steady_clock::now();
        src.wait_first_pass(std::chrono::minutes(5));
        while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < warmup_s_ &&
               !g_stop_signal.load())
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        if (auto f = src.failure())
            throw Error("the source guest failed before migrating: " + f->reason);
        if (!qaddr)
            return report(src, migrate(src, *tracker, o, &g_stop_signal, hooks_));
        // --qmp: the same migration, watched and steered over QMP (query-migrate,
        // migrate-set-parameters, migrate_cancel; quit cancels it).
        o.progress = false;
        qmp::Monitor mon("--qmp", *qaddr, src, qmp::Monitor::Role::Source);
        mon.set_source(tracker.get(), o, hooks_);
        qmp::serve(mon);
        try {
            mon.start_migration(o);
        } catch (const qmp::QmpError& e) {
            throw Error(e.what());
        }
        const std::optional<MigrateReport> r = mon.wait_migration();
        return report(src, *r);
    }

private:
    // Everything that needs no KVM.
    MigrateOptions parse_options()
    {
        MigrateOptions o;
        if (to_.empty())
            throw UsageError("--to is required: inproc, tcp:HOST:PORT, unix:PATH, fd:N or file:PATH");
        o.to = to_;
        const bool to_file = migration::parse_file_uri("--to", o.to).has_value();
        if (o.to != "inproc" && !to_file)
            parse_endpoint("--to", o.to);
        o.tracker = dirty::parse_mode_option("--tracker", tracker_, "tracker", "ring or bitmap");
        o.max_downtime_ms = parse_ms("--max-downtime", max_downtime_);
        o.bandwidth = parse_size_option("--bandwidth", bandwidth_);
        o.max_iterations = static_cast<uint32_t>(parse_uint("--max-iterations", max_iterations_, 1, 100000));
        o.timeout_s = parse_seconds("--timeout", timeout_);
        if (o.timeout_s <= 0)
            throw UsageError("--timeout: must be positive, e.g. 120");
        warmup_s_ = parse_seconds("--warmup", warmup_);
        o.post_run_s = parse_seconds("--post-run", post_run_);
        o.channels = static_cast<uint32_t>(parse_uint("--channels", channels_, 0, 64));
        if (o.to.rfind("fd:", 0) == 0 && o.channels > 1 && !(to_file && mapped_ram_))
            throw UsageError(fmt::format("--channels {}: --to {} is one connected socket, one channel; drop --channels "
                                         "or use tcp:/unix:",
                                         o.channels, o.to));
        o.compress = migration::Compression::parse("--compress", compress_);
        if (o.compress.zstd && o.to == "inproc")
            throw UsageError("--compress: applies to a TCP destination; in-process migration copies memory directly "
                             "(use --to tcp:HOST:PORT with minivmm receive)");
        o.verify = !no_verify_;
        o.io_timeout_s = link_.io_timeout_s();
        o.tls = link_.tls();
        o.postcopy = postcopy_;
        o.postcopy_after = static_cast<uint32_t>(parse_uint("--postcopy-after", postcopy_after_, 0, 100000));
        if (!postcopy_ && postcopy_after_ != "0")
            throw UsageError("--postcopy-after: only with --postcopy");
        o.postcopy_preempt = postcopy_preempt_;
        if (postcopy_preempt_ && !postcopy_)
            throw UsageError("--postcopy-preempt: only with --postcopy");
        if (postcopy_preempt_ && o.to.rfind("tcp:", 0) != 0 && o.to.rfind("unix:", 0) != 0)
            throw UsageError(fmt::format("--postcopy-preempt: --to {} has no room for a second connection; use "
                                         "tcp:HOST:PORT or unix:PATH",
                                         o.to));
        o.postcopy_recover_s = parse_seconds("--postcopy-recover", postcopy_recover_);
        if (o.postcopy_recover_s < 0)
            throw UsageError("--postcopy-recover: seconds must be 0 or more, e.g. 60");
        if (o.postcopy_recover_s > 0 && !postcopy_)
            throw UsageError("--postcopy-recover: only with --postcopy");
        if (o.postcopy_recover_s > 0 && o.to.rfind("tcp:", 0) != 0 && o.to.rfind("unix:", 0) != 0)
            throw UsageError(fmt::format("--postcopy-recover: --to {} cannot be connected to again; use "
                                         "tcp:HOST:PORT or unix:PATH",
                                         o.to));
        parse_file_target(o, to_file);
        if (o.tls.enabled()) {
            if (o.to == "inproc")
                throw UsageError("--tls-creds: applies to a TCP destination (--to tcp:HOST:PORT)");
            const auto ep = parse_endpoint("--to", o.to);
            migration::check_tls_over("--tls-creds", o.tls.creds, o.tls.hostname, ep);
            // The credentials are read and checked now, before the guest boots.
            migration::tls::Context::client(o.tls, ep.host);
        }
        hooks_ = test_hooks(o);
        parse_throttle(throttle_, o);
        if (!ring_.empty() && o.tracker != dirty::Mode::Ring)
            throw UsageError("--ring: only with --tracker ring");
        return o;
    }

    // --to file: (file.hpp): one way, nothing asks for pages, nothing to
    // encrypt on a wire; --mapped-ram and --direct-io belong to it.
    void parse_file_target(MigrateOptions& o, bool to_file) const
    {
        o.mapped_ram = mapped_ram_;
        o.direct_io = direct_io_;
        if (!to_file) {
            if (mapped_ram_ || direct_io_)
                throw UsageError(fmt::format("{}: only with --to file:PATH", mapped_ram_ ? "--mapped-ram" : "--direct-io"));
            return;
        }
        if (direct_io_ && !mapped_ram_)
            throw UsageError("--direct-io: needs --mapped-ram (O_DIRECT writes pages at fixed, aligned places)");
        if (o.postcopy)
            throw UsageError(fmt::format("--postcopy: --to {} is a file, with no return path for the pages the guest "
                                         "asks for; drop --postcopy",
                                         o.to));
        if (o.tls.enabled())
            throw UsageError(fmt::format("--tls-creds: --to {} is a file, not a connection; drop --tls-creds", o.to));
        if (o.channels > 1 && !mapped_ram_)
            throw UsageError(fmt::format("--channels {}: --to {} is one stream; more writers need --mapped-ram (as "
                                         "QEMU's multifd to a file)",
                                         o.channels, o.to));
        if (mapped_ram_ && o.compress.zstd)
            throw UsageError("--compress: --mapped-ram writes each page in place, uncompressed (as QEMU's); drop one");
        const auto f = migration::parse_file_uri("--to", o.to);
        if (f->fd < 0) {
            const size_t slash = f->path.rfind('/');
            const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : f->path.substr(0, slash);
            if (::access(dir.c_str(), W_OK) != 0)
                throw UsageError(fmt::format("--to {}: cannot write in {}: {}", o.to, dir, std::strerror(errno)));
        }
    }

    // A TCP destination must answer before the guest boots: one connection,
    // closed before its first byte (receive skips it), or one line and exit 1.
    static void check_destination(const std::string& to)
    {
        if (to == "inproc" || to.rfind("fd:", 0) == 0 || to.rfind("file:", 0) == 0)  // no connection to probe
            return;
        ::close(connect_endpoint(parse_endpoint("--to", to), std::chrono::steady_clock::now() + std::chrono::seconds(30)));
    }

    // Test hooks (cli/test_hooks.hpp): lose the destination in a phase, or damage the stream.
    static SenderHooks test_hooks(const MigrateOptions& o)
    {
        SenderHooks h;
        if (std::string phase = test_hook("FAIL_IN"); !phase.empty())
            h.at_fault_point = [phase](const char* p) {
                if (phase == p)
                    throw Error(fmt::format("destination lost during {} (test hook MINIVMM_TEST_FAIL_IN={})", p, p));
            };
        // A sender that stops (SIGSTOP itself) in a phase: the receiver's --io-timeout.
        if (std::string phase = test_hook("STOP_IN"); !phase.empty())
            h.at_fault_point = [phase](const char* p) {
                if (phase == p)
                    ::raise(SIGSTOP);
            };
        if (const std::string fault = test_hook("STREAM_FAULT"); !fault.empty()) {
            StreamFault f = parse_stream_fault(fault);
            if (o.to == "inproc")
                throw UsageError("MINIVMM_TEST_STREAM_FAULT needs a stream: use --to tcp:HOST:PORT");
            h.transport = std::make_shared<StreamFaultInjector>(f);
        }
        return h;
    }

    // Prints the report; after a failure, shows the source intact and running.
    int report(StressVm& src, const MigrateReport& r)
    {
        nlohmann::json j = r.to_json();
        // One failure, one message: the cause is the stderr line below, not
        // also the table's first line.
        std::string table = r.to_table(false);
        int rc = kExitOk;
        if (r.guest_lost) {
            src.kill();
            table += "source: parked for good: postcopy broke off, the destination lacks pages only this side "
                     "held; the guest is lost\n";
            j["source"] = {{"running", false}, {"state", r.source_state}};
            rc = g_stop_signal.load() ? 128 + g_stop_signal.load() : kExitGuestLost;
        } else if (r.status != "completed" && r.source_state == "parked") {
            // After the switchover the source stays parked: the guest was handed over.
            src.kill();
            StampCheck c = verify_stamps(src);
            table += fmt::format("source: {}; stamp check of its frozen memory {}\n", r.source_state, c.summary());
            j["source"] = {{"running", false}, {"state", r.source_state}, {"pages_checked", c.pages_checked},
                           {"mismatches", c.mismatches}};
            rc = g_stop_signal.load() ? 128 + g_stop_signal.load() : kExitMigration;
        } else if (r.status != "completed") {
            SourceCheck c = stop_and_check_source(src);
            table += fmt::format("source: {} ({}), stamp check {}\n", !c.running                      ? "NOT RUNNING"
                                 : r.source_state == "resumed" ? "resumed after the switchover"
                                                               : "kept running",
                                 c.running ? "made progress" : "no progress in 300 ms", c.stamps.summary());
            j["source"] = {{"running", c.running}, {"state", r.source_state}, {"pages_checked", c.stamps.pages_checked},
                           {"mismatches", c.stamps.mismatches}};
            rc = g_stop_signal.load() ? 128 + g_stop_signal.load() : kExitMigration;
        } else {
            src.kill();
        }
        fmt::print(table_stream(json_), "{}", table);
        if (!json_.empty())
            write_json(json_, j);
        if (rc == kExitMigration || rc == kExitGuestLost)
            fmt::print(stderr, "minivmm: migration {} in {}: {}{}\n", r.status, r.phase, r.error,
                       rc == kExitGuestLost ? " (the guest is lost: exit 7)" : "");
        return rc;
    }

    VmOptions vm_;
    LinkCliOptions link_;
    qmp::QmpOptions qmp_;
    SenderHooks hooks_;
    std::string to_, tracker_ = "bitmap", ring_, max_downtime_ = "300", bandwidth_ = "0", max_iterations_ = "30",
                     timeout_ = "120", throttle_, warmup_ = "1", post_run_ = "2", channels_ = "0", compress_ = "none", json_;
    bool no_verify_ = false, postcopy_ = false, postcopy_preempt_ = false, mapped_ram_ = false, direct_io_ = false;
    std::string postcopy_after_ = "0", postcopy_recover_ = "0";
    double warmup_s_ = 1;
};

}  // namespace

std::unique_ptr<Command> migrate_command() { return std::make_unique<Migrate>(); }

}  // namespace mvm::cli
