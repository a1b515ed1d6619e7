#include "migration/receiver_impl.hpp"

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <fmt/format.h>
#include <mutex>
#include <string_view>
#include <thread>

#include "base/error.hpp"
#include "migration/admission.hpp"
#include "migration/channels.hpp"
#include "migration/page_codec.hpp"
#include "migration/postcopy.hpp"
#include "migration/resume.hpp"
#include "migration/transport/tcp.hpp"
#include "migration/vcpu_state.hpp"
#include "migration/verify.hpp"

namespace mvm::migration {

namespace detail {


ReceiveReport Receiver::run(double post_run_s)
{
    // The step under way and since when: a failure's report times the step
    // it cut short up to the failure and leaves the later ones out.
    const char* step = "header";
    auto t = clock::now();
    auto enter = [&](const char* next) {
        step = next;
        t = clock::now();
    };
    try {
        RecordReader in(*ch_[0]);
        check_header(in);
        enter("memory");
        receive_memory();
        rep_.memory_ms = ms_since(t);
        enter("switchover");
        Handover h = read_state(in);
        if (h.postcopy) {
            enter("postcopy");
            postcopy(in, h, post_run_s);
            phase("stopped");
            rep_.total_ms = ms_since(t0_);
            return rep_;
        }
        std::vector<VcpuState>& states = h.states;
        check_guest();
        Resumed at = resume_here(states);
        rep_.switchover_ms = ms_since(t);
        if (!hold_paused_)
            phase("running");
        enter("verify");
        verify(in, at);
        if (hold_paused_ && !held_until_cont(at)) {
            rep_.total_ms = ms_since(t0_);
            return rep_;
        }
        enter("post-run");
        run_and_report(at, post_run_s);
        phase("stopped");
        rep_.total_ms = ms_since(t0_);
        return rep_;
    } catch (const std::exception& e) {
        rep_.status = "failed";
        rep_.error = e.what();
        rep_.failed_step = step;
        const double cut = ms_since(t);
        if (step == std::string_view("memory"))
            rep_.memory_ms = cut;
        else if (step == std::string_view("switchover"))
            rep_.switchover_ms = cut;
        else if (step == std::string_view("postcopy"))
            rep_.postcopy_ms = cut;
        else if (step == std::string_view("verify"))
            rep_.verify_ms = cut;
        else if (step == std::string_view("post-run"))
            rep_.post_run_ms = cut;
        if (!rep_.guest_lost)
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
        write_out(RecordType::Result, r.encode());
    } catch (...) {
    }
}

void Receiver::write_out(RecordType type, std::span<const uint8_t> payload)
{
    std::lock_guard lk(out_mu_);
    out_->write(type, payload);
}

// The sender's layout against ours, before a byte of memory.
void Receiver::check_header(RecordReader& in)
{
    Record hdr = header_ ? std::move(*header_) : in.read();
    if (hdr.type == RecordType::Hello) {
        if (auto h = Hello::decode(hdr.payload); h && !session_)
            session_ = h->session;
        hdr = in.read();
    }
    if (hdr.type != RecordType::Header)
        throw Error(fmt::format("migration stream: expected HEADER first, got {}", record_name(hdr.type)));
    StreamHeader sender = StreamHeader::decode(hdr.payload);
    hold_paused_ = sender.guest_stopped && wait_cont_;
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
    data_channels_ = sender.data_channels();
    // Our memory before any arrives: what a page never sent still holds
    // (receive() hashed it before the sender connected: not in its setup).
    if (landed_.empty())
        landed_ = PageHashes::of_memory(dst_);
    ResultRecord accepted;
    accepted.ok = 1;
    accepted.text = "layout accepted";
    out_->write(RecordType::Result, accepted.encode());
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
                pump(static_cast<uint32_t>(c), true, nullptr);
            } catch (...) {
                std::lock_guard lk(mu_);
                if (!err)
                    err = std::current_exception();
                for (auto& ch : ch_)
                    ch->shutdown();  // unblock the others
            }
        });
    try {
        pump(0, false, nullptr);
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
void Receiver::pump(uint32_t c, bool skip_hello, FaultServer* postcopy)
{
    std::optional<UnitPlacer> placer;
    if (postcopy)
        placer.emplace(dst_, *postcopy);
    std::optional<numa::ThreadPolicyScope> scope;
    if (c < data_channels_)  // the preempt channel's pages are anyone's
        ChannelMap(dst_, data_channels_).enter(c, scope);
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
            if (placer && placer->partial())
                throw Error(fmt::format("migration stream: channel {} ended postcopy inside a huge page", c));
            if (!postcopy)
                phase("stop");
            break;
        }
        if (f.type != RecordType::Pages && f.type != RecordType::PagesZstd)
            throw Error(fmt::format("migration stream: {} where PAGES or CHANNEL_DONE belongs", record_name(f.type)));
        const uint64_t n = dec.read(r, f, dst_, [this](uint64_t gpa, uint64_t h) { landed_.set(gpa, h); },
                                    placer ? &*placer : nullptr);
        const uint64_t total = received_ += n;
        if (postcopy) {
            phase("postcopy");
            continue;
        }
        phase("bulk");
        if (total > layout_pages_)
            phase("precopy");
    }
}

// The vCPU states, then END; or (postcopy) the states, DISCARDs and POSTCOPY_RUN.
Receiver::Handover Receiver::read_state(RecordReader& in)
{
    Handover h;
    std::vector<VcpuState>& states = h.states;
    for (;;) {
        Record rec = in.read();
        if (rec.type == RecordType::End && !h.postcopy)
            break;
        if (rec.type == RecordType::PostcopyRun && h.postcopy)
            break;
        if (rec.type == RecordType::Discard && states.size() == dst_.vcpu_count()) {
            h.postcopy = true;
            std::vector<uint64_t> g = decode_gpas(rec.payload, "DISCARD");
            for (uint64_t gpa : g)
                if (!dst_.host_ptr(gpa, 4096))
                    throw Error(fmt::format("migration stream: DISCARD names GPA {:#x}, outside every memslot", gpa));
            h.discard.insert(h.discard.end(), g.begin(), g.end());
            continue;
        }
        if (rec.type != RecordType::Vcpu || h.postcopy)
            throw Error(fmt::format("migration stream: {} where {} belongs", record_name(rec.type),
                                    h.postcopy ? "DISCARD or POSTCOPY_RUN" : "VCPU or END"));
        states.push_back(VcpuState::parse(rec.payload));
        if (states.back().id >= dst_.vcpu_count())
            throw Error(fmt::format("migration stream: VCPU record for vCPU {} of {}", states.back().id,
                                    dst_.vcpu_count()));
    }
    if (states.size() != dst_.vcpu_count())
        throw Error(fmt::format("migration stream: {} vCPU states for {} vCPUs", states.size(), dst_.vcpu_count()));
    return h;
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
    Resumed at = resume(dst_, states, hold_paused_);
    rep_.restore_ms = at.restore_ms;
    rep_.refused_msrs = at.refused_msrs;
    rep_.guest = "running";
    ResultRecord r;
    r.ok = 1;
    r.text = "resumed";
    r.post_run_s = post_run_s_;  // the sender waits that much longer for the last RESULT
    r.restore_ms = at.restore_ms;
    r.refused_msrs = at.refused_msrs;
    try {
        write_out(RecordType::Result, r.encode());
    } catch (...) {
        // Postcopy with recovery: the cut shows in the channels' reads (the
        // guest runs here now), and a recovery goes on without this RESULT.
        if (!rep_.postcopy || !recovery_ || !recovery_->reconnect)
            throw;
    }
    return at;
}

// A stopped source's guest, loaded, verified and parked here: the migration
// is complete ("paused"); it runs once the gate says cont ("running"), from
// where `at` now counts its progress. False: it never ran (quit).
bool Receiver::held_until_cont(Resumed& at)
{
    rep_.status = "completed";
    rep_.guest = "paused";
    phase("paused");
    if (!wait_cont_()) {
        rep_.guest = "paused (never continued)";
        return false;
    }
    for (uint32_t i = 0; i < dst_.vcpu_count(); i++)
        at.progress[i] = dst_.snapshot(i).pages_written + dst_.snapshot(i).pages_read;
    dst_.unpark_guests();
    rep_.guest = "running";
    phase("running");
    return true;
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
    GuestGap g;
    if (hold_paused_) {  // no gap to measure: the guest was stopped before and stays so
        g.max_ms = -1;
        g.note = "the guest was stopped at the source and stays paused here until cont";
    } else if (from_file_) {
        g.max_ms = -1;
        g.note = "restored from a file: the guest's gap is how long the file lay, not a downtime";
    } else {
        g = guest_gap(dst_, at, std::chrono::seconds(2));
    }
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
        if (auto d = nlohmann::json::parse(fin.details, nullptr, false); d.is_object() && d.contains("placement"))
            rep_.placement = d["placement"];
    }
    send_result(fin);
    rep_.status = fin.ok ? "completed" : "failed";
    if (!fin.ok)
        rep_.error = fin.text;
}

}  // namespace detail

ReceiveReport receive_from(StressVm& dst, std::vector<std::unique_ptr<Transport>> channels, double post_run_s,
                           const PhaseHook& on_phase, PageHashes before, std::optional<Record> header,
                           const PostcopyHook& on_postcopy, const ContGate& wait_cont, bool from_file,
                           const Recovery* recovery)
{
    if (channels.empty())
        throw Error("receive: no connection");
    return detail::Receiver(dst, std::move(channels), on_phase, std::move(before), std::move(header), post_run_s, on_postcopy,
                    wait_cont, from_file, recovery)
        .run(post_run_s);
}

}  // namespace mvm::migration
