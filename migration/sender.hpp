// migration/sender.hpp - the sending side of a live migration, one phase at
// a time.
//
// A Sender owns the source while migrating: setup (destination opened,
// tracking on), a bulk pass, pre-copy rounds that harvest and send while
// the vCPUs run, stop-and-copy (guests parked, final harvest, guest_memfd
// slots whole, vCPU state), the switchover (resume on the destination, then
// verification against the parked source) and the destination's own check. Any failure turns tracking
// off and resumes the source, memory untouched (fail()). migrate()
// (migrate.hpp) drives the phases in order; a controller can drive them
// itself, reading phase() and rounds() and changing the bandwidth, the
// downtime limit or cancelling from another thread meanwhile.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "migration/channels.hpp"
#include "migration/destination.hpp"
#include "migration/report.hpp"
#include "migration/transport/tls.hpp"
#include "migration/transport/wrapper.hpp"
#include "vmm/dirty/tracker.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm {
class ProgressSampler;
}

namespace mvm::migration {

class PostcopySource;

enum class Throttle { None, AutoConverge, DirtyLimit };

struct MigrateOptions {
    std::string to = "inproc";        // "inproc", tcp:HOST:PORT, unix:PATH, fd:N, file:PATH[,offset=N]
    dirty::Mode tracker = dirty::Mode::Bitmap;
    double max_downtime_ms = 300;
    uint32_t max_iterations = 30;
    double timeout_s = 120;           // everything up to the switchover, blocked sends included
    double io_timeout_s = 30;         // a TCP destination: any wait on it without progress (0: none)
    tls::Options tls;                 // a TCP destination over TLS (--tls-creds, --tls-hostname)
    uint64_t bandwidth = 0;           // bytes/s; 0 = unlimited
    Throttle throttle = Throttle::None;
    uint64_t dirty_limit = 0;         // pages/s per vCPU (dirty-limit)
    // auto-converge: the idle share from pre-copy round 2, its step per round
    // and its cap, in % (QEMU's cpu-throttle-initial, -increment, max-cpu-throttle).
    uint32_t throttle_initial = 20, throttle_increment = 10, throttle_max = 99;
    bool verify = true;
    // The guest was stopped (QMP stop) before the migration: it is sent as it
    // stands, the destination keeps it paused until cont, and the source does
    // not wait for the destination's post-run check (that runs after cont).
    bool source_stopped = false;
    bool validate_uuid = false;       // QEMU's validate-uuid: the HEADER carries --uuid for the destination to check
    double post_run_s = 2;            // destination runs this long before its stamp check
    uint32_t channels = 0;            // 0: one per virtual node
    Compression compress;             // TCP only: PAGES_ZSTD frames
    // A file destination (file.hpp, QEMU's mapped-ram capability and
    // direct-io parameter): pages at fixed places, O_DIRECT page writes.
    bool mapped_ram = false, direct_io = false;
    // Postcopy (postcopy.hpp; QEMU's postcopy-ram capability): instead of a
    // forced stop-and-copy, switch the guest over early and fetch the rest on
    // demand. It starts after postcopy_after pre-copy rounds, or (0) once the
    // dirty rate stayed above the measured link rate for two harvests or
    // pre-copy ran out of rounds; a pre-copy that converges first completes
    // as pre-copy. start_postcopy() (QMP's migrate-start-postcopy) starts it
    // at the next round.
    bool postcopy = false;
    uint32_t postcopy_after = 0;
    bool postcopy_on_request = false;  // only start_postcopy() starts it (QMP, as QEMU)
    // The background push's bandwidth in postcopy, bytes/s (QEMU's
    // max-postcopy-bandwidth, 0 unlimited); unset: `bandwidth` goes on.
    // Requested pages are never paced.
    std::optional<uint64_t> postcopy_bandwidth;
    // The command line's postcopy recovery (migrate --postcopy-recover): a
    // cut in postcopy pauses, and the sender connects to `to` again every
    // second for this long (0: a cut loses the guest). QMP resumes on
    // migrate resume:true instead (SenderEvents::postcopy_paused).
    double postcopy_recover_s = 0;
    // Postcopy-preempt (QEMU's capability): one more connection that carries
    // only requested pages, so a fault's page never queues behind the
    // background push. Needs a remote destination.
    bool postcopy_preempt = false;
    bool progress = false;
};

// What a caller injects: the tests' faults (cli/test_hooks.hpp), later TLS.
struct SenderHooks {
    // Called at one point of bulk (before its pages go), of precopy (round 2,
    // after its harvest), of stop (the source parked, its last harvest
    // taken), at "switchover" (every page sent, nothing resumed yet) and of
    // destination (after the switchover) with that phase's name. Throwing there loses the destination:
    // it is aborted and the migration fails in that phase.
    std::function<void(const char* phase)> at_fault_point;
    // Put around every connection to a remote destination.
    std::shared_ptr<TransportWrapper> transport;
};

enum class Phase : uint8_t { Idle, Setup, Bulk, Precopy, Stop, Postcopy, Destination, Done };

// Told of a migration's progress, from the migrating thread (a monitor's
// events: QMP's MIGRATION, MIGRATION_PASS, STOP and RESUME). Each must be quick.
struct SenderEvents {
    std::function<void(Phase)> on_phase;           // every phase entered (Done: finished or failed)
    std::function<void(uint64_t sync)> on_sync;    // after each dirty-log harvest, numbered from 1
    std::function<void(bool running)> on_source;   // the source's vCPUs parked (false) or given back (true)
    // Pre-copy's end: the source parked, nothing of the last round sent yet.
    // May wait (QEMU's pause-before-switchover until migrate-continue); a
    // cancel meanwhile is honoured when it returns. Its wait is downtime.
    std::function<void()> before_switchover;
    // Postcopy recovery: a cut in postcopy pauses the migration (QEMU's
    // postcopy-paused) and this blocks until the address to resume on
    // (QMP's migrate resume:true, the CLI's --to again), "" to give up (the
    // guest is lost). Unset: a cut loses the guest.
    std::function<std::string(const std::string& why)> postcopy_paused;
    // Postcopy's states as QEMU names them: postcopy-paused,
    // postcopy-recover-setup, postcopy-recover, postcopy-active (again).
    std::function<void(const char* status)> on_postcopy_status;
};

// What a migration has done so far: what QMP's query-migrate reads while it
// runs. Cheap (a copy under a lock plus a few atomics) and never waits for a round.
struct LiveFigures {
    Phase phase = Phase::Idle;
    double elapsed_ms = 0;             // since the migration started
    double setup_ms = -1;              // once setup is done
    uint64_t transferred_bytes = 0;    // on the wire so far
    uint64_t sent_pages = 0, zero_pages = 0;
    uint64_t remaining_pages = 0;      // of the round being sent (the bulk pass: of all memory); 0 once sent
    uint64_t total_bytes = 0;          // guest memory (every memslot)
    double dirty_rate = 0;             // pages/s over the last harvest interval
    uint64_t dirty_syncs = 0;          // harvests so far
    double expected_downtime_ms = 0;   // the last harvest's dirty set at the measured bandwidth
    uint32_t throttle_pct = 0;         // auto-converge share in effect
    uint64_t dirty_limit = 0;          // dirty-limit cap in effect, pages/s per vCPU (0: none)
    double dirty_limit_cut_rate = 0;   // the highest rate (pages/s) a vCPU dirtied at when the cap cut it
    uint64_t precopy_bytes = 0;        // sent before the source parked
    uint64_t downtime_bytes = 0;       // sent while parked, before the destination ran
    uint64_t postcopy_bytes = 0;       // sent once the destination ran (postcopy)
    uint32_t rounds = 0;
};
// "idle", "setup", "bulk", "precopy", "stop", "postcopy", "destination", "done"
// (MigrateReport::phase names the phase a migration failed in).
const char* phase_name(Phase p);

// The configuration a migration ran with, and the host's kernel and KVM
// parameters (vmm/host_info.hpp: machine_echo(), host_echo()): every
// migrate JSON report carries it as "config".
nlohmann::json config_echo(const StressVm& src, const MigrateOptions& o, uint32_t channels);

class Sender {
public:
    // Throws UsageError when opt.to is neither inproc nor tcp:HOST:PORT.
    Sender(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel = nullptr,
           SenderHooks hooks = {}, SenderEvents events = {});
    ~Sender();
    Sender(const Sender&) = delete;
    Sender& operator=(const Sender&) = delete;

    // The phases, in this order. Each throws on failure; then call fail().
    // (A Sender left between phases leaves the source as it is.)
    void setup();          // the destination opened, dirty logging on
    void bulk();           // every tracked page once
    bool precopy_round();  // harvest and send; false: converged, out of rounds, or postcopy is due
    // Then either pre-copy's end:
    void stop_and_copy();  // park the source, send what is left, save the vCPUs
    void switchover();     // hand over, the destination resumes (downtime ends); logging off;
                           // then verify against the parked source (throws on a mismatch)
    // or postcopy's (when postcopy_due()):
    bool postcopy_due() const { return postcopy_due_; }
    void postcopy_switch();  // park the source, hand over the vCPUs and the pages to drop: the destination resumes
    void postcopy();         // push the rest, requested pages first; then logging off and verify (as switchover())
    void finish();         // the destination's check after it ran: completed, or throws (then fail())
    // After a phase threw: the source resumes as it was (tracking off,
    // throttles off, unparked and running); the report says why.
    void fail(const std::string& error);

    // Safe from any thread while the phases run.
    Phase phase() const { return phase_.load(); }
    uint32_t rounds() const { return rounds_.load(); }  // reported so far, the bulk pass included
    void set_bandwidth(uint64_t bytes_per_s) { channels_.set_bandwidth(bytes_per_s); }
    void set_max_downtime_ms(double ms) { max_downtime_ms_ = ms; }
    void cancel() { cancel_requested_ = true; }
    void start_postcopy() { postcopy_requested_ = true; }  // QMP's migrate-start-postcopy (needs opt.postcopy)
    // QMP's migrate-pause: cuts postcopy's connections as a network failure
    // would (postcopy-active or postcopy-recover); false: not in either.
    bool pause_postcopy();
    void set_postcopy_bandwidth(uint64_t bytes_per_s);  // QEMU's max-postcopy-bandwidth (0: unlimited)
    // "" outside postcopy, else postcopy-active, postcopy-paused,
    // postcopy-recover-setup or postcopy-recover.
    std::string postcopy_status() const;
    bool cancelled() const;
    LiveFigures live() const;

    // Complete once finish() or fail() returned.
    const MigrateReport& report() const { return rep_; }

private:
    using clock = std::chrono::steady_clock;

    void enter(Phase p);
    void require(std::initializer_list<Phase> ok, const char* step) const;
    void check_cancel() const;
    void fault_point(const char* phase);
    uint64_t send(ChannelPages per);  // kept in inflight_per_ while it is sent
    void account(const RoundReport& rr);
    void throttle(const dirty::Harvest& h, double prev_s, RoundReport& rr);
    void print_progress(const RoundReport& rr) const;
    std::vector<double> stop_sampler();
    [[noreturn]] void discard_destination(const std::string& why, const std::string& error);
    void park_source();
    dirty::Harvest park_and_harvest();
    ChannelPages final_pages(const dirty::Harvest& last);
    void save_state();
    void verify_after_resume();
    void give_back_source();
    // Round bookkeeping (migration/sender_figures.cpp).
    double harvested();  // seconds since the previous harvest; this one becomes the previous
    RoundReport begin_round(uint32_t round, const char* kind, clock::time_point start) const;
    void rate(RoundReport& rr, uint64_t dirty, double interval_s, uint64_t guest_dirty) const;
    uint64_t guest_dirty(const dirty::Harvest& a, const dirty::Harvest* b) const;
    double expected_downtime_ms(uint64_t dirty_pages) const;
    void begin_send(const RoundReport& rr, uint64_t pages);
    void end_send();
    void synced(uint64_t dirty_pages, double interval_s);
    void count_failure();
    void fill_rates();
    void start_series();
    void stop_series();

    StressVm& src_;
    dirty::Tracker& tracker_;
    const MigrateOptions opt_;
    const std::atomic<int>* cancel_signal_;
    SenderHooks hooks_;
    SenderEvents events_;
    const clock::time_point t0_;
    PageChannels channels_;
    std::unique_ptr<Destination> dest_;
    std::unique_ptr<ProgressSampler> sampler_;
    std::unique_ptr<ProgressSampler> series_;  // 100 Hz, kept: the report's guest_progress
    double series_offset_ms_ = 0;
    MigrateReport rep_;

    std::atomic<Phase> phase_{Phase::Idle};
    std::atomic<uint32_t> rounds_{0};
    std::atomic<double> max_downtime_ms_;
    std::atomic<bool> cancel_requested_{false};
    std::atomic<bool> postcopy_requested_{false};
    bool postcopy_due_ = false, postcopy_done_ = false;
    uint32_t above_link_ = 0;  // consecutive harvests whose dirty rate exceeded the link rate
    ChannelPages postcopy_pages_;
    clock::time_point postcopy_resumed_, postcopy_start_;
    // Postcopy's threads: a pusher per channel and the return path.
    std::unique_ptr<PostcopySource> pcs_;
    std::vector<std::thread> pushers_;
    std::thread return_path_;
    std::atomic<bool> pc_stop_{false};
    std::mutex pc_mu_;
    std::exception_ptr pc_err_;
    uint64_t pc_bytes0_ = 0;
    bool counted_ = false;
    void start_pushing();
    void launch_pushers();
    void push(uint32_t c, bool hook);
    void push_urgent();
    void pace_postcopy(uint32_t c, uint64_t bytes);
    void pushing_failed(std::exception_ptr e);
    std::exception_ptr push_and_end(ResultRecord& done);
    bool recover_after(std::exception_ptr cut);
    void set_pc_status(int s);
    void join_pushing();
    // Postcopy's state (postcopy_status()): 0 none, 1 active, 2 paused, 3 recover-setup, 4 recover.
    std::atomic<int> pc_status_{0};
    bool pc_launched_ = false;  // the tests' fault point fires in the first pushers only
    std::atomic<uint64_t> pc_bw_{0};
    std::atomic<bool> pc_bw_set_{false};
    std::mutex pc_pace_mu_;
    clock::time_point pc_paced_since_;
    uint64_t pc_paced_bytes_ = 0;
    bool check_postcopy_due(uint64_t dirty_pages, double interval_s);
    void handed_over();
    bool tracking_ = false, parked_ = false, switched_over_ = false;
    bool destination_discarded_ = false;  // it stopped and dropped its copy after the switchover: the source may resume
    // Pre-copy: the bandwidth measured so far, the next round, the throttle
    // in effect and the harvest that ended it (sent at stop-and-copy).
    uint64_t precopy_bytes_ = 0;
    double precopy_s_ = 0, bw_ = 0;
    uint32_t round_ = 1, throttle_pct_ = 0;
    double dirty_limit_cut_rate_ = 0;
    std::optional<dirty::Harvest> pending_;
    // Harvest intervals, the round being sent (for a failure's true counts).
    clock::time_point last_harvest_, bulk_start_;
    double pending_interval_s_ = 0;
    uint64_t tracked_pages_ = 0;
    bool inflight_ = false;
    RoundReport inflight_round_;
    ChannelPages inflight_per_;
    uint64_t inflight_pages_ = 0, inflight_sent_pages_ = 0, inflight_sent_bytes_ = 0;
    clock::time_point inflight_start_;
    // Stop-and-copy.
    clock::time_point tdown_;
    uint64_t final_bytes_ = 0;
    std::vector<VcpuState> states_;
    // What live() reads: updated by the migrating thread at each step.
    mutable std::mutex live_mu_;
    LiveFigures live_;
    uint64_t live_round_pages_ = 0, live_round_base_ = 0;  // the round being sent, sent_pages() when it began
    bool live_inflight_ = false;
    // sent_bytes() when the source parked and when the destination resumed
    // in postcopy (max: not yet): live() splits transferred by them.
    std::atomic<uint64_t> park_mark_{UINT64_MAX}, resume_mark_{UINT64_MAX};
    void publish(const std::function<void(LiveFigures&)>& f);
};

}  // namespace mvm::migration
