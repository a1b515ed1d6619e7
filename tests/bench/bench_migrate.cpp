// bench_migrate - migration speed as ratios measured in one run (these
// machines are shared and noisy: compare figures taken side by side).
//
// Micro part (Google Benchmark):
//  - memcpy of 256 MiB into populated memory (the destination preallocates,
//    like QEMU's -mem-prealloc) and into fresh memory, for scale;
//  - the link: a plain TCP loopback stream of 256 MiB between two processes,
//    from populated memory into populated memory, 1 MiB writes and reads;
//  - in-process migration and TCP loopback migration (receiver thread) of a
//    256 MiB guest whose vCPUs idle at the pass gate after writing all of
//    their memory: the bulk pass has the CPUs to itself, as the stream does.
// Workload part (`minivmm receive` and `minivmm migrate` as two processes):
//  - the workload: 256 MiB, 1 vCPU rewriting all of its memory
//    continuously, unlimited bandwidth, --max-downtime 300ms; stop-and-copy
//    throughput (the parked source's last pages), downtime, total time and
//    the guest's own downtime, with verification on and off (interleaved);
//  - each side's peak RSS (VmHWM) minus its guest RAM, at two guest sizes.
// Run by scripts/bench-migrate; --quick: one repeat, smaller RSS pair.
#include <benchmark/benchmark.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <fstream>
#include <map>
#include <thread>

#include <nlohmann/json.hpp>

#include "migration/migrate.hpp"
#include <openssl/evp.h>
#include "migration/page_codec.hpp"
#include "vmm/kvm/kvm.hpp"
#include "vmm/stress/stress_vm.hpp"

using namespace mvm;
using json = nlohmann::json;

namespace {

constexpr uint64_t kBytes = 256ull << 20;
constexpr size_t kChunk = 1 << 20;
std::unique_ptr<Kvm> g_kvm;
std::map<std::string, double> g_rate;  // bytes/s by name
bool g_quick = false;

double since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

uint8_t* map_populated(uint8_t fill)
{
    void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        throw std::runtime_error("mmap");
    std::memset(p, fill, kBytes);
    return static_cast<uint8_t*>(p);
}

void BM_MemcpyFresh(benchmark::State& state)
{
    uint8_t* src = map_populated(0x5a);
    double secs = 0;
    for (auto _ : state) {
        void* dst = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        auto t0 = std::chrono::steady_clock::now();
        for (uint64_t off = 0; off < kBytes; off += 4096)
            std::memcpy(static_cast<char*>(dst) + off, src + off, 4096);
        const double t = since(t0);
        state.SetIterationTime(t);
        secs += t;
        munmap(dst, kBytes);
    }
    g_rate["memcpy_fresh"] = static_cast<double>(kBytes) * static_cast<double>(state.iterations()) / secs;
    munmap(src, kBytes);
}
BENCHMARK(BM_MemcpyFresh)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

void BM_MemcpyPopulated(benchmark::State& state)
{
    uint8_t* src = map_populated(0x5a);
    uint8_t* dst = map_populated(0);
    double secs = 0;
    for (auto _ : state) {
        auto t0 = std::chrono::steady_clock::now();
        for (uint64_t off = 0; off < kBytes; off += 4096)
            std::memcpy(dst + off, src + off, 4096);
        const double t = since(t0);
        state.SetIterationTime(t);
        secs += t;
    }
    g_rate["memcpy_populated"] = static_cast<double>(kBytes) * static_cast<double>(state.iterations()) / secs;
    munmap(src, kBytes);
    munmap(dst, kBytes);
}
BENCHMARK(BM_MemcpyPopulated)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

// The link: one process writes 256 MiB of populated memory to a TCP loopback
// socket in 1 MiB writes, another reads it into populated memory.
double tcp_stream_once()
{
    int ls = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    if (::bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof(a)) || ::listen(ls, 1) ||
        ::getsockname(ls, reinterpret_cast<sockaddr*>(&a), &al))
        throw std::runtime_error("tcp stream: cannot listen on loopback");
    const pid_t pid = ::fork();
    if (pid == 0) {
        uint8_t* dst = map_populated(0);
        int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)))
            _exit(1);
        uint64_t got = 0;
        while (got < kBytes) {
            ssize_t n = ::read(fd, dst + got, std::min<uint64_t>(kChunk, kBytes - got));
            if (n <= 0)
                _exit(1);
            got += static_cast<uint64_t>(n);
        }
        char ack = 1;
        _exit(::write(fd, &ack, 1) == 1 ? 0 : 1);
    }
    uint8_t* src = map_populated(0x5a);
    int fd = ::accept(ls, nullptr, nullptr);  // the reader is ready: its memory is populated
    const auto t0 = std::chrono::steady_clock::now();
    for (uint64_t off = 0; off < kBytes;) {
        ssize_t n = ::write(fd, src + off, std::min<uint64_t>(kChunk, kBytes - off));
        if (n <= 0)
            throw std::runtime_error("tcp stream: write failed");
        off += static_cast<uint64_t>(n);
    }
    char ack = 0;
    if (::read(fd, &ack, 1) != 1)
        throw std::runtime_error("tcp stream: no ack");
    const double t = since(t0);
    int st = 0;
    ::waitpid(pid, &st, 0);
    ::close(fd);
    ::close(ls);
    munmap(src, kBytes);
    return t;
}

void BM_TcpStreamTwoProcesses(benchmark::State& state)
{
    double secs = 0;
    for (auto _ : state) {
        const double t = tcp_stream_once();
        state.SetIterationTime(t);
        secs += t;
    }
    g_rate["link"] = static_cast<double>(kBytes) * static_cast<double>(state.iterations()) / secs;
}
BENCHMARK(BM_TcpStreamTwoProcesses)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

// A 256 MiB guest written once and then idle at the pass gate: the bulk pass
// is measured alone. Records the bulk rate under `name`.
// x509 credentials for the TLS runs, made once by scripts/make-tls-creds ("" when that failed).
std::string tls_creds()
{
    static const std::string dir = [] {
        char tmpl[] = "/tmp/minivmm-bench-tls-XXXXXX";
        if (!::mkdtemp(tmpl))
            return std::string();
        const std::string d = std::string(tmpl) + "/c";
        const std::string cmd = std::string(MINIVMM_SOURCE_DIR) + "/scripts/make-tls-creds " + d + " >/dev/null 2>&1";
        return std::system(cmd.c_str()) == 0 ? d : std::string();
    }();
    return dir;
}

void migrate_idle(benchmark::State& state, const std::string& to, const std::string& name, uint32_t channels,
                  bool tls = false)
{
    if (tls && tls_creds().empty()) {
        state.SkipWithError("scripts/make-tls-creds failed: no TLS credentials");
        return;
    }
    if (!g_kvm) {
        state.SkipWithError("no /dev/kvm");
        return;
    }
    double bytes = 0, secs = 0;
    for (auto _ : state) {
        MachineConfig cfg = single_node_config(2, kBytes);
        cfg.workload.rate_pages_per_s = 0;  // the first pass at full speed, then the gate holds it
        StressVm src(*g_kvm, cfg);
        auto tracker = dirty::Tracker::create(src, dirty::TrackerOptions{});
        std::unique_ptr<StressVm> dst;
        std::thread recv;
        std::string dest = to;
        if (to == "tcp") {
            static uint16_t port = 31000 + static_cast<uint16_t>(::getpid() % 1000);
            port++;
            MachineConfig dcfg = cfg;
            dcfg.nodes[0].prealloc = true;  // as minivmm receive does
            dst = std::make_unique<StressVm>(*g_kvm, dcfg);
            migration::ReceiveOptions ro;
            ro.listen = fmt::format("tcp:127.0.0.1:{}", port);
            ro.post_run_s = 0.1;
            if (tls)
                ro.tls.creds = "x509:" + tls_creds();
            recv = std::thread([&, ro] { migration::receive(*dst, ro); });
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
            dest = ro.listen;
        }
        src.set_pass_gate(1);
        src.start();
        while ((src.snapshot(0).passes < 1 || src.snapshot(1).passes < 1) && !src.failure())
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        migration::MigrateOptions o;
        o.to = dest;
        o.post_run_s = 0.1;
        o.verify = false;
        o.channels = channels;
        if (tls)
            o.tls.creds = "x509:" + tls_creds();
        migration::MigrateReport r = migrate(src, *tracker, o, nullptr);
        if (recv.joinable())
            recv.join();
        if (r.status != "completed") {
            state.SkipWithError(r.error.c_str());
            return;
        }
        const auto& bulk = r.rounds.front();
        state.SetIterationTime(bulk.duration_s);
        bytes += static_cast<double>(bulk.bytes);
        secs += bulk.duration_s;
        src.kill();
    }
    g_rate[name] = bytes / secs;
}

void BM_BulkInproc(benchmark::State& state) { migrate_idle(state, "inproc", "inproc", 1); }
BENCHMARK(BM_BulkInproc)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
void BM_BulkTcp1Channel(benchmark::State& state) { migrate_idle(state, "tcp", "tcp1", 1); }
BENCHMARK(BM_BulkTcp1Channel)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
void BM_BulkTcp2Channels(benchmark::State& state) { migrate_idle(state, "tcp", "tcp2", 2); }
BENCHMARK(BM_BulkTcp2Channels)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
// The same over TLS 1.3 (x509, AES-128-GCM): issue 18's goal is >= 0.7 x plain TCP.
void BM_BulkTls1Channel(benchmark::State& state) { migrate_idle(state, "tcp", "tls1", 1, true); }
BENCHMARK(BM_BulkTls1Channel)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
void BM_BulkTls2Channels(benchmark::State& state) { migrate_idle(state, "tcp", "tls2", 2, true); }
BENCHMARK(BM_BulkTls2Channels)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

// The cipher alone: AES-128-GCM (TLS 1.3's first suite) sealing 16 KiB
// records on one core, OpenSSL's EVP as the TLS layer uses it. With both ends
// on this host's cores, a TLS byte costs a plain byte plus one seal and one
// open: the ceiling for TLS / plain below.
void BM_AesGcm(benchmark::State& state)
{
    std::vector<uint8_t> in(16384, 0x5a), out(16384 + 16);
    const uint8_t key[16] = {1}, iv[12] = {2};
    EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
    double bytes = 0, secs = 0;
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        for (size_t done = 0; done < kBytes; done += in.size()) {
            int n = 0;
            EVP_EncryptInit_ex(c, EVP_aes_128_gcm(), nullptr, key, iv);
            EVP_EncryptUpdate(c, out.data(), &n, in.data(), static_cast<int>(in.size()));
            EVP_EncryptFinal_ex(c, out.data() + n, &n);
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, out.data() + in.size());
        }
        const double t = since(t0);
        state.SetIterationTime(t);
        secs += t;
        bytes += static_cast<double>(kBytes);
    }
    EVP_CIPHER_CTX_free(c);
    g_rate["aes_gcm"] = bytes / secs;
}
BENCHMARK(BM_AesGcm)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

// ---- where a channel's CPU goes: each side's per-byte work without a socket ----------------

class NullSink : public migration::Transport {
public:
    void write_all(const void*, size_t) override {}
    void writev_all(std::span<const iovec>) override {}
    void read_exact(void*, size_t) override {}
};

std::unique_ptr<StressVm> g_codec_vm;
StressVm& codec_vm()
{
    if (!g_codec_vm) {
        MachineConfig cfg = single_node_config(1, kBytes);
        cfg.nodes[0].prealloc = true;
        g_codec_vm = std::make_unique<StressVm>(*g_kvm, cfg);
        const MemoryRegion* r = nullptr;
        for (const auto& reg : g_codec_vm->memslots().regions())
            if (reg.vnode >= 0)
                r = &reg;
        for (uint64_t off = 0; off < r->size; off += 4096)
            std::memset(g_codec_vm->host_ptr(r->gpa + off, 4096), static_cast<int>(off >> 12) | 1, 64);
    }
    return *g_codec_vm;
}

std::vector<uint64_t> guest_pages(const StressVm& m)
{
    std::vector<uint64_t> g;
    for (const auto& r : m.memslots().regions())
        if (r.vnode >= 0)
            for (uint64_t off = 0; off < r.size; off += 4096)
                g.push_back(r.gpa + off);
    return g;
}

void encode_all(benchmark::State& state, bool frozen, const char* name)
{
    if (!g_kvm) {
        state.SkipWithError("no /dev/kvm");
        return;
    }
    StressVm& m = codec_vm();
    const auto gpas = guest_pages(m);
    NullSink sink;
    migration::RecordWriter w(sink);
    migration::PageEncoder enc(migration::Compression{});
    double secs = 0;
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        for (size_t i = 0; i < gpas.size(); i += migration::kBatchPages)
            enc.write(w, m, std::span<const uint64_t>(gpas).subspan(i, migration::kBatchPages), frozen);
        const double t = since(t0);
        state.SetIterationTime(t);
        secs += t;
    }
    g_rate[name] = static_cast<double>(kBytes) * static_cast<double>(state.iterations()) / secs;
}
void BM_EncodeStaged(benchmark::State& state) { encode_all(state, false, "encode_staged"); }
BENCHMARK(BM_EncodeStaged)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
void BM_EncodeFrozen(benchmark::State& state) { encode_all(state, true, "encode_frozen"); }
BENCHMARK(BM_EncodeFrozen)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

// ---- the workload, two processes ----------------------------------------------------------

struct Proc {
    pid_t pid = -1;
    long hwm_kib = 0;  // VmHWM: the peak RSS of its own mm (ru_maxrss would carry ours across fork+exec)
    int status = -1;
    bool done = false;
};

long vm_hwm_kib(pid_t pid)
{
    std::ifstream f(fmt::format("/proc/{}/status", pid));
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("VmHWM:", 0) == 0)
            return std::stol(line.substr(6));
    return 0;
}

Proc spawn(const std::vector<std::string>& args, const std::string& log)
{
    Proc p;
    p.pid = ::fork();
    if (p.pid == 0) {
        int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        ::dup2(fd, 1);
        ::dup2(fd, 2);
        std::vector<char*> argv;
        for (const auto& a : args)
            argv.push_back(const_cast<char*>(a.c_str()));
        argv.push_back(nullptr);
        ::execv(argv[0], argv.data());
        _exit(127);
    }
    return p;
}

// Polls both until they exit, keeping each one's last VmHWM: a high-water
// mark, so the last read before the exit holds the peak (and reads before
// the exec, of the forked copy of our own memory, are overwritten).
void reap(Proc& a, Proc& b)
{
    while (!a.done || !b.done) {
        for (Proc* p : {&a, &b}) {
            if (p->done)
                continue;
            if (const long h = vm_hwm_kib(p->pid))
                p->hwm_kib = h;
            p->done = ::waitpid(p->pid, &p->status, WNOHANG) == p->pid;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
}

bool port_open(uint16_t port)
{
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    ::close(fd);  // closed before its first byte: receive skips it
    return ok;
}

struct Run {
    json mig, rcv;
    double src_over_mib = 0, dst_over_mib = 0;  // peak RSS minus guest RAM
};

// One migration between two processes; throws when it did not complete.
Run run_pair(const std::string& mem, uint64_t mem_bytes, const std::vector<std::string>& extra)
{
    static uint16_t port = 33000 + static_cast<uint16_t>(::getpid() % 1000);
    port++;
    const std::string dir = fmt::format("/tmp/bench-migrate-{}", ::getpid());
    ::mkdir(dir.c_str(), 0755);
    const std::vector<std::string> vm = {"--vcpus", "1", "--mem", mem, "--post-run", "0.5"};
    std::vector<std::string> ra = {MINIVMM_BINARY, "receive", "--listen", fmt::format("tcp:127.0.0.1:{}", port),
                                   "--json", dir + "/recv.json"};
    ra.insert(ra.end(), vm.begin(), vm.end());
    Proc r = spawn(ra, dir + "/recv.log");
    for (int i = 0; i < 500 && !port_open(port); i++)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::vector<std::string> ma = {MINIVMM_BINARY, "migrate", "--to", fmt::format("tcp:127.0.0.1:{}", port),
                                   "--max-downtime", "300ms", "--warmup", "1", "--json", dir + "/mig.json"};
    ma.insert(ma.end(), vm.begin(), vm.end());
    ma.insert(ma.end(), extra.begin(), extra.end());
    Proc m = spawn(ma, dir + "/mig.log");
    reap(m, r);
    Run out;
    std::ifstream(dir + "/mig.json") >> out.mig;
    std::ifstream(dir + "/recv.json") >> out.rcv;
    if (out.mig.value("status", "") != "completed")
        throw std::runtime_error("migrate did not complete: " + out.mig.value("error", std::string("?")));
    const double guest_mib = static_cast<double>(mem_bytes) / (1 << 20);
    out.src_over_mib = static_cast<double>(m.hwm_kib) / 1024 - guest_mib;
    out.dst_over_mib = static_cast<double>(r.hwm_kib) / 1024 - guest_mib;
    return out;
}

struct Series {
    std::vector<double> v;
    void add(double x) { v.push_back(x); }
    double median() const
    {
        if (v.empty())
            return 0;
        auto s = v;
        std::sort(s.begin(), s.end());
        return s.size() % 2 ? s[s.size() / 2] : (s[s.size() / 2 - 1] + s[s.size() / 2]) / 2;
    }
    std::string str(const char* unit) const
    {
        if (v.empty())
            return "-";
        return fmt::format("{:.1f} {} [{:.1f}..{:.1f}]", median(), unit, *std::min_element(v.begin(), v.end()),
                           *std::max_element(v.begin(), v.end()));
    }
};

struct Workload {
    Series downtime, total, guest_downtime, stop_rate, bulk_rate, stop_mib, rounds, ms_per_mib;
    void add(const Run& r)
    {
        const json& j = r.mig;
        downtime.add(j["downtime_ms"].get<double>());
        total.add(j["total_ms"].get<double>());
        if (j["downtime_guest_ms"].is_number())
            guest_downtime.add(j["downtime_guest_ms"].get<double>());
        const double send_ms = j["downtime_split"]["final_send_ms"].get<double>();
        const double stop_b = j["remaining_bytes"].get<double>();
        stop_mib.add(stop_b / (1 << 20));
        if (stop_b > 0)
            ms_per_mib.add(j["downtime_ms"].get<double>() / (stop_b / (1 << 20)));
        if (send_ms > 0)
            stop_rate.add(stop_b / (send_ms / 1e3) / (1 << 30));
        const json& bulk = j["rounds"][0];
        bulk_rate.add(bulk["bytes"].get<double>() / (bulk["duration_ms"].get<double>() / 1e3) / (1 << 30));
        rounds.add(static_cast<double>(j["rounds"].size()));
    }
};

void workload_part(double link)
{
    const int repeats = g_quick ? 1 : 5;
    Workload on, off, two;
    fmt::print("\nworkload: 256 MiB, 1 vCPU rewriting all of its memory, --max-downtime 300ms, unlimited "
               "bandwidth, TCP loopback, two processes; {} x verify on/off interleaved\n",
               repeats);
    for (int i = 0; i < repeats; i++) {
        on.add(run_pair("256M", kBytes, {}));
        off.add(run_pair("256M", kBytes, {"--no-verify"}));
        two.add(run_pair("256M", kBytes, {"--channels", "2"}));
        fmt::print(stderr, "\r\033[Kworkload: {} of {} pairs", i + 1, repeats);
    }
    fmt::print(stderr, "\r\033[K");
    auto row = [](const char* name, const Series& a, const Series& b, const Series& c, const char* unit) {
        fmt::print("  {:<34} {:>28} {:>28} {:>28}\n", name, a.str(unit), b.str(unit), c.str(unit));
    };
    fmt::print("  {:<34} {:>28} {:>28} {:>28}\n", "median [min..max]", "verify on", "verify off",
               "verify on, 2 channels");
    row("downtime_ms (QEMU's downtime)", on.downtime, off.downtime, two.downtime, "ms");
    row("downtime_guest_ms (guest's view)", on.guest_downtime, off.guest_downtime, two.guest_downtime, "ms");
    row("total_ms (QEMU's total-time)", on.total, off.total, two.total, "ms");
    row("stop-and-copy set", on.stop_mib, off.stop_mib, two.stop_mib, "MiB");
    row("stop-and-copy throughput", on.stop_rate, off.stop_rate, two.stop_rate, "GiB/s");
    row("bulk throughput (guest running)", on.bulk_rate, off.bulk_rate, two.bulk_rate, "GiB/s");
    row("rounds (bulk + pre-copy + stop)", on.rounds, off.rounds, two.rounds, "");
    row("downtime per MiB of stop set", on.ms_per_mib, off.ms_per_mib, two.ms_per_mib, "ms");
    g_rate["stop"] = on.stop_rate.median() * (1 << 30);
    g_rate["stop_off"] = off.stop_rate.median() * (1 << 30);
    g_rate["stop2"] = two.stop_rate.median() * (1 << 30);
    // The stop set's size varies run to run with the guest's dirty rate: compare
    // the downtime per MiB it had to move, with and without verification.
    g_rate["verify_cost"] = off.ms_per_mib.median() > 0 ? on.ms_per_mib.median() / off.ms_per_mib.median() : 0;
    (void)link;
}

void rss_part()
{
    const uint64_t small = 128ull << 20, big = g_quick ? 256ull << 20 : 1024ull << 20;
    const Run a = run_pair("128M", small, {});
    const Run b = run_pair(g_quick ? "256M" : "1G", big, {});
    fmt::print("\npeak RSS beyond guest RAM (VmHWM - guest RAM), same workload\n");
    fmt::print("  {:<12} {:>14} {:>14}\n", "guest", "sender", "receiver");
    fmt::print("  {:<12} {:>10.1f} MiB {:>10.1f} MiB\n", "128 MiB", a.src_over_mib, a.dst_over_mib);
    fmt::print("  {:<12} {:>10.1f} MiB {:>10.1f} MiB\n", g_quick ? "256 MiB" : "1 GiB", b.src_over_mib, b.dst_over_mib);
    const double dg = static_cast<double>(big - small) / (1 << 20);
    fmt::print("  growth per GiB of guest: sender {:.1f} MiB, receiver {:.1f} MiB (page hashes and bitmaps: "
               "8 B + 1 bit per 4 KiB page = ~2.0 MiB/GiB)\n",
               (b.src_over_mib - a.src_over_mib) / dg * 1024, (b.dst_over_mib - a.dst_over_mib) / dg * 1024);
}

class RatioReporter : public benchmark::ConsoleReporter {
public:
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        auto gib = [](double v) { return v / (1ull << 30); };
        const double pop = g_rate["memcpy_populated"], link = g_rate["link"], in = g_rate["inproc"],
                     t1 = g_rate["tcp1"], t2 = g_rate["tcp2"];
        fmt::print("\nmigration throughput, 256 MiB guest idle after its first pass (bulk pass alone)\n");
        fmt::print("  memcpy into populated memory:       {:6.2f} GiB/s\n", gib(pop));
        fmt::print("  memcpy into fresh memory:           {:6.2f} GiB/s (one page fault per page)\n",
                   gib(g_rate["memcpy_fresh"]));
        fmt::print("  TCP stream, two processes (link):   {:6.2f} GiB/s\n", gib(link));
        fmt::print("  in-process migration, bulk:         {:6.2f} GiB/s = {:.2f} x memcpy into populated memory\n",
                   gib(in), pop > 0 ? in / pop : 0);
        fmt::print("  TCP migration, bulk, 1 channel:     {:6.2f} GiB/s = {:.2f} x link\n", gib(t1),
                   link > 0 ? t1 / link : 0);
        fmt::print("  TCP migration, bulk, 2 channels:    {:6.2f} GiB/s = {:.2f} x link\n", gib(t2),
                   link > 0 ? t2 / link : 0);
        const double s1 = g_rate["tls1"], s2 = g_rate["tls2"];
        fmt::print("  TLS migration, bulk, 1 channel:     {:6.2f} GiB/s = {:.2f} x plain TCP, 1 channel\n", gib(s1),
                   t1 > 0 ? s1 / t1 : 0);
        fmt::print("  TLS migration, bulk, 2 channels:    {:6.2f} GiB/s = {:.2f} x plain TCP, 2 channels\n", gib(s2),
                   t2 > 0 ? s2 / t2 : 0);
        const double aes = g_rate["aes_gcm"];
        if (aes > 0 && t1 > 0 && t2 > 0) {
            // Each end's busiest thread (1 channel) or the two cores (2 channels)
            // carry a plain byte's work plus one AES-GCM pass per byte.
            const double c1 = 1 / (1 / t1 + 1 / aes), c2 = 1 / (1 / t2 + 1 / aes);
            fmt::print("  AES-128-GCM alone, one core:        {:6.2f} GiB/s: with both ends on this host the TLS "
                       "ceiling is {:.2f} x plain (1 channel), {:.2f} x (2 channels)\n",
                       gib(aes), c1 / t1, c2 / t2);
        }
        fmt::print("  sender's page work, no socket:      {:6.2f} GiB/s staged (source running), {:.2f} GiB/s frozen "
                   "(source parked)\n",
                   gib(g_rate["encode_staged"]), gib(g_rate["encode_frozen"]));
    }
};

}  // namespace

int main(int argc, char** argv)
{
    std::vector<char*> args;
    for (int i = 0; i < argc; i++) {
        if (std::string(argv[i]) == "--quick")
            g_quick = true;
        else
            args.push_back(argv[i]);
    }
    int n = static_cast<int>(args.size());
    bool filtered = false;
    for (char* a : args)
        filtered |= std::string(a).rfind("--benchmark_filter", 0) == 0;
    try {
        g_kvm = std::make_unique<Kvm>();
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench_migrate: {}\n", e.what());
    }
    benchmark::Initialize(&n, args.data());
    RatioReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
    if (!g_kvm)
        return 1;
    if (filtered)
        return 0;  // chosen micro-benchmarks only: no workload part
    g_codec_vm.reset();
    try {
        const double link = g_rate["link"];
        workload_part(link);
        rss_part();
        const double stop = g_rate["stop"], in = g_rate["inproc"], pop = g_rate["memcpy_populated"];
        fmt::print("\ngoals (issue 16), ratios from this run\n");
        auto goal = [](const char* what, double v, const char* want, bool met) {
            fmt::print("  {:<58} {:>6.2f}  {:<8} {}\n", what, v, want, met ? "met" : "NOT met");
        };
        goal("bulk over TCP, 1 channel / link", link > 0 ? g_rate["tcp1"] / link : 0, ">= 0.8",
             g_rate["tcp1"] >= 0.8 * link);
        goal("stop-and-copy over TCP (workload, verify on) / link", link > 0 ? stop / link : 0, ">= 0.8",
             stop >= 0.8 * link);
        goal("stop-and-copy over TCP (workload, 2 channels) / link", link > 0 ? g_rate["stop2"] / link : 0, ">= 0.8",
             g_rate["stop2"] >= 0.8 * link);
        goal("bulk over TCP, 2 channels / link", link > 0 ? g_rate["tcp2"] / link : 0, ">= 0.8",
             g_rate["tcp2"] >= 0.8 * link);
        const double t1 = g_rate["tcp1"], t2 = g_rate["tcp2"];
        goal("bulk over TLS / plain TCP, 1 channel (issue 18)", t1 > 0 ? g_rate["tls1"] / t1 : 0, ">= 0.7",
             g_rate["tls1"] >= 0.7 * t1);
        goal("bulk over TLS / plain TCP, 2 channels (issue 18)", t2 > 0 ? g_rate["tls2"] / t2 : 0, ">= 0.7",
             g_rate["tls2"] >= 0.7 * t2);
        goal("in-process bulk / memcpy into populated memory", pop > 0 ? in / pop : 0, ">= 0.9", in >= 0.9 * pop);
        goal("downtime per MiB of stop set, verification on / off (medians)", g_rate["verify_cost"], "<= 1.05",
             g_rate["verify_cost"] <= 1.05);
        fmt::print("  downtime and total time against QEMU: scripts/compare-qemu\n");
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench_migrate: {}\n", e.what());
        return 1;
    }
}
