#include "migration/receiver.hpp"

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <fmt/format.h>
#include <mutex>
#include <thread>

#include "base/error.hpp"
#include "migration/admission.hpp"
#include "migration/channels.hpp"
#include "migration/page_codec.hpp"
#include "migration/resume.hpp"
#include "migration/transport/tcp.hpp"
#include "migration/vcpu_state.hpp"
#include "migration/verify.hpp"

namespace mvm::migration {

namespace {

using clock = std::chrono::steady_clock;

// One incoming migration into `dst` from connected channels, channel 0
// (the control channel) first.
class Receiver {
public:
    Receiver(StressVm& dst, std::vector<std::unique_ptr<Transport>> channels, const PhaseHook& on_phase,
             PageHashes before, std::optional<Record> header, double post_run_s)
        : dst_(dst), ch_(std::move(channels)), on_phase_(on_phase), out_(*ch_[0]), landed_(std::move(before)),
          header_(std::move(header)), post_run_s_(post_run_s)
    {
        for (const auto& r : dst_.memslots().regions())
            layout_pages_ += r.pages();
    }
    ReceiveReport run(double post_run_s);
    ReceiveReport& report() { return rep_; }

private:
    void check_header(RecordReader& in);
    void receive_memory();
    void pump(uint32_t c, bool skip_hello);
    std::vector<VcpuState> read_state(RecordReader& in);
    void check_guest();
    Resumed resume_here(const std::vector<VcpuState>& states);
    void verify(RecordReader& in, const Resumed& at);
    void run_and_report(const Resumed& at, double post_run_s);
    double ms_since(clock::time_point t) const { return std::chrono::duration<double, std::milli>(clock::now() - t).count(); }
    void send_result(const ResultRecord& r);
    void phase(const char* p) const
    {
        if (on_phase_)
            on_phase_(p);
    }

    StressVm& dst_;
    std::vector<std::unique_ptr<Transport>> ch_;
    const PhaseHook& on_phase_;
    RecordWriter out_;  // to the sender, on channel 0
    uint64_t layout_pages_ = 0;
    std::atomic<uint64_t> received_{0};
    std::mutex mu_;  // guards rep_ while the channels pump
    ReceiveReport rep_;
    PageHashes landed_;  // every page as it landed
    std::optional<Record> header_;  // channel 0's HEADER, when admission read it
    double post_run_s_;
    const clock::time_point t0_ = clock::now();
};

ReceiveReport Receiver::run(double post_run_s)
{
    try {
        RecordReader in(*ch_[0]);
        check_header(in);
        auto t = clock::now();
        receive_memory();
        rep_.memory_ms = ms_since(t);
        t = clock::now();
        std::vector<VcpuState> states = read_state(in);
        check_guest();
        const Resumed at = resume_here(states);
        rep_.switchover_ms = ms_since(t);
        phase("running");
        verify(in, at);
        run_and_report(at, post_run_s);
        phase("stopped");
        rep_.total_ms = ms_since(t0_);
        return rep_;
    } catch (const std::exception& e) {
        rep_.status = "failed";
        rep_.error = e.what();
        rep_.guest = dst_.started() ? "stopped (killed after the failure)" : "never started";
        if (dst_.started())
            dst_.kill();
        rep_.total_ms = ms_since(t0_);
        return rep_;
    }
}

// Best effort: the sender may be gone already.
void Receiver::send_result(const ResultRecord& r)
{
    try {
        out_.write(RecordType::Result, r.encode());
    } catch (...) {
    }
}

// The sender's layout against ours, before a byte of memory.
void Receiver::check_header(RecordReader& in)
{
    Record hdr = header_ ? std::move(*header_) : in.read();
    if (hdr.type == RecordType::Hello)
        hdr = in.read();
    if (hdr.type != RecordType::Header)
        throw Error(fmt::format("migration stream: expected HEADER first, got {}", record_name(hdr.type)));
    StreamHeader sender = StreamHeader::decode(hdr.payload);
    StreamHeader mine = StreamHeader::of(dst_, sender.nr_channels);
    if (auto why = mine.incompatibility(sender); !why.empty()) {
        ResultRecord r;
        r.text = why;
        send_result(r);
        throw Error("incompatible stream: " + why);
    }
    if (ch_.size() != sender.nr_channels)
        throw Error(fmt::format("the sender uses {} channels but {} connected", sender.nr_channels, ch_.size()));
    rep_.channels = sender.nr_channels;
    // Our memory before any arrives: what a page never sent still holds
    // (receive() hashed it before the sender connected: not in its setup).
    if (landed_.empty())
        landed_ = PageHashes::of_memory(dst_);
    ResultRecord accepted;
    accepted.ok = 1;
    accepted.text = "layout accepted";
    out_.write(RecordType::Result, accepted.encode());
}

// Memory: one thread per data channel; channel 0's pages on this thread.
// The first error stops every channel.
void Receiver::receive_memory()
{
    std::exception_ptr err;
    std::vector<std::thread> threads;
    for (size_t c = 1; c < ch_.size(); c++)
        threads.emplace_back([&, c] {
            try {
                pump(static_cast<uint32_t>(c), true);
            } catch (...) {
                std::lock_guard lk(mu_);
                if (!err)
                    err = std::current_exception();
                for (auto& ch : ch_)
                    ch->shutdown();  // unblock the others
            }
        });
    try {
        pump(0, false);
    } catch (...) {
        for (auto& ch : ch_)
            ch->shutdown();
        for (auto& t : threads)
            t.join();
        throw;
    }
    for (auto& t : threads)
        t.join();
    if (err)
        std::rethrow_exception(err);
}

// One channel's PAGES records up to its CHANNEL_DONE, on its virtual node's
// host CPUs and under its policy (ChannelMap: as the sender maps them).
void Receiver::pump(uint32_t c, bool skip_hello)
{
    std::optional<numa::ThreadPolicyScope> scope;
    ChannelMap(dst_, static_cast<uint32_t>(ch_.size())).enter(c, scope);
    RecordReader r(*ch_[c]);
    PageDecoder dec;
    // What this channel got counts in the report even when the stream breaks (issue 14).
    struct Count {
        Receiver& rc;
        const PageDecoder& dec;
        ~Count()
        {
            const PageCounts& n = dec.counts();
            std::lock_guard lk(rc.mu_);
            rc.rep_.pages += n.pages;
            rc.rep_.zero_pages += n.zero_pages;
            rc.rep_.bytes += n.frame_bytes;
            rc.rep_.compression.data_bytes += n.data_bytes;
            rc.rep_.compression.wire_bytes += n.payload_bytes;
            rc.rep_.compression.cpu_ms += n.codec_cpu_s * 1e3;
            if (n.zstd_frames)
                rc.rep_.compression.method = "zstd";  // the level is the sender's to know
        }
    } count{*this, dec};
    for (;;) {
        const FrameHead f = r.next();
        if (skip_hello && f.type == RecordType::Hello) {
            r.payload(f);
            skip_hello = false;
            continue;
        }
        if (f.type == RecordType::ChannelDone) {
            r.payload(f);
            phase("stop");
            break;
        }
        if (f.type != RecordType::Pages && f.type != RecordType::PagesZstd)
            throw Error(fmt::format("migration stream: {} where PAGES or CHANNEL_DONE belongs", record_name(f.type)));
        const uint64_t n = dec.read(r, f, dst_, [this](uint64_t gpa, uint64_t h) { landed_.set(gpa, h); });
        const uint64_t total = received_ += n;
        phase("bulk");
        if (total > layout_pages_)
            phase("precopy");
    }
}

// The vCPU states, then END.
std::vector<VcpuState> Receiver::read_state(RecordReader& in)
{
    std::vector<VcpuState> states;
    for (;;) {
        Record rec = in.read();
        if (rec.type == RecordType::End)
            break;
        if (rec.type != RecordType::Vcpu)
            throw Error(fmt::format("migration stream: {} where VCPU or END belongs", record_name(rec.type)));
        states.push_back(VcpuState::parse(rec.payload));
        if (states.back().id >= dst_.vcpu_count())
            throw Error(fmt::format("migration stream: VCPU record for vCPU {} of {}", states.back().id,
                                    dst_.vcpu_count()));
    }
    if (states.size() != dst_.vcpu_count())
        throw Error(fmt::format("migration stream: {} vCPU states for {} vCPUs", states.size(), dst_.vcpu_count()));
    return states;
}

// The stream rewrote guest memory, boot parameters included: they must
// still describe the guest this receiver was started for.
void Receiver::check_guest()
{
    if (auto why = dst_.guest_boot_params_difference(); !why.empty()) {
        ResultRecord r;
        r.text = why + "; start receive with the source's --seed/--pattern/--write-pct/--fill";
        send_result(r);
        throw Error("incompatible guest: " + r.text);
    }
    dst_.adopt_guest_vm_tag();  // the same VM continues here: its stamps carry the source's tag
}

Resumed Receiver::resume_here(const std::vector<VcpuState>& states)
{
    Resumed at = resume(dst_, states);
    rep_.restore_ms = at.restore_ms;
    rep_.refused_msrs = at.refused_msrs;
    rep_.guest = "running";
    ResultRecord r;
    r.ok = 1;
    r.text = "resumed";
    r.post_run_s = post_run_s_;  // the sender waits that much longer for the last RESULT
    r.restore_ms = at.restore_ms;
    r.refused_msrs = at.refused_msrs;
    out_.write(RecordType::Result, r.encode());
    return at;
}

// While the guest runs: the parked source's digests against our pages as
// they landed, and the switchover as the guest saw it.
void Receiver::verify(RecordReader& in, const Resumed& at)
{
    Record rec = in.read();
    const auto t = clock::now();
    if (rec.type != RecordType::Digests)
        throw Error(fmt::format("migration stream: {} where DIGESTS belongs", record_name(rec.type)));
    const std::vector<Digest> digests = decode_digests(rec.payload);
    ResultRecord r = check_landed(landed_, digests);
    rep_.verify_ms = ms_since(t);
    rep_.verified = !digests.empty();
    rep_.verify_pages_checked = r.pages_checked;
    rep_.verify_mismatches = r.mismatches;
    const GuestGap g = guest_gap(dst_, at, std::chrono::seconds(2));
    r.guest_gap_ms = rep_.downtime_guest_ms = g.max_ms;
    rep_.downtime_guest_note = g.note;
    send_result(r);
    if (!r.ok)
        throw Error("verification failed: " + r.text);
}

void Receiver::run_and_report(const Resumed& at, double post_run_s)
{
    const auto t = clock::now();
    const AfterRun after = run_and_check(dst_, at, post_run_s, std::chrono::seconds(3));
    rep_.post_run_ms = ms_since(t);
    rep_.guest = "stopped after its post-run check";
    const ResultRecord& fin = after.result;
    if (after.stamps_checked) {
        rep_.pages_checked = fin.pages_checked;
        rep_.mismatches = fin.mismatches;
        rep_.stamp_summary = fin.text;
    }
    send_result(fin);
    rep_.status = fin.ok ? "completed" : "failed";
    if (!fin.ok)
        rep_.error = fin.text;
}

}  // namespace

ReceiveReport receive_from(StressVm& dst, std::vector<std::unique_ptr<Transport>> channels, double post_run_s,
                           const PhaseHook& on_phase, PageHashes before, std::optional<Record> header)
{
    if (channels.empty())
        throw Error("receive: no connection");
    return Receiver(dst, std::move(channels), on_phase, std::move(before), std::move(header), post_run_s)
        .run(post_run_s);
}

ReceiveReport receive(StressVm& dst, const ReceiveOptions& opt, const PhaseHook& on_phase)
{
    AdmitOptions ao;
    ao.listen = opt.listen;
    ao.timeout_s = opt.accept_timeout_s;
    ao.io_timeout_s = opt.io_timeout_s;
    if (opt.tls.enabled())
        ao.tls = tls::Context::server(opt.tls);  // files checked before the listener opens
    PageHashes before;
    Admitted a;
    {
        int ls = bind_listener(opt.listen);
        FdTransport guard(ls, "listener");  // closed once a sender is admitted: later ones are refused
        if (::listen(ls, 64) != 0)
            throw SysError("listen", errno);
        // Hashed while nobody waits: a sender's setup does not include it.
        before = PageHashes::of_memory(dst);
        fmt::print(stderr, "receive: listening on {}{}\n", opt.listen,
                   ao.tls ? fmt::format(" (TLS: {})", ao.tls->describe()) : "");
        a = admit(ls, ao);
    }
    // The admitted sender: every wait on it bounded by --io-timeout.
    IoLimits l;
    l.idle_s = opt.io_timeout_s;
    for (auto& c : a.channels)
        c->set_limits(l);
    ReceiveReport r = receive_from(dst, std::move(a.channels), opt.post_run_s, on_phase, std::move(before),
                                   std::move(a.header));
    r.peer = a.peer;
    r.peer_identity = a.identity;
    r.security = ao.tls ? (ao.tls->kind() == tls::Kind::X509 ? "tls-x509" : "tls-psk") : "none";
    r.dropped_connections = a.dropped;
    return r;
}

}  // namespace mvm::migration
