#include "migration/migrate.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "numa/policy.hpp"
#include "base/error.hpp"
#include "base/units.hpp"

namespace mvm::migration {

namespace {

using clock = std::chrono::steady_clock;
double since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }
constexpr size_t kBatchPages = 256;  // 1 MiB of data per PAGES record
constexpr uint64_t kDigestBytes = 2ull << 20;

template <class T>
std::vector<uint8_t> pod_bytes(const T& v)
{
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    return {p, p + sizeof(T)};
}

// ---- TCP helpers ------------------------------------------------------------------

int connect_tcp(const std::string& host, uint16_t port)
{
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res); rc != 0)
        throw Error(fmt::format("--to tcp:{}:{}: cannot resolve {}: {}", host, port, host, gai_strerror(rc)));
    int fd = -1, err = 0;
    for (addrinfo* a = res; a; a = a->ai_next) {
        fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            break;
        err = errno;
        ::close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        throw Error(fmt::format("--to tcp:{}:{}: cannot connect: {}; is 'minivmm receive --listen tcp:...:{}' running "
                                "there?",
                                host, port, errno_text(err), port));
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

std::vector<uint8_t> hello(uint32_t channel, uint32_t channels)
{
    std::vector<uint8_t> v(8);
    std::memcpy(v.data(), &channel, 4);
    std::memcpy(v.data() + 4, &channels, 4);
    return v;
}

// Damages one channel's byte stream at a chosen offset of a phase (test hook).
class FaultInjectingTransport : public Transport {
public:
    FaultInjectingTransport(std::unique_ptr<Transport> inner, StreamFault f) : inner_(std::move(inner)), f_(std::move(f))
    {
    }
    void enter_phase(const char* phase) { phase_.store(phase); }
    void write_all(const void* data, size_t len) override
    {
        const char* phase = phase_.load();
        if (phase != seen_) {  // a new phase starts counting at 0
            seen_ = phase;
            at_ = 0;
        }
        const bool armed = !fired_ && phase && f_.phase == phase && f_.offset >= at_ && f_.offset < at_ + len;
        if (!armed) {
            at_ += len;
            inner_->write_all(data, len);
            return;
        }
        fired_ = true;
        const size_t k = f_.offset - at_;
        const auto* p = static_cast<const uint8_t*>(data);
        if (f_.kind == StreamFault::Kind::Cut) {
            if (k)
                inner_->write_all(p, k);
            inner_->shutdown();
            throw Error(fmt::format("stream cut at byte {} of {} on channel {} (test hook --stream-fault)", f_.offset,
                                    f_.phase, f_.channel));
        }
        std::vector<uint8_t> copy(p, p + len);
        copy[k] ^= 0x10;
        fmt::print(stderr, "migrate: flipped a bit at byte {} of {} on channel {} (test hook --stream-fault)\n",
                   f_.offset, f_.phase, f_.channel);
        at_ += len;
        inner_->write_all(copy.data(), len);
    }
    void read_exact(void* data, size_t len) override { inner_->read_exact(data, len); }
    void shutdown() override { inner_->shutdown(); }

private:
    std::unique_ptr<Transport> inner_;
    StreamFault f_;
    std::atomic<const char*> phase_{nullptr};
    const char* seen_ = nullptr;  // below: only the channel's (one) writer touches these
    uint64_t at_ = 0;
    bool fired_ = false;
};

// ---- destinations ---------------------------------------------------------------

class Destination {
public:
    virtual ~Destination() = default;
    virtual void open(const StreamHeader& h) = 0;
    // Called by one thread per channel.
    virtual void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) = 0;
    // All pages are sent and the source is parked: hand over state, verify,
    // resume the destination. Returns the switchover check.
    virtual ResultRecord switchover(const std::vector<VcpuState>& states, const std::vector<Digest>& digests) = 0;
    // After the destination ran: its stamp check.
    virtual ResultRecord finish() = 0;
    virtual void abort() = 0;
    // The migration moved to another phase (bulk, precopy, stop, ...).
    virtual void enter_phase(const char*) {}
};

class InprocDestination : public Destination {
public:
    InprocDestination(StressVm& src, const MigrateOptions& opt) : src_(src), opt_(opt) {}

    void open(const StreamHeader& h) override
    {
        // The destination's memory is populated up front, on each node's CPUs
        // and under its policy (like QEMU's -mem-prealloc on the target), so
        // the copy does not pay a page fault per page while the guest waits.
        MachineConfig cfg = src_.config();
        for (auto& n : cfg.nodes)
            n.prealloc = true;
        cfg.show_progress = false;
        dst_ = std::make_unique<StressVm>(src_.kvm(), cfg);
        StreamHeader mine = StreamHeader::of(*dst_, h.nr_channels);
        if (auto why = mine.incompatibility(h); !why.empty())
            throw Error("destination layout differs: " + why);
    }

    void send(uint32_t, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t&) override
    {
        for (uint64_t gpa : gpas) {
            std::memcpy(dst_->host_ptr(gpa, 4096), src_.host_ptr(gpa, 4096), 4096);
            bytes += 4096;
        }
    }

    ResultRecord switchover(const std::vector<VcpuState>& states, const std::vector<Digest>&) override
    {
        ResultRecord r;
        r.ok = 1;
        if (opt_.verify) {
            // Page by page against the parked source.
            for (const auto& reg : src_.memslots().regions())
                for (uint64_t off = 0; off < reg.size; off += 4096) {
                    r.pages_checked++;
                    if (std::memcmp(src_.host_ptr(reg.gpa + off, 4096), dst_->host_ptr(reg.gpa + off, 4096), 4096)) {
                        r.mismatches++;
                        if (r.mismatched_gpas.size() < 16)
                            r.mismatched_gpas.push_back(reg.gpa + off);
                    }
                }
            if (r.mismatches) {
                r.ok = 0;
                r.text = fmt::format("{} of {} pages differ at switchover", r.mismatches, r.pages_checked);
                return r;
            }
        }
        for (const auto& s : states)
            for (uint32_t m : restore_vcpu(dst_->kvm(), dst_->vcpu(s.id), s))
                refused_.push_back(m);
        reset_controls(*dst_);
        dst_->start();
        for (uint32_t i = 0; i < dst_->vcpu_count(); i++)
            at_switch_.push_back(dst_->snapshot(i).pages_written + dst_->snapshot(i).pages_read);
        return r;
    }

    ResultRecord finish() override
    {
        std::this_thread::sleep_for(std::chrono::duration<double>(opt_.post_run_s));
        ResultRecord r;
        bool progressed = true;
        for (uint32_t i = 0; i < dst_->vcpu_count(); i++)
            progressed &= dst_->snapshot(i).pages_written + dst_->snapshot(i).pages_read > at_switch_[i];
        dst_->request_stop();
        if (!dst_->wait_finished(std::chrono::seconds(10)))
            dst_->kill();
        if (auto f = dst_->failure()) {
            r.text = "destination guest failed: " + f->reason;
            return r;
        }
        StampCheck c = verify_stamps(*dst_);
        r.pages_checked = c.pages_checked;
        r.mismatches = c.mismatches;
        for (const auto& m : c.first)
            r.mismatched_gpas.push_back(m.gpa);
        r.ok = c.ok() && progressed;
        r.text = progressed ? c.summary() : "the destination guest made no progress after resume; " + c.summary();
        return r;
    }

    void abort() override
    {
        if (dst_)
            dst_->kill();
    }

    static void reset_controls(StressVm& m)
    {
        for (uint32_t i = 0; i < m.vcpu_count(); i++) {
            m.set_throttle(i, 0);
            m.set_rate(i, m.config().workload.rate_pages_per_s);
            m.mailbox(i)->park = 0;
        }
        m.set_pass_gate(0);  // VMM controls are the destination VMM's own
    }

    std::vector<uint32_t> refused_;

private:
    StressVm& src_;
    const MigrateOptions& opt_;
    std::unique_ptr<StressVm> dst_;
    std::vector<uint64_t> at_switch_;
};

class TcpDestination : public Destination {
public:
    TcpDestination(StressVm& src, const MigrateOptions& opt, std::string host, uint16_t port)
        : src_(src), opt_(opt), host_(std::move(host)), port_(port)
    {
    }

    void open(const StreamHeader& h) override
    {
        // Every connection first (the receiver sorts them by HELLO), then
        // the header, whose layout check must pass before any memory moves.
        std::optional<StreamFault> fault;
        if (!opt_.stream_fault.empty()) {
            fault = parse_stream_fault(opt_.stream_fault);
            if (fault->channel >= h.nr_channels)
                throw UsageError(fmt::format("--stream-fault: channel {} but the migration has {} channel(s)",
                                             fault->channel, h.nr_channels));
        }
        for (uint32_t c = 0; c < h.nr_channels; c++) {
            int fd = connect_tcp(host_, port_);
            std::unique_ptr<Transport> t =
                std::make_unique<FdTransport>(fd, fmt::format("{}:{} (channel {})", host_, port_, c));
            if (fault && fault->channel == c) {
                auto f = std::make_unique<FaultInjectingTransport>(std::move(t), *fault);
                faulty_ = f.get();
                t = std::move(f);
            }
            ch_.push_back(std::move(t));
            RecordWriter(*ch_.back()).write(RecordType::Hello, hello(c, h.nr_channels));
        }
        RecordWriter(*ch_[0]).write(RecordType::Header, h.encode());
        ResultRecord r = read_result("the layout check");
        if (!r.ok)
            throw Error("the destination refused the stream: " + r.text);
    }

    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override
    {
        RecordWriter w(*ch_.at(channel));
        for (size_t i = 0; i < gpas.size(); i += kBatchPages) {
            auto part = gpas.subspan(i, std::min(kBatchPages, gpas.size() - i));
            auto payload = encode_pages(src_, part, &zeros);
            w.write(RecordType::Pages, payload);
        }
        bytes += w.bytes();
    }

    ResultRecord switchover(const std::vector<VcpuState>& states, const std::vector<Digest>& digests) override
    {
        for (auto& c : ch_)
            RecordWriter(*c).write(RecordType::ChannelDone, {});
        RecordWriter w(*ch_[0]);
        for (const auto& s : states)
            w.write(RecordType::Vcpu, s.serialize());
        std::vector<uint8_t> d;
        const auto n = static_cast<uint32_t>(digests.size());
        d.insert(d.end(), reinterpret_cast<const uint8_t*>(&n), reinterpret_cast<const uint8_t*>(&n) + 4);
        for (const auto& g : digests) {
            auto b = pod_bytes(g);
            d.insert(d.end(), b.begin(), b.end());
        }
        w.write(RecordType::Digests, d);
        w.write(RecordType::End, {});
        return read_result("the switchover");
    }

    ResultRecord finish() override { return read_result("the destination's stamp check"); }

    void abort() override
    {
        for (auto& c : ch_)
            c->shutdown();
    }

    void enter_phase(const char* phase) override
    {
        if (faulty_)
            faulty_->enter_phase(phase);
    }

private:
    ResultRecord read_result(const char* what)
    {
        RecordReader r(*ch_[0]);
        Record rec = r.read();
        if (rec.type != RecordType::Result)
            throw Error(fmt::format("expected RESULT for {}, got {}", what, record_name(rec.type)));
        return ResultRecord::decode(rec.payload);
    }

    StressVm& src_;
    const MigrateOptions& opt_;
    std::string host_;
    uint16_t port_;
    std::vector<std::unique_ptr<Transport>> ch_;
    FaultInjectingTransport* faulty_ = nullptr;
};

// Longest gap with no guest progress per vCPU, sampled at 1 kHz from the mailboxes.
class StallSampler {
public:
    explicit StallSampler(const StressVm& m) : m_(m), max_(m.vcpu_count(), 0)
    {
        thread_ = std::thread([this] { loop(); });
    }
    ~StallSampler() { stop(); }
    std::vector<double> stop()
    {
        if (thread_.joinable()) {
            stop_ = true;
            thread_.join();
        }
        return max_;
    }

private:
    void loop()
    {
        const uint32_t n = m_.vcpu_count();
        std::vector<uint64_t> last(n);
        std::vector<clock::time_point> since_change(n, clock::now());
        for (uint32_t i = 0; i < n; i++)
            last[i] = m_.snapshot(i).pages_written + m_.snapshot(i).pages_read;
        while (!stop_) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
            auto now = clock::now();
            for (uint32_t i = 0; i < n; i++) {
                const mvm_mailbox* mb = m_.mailbox(i);
                uint64_t p = mb->pages_written + mb->pages_read;
                double gap = std::chrono::duration<double, std::milli>(now - since_change[i]).count();
                max_[i] = std::max(max_[i], gap);
                if (p != last[i] || mb->state == MVM_STATE_DONE) {
                    last[i] = p;
                    since_change[i] = now;
                }
            }
        }
    }
    const StressVm& m_;
    std::vector<double> max_;
    std::atomic<bool> stop_{false};
    std::thread thread_;
};

}  // namespace

StreamFault parse_stream_fault(const std::string& spec)
{
    auto bad = [&](const std::string& why) {
        return UsageError(fmt::format("--stream-fault '{}': {}; use flip|cut:bulk|precopy|stop:OFFSET[@CHANNEL]", spec, why));
    };
    StreamFault f;
    std::string rest = spec;
    if (auto at = rest.find('@'); at != std::string::npos) {
        auto ch = parse_size(rest.substr(at + 1));
        if (!ch || *ch > 63)
            throw bad("the channel is not a number below 64");
        f.channel = static_cast<uint32_t>(*ch);
        rest = rest.substr(0, at);
    }
    auto c1 = rest.find(':'), c2 = rest.rfind(':');
    if (c1 == std::string::npos || c1 == c2)
        throw bad("expected three fields");
    const std::string kind = rest.substr(0, c1);
    f.phase = rest.substr(c1 + 1, c2 - c1 - 1);
    if (kind == "flip")
        f.kind = StreamFault::Kind::Flip;
    else if (kind == "cut")
        f.kind = StreamFault::Kind::Cut;
    else
        throw bad("'" + kind + "' is neither flip nor cut");
    if (f.phase != "bulk" && f.phase != "precopy" && f.phase != "stop")
        throw bad("'" + f.phase + "' is not a phase");
    auto off = parse_size(rest.substr(c2 + 1));
    if (!off)
        throw bad("the offset is not a byte count");
    f.offset = *off;
    return f;
}

std::pair<std::string, uint16_t> parse_tcp(const std::string& option, const std::string& spec)
{
    if (spec.rfind("tcp:", 0) != 0)
        throw UsageError(fmt::format("{}: '{}' is not tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444)", option, spec));
    std::string rest = spec.substr(4);
    auto colon = rest.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == rest.size())
        throw UsageError(fmt::format("{}: '{}' is not tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444)", option, spec));
    std::string host = rest.substr(0, colon), port = rest.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    uint64_t p = 0;
    for (char c : port) {
        if (c < '0' || c > '9' || p > 65535)
            throw UsageError(fmt::format("{}: port '{}' is not a number in 1..65535", option, port));
        p = p * 10 + static_cast<uint64_t>(c - '0');
    }
    if (p == 0 || p > 65535)
        throw UsageError(fmt::format("{}: port '{}' is not a number in 1..65535", option, port));
    return {host, static_cast<uint16_t>(p)};
}

MigrateReport migrate(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel)
{
    MigrateReport rep;
    const auto t0 = clock::now();
    const MachineConfig& cfg = src.config();
    const uint32_t nch = opt.channels ? opt.channels : static_cast<uint32_t>(std::max<size_t>(1, cfg.nodes.size()));
    std::unique_ptr<Destination> dest;
    InprocDestination* inproc = nullptr;
    if (opt.to == "inproc") {
        auto d = std::make_unique<InprocDestination>(src, opt);
        inproc = d.get();
        dest = std::move(d);
    } else {
        auto [host, port] = parse_tcp("--to", opt.to);
        dest = std::make_unique<TcpDestination>(src, opt, host, port);
    }
    bool parked = false, tracking = false;
    std::optional<StallSampler> sampler;
    auto check_cancel = [&] {
        if (cancel && cancel->load())
            throw Error("cancelled by signal");
        if (since(t0) > opt.timeout_s)
            throw Error(fmt::format("--timeout {} s reached before the migration converged", opt.timeout_s));
    };
    // Channel of a GPA: its node's (system memory goes on channel 0).
    std::map<uint32_t, uint32_t> slot_channel;
    std::map<uint32_t, const NodeConfig*> channel_node;
    for (const auto& r : src.memslots().regions()) {
        uint32_t ch = 0;
        if (r.vnode >= 0) {
            size_t idx = 0;
            for (size_t i = 0; i < cfg.nodes.size(); i++)
                if (static_cast<int>(cfg.nodes[i].id) == r.vnode)
                    idx = i;
            ch = static_cast<uint32_t>(idx % nch);
            channel_node.emplace(ch, &cfg.nodes[idx]);
        }
        slot_channel[r.slot] = ch;
    }
    uint64_t zero_pages = 0;
    std::mutex zmu;
    double bw = 0;  // bytes/s measured so far
    uint64_t precopy_bytes = 0;
    double precopy_s = 0;
    auto t_bw = clock::now();
    uint64_t paced_bytes = 0;
    std::mutex pace_mu;

    // Sends pages, one thread per channel on its node's CPUs and policy.
    auto send_pages = [&](const std::vector<std::vector<uint64_t>>& per_channel) -> uint64_t {
        std::vector<uint64_t> bytes(nch, 0);
        std::vector<std::thread> threads;
        std::mutex emu;
        std::exception_ptr err;
        for (uint32_t c = 0; c < nch; c++) {
            if (per_channel[c].empty())
                continue;
            threads.emplace_back([&, c] {
                try {
                    const NodeConfig* node = channel_node.count(c) ? channel_node[c] : nullptr;
                    std::optional<numa::ThreadPolicyScope> scope;
                    if (node && !node->host_cpus.empty())
                        numa::pin_current_thread(node->host_cpus);
                    if (node && node->host_policy.policy != numa::Policy::Default)
                        scope.emplace(node->host_policy);
                    const auto& pages = per_channel[c];
                    uint64_t z = 0;
                    for (size_t i = 0; i < pages.size(); i += kBatchPages) {
                        if (cancel && cancel->load())
                            throw Error("cancelled by signal");
                        auto part = std::span<const uint64_t>(pages).subspan(i, std::min(kBatchPages, pages.size() - i));
                        uint64_t b = 0;
                        dest->send(c, part, b, z);
                        bytes[c] += b;
                        if (opt.bandwidth) {
                            // Pace all channels together to --bandwidth.
                            std::unique_lock lk(pace_mu);
                            paced_bytes += b;
                            const double due = static_cast<double>(paced_bytes) / static_cast<double>(opt.bandwidth);
                            const double ahead = due - since(t_bw);
                            lk.unlock();
                            if (ahead > 0)
                                std::this_thread::sleep_for(std::chrono::duration<double>(ahead));
                        }
                    }
                    std::lock_guard lk(zmu);
                    zero_pages += z;
                } catch (...) {
                    std::lock_guard lk(emu);
                    if (!err)
                        err = std::current_exception();
                }
            });
        }
        for (auto& t : threads)
            t.join();
        if (err)
            std::rethrow_exception(err);
        uint64_t total = 0;
        for (uint64_t b : bytes)
            total += b;
        return total;
    };
    auto split = [&](const dirty::Harvest& h) {
        std::vector<std::vector<uint64_t>> per(nch);
        for (const auto& s : h.slots)
            s.for_each([&](uint64_t page) { per[slot_channel[s.slot]].push_back(s.gpa + page * 4096); });
        return per;
    };
    auto maybe_fail = [&](const char* phase) {
        if (opt.fail_in == phase) {
            dest->abort();  // the test hook: the destination goes away in this phase
            throw Error(fmt::format("destination lost during {} (test hook --fail-in {})", phase, phase));
        }
    };
    auto unthrottle = [&] {
        for (uint32_t i = 0; i < src.vcpu_count(); i++) {
            src.set_throttle(i, 0);
            src.set_rate(i, cfg.workload.rate_pages_per_s);
        }
    };

    auto enter_phase = [&](const char* phase) {
        rep.phase = phase;
        dest->enter_phase(phase);
    };
    try {
        enter_phase("setup");
        StreamHeader header = StreamHeader::of(src, nch);
        dest->open(header);
        rep.untracked = tracker.untracked_slots();
        rep.enable = tracker.enable();
        tracking = true;
        rep.setup_ms = since(t0) * 1e3;
        sampler.emplace(src);

        // Bulk pass: every page of the tracked slots (logging is already on,
        // so whatever changes meanwhile is in the first harvest).
        enter_phase("bulk");
        auto rt = clock::now();
        {
            std::vector<std::vector<uint64_t>> per(nch);
            uint64_t n = 0;
            for (uint32_t id : tracker.tracked_slots()) {
                const MemoryRegion* r = src.memslots().by_slot(id);
                for (uint64_t off = 0; off < r->size; off += 4096)
                    per[slot_channel[id]].push_back(r->gpa + off);
                n += r->pages();
            }
            maybe_fail("bulk");
            t_bw = clock::now();
            paced_bytes = 0;
            uint64_t b = send_pages(per);
            RoundReport rr;
            rr.round = 0;
            rr.pages = n;
            rr.bytes = b;
            rr.duration_s = since(rt);
            rep.rounds.push_back(rr);
            rep.pages += n;
            precopy_bytes += b;
            precopy_s += rr.duration_s;
            bw = precopy_s > 0 ? static_cast<double>(precopy_bytes) / precopy_s : 0;
        }

        // Pre-copy rounds.
        enter_phase("precopy");
        uint32_t throttle = 0;
        std::optional<dirty::Harvest> pending;
        for (uint32_t round = 1;; round++) {
            check_cancel();
            auto rstart = clock::now();
            const double prev_s = rep.rounds.back().duration_s;
            dirty::Harvest h = tracker.harvest();
            const uint64_t dirty_bytes = h.dirty_pages * 4096;
            rep.expected_downtime_ms = bw > 0 ? static_cast<double>(dirty_bytes) / bw * 1e3 : 0;
            const bool converged = bw > 0 && rep.expected_downtime_ms <= opt.max_downtime_ms;
            if (converged || round > opt.max_iterations) {
                pending = std::move(h);
                break;
            }
            if (round == 2)
                maybe_fail("precopy");
            RoundReport rr;
            rr.round = round;
            rr.dirty_pages = h.dirty_pages;
            rr.dirty_rate = prev_s > 0 ? static_cast<double>(h.dirty_pages) / prev_s : 0;
            // Throttling for guests that dirty faster than the link.
            if (opt.throttle == Throttle::AutoConverge && round >= 2) {
                throttle = throttle ? std::min<uint32_t>(99, throttle + 10) : 20;
                for (uint32_t i = 0; i < src.vcpu_count(); i++)
                    src.set_throttle(i, throttle);
            }
            if (opt.throttle == Throttle::DirtyLimit && prev_s > 0) {
                std::vector<double> per_vcpu(src.vcpu_count(), 0);
                if (tracker.mode() == dirty::Mode::Ring)
                    for (uint32_t i = 0; i < src.vcpu_count(); i++)
                        per_vcpu[i] = static_cast<double>(h.per_vcpu[i]);
                else
                    for (const auto& s : h.slots)
                        s.for_each([&](uint64_t p) {
                            int o = owner_of_gpa(src, s.gpa + p * 4096);
                            if (o >= 0)
                                per_vcpu[static_cast<size_t>(o)] += 1;
                        });
                for (uint32_t i = 0; i < src.vcpu_count(); i++)
                    if (per_vcpu[i] / prev_s > static_cast<double>(opt.dirty_limit))
                        src.set_rate(i, opt.dirty_limit);
                rr.dirty_limit = opt.dirty_limit;
            }
            rr.throttle_pct = throttle;
            t_bw = clock::now();
            paced_bytes = 0;
            auto per = split(h);
            rr.bytes = send_pages(per);
            rr.pages = h.dirty_pages;
            rr.duration_s = since(rstart);
            rep.pages += rr.pages;
            precopy_bytes += rr.bytes;
            precopy_s += rr.duration_s;
            bw = precopy_s > 0 ? static_cast<double>(precopy_bytes) / precopy_s : 0;
            rep.rounds.push_back(rr);
            if (opt.progress)
                fmt::print(stderr, "\r\033[Kmigrate: round {} sent {} pages ({}), {:.0f} dirty pages/s, expected downtime "
                                   "{:.0f} ms, throttle {}%",
                           round, rr.pages, human_bytes(static_cast<double>(rr.bytes)), rr.dirty_rate,
                           rep.expected_downtime_ms, throttle);
        }
        if (opt.progress)
            fmt::print(stderr, "\r\033[K");

        // Stop-and-copy.
        enter_phase("stop");
        rep.vcpu_stall_ms = sampler->stop();
        const auto tdown = clock::now();
        if (!src.park_guests(std::chrono::milliseconds(2000))) {
            src.unpark_guests();
            src.pause();  // a guest that does not park in time is paused by signal
        }
        parked = true;
        dirty::Harvest last = tracker.harvest();
        maybe_fail("stop");
        auto per = split(last);
        if (pending) {
            auto p2 = split(*pending);
            for (uint32_t c = 0; c < nch; c++) {
                per[c].insert(per[c].end(), p2[c].begin(), p2[c].end());
                std::sort(per[c].begin(), per[c].end());
                per[c].erase(std::unique(per[c].begin(), per[c].end()), per[c].end());
            }
        }
        // guest_memfd slots cannot be logged: they go whole, now.
        for (const auto& [slot, why] : tracker.untracked_slots()) {
            const MemoryRegion* r = src.memslots().by_slot(slot);
            for (uint64_t off = 0; off < r->size; off += 4096)
                per[slot_channel[slot]].push_back(r->gpa + off);
        }
        uint64_t final_pages = 0;
        for (const auto& v : per)
            final_pages += v.size();
        rep.remaining_bytes = final_pages * 4096;
        t_bw = clock::now();
        paced_bytes = 0;
        const uint64_t final_bytes = send_pages(per);
        rep.pages += final_pages;
        RoundReport fr;
        fr.round = static_cast<uint32_t>(rep.rounds.size());
        fr.pages = final_pages;
        fr.dirty_pages = final_pages;
        fr.bytes = final_bytes;
        fr.duration_s = since(tdown);
        fr.throttle_pct = throttle;
        rep.rounds.push_back(fr);
        std::vector<VcpuState> states;
        for (uint32_t i = 0; i < src.vcpu_count(); i++)
            states.push_back(save_vcpu(src.kvm(), src.vcpu(i)));
        std::vector<Digest> digests;
        if (opt.verify && !inproc)
            for (const auto& r : src.memslots().regions())
                for (uint64_t off = 0; off < r.size; off += kDigestBytes) {
                    const uint64_t len = std::min(kDigestBytes, r.size - off);
                    digests.push_back({r.gpa + off, len, digest64(src.host_ptr(r.gpa + off, len), len)});
                }
        ResultRecord sw = dest->switchover(states, digests);
        rep.downtime_ms = since(tdown) * 1e3;
        rep.switchover_pages_checked = sw.pages_checked;
        rep.switchover_mismatches = sw.mismatches;
        rep.switchover_mismatch_gpas = sw.mismatched_gpas;
        if (!sw.ok)
            throw Error("switchover check failed: " + sw.text);
        if (inproc)
            rep.refused_msrs = inproc->refused_;
        // The guest lives on at the destination now; the source stays parked.
        tracker.disable();
        tracking = false;
        rep.transferred_bytes = precopy_bytes + final_bytes;
        rep.zero_pages = zero_pages;
        rep.throughput = precopy_s > 0 ? static_cast<double>(precopy_bytes) / precopy_s : 0;
        enter_phase("destination");
        ResultRecord fin = dest->finish();
        rep.pages_checked = fin.pages_checked;
        rep.mismatches = fin.mismatches;
        rep.stamp_summary = fin.text;
        rep.destination_progressed = fin.ok != 0 || fin.text.find("no progress") == std::string::npos;
        rep.verified = opt.verify;
        rep.total_ms = since(t0) * 1e3;
        if (!fin.ok) {
            rep.status = "failed";
            rep.error = "destination check failed after resume: " + fin.text;
            return rep;
        }
        rep.status = "completed";
        rep.phase.clear();
        return rep;
    } catch (const std::exception& e) {
        rep.error = e.what();
        rep.status = cancel && cancel->load() ? "cancelled" : "failed";
        if (sampler)
            sampler->stop();
        try {
            dest->abort();
        } catch (...) {
        }
        // The source resumes as it was: tracking off, no throttle, running.
        try {
            if (tracking)
                tracker.disable();
        } catch (const std::exception& e2) {
            rep.error += fmt::format(" (and turning dirty logging off failed: {})", e2.what());
        }
        unthrottle();
        if (parked) {
            src.unpark_guests();
            if (src.paused())
                src.resume();
        }
        rep.transferred_bytes = precopy_bytes;
        rep.total_ms = since(t0) * 1e3;
        return rep;
    }
}

SourceCheck stop_and_check_source(StressVm& src)
{
    SourceCheck c;
    const uint64_t before = src.snapshot(0).pages_written;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    c.running = src.snapshot(0).pages_written > before || src.snapshot(0).state == MVM_STATE_DONE;
    src.request_stop();
    if (!src.wait_finished(std::chrono::seconds(10)))
        src.kill();
    c.stamps = verify_stamps(src);
    return c;
}

// ---- receiver -----------------------------------------------------------------

ReceiveReport receive_from(StressVm& dst, std::vector<std::unique_ptr<Transport>> channels, double post_run_s,
                           const std::string& die_in)
{
    uint64_t layout_pages = 0;
    for (const auto& r : dst.memslots().regions())
        layout_pages += r.pages();
    std::atomic<uint64_t> received{0};
    // Test hook: die like a killed receiver (no goodbye) in a phase.
    auto die_if = [&](const char* phase) {
        if (die_in == phase) {
            fmt::print(stderr, "receive: dying in {} (test hook --die-in)\n", phase);
            std::fflush(stderr);
            ::_exit(9);
        }
    };
    ReceiveReport rep;
    if (channels.empty())
        throw Error("receive: no connection");
    Transport& ctl = *channels[0];
    RecordWriter out(ctl);
    auto send_result = [&](const ResultRecord& r) {
        try {
            out.write(RecordType::Result, r.encode());
        } catch (...) {
        }
    };
    try {
        RecordReader in(ctl);
        Record hdr = in.read();
        if (hdr.type == RecordType::Hello)
            hdr = in.read();
        if (hdr.type != RecordType::Header)
            throw Error(fmt::format("migration stream: expected HEADER first, got {}", record_name(hdr.type)));
        StreamHeader sender = StreamHeader::decode(hdr.payload);
        StreamHeader mine = StreamHeader::of(dst, sender.nr_channels);
        if (auto why = mine.incompatibility(sender); !why.empty()) {
            ResultRecord r;
            r.text = why;
            send_result(r);
            throw Error("incompatible stream: " + why);
        }
        if (channels.size() != sender.nr_channels)
            throw Error(fmt::format("the sender uses {} channels but {} connected", sender.nr_channels, channels.size()));
        ResultRecord accepted;
        accepted.ok = 1;
        accepted.text = "layout accepted";
        out.write(RecordType::Result, accepted.encode());

        // Memory: one thread per data channel; channel 0's pages on this thread.
        std::mutex mu;
        std::exception_ptr err;
        auto pump = [&](Transport& t, bool skip_hello) {
            RecordReader r(t);
            uint64_t pages = 0, zeros = 0, bytes = 0;
            for (;;) {
                Record rec = r.read();
                if (skip_hello && rec.type == RecordType::Hello) {
                    skip_hello = false;
                    continue;
                }
                if (rec.type == RecordType::ChannelDone) {
                    die_if("stop");
                    break;
                }
                if (rec.type != RecordType::Pages)
                    throw Error(fmt::format("migration stream: {} where PAGES or CHANNEL_DONE belongs",
                                            record_name(rec.type)));
                const uint64_t n = apply_pages(dst, rec.payload, &zeros);
                pages += n;
                bytes += rec.payload.size();
                const uint64_t total = received += n;
                die_if("bulk");
                if (total > layout_pages)
                    die_if("precopy");
            }
            std::lock_guard lk(mu);
            rep.pages += pages;
            rep.zero_pages += zeros;
            rep.bytes += bytes;
        };
        std::vector<std::thread> threads;
        for (size_t c = 1; c < channels.size(); c++)
            threads.emplace_back([&, c] {
                try {
                    pump(*channels[c], true);
                } catch (...) {
                    std::lock_guard lk(mu);
                    if (!err)
                        err = std::current_exception();
                    for (auto& ch : channels)
                        ch->shutdown();  // unblock the others
                }
            });
        try {
            pump(ctl, false);
        } catch (...) {
            for (auto& ch : channels)
                ch->shutdown();
            for (auto& t : threads)
                t.join();
            throw;
        }
        for (auto& t : threads)
            t.join();
        if (err)
            std::rethrow_exception(err);

        // State, digests, end.
        std::vector<VcpuState> states;
        std::vector<Digest> digests;
        for (;;) {
            Record rec = in.read();
            if (rec.type == RecordType::End)
                break;
            if (rec.type == RecordType::Vcpu) {
                states.push_back(VcpuState::parse(rec.payload));
                if (states.back().id >= dst.vcpu_count())
                    throw Error(fmt::format("migration stream: VCPU record for vCPU {} of {}", states.back().id,
                                            dst.vcpu_count()));
            } else if (rec.type == RecordType::Digests) {
                if (rec.payload.size() < 4)
                    throw Error("migration stream: DIGESTS is truncated");
                uint32_t n;
                std::memcpy(&n, rec.payload.data(), 4);
                if (rec.payload.size() != 4 + static_cast<size_t>(n) * sizeof(Digest))
                    throw Error("migration stream: DIGESTS length does not match its count");
                digests.resize(n);
                std::memcpy(digests.data(), rec.payload.data() + 4, n * sizeof(Digest));
            } else {
                throw Error(fmt::format("migration stream: {} where VCPU, DIGESTS or END belongs", record_name(rec.type)));
            }
        }
        if (states.size() != dst.vcpu_count())
            throw Error(fmt::format("migration stream: {} vCPU states for {} vCPUs", states.size(), dst.vcpu_count()));
        ResultRecord sw;
        sw.ok = 1;
        for (const auto& d : digests) {
            const uint8_t* p = dst.host_ptr(d.gpa, d.bytes);
            sw.pages_checked += d.bytes / 4096;
            if (!p || digest64(p, d.bytes) != d.value) {
                sw.mismatches += d.bytes / 4096;
                if (sw.mismatched_gpas.size() < 16)
                    sw.mismatched_gpas.push_back(d.gpa);
            }
        }
        if (sw.mismatches) {
            sw.ok = 0;
            sw.text = fmt::format("{} ranges differ from the source at switchover, first at GPA {:#x}",
                                  sw.mismatched_gpas.size(), sw.mismatched_gpas[0]);
            send_result(sw);
            throw Error(sw.text);
        }
        // The stream rewrote guest memory, boot parameters included: they
        // must still describe the guest this receiver was started for.
        if (auto why = dst.guest_boot_params_difference(); !why.empty()) {
            ResultRecord r;
            r.text = why + "; start receive with the source's --seed/--pattern/--write-pct/--touch";
            send_result(r);
            throw Error("incompatible guest: " + r.text);
        }
        for (const auto& s : states)
            restore_vcpu(dst.kvm(), dst.vcpu(s.id), s);
        for (uint32_t i = 0; i < dst.vcpu_count(); i++) {
            dst.set_throttle(i, 0);
            dst.set_rate(i, dst.config().workload.rate_pages_per_s);
            dst.mailbox(i)->park = 0;
        }
        dst.set_pass_gate(0);
        std::vector<uint64_t> at_switch;
        dst.start();
        for (uint32_t i = 0; i < dst.vcpu_count(); i++)
            at_switch.push_back(dst.snapshot(i).pages_written + dst.snapshot(i).pages_read);
        sw.text = "resumed";
        out.write(RecordType::Result, sw.encode());

        std::this_thread::sleep_for(std::chrono::duration<double>(post_run_s));
        bool progressed = true;
        for (uint32_t i = 0; i < dst.vcpu_count(); i++)
            progressed &= dst.snapshot(i).pages_written + dst.snapshot(i).pages_read > at_switch[i];
        dst.request_stop();
        if (!dst.wait_finished(std::chrono::seconds(3)))
            dst.kill();
        ResultRecord fin;
        if (auto f = dst.failure()) {
            fin.text = "destination guest failed: " + f->reason;
        } else {
            StampCheck c = verify_stamps(dst);
            fin.pages_checked = rep.pages_checked = c.pages_checked;
            fin.mismatches = rep.mismatches = c.mismatches;
            for (const auto& m : c.first)
                fin.mismatched_gpas.push_back(m.gpa);
            fin.ok = c.ok() && progressed;
            fin.text = progressed ? c.summary() : "the destination guest made no progress after resume; " + c.summary();
            rep.stamp_summary = fin.text;
        }
        send_result(fin);
        rep.status = fin.ok ? "completed" : "failed";
        if (!fin.ok)
            rep.error = fin.text;
        return rep;
    } catch (const std::exception& e) {
        rep.status = "failed";
        rep.error = e.what();
        if (dst.started())
            dst.kill();
        return rep;
    }
}

int bind_listener(const std::string& spec)
{
    auto [host, port] = parse_tcp("--listen", spec);
    sockaddr_storage ss{};
    socklen_t sl;
    if (host.find(':') != std::string::npos) {
        auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host.c_str(), &a->sin6_addr) != 1)
            throw UsageError(fmt::format("--listen: '{}' is not an IPv6 address; use e.g. tcp:[::1]:{}", host, port));
        sl = sizeof(*a);
    } else {
        auto* a = reinterpret_cast<sockaddr_in*>(&ss);
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (host == "0.0.0.0" || host == "*")
            a->sin_addr.s_addr = INADDR_ANY;
        else if (inet_pton(AF_INET, host.c_str(), &a->sin_addr) != 1)
            throw UsageError(fmt::format("--listen: '{}' is not an IPv4 address; use e.g. tcp:0.0.0.0:{}", host, port));
        sl = sizeof(*a);
    }
    int fd = ::socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        throw SysError("socket", errno);
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), sl) != 0) {
        const int err = errno;
        ::close(fd);
        throw UsageError(fmt::format("--listen {}: cannot bind: {}; {}", spec, errno_text(err),
                                     err == EADDRINUSE ? "pick a free port" : "use an address of this host"));
    }
    return fd;
}

ReceiveReport receive(StressVm& dst, const ReceiveOptions& opt)
{
    int ls = bind_listener(opt.listen);
    FdTransport guard(ls, "listener");
    if (::listen(ls, 64) != 0)
        throw SysError("listen", errno);
    fmt::print(stderr, "receive: listening on {}\n", opt.listen);
    auto accept_one = [&](double timeout_s) -> std::unique_ptr<FdTransport> {
        pollfd p{ls, POLLIN, 0};
        int rc = ::poll(&p, 1, static_cast<int>(timeout_s * 1000));
        if (rc == 0)
            throw Error(fmt::format("receive: no sender connected to {} within {:.0f} s", opt.listen, timeout_s));
        if (rc < 0)
            throw SysError("poll on the listening socket", errno);
        sockaddr_storage peer{};
        socklen_t pl = sizeof(peer);
        int fd = ::accept4(ls, reinterpret_cast<sockaddr*>(&peer), &pl, SOCK_CLOEXEC);
        if (fd < 0)
            throw SysError("accept", errno);
        return std::make_unique<FdTransport>(fd, "the sender");
    };
    // Connections can arrive in any order: sort them by their HELLO.
    auto first = accept_one(opt.accept_timeout_s);
    RecordReader r0(*first);
    Record h0 = r0.read();
    if (h0.type != RecordType::Hello || h0.payload.size() != 8)
        throw Error("receive: the first record is not HELLO; is the sender minivmm migrate?");
    uint32_t ch, nch;
    std::memcpy(&ch, h0.payload.data(), 4);
    std::memcpy(&nch, h0.payload.data() + 4, 4);
    if (nch == 0 || nch > 64 || ch >= nch)
        throw Error(fmt::format("receive: HELLO names channel {} of {}", ch, nch));
    std::vector<std::unique_ptr<Transport>> chans(nch);
    chans[ch] = std::move(first);
    for (uint32_t i = 1; i < nch; i++) {
        auto t = accept_one(30);
        RecordReader r(*t);
        Record h = r.read();
        uint32_t c = 0, n = 0;
        if (h.type != RecordType::Hello || h.payload.size() != 8)
            throw Error("receive: a connection did not start with HELLO");
        std::memcpy(&c, h.payload.data(), 4);
        std::memcpy(&n, h.payload.data() + 4, 4);
        if (n != nch || c >= nch || chans[c])
            throw Error(fmt::format("receive: HELLO for channel {} of {} does not fit", c, n));
        chans[c] = std::move(t);
    }
    return receive_from(dst, std::move(chans), opt.post_run_s, opt.die_in);
}

// ---- reports ------------------------------------------------------------------

nlohmann::json MigrateReport::to_json() const
{
    using nlohmann::json;
    json j;
    j["status"] = status;
    if (!error.empty()) {
        j["error"] = error;
        j["failed_phase"] = phase;
    }
    j["total_ms"] = total_ms;
    j["setup_ms"] = setup_ms;
    j["downtime_ms"] = downtime_ms;
    j["expected_downtime_ms"] = expected_downtime_ms;
    j["transferred_bytes"] = transferred_bytes;
    j["remaining_bytes"] = remaining_bytes;
    j["zero_pages"] = zero_pages;
    j["pages"] = pages;
    j["throughput_bytes_per_s"] = throughput;
    j["rounds"] = json::array();
    for (const auto& r : rounds)
        j["rounds"].push_back({{"round", r.round},
                               {"pages", r.pages},
                               {"dirty_pages", r.dirty_pages},
                               {"dirty_rate_pages_per_s", r.dirty_rate},
                               {"bytes", r.bytes},
                               {"duration_ms", r.duration_s * 1e3},
                               {"throttle_pct", r.throttle_pct},
                               {"dirty_limit_pages_per_s", r.dirty_limit}});
    j["vcpu_stall_ms"] = vcpu_stall_ms;
    j["enable_ms"] = enable.wall_s * 1e3;
    j["untracked_slots"] = json::array();
    for (const auto& [s, why] : untracked)
        j["untracked_slots"].push_back({{"slot", s}, {"why", why}});
    j["verify"] = {{"enabled", verified},
                   {"switchover_pages_checked", switchover_pages_checked},
                   {"switchover_mismatches", switchover_mismatches},
                   {"switchover_mismatch_gpas", switchover_mismatch_gpas},
                   {"pages_checked", pages_checked},
                   {"mismatches", mismatches},
                   {"summary", stamp_summary},
                   {"destination_progressed", destination_progressed}};
    if (!refused_msrs.empty())
        j["refused_msrs"] = refused_msrs;
    return j;
}

std::string MigrateReport::to_table() const
{
    std::string o = fmt::format("migration {}{}\n", status, error.empty() ? "" : fmt::format(" in {}: {}", phase, error));
    o += fmt::format("total {:.1f} ms, setup {:.1f} ms (logging on in {:.1f} ms), downtime {:.1f} ms (expected {:.1f} "
                     "ms)\n",
                     total_ms, setup_ms, enable.wall_s * 1e3, downtime_ms, expected_downtime_ms);
    o += fmt::format("transferred {} ({} pages, {} zero), remaining at stop {} , throughput {}/s\n",
                     human_bytes(static_cast<double>(transferred_bytes)), pages, zero_pages,
                     human_bytes(static_cast<double>(remaining_bytes)), human_bytes(throughput));
    o += fmt::format("{:>6} {:>10} {:>12} {:>14} {:>12} {:>10} {:>9} {:>12}\n", "round", "pages", "dirty pages",
                     "dirty pages/s", "bytes", "ms", "throttle", "dirty-limit");
    for (size_t i = 0; i < rounds.size(); i++) {
        const auto& r = rounds[i];
        std::string name = i == 0 ? "bulk" : (i + 1 == rounds.size() && status != "failed" ? "stop" : std::to_string(r.round));
        o += fmt::format("{:>6} {:>10} {:>12} {:>14.0f} {:>12} {:>10.1f} {:>8}% {:>12}\n", name, r.pages, r.dirty_pages,
                         r.dirty_rate, human_bytes(static_cast<double>(r.bytes)), r.duration_s * 1e3, r.throttle_pct,
                         r.dirty_limit ? std::to_string(r.dirty_limit) : "-");
    }
    if (!vcpu_stall_ms.empty()) {
        o += "longest stall per vCPU during pre-copy (ms):";
        for (size_t i = 0; i < vcpu_stall_ms.size(); i++)
            o += fmt::format(" vcpu{} {:.1f}", i, vcpu_stall_ms[i]);
        o += "\n";
    }
    for (const auto& [s, why] : untracked)
        o += fmt::format("slot {} sent whole at stop-and-copy: {}\n", s, why);
    if (verified)
        o += fmt::format("verify: switchover {} pages checked, {} mismatches; destination {}\n", switchover_pages_checked,
                         switchover_mismatches, stamp_summary);
    return o;
}

nlohmann::json ReceiveReport::to_json() const
{
    return {{"status", status},         {"error", error},           {"pages", pages},
            {"zero_pages", zero_pages}, {"bytes", bytes},           {"verify", {{"pages_checked", pages_checked}, {"mismatches", mismatches}, {"summary", stamp_summary}}}};
}

}  // namespace mvm::migration
