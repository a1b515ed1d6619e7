// minivmm - command line. Each command validates every option before it
// creates anything; bad input is one line on stderr and exit code 2.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "vmm/cli/options.hpp"
#include "vmm/host_info.hpp"
#include "vmm/kvm/error.hpp"
#include "vmm/kvm/kvm.hpp"
#include "migration/dirty/perf.hpp"
#include "migration/dirty/rate.hpp"
#include "migration/lockup.hpp"
#include "migration/migrate.hpp"
#include "vmm/machine.hpp"
#include "vmm/numa_check.hpp"
#include "vmm/report.hpp"
#include "vmm/runner.hpp"
#include "vmm/units.hpp"

using namespace mvm;

namespace {

void write_json(const std::string& dest, const nlohmann::json& j)
{
    if (dest == "-") {
        fmt::print("{}\n", j.dump(2));
        return;
    }
    std::ofstream f(dest);
    if (!f)
        throw UsageError(fmt::format("--json: cannot write '{}': {}", dest, errno_text(errno)));
    f << j.dump(2) << "\n";
}

// An output file (--json, --timeline) must be writable before a guest is
// booted for it. Checked without opening it: bad input must neither create
// the file nor touch one that is there.
void check_output_path(std::string_view option, const std::string& dest, std::string_view fix)
{
    if (dest.empty())
        return;
    struct stat st {};
    int err = 0;
    if (::stat(dest.c_str(), &st) == 0) {
        if (S_ISDIR(st.st_mode))
            err = EISDIR;
        else if (::access(dest.c_str(), W_OK) != 0)
            err = errno;
    } else if (errno != ENOENT) {
        err = errno;
    } else {
        const auto slash = dest.rfind('/');
        const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : dest.substr(0, slash);
        if (::access(dir.c_str(), W_OK | X_OK) != 0)
            err = errno;
    }
    if (err)
        throw UsageError(fmt::format("{}: cannot write '{}': {}; {}", option, dest, errno_text(err), fix));
}

void check_json_dest(const std::string& dest)
{
    if (dest != "-")
        check_output_path("--json", dest, "give a writable path or - for stdout");
}

// receive binds --listen only once the guest's memory is ready: a bad or busy
// address is found here, before anything is allocated.
void check_listen_address(const std::string& listen) { ::close(migration::bind_listener(listen)); }

// The KVM device; MINIVMM_KVM_DEVICE overrides it (tests use it to show the
// message a host without KVM gets).
std::string kvm_device()
{
    const char* dev = std::getenv("MINIVMM_KVM_DEVICE");
    return dev && *dev ? dev : "/dev/kvm";
}

int cmd_caps(bool json)
{
    Kvm kvm(kvm_device());
    auto info = host_info(kvm);
    if (json)
        fmt::print("{}\n", info.dump(2));
    else
        fmt::print("{}", host_info_table(info));
    return kExitOk;
}

struct RunArgs {
    cli::VmOptions vm;
    std::string duration = "3";
    std::string json;
    bool no_verify = false;
    std::string dirty_log, ring, harvest_ms = "100";
};

// run --dirty-log: what the harvests of a whole run added up to.
struct DirtyLogStats {
    std::string mode;
    uint64_t harvests = 0, dirty_pages = 0, max_dirty = 0, ring_full = 0, entries = 0, reset = 0;
    double harvest_s = 0, max_harvest_s = 0, enable_s = 0, disable_s = 0;
    std::vector<std::pair<uint32_t, std::string>> untracked;
    void add(const dirty::Harvest& h)
    {
        harvests++;
        dirty_pages += h.dirty_pages;
        max_dirty = std::max(max_dirty, h.dirty_pages);
        ring_full += h.ring_full_harvests;
        entries += h.entries;
        reset += h.reset;
        const double t = h.sync_s + h.get_s + h.clear_s;
        harvest_s += t;
        max_harvest_s = std::max(max_harvest_s, t);
    }
    std::string table() const
    {
        std::string o = fmt::format("\ndirty log ({}): enabled in {:.3f} ms, {} harvests, {} dirty pages ({} per "
                                    "harvest at most), harvest mean {:.3f} ms max {:.3f} ms, disabled in {:.3f} ms\n",
                                    mode, enable_s * 1e3, harvests, dirty_pages, max_dirty,
                                    harvests ? harvest_s / static_cast<double>(harvests) * 1e3 : 0.0, max_harvest_s * 1e3,
                                    disable_s * 1e3);
        if (mode == "ring")
            o += fmt::format("ring: {} entries collected, {} reset, {} ring-full exits harvested on vCPU threads\n",
                             entries, reset, ring_full);
        for (const auto& [slot, why] : untracked)
            o += fmt::format("slot {} not tracked: {}\n", slot, why);
        return o;
    }
    nlohmann::json json() const
    {
        return {{"mode", mode},           {"enable_s", enable_s},       {"disable_s", disable_s},
                {"harvests", harvests},   {"dirty_pages", dirty_pages}, {"max_dirty_pages_per_harvest", max_dirty},
                {"harvest_s", harvest_s}, {"max_harvest_s", max_harvest_s}, {"ring_entries", entries},
                {"ring_reset", reset},    {"ring_full_harvests", ring_full}};
    }
};

int cmd_run(const RunArgs& a)
{
    double duration = cli::parse_seconds("--duration", a.duration);
    check_json_dest(a.json);
    Kvm kvm(kvm_device());
    MachineConfig cfg = a.vm.to_config(kvm);
    if (duration <= 0 && cfg.workload.max_passes == 0)
        throw UsageError("--duration: must be positive unless --passes is given");
    std::optional<dirty::Mode> log_mode;
    double harvest_ms = 100;
    if (!a.dirty_log.empty()) {
        if (a.dirty_log == "ring")
            log_mode = dirty::Mode::Ring;
        else if (a.dirty_log == "bitmap")
            log_mode = dirty::Mode::Bitmap;
        else
            throw UsageError(fmt::format("--dirty-log: unknown mode '{}'; use bitmap or ring", a.dirty_log));
        harvest_ms = cli::parse_seconds("--harvest-ms", a.harvest_ms);
        if (harvest_ms <= 0)
            throw UsageError("--harvest-ms: must be positive, e.g. 100");
        if (*log_mode == dirty::Mode::Ring)
            cfg.dirty_ring_bytes = cli::parse_ring_size("--ring", a.ring.empty() ? "64K" : a.ring, kvm);
    }
    if (!a.ring.empty() && log_mode != dirty::Mode::Ring)
        throw UsageError("--ring: only with --dirty-log ring");
    install_stop_signals();
    cfg.show_progress = ::isatty(STDERR_FILENO);
    Machine m(kvm, cfg);
    RunOptions opt;
    opt.duration_s = duration;
    opt.progress = ::isatty(STDERR_FILENO);
    opt.verify = !a.no_verify;
    std::unique_ptr<dirty::Tracker> tracker;
    DirtyLogStats dls;
    double last = 0;  // outlives the tick callback below (ASan found it scoped to the if)
    if (log_mode) {
        dirty::TrackerOptions to;
        to.mode = *log_mode;
        to.ring_soft_limit = *log_mode == dirty::Mode::Ring ? cfg.dirty_ring_bytes / 16 / 2 : 0;
        tracker = dirty::Tracker::create(m, to);
        dls.mode = dirty::mode_name(*log_mode);
        dls.untracked = tracker->untracked_slots();
        dls.enable_s = tracker->enable().wall_s;
        // The runner's thread harvests (never a vCPU thread, except at ring-full).
        opt.on_tick = [&](double t) {
            tracker->poll();
            if ((t - last) * 1000 >= harvest_ms) {
                dls.add(tracker->harvest());
                last = t;
            }
        };
        opt.tick_ms = std::min(100.0, harvest_ms);
    }
    RunReport r = run_workload(m, opt);
    if (tracker) {
        dls.add(tracker->harvest());
        dls.disable_s = tracker->disable().wall_s;
    }
    nlohmann::json j = to_json(r);
    std::string table = to_table(r);
    if (tracker) {
        j["dirty_log"] = dls.json();
        table += dls.table();
    }
    if (a.json == "-") {
        fmt::print(stderr, "{}", table);
        write_json(a.json, j);
    } else {
        fmt::print("{}", table);
        if (!a.json.empty())
            write_json(a.json, j);
    }
    if (r.failure || (r.stamps && !r.stamps->ok()))
        return kExitFailure;
    if (r.interrupted)
        return 128 + g_stop_signal.load();
    return kExitOk;
}

struct NumaCheckArgs {
    cli::VmOptions vm;
    std::string json;
    std::string sample = "0";
    std::string expect_nodes;  // test hook
};

int cmd_numa_check(const NumaCheckArgs& a)
{
    check_json_dest(a.json);
    NumaCheckOptions opt;
    opt.sample_pages = cli::parse_uint("--sample", a.sample, 0, 1ull << 40);
    if (!a.expect_nodes.empty()) {
        try {
            opt.expect_override = numa::parse_cpu_list(a.expect_nodes);
        } catch (const std::exception&) {
            throw UsageError(fmt::format("--expect-host-nodes: '{}' is not a node list like 0-1", a.expect_nodes));
        }
    }
    Kvm kvm(kvm_device());
    MachineConfig cfg = a.vm.to_config(kvm);
    // One pass that writes every page: each page then exists where it was faulted.
    cfg.workload.max_passes = 1;
    cfg.workload.write_pct = 100;
    cfg.show_progress = ::isatty(STDERR_FILENO);
    opt.progress = cfg.show_progress;
    install_stop_signals();
    Machine m(kvm, cfg);
    NumaCheckReport r = numa_check(m, opt);
    std::FILE* table_out = a.json == "-" ? stderr : stdout;
    fmt::print(table_out, "{}", to_table(r));
    if (!a.json.empty())
        write_json(a.json, to_json(r));
    if (r.failure || (r.stamps && !r.stamps->ok()))
        return kExitFailure;
    if (r.interrupted)
        return 128 + g_stop_signal.load();
    if (!r.placement_ok()) {
        fmt::print(stderr, "minivmm: misplaced memory: {}\n", r.first_offender());
        return kExitMisplaced;
    }
    return kExitOk;
}

struct MigrateArgs {
    cli::VmOptions vm;
    std::string to, tracker = "bitmap", ring, max_downtime = "300", bandwidth = "0", max_iterations = "30",
                     timeout = "120", throttle, warmup = "1", post_run = "2", channels = "0", json, fail_in,
                     stream_fault;
    bool no_verify = false;
};

int cmd_migrate(const MigrateArgs& a)
{
    using namespace mvm::migration;
    check_json_dest(a.json);
    MigrateOptions o;
    if (a.to.empty())
        throw UsageError("--to is required: inproc or tcp:HOST:PORT");
    o.to = a.to;
    if (o.to != "inproc")
        parse_tcp("--to", o.to);
    if (a.tracker == "ring")
        o.tracker = dirty::Mode::Ring;
    else if (a.tracker != "bitmap")
        throw UsageError(fmt::format("--tracker: unknown tracker '{}'; use ring or bitmap", a.tracker));
    o.max_downtime_ms = cli::parse_seconds("--max-downtime", a.max_downtime);
    o.bandwidth = parse_size_option("--bandwidth", a.bandwidth == "0" ? "0" : a.bandwidth);
    o.max_iterations = static_cast<uint32_t>(cli::parse_uint("--max-iterations", a.max_iterations, 1, 100000));
    o.timeout_s = cli::parse_seconds("--timeout", a.timeout);
    if (o.timeout_s <= 0)
        throw UsageError("--timeout: must be positive, e.g. 120");
    const double warmup = cli::parse_seconds("--warmup", a.warmup);
    o.post_run_s = cli::parse_seconds("--post-run", a.post_run);
    o.channels = static_cast<uint32_t>(cli::parse_uint("--channels", a.channels, 0, 64));
    o.verify = !a.no_verify;
    o.fail_in = a.fail_in;
    if (!a.stream_fault.empty()) {
        parse_stream_fault(a.stream_fault);
        if (o.to == "inproc")
            throw UsageError("--stream-fault needs a stream: use --to tcp:HOST:PORT");
        o.stream_fault = a.stream_fault;
    }
    if (!a.throttle.empty()) {
        if (a.throttle == "auto-converge")
            o.throttle = Throttle::AutoConverge;
        else if (a.throttle.rfind("dirty-limit:", 0) == 0) {
            o.throttle = Throttle::DirtyLimit;
            o.dirty_limit = cli::parse_uint("--throttle dirty-limit:RATE", a.throttle.substr(12), 1, 1ull << 40);
        } else
            throw UsageError(fmt::format("--throttle: '{}' is not auto-converge or dirty-limit:PAGES_PER_S", a.throttle));
    }
    if (!a.ring.empty() && o.tracker != dirty::Mode::Ring)
        throw UsageError("--ring: only with --tracker ring");
    Kvm kvm(kvm_device());
    MachineConfig cfg = a.vm.to_config(kvm);
    if (o.tracker == dirty::Mode::Ring)
        cfg.dirty_ring_bytes = cli::parse_ring_size("--ring", a.ring.empty() ? "256K" : a.ring, kvm);
    cfg.show_progress = o.progress = ::isatty(STDERR_FILENO);
    install_stop_signals();
    Machine src(kvm, cfg);
    dirty::TrackerOptions to;
    to.mode = o.tracker;
    auto tracker = dirty::Tracker::create(src, to);
    src.start();
    // Warm up: every vCPU through its first pass, then --warmup seconds.
    auto t0 = std::chrono::steady_clock::now();
    src.wait_first_pass(std::chrono::minutes(5));
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < warmup && !g_stop_signal.load())
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (auto f = src.failure())
        throw Error("the source guest failed before migrating: " + f->reason);
    MigrateReport r = migrate(src, *tracker, o, &g_stop_signal);
    nlohmann::json j = r.to_json();
    std::string table = r.to_table();
    int rc = kExitOk;
    if (r.status != "completed") {
        // The source kept its guest: show that it is intact and still running.
        const uint64_t before = src.snapshot(0).pages_written;
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        const bool running = src.snapshot(0).pages_written > before || src.snapshot(0).state == MVM_STATE_DONE;
        src.request_stop();
        if (!src.wait_finished(std::chrono::seconds(10)))
            src.kill();
        StampCheck c = verify_stamps(src);
        table += fmt::format("source: kept running ({}), stamp check {}\n", running ? "made progress" : "NO PROGRESS",
                             c.summary());
        j["source"] = {{"running", running}, {"pages_checked", c.pages_checked}, {"mismatches", c.mismatches}};
        rc = g_stop_signal.load() ? 128 + g_stop_signal.load() : kExitMigration;
    } else {
        src.kill();
    }
    std::FILE* out = a.json == "-" ? stderr : stdout;
    fmt::print(out, "{}", table);
    if (!a.json.empty())
        write_json(a.json, j);
    if (rc == kExitMigration)
        fmt::print(stderr, "minivmm: migration {} in {}: {}\n", r.status, r.phase, r.error);
    return rc;
}

struct ReceiveArgs {
    cli::VmOptions vm;
    std::string listen, post_run = "2", timeout = "300", json, die_in;
    bool no_prealloc = false;
};

int cmd_receive(const ReceiveArgs& a)
{
    using namespace mvm::migration;
    check_json_dest(a.json);
    ReceiveOptions o;
    if (a.listen.empty())
        throw UsageError("--listen is required: tcp:ADDR:PORT, e.g. tcp:0.0.0.0:4444");
    check_listen_address(a.listen);
    o.listen = a.listen;
    o.post_run_s = cli::parse_seconds("--post-run", a.post_run);
    o.accept_timeout_s = cli::parse_seconds("--timeout", a.timeout);
    if (o.accept_timeout_s <= 0)
        throw UsageError("--timeout: must be positive, e.g. 300");
    o.die_in = a.die_in;
    Kvm kvm(kvm_device());
    MachineConfig cfg = a.vm.to_config(kvm);
    // Populate the memory before the sender connects, so the copy does not
    // fault page by page while the guest is stopped.
    if (!a.no_prealloc)
        for (auto& n : cfg.nodes)
            n.prealloc = true;
    cfg.show_progress = ::isatty(STDERR_FILENO);
    Machine dst(kvm, cfg);
    ReceiveReport r = receive(dst, o);
    std::FILE* out = a.json == "-" ? stderr : stdout;
    fmt::print(out, "receive {}: {} pages ({} zero, {}){}\n", r.status, r.pages, r.zero_pages,
               human_bytes(static_cast<double>(r.bytes)), r.error.empty() ? "" : "; " + r.error);
    if (!r.stamp_summary.empty())
        fmt::print(out, "destination stamp check: {}\n", r.stamp_summary);
    if (!a.json.empty())
        write_json(a.json, r.to_json());
    if (r.status != "completed") {
        fmt::print(stderr, "minivmm: receive failed: {}\n", r.error);
        return kExitMigration;
    }
    return kExitOk;
}

struct LockupArgs {
    cli::VmOptions vm;
    std::string variants, threshold = "20", steady = "0.5", logging = "2", harvest_ms = "100", clear_chunk = "1M",
                          ring = "64K", json, timeline, test_pause;
    bool variants_given = false;  // even as --variants ''
};

int cmd_lockup(const LockupArgs& a)
{
    using namespace mvm::migration;
    check_json_dest(a.json);
    LockupOptions o;
    if (a.variants_given) {
        o.variants.clear();
        std::string v = a.variants;
        for (size_t pos = 0; pos <= v.size();) {
            size_t c = v.find(',', pos);
            std::string name = v.substr(pos, c == std::string::npos ? std::string::npos : c - pos);
            pos = c == std::string::npos ? v.size() + 1 : c + 1;
            const auto& known = lockup_variant_names();
            if (std::find(known.begin(), known.end(), name) == known.end()) {
                std::string list;
                for (const auto& k : known)
                    list += (list.empty() ? "" : ",") + k;
                throw UsageError(fmt::format("--variants: unknown variant '{}'; use some of {}", name, list));
            }
            if (std::find(o.variants.begin(), o.variants.end(), name) != o.variants.end())
                throw UsageError(fmt::format("--variants: '{}' is listed twice; list each variant once", name));
            o.variants.push_back(name);
        }
    }
    o.threshold_ms = cli::parse_seconds("--threshold-ms", a.threshold);
    if (o.threshold_ms <= 0)
        throw UsageError("--threshold-ms: must be positive, e.g. 20");
    o.steady_s = cli::parse_seconds("--steady", a.steady);
    o.logging_s = cli::parse_seconds("--logging", a.logging);
    o.harvest_ms = cli::parse_seconds("--harvest-ms", a.harvest_ms);
    if (o.harvest_ms <= 0)
        throw UsageError("--harvest-ms: must be positive, e.g. 100");
    o.clear_chunk_bytes = parse_size_option("--clear-chunk", a.clear_chunk);
    if (o.clear_chunk_bytes < 256 * 1024 || o.clear_chunk_bytes % (256 * 1024))
        throw UsageError(fmt::format("--clear-chunk {}: must be a multiple of 256K, e.g. 1M", a.clear_chunk));
    if (!a.test_pause.empty())
        o.test_pause_ms = cli::parse_seconds("--test-pause-ms", a.test_pause);
    check_output_path("--timeline", a.timeline, "give a writable path for the CSV");
    Kvm kvm(kvm_device());
    o.ring_bytes = cli::parse_ring_size("--ring", a.ring, kvm);
    MachineConfig cfg = a.vm.to_config(kvm);
    cfg.workload.watchdog_ms = o.threshold_ms;
    cfg.show_progress = o.progress = ::isatty(STDERR_FILENO);
    o.keep_samples = !a.timeline.empty();
    LockupReport r = run_lockup(kvm, cfg, o);
    std::FILE* out = a.json == "-" ? stderr : stdout;
    fmt::print(out, "{}", r.to_table());
    if (!a.timeline.empty()) {
        r.write_timeline(a.timeline);
        fmt::print(out, "timeline written to {} (plot it with scripts/plot-timeline {})\n", a.timeline, a.timeline);
    }
    if (!a.json.empty())
        write_json(a.json, r.to_json());
    return kExitOk;
}

struct DirtyRateArgs {
    cli::VmOptions vm;
    std::string mode = "bitmap", period = "1", warmup = "0.5", ring, sample = "512", json;
};

int cmd_dirty_rate(const DirtyRateArgs& a)
{
    using namespace mvm::dirty;
    check_json_dest(a.json);
    RateOptions o;
    if (a.mode == "ring")
        o.mode = RateMode::Ring;
    else if (a.mode == "bitmap")
        o.mode = RateMode::Bitmap;
    else if (a.mode == "sampling")
        o.mode = RateMode::Sampling;
    else
        throw UsageError(fmt::format("--mode: unknown mode '{}'; use ring, bitmap or sampling", a.mode));
    o.period_s = cli::parse_seconds("--period", a.period);
    if (o.period_s <= 0)
        throw UsageError("--period: must be positive, e.g. 1");
    o.warmup_s = cli::parse_seconds("--warmup", a.warmup);
    o.sample_pages_per_gib = cli::parse_uint("--sample-pages", a.sample, 1, 1u << 18);
    if (!a.ring.empty() && o.mode != RateMode::Ring)
        throw UsageError("--ring: only with --mode ring");
    Kvm kvm(kvm_device());
    MachineConfig cfg = a.vm.to_config(kvm);
    if (o.mode == RateMode::Ring)
        cfg.dirty_ring_bytes = cli::parse_ring_size("--ring", a.ring.empty() ? "64K" : a.ring, kvm);
    cfg.show_progress = o.progress = ::isatty(STDERR_FILENO);
    install_stop_signals();
    Machine m(kvm, cfg);
    RateResult r = measure_dirty_rate(m, o);
    std::FILE* out = a.json == "-" ? stderr : stdout;
    fmt::print(out, "{}", to_table(r));
    if (!a.json.empty())
        write_json(a.json, to_json(r));
    return m.failure() ? kExitFailure : kExitOk;
}

struct DirtyLogPerfArgs {
    std::string vcpus = "1", bytes = "1G", iterations = "2", write_pct = "100", slots = "1", backing = "anon";
    bool random = false, no_manual = false, no_initially_set = false;
    std::string ring, clear_chunk, eager_split, json;
};

int cmd_dirty_log_perf(const DirtyLogPerfArgs& a)
{
    using namespace mvm::dirty;
    check_json_dest(a.json);
    PerfOptions o;
    o.vcpus = static_cast<uint32_t>(cli::parse_uint("-v", a.vcpus, 1, 1024));
    o.bytes_per_vcpu = parse_size_option("-b", a.bytes);
    o.iterations = static_cast<uint32_t>(cli::parse_uint("-i", a.iterations, 1, 1000000));
    o.write_pct = static_cast<uint32_t>(cli::parse_uint("-w", a.write_pct, 0, 100));
    o.slots = static_cast<uint32_t>(cli::parse_uint("-x", a.slots, 1, 32000));
    o.random = a.random;
    o.backing = cli::parse_backing_option("-s", a.backing);
    if (o.backing == BackingKind::Gmem)
        throw UsageError("-s gmem: guest_memfd slots cannot be dirty-logged; use anon, thp, shm, hugetlb2m or hugetlb1g");
    o.manual_protect = !a.no_manual;
    o.initially_set = !a.no_initially_set;
    if (!a.clear_chunk.empty()) {
        o.clear_chunk_bytes = parse_size_option("--clear-chunk", a.clear_chunk);
        if (o.clear_chunk_bytes < 64 * 4096 || o.clear_chunk_bytes % (64 * 4096))
            throw UsageError(fmt::format("--clear-chunk {}: must be a multiple of 256K (64 pages, KVM_CLEAR_DIRTY_LOG's "
                                         "granule), e.g. 1M",
                                         a.clear_chunk));
        if (a.no_manual)
            throw UsageError("--clear-chunk needs manual protection (KVM_CLEAR_DIRTY_LOG); drop -g");
    }
    if (!a.eager_split.empty()) {
        if (a.eager_split != "on" && a.eager_split != "off")
            throw UsageError(fmt::format("--eager-split: '{}' is not on or off", a.eager_split));
        o.eager_split = a.eager_split == "on";
    }
    Kvm kvm(kvm_device());
    if (!a.ring.empty()) {
        o.ring_bytes = cli::parse_ring_size("--ring", a.ring, kvm);
        if (a.no_manual || !a.clear_chunk.empty())
            throw UsageError("--ring: -g and --clear-chunk are bitmap options; drop them with --ring");
    }
    o.progress = ::isatty(STDERR_FILENO);
    // The same checks as every VM: vCPU limit, memory, hugetlb pools.
    MachineConfig probe = single_node_config(o.vcpus, o.bytes_per_vcpu * o.vcpus, o.backing);
    probe.nodes[0].origin = "-b";
    probe.slots_per_node = o.slots;
    validate_config(probe, numa::host_topology());
    check_host_resources(probe, kvm);
    install_stop_signals();
    PerfResult r = run_dirty_log_perf(kvm, o);
    std::FILE* out = a.json == "-" ? stderr : stdout;
    fmt::print(out, "{}", to_text(r));
    if (!a.json.empty())
        write_json(a.json, to_json(r));
    if (r.failure || (r.stamps && !r.stamps->ok()))
        return kExitFailure;
    return kExitOk;
}

}  // namespace

int main(int argc, char** argv)
{
    spdlog::set_pattern("%^%l%$: %v");
    spdlog::set_level(spdlog::level::warn);
    CLI::App app{"minivmm - a small VMM for dirty-rate, vNUMA placement and soft-lockup experiments on /dev/kvm"};
    app.require_subcommand(1);
    app.set_help_all_flag("--help-all", "help for every command");
    bool verbose = false;
    app.add_flag("-v,--verbose", verbose, "debug logging");

    bool caps_json = false;
    auto* caps = app.add_subcommand("caps", "the host as minivmm sees it: KVM capabilities, module parameters, "
                                            "THP, hugetlb pools, NUMA");
    caps->add_flag("--json", caps_json, "JSON instead of a table");

    RunArgs run;
    auto* runc = app.add_subcommand("run", "boot the stress guest, dirty memory, report");
    run.vm.add_to(*runc);
    runc->add_option("--duration", run.duration, "seconds to run")->capture_default_str();
    runc->add_option("--json", run.json, "also write the report as JSON to FILE, or - for stdout");
    runc->add_flag("--no-verify", run.no_verify, "skip the stamp check after the run");
    runc->add_option("--dirty-log", run.dirty_log, "keep dirty logging on for the whole run: bitmap|ring");
    runc->add_option("--ring", run.ring, "with --dirty-log ring: bytes per vCPU ring (default 64K)");
    runc->add_option("--harvest-ms", run.harvest_ms, "with --dirty-log: harvest period in ms")->capture_default_str();

    NumaCheckArgs nc;
    auto* ncc = app.add_subcommand("numa-check", "boot the VM, write every page once, then report where each virtual "
                                                 "node's memory landed on the host (exit 3 if off-policy)");
    nc.vm.add_to(*ncc);
    ncc->add_option("--json", nc.json, "also write the report as JSON to FILE, or - for stdout");
    ncc->add_option("--sample", nc.sample, "query at most this many pages per node, spread evenly (0 = every page)")
        ->capture_default_str();
    ncc->add_option("--expect-host-nodes", nc.expect_nodes, "test hook: judge placement against these host nodes")
        ->group("");

    DirtyLogPerfArgs dlp;
    auto* dlpc = app.add_subcommand("dirty-log-perf", "the kernel's dirty_log_perf_test with minivmm's native guest: "
                                                      "populate, enable logging, N lock-step dirtying iterations with "
                                                      "a harvest after each, disable; same knobs and figures");
    dlpc->add_option("-v", dlp.vcpus, "vCPUs")->capture_default_str();
    dlpc->add_option("-b", dlp.bytes, "bytes dirtied by each vCPU, e.g. 256M")->capture_default_str();
    dlpc->add_option("-i", dlp.iterations, "iterations")->capture_default_str();
    dlpc->add_option("-w", dlp.write_pct, "percentage of pages written (the rest are read)")->capture_default_str();
    dlpc->add_flag("-a", dlp.random, "access memory in a random order");
    dlpc->add_option("-x", dlp.slots, "split the memory into this many memslots")->capture_default_str();
    dlpc->add_option("-s", dlp.backing, "backing: anon|thp|shm|hugetlb2m|hugetlb1g (selftest names accepted too)")
        ->capture_default_str();
    dlpc->add_flag("-g", dlp.no_manual, "no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG clears the log");
    dlpc->add_flag("--no-initially-set", dlp.no_initially_set, "manual protect without KVM_DIRTY_LOG_INITIALLY_SET");
    dlpc->add_option("--ring", dlp.ring, "use per-vCPU dirty rings of this many bytes (16 per entry), e.g. 64K");
    dlpc->add_option("--clear-chunk", dlp.clear_chunk, "bytes per KVM_CLEAR_DIRTY_LOG call (multiple of 256K)");
    dlpc->add_option("--eager-split", dlp.eager_split, "on|off: set eager_page_split for the run where writable");
    dlpc->add_option("--json", dlp.json, "also write the results as JSON to FILE, or - for stdout");

    DirtyRateArgs dr;
    auto* drc = app.add_subcommand("dirty-rate", "measure how fast the running guest dirties memory (like QEMU's "
                                                 "calc-dirty-rate): total and per vCPU");
    dr.vm.add_to(*drc);
    drc->add_option("--mode", dr.mode, "ring|bitmap|sampling")->capture_default_str();
    drc->add_option("--period", dr.period, "seconds to measure over")->capture_default_str();
    drc->add_option("--warmup", dr.warmup, "seconds to run after the first pass before measuring")->capture_default_str();
    drc->add_option("--ring", dr.ring, "with --mode ring: bytes per vCPU ring (default 64K)");
    drc->add_option("--sample-pages", dr.sample, "with --mode sampling: pages sampled per GiB")->capture_default_str();
    drc->add_option("--json", dr.json, "also write the result as JSON to FILE, or - for stdout");

    MigrateArgs mg;
    auto* mgc = app.add_subcommand("migrate", "boot the guest, let it dirty memory, live-migrate it (pre-copy rounds "
                                              "while it runs, stop-and-copy, resume on the destination), verify");
    mg.vm.add_to(*mgc);
    mgc->add_option("--to", mg.to, "inproc (a second VM here) or tcp:HOST:PORT (minivmm receive there)");
    mgc->add_option("--tracker", mg.tracker, "ring|bitmap")->capture_default_str();
    mgc->add_option("--ring", mg.ring, "with --tracker ring: bytes per vCPU ring (default 256K)");
    mgc->add_option("--max-downtime", mg.max_downtime, "ms the stop-and-copy may take at the measured bandwidth")
        ->capture_default_str();
    mgc->add_option("--bandwidth", mg.bandwidth, "cap in bytes/s, e.g. 100M (0 = unlimited)")->capture_default_str();
    mgc->add_option("--max-iterations", mg.max_iterations, "pre-copy rounds before stop-and-copy regardless")
        ->capture_default_str();
    mgc->add_option("--timeout", mg.timeout, "seconds before giving up (the source resumes)")->capture_default_str();
    mgc->add_option("--throttle", mg.throttle, "auto-converge or dirty-limit:PAGES_PER_S (per vCPU)");
    mgc->add_option("--warmup", mg.warmup, "seconds the guest runs before migrating")->capture_default_str();
    mgc->add_option("--post-run", mg.post_run, "seconds the destination runs before its stamp check")
        ->capture_default_str();
    mgc->add_option("--channels", mg.channels, "connections (0 = one per virtual node)")->capture_default_str();
    mgc->add_flag("--no-verify", mg.no_verify, "skip the switchover compare and the destination stamp check");
    mgc->add_option("--json", mg.json, "also write the report as JSON to FILE, or - for stdout");
    mgc->add_option("--fail-in", mg.fail_in, "test hook: lose the destination in bulk|precopy|stop")->group("");
    mgc->add_option("--stream-fault", mg.stream_fault, "test hook: flip|cut:PHASE:OFFSET[@CHANNEL]")->group("");

    ReceiveArgs rc;
    auto* rcc = app.add_subcommand("receive", "wait for one incoming migration (same VM options as the sender), "
                                              "resume the guest, check its stamps");
    rc.vm.add_to(*rcc);
    rcc->add_option("--listen", rc.listen, "tcp:ADDR:PORT to listen on");
    rcc->add_option("--post-run", rc.post_run, "seconds the guest runs here before its stamp check")->capture_default_str();
    rcc->add_option("--timeout", rc.timeout, "seconds to wait for a sender")->capture_default_str();
    rcc->add_option("--json", rc.json, "also write the report as JSON to FILE, or - for stdout");
    rcc->add_flag("--no-prealloc", rc.no_prealloc, "do not populate the guest memory before receiving");
    rcc->add_option("--die-in", rc.die_in, "test hook: exit abruptly in bulk|precopy|stop")->group("");

    LockupArgs lk;
    auto* lkc = app.add_subcommand("lockup", "reproduce soft-lockup reports: per variant, enable dirty logging on a "
                                             "write-heavy guest and record which vCPUs stall, when, how long, in "
                                             "which phase");
    lk.vm.add_to(*lkc);
    lkc->add_option("--variants", lk.variants,
                    "comma list of bitmap,bitmap-initially-set,ring,per-node-parallel-enable,eager-split-on,"
                    "eager-split-off (default: all)")
        ->each([&lk](const std::string&) { lk.variants_given = true; });
    lkc->add_option("--threshold-ms", lk.threshold, "a gap without progress longer than this is a stall")
        ->capture_default_str();
    lkc->add_option("--steady", lk.steady, "seconds measured before logging")->capture_default_str();
    lkc->add_option("--logging", lk.logging, "seconds of harvesting with logging on")->capture_default_str();
    lkc->add_option("--harvest-ms", lk.harvest_ms, "harvest period")->capture_default_str();
    lkc->add_option("--clear-chunk", lk.clear_chunk, "bitmap-initially-set: bytes per KVM_CLEAR_DIRTY_LOG")
        ->capture_default_str();
    lkc->add_option("--ring", lk.ring, "ring: bytes per vCPU ring")->capture_default_str();
    lkc->add_option("--json", lk.json, "also write the report as JSON to FILE, or - for stdout");
    lkc->add_option("--timeline", lk.timeline, "write the per-vCPU progress timeline as CSV");
    lkc->add_option("--test-pause-ms", lk.test_pause, "test hook: pause every vCPU this long mid-logging")->group("");

    if (argc > 1 && argv[1][0] != '-') {
        std::string cmd = argv[1];
        bool known = false;
        std::string names;
        for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; })) {
            known |= sc->get_name() == cmd;
            names += (names.empty() ? "" : ", ") + sc->get_name();
        }
        if (!known) {
            fmt::print(stderr, "minivmm: unknown command '{}'; use one of {} (see 'minivmm --help')\n", cmd, names);
            return kExitUsage;
        }
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::string what = e.what();
        // argv[1], if a command, is a known one (checked above): point at its help.
        fmt::print(stderr, "minivmm: {}; see 'minivmm {}--help'\n", what,
                   argc > 1 && argv[1][0] != '-' ? std::string(argv[1]) + " " : "");
        return kExitUsage;
    }
    if (verbose)
        spdlog::set_level(spdlog::level::debug);
    try {
        if (*caps)
            return cmd_caps(caps_json);
        if (*runc)
            return cmd_run(run);
        if (*ncc)
            return cmd_numa_check(nc);
        if (*dlpc)
            return cmd_dirty_log_perf(dlp);
        if (*drc)
            return cmd_dirty_rate(dr);
        if (*mgc)
            return cmd_migrate(mg);
        if (*lkc)
            return cmd_lockup(lk);
        if (*rcc)
            return cmd_receive(rc);
    } catch (const Error& e) {
        fmt::print(stderr, "minivmm: {}\n", e.what());
        return e.exit_code();
    } catch (const std::exception& e) {
        fmt::print(stderr, "minivmm: {}\n", e.what());
        return kExitFailure;
    }
    return kExitUsage;
}
