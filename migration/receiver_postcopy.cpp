// migration/receiver_postcopy.cpp - the Receiver's postcopy (postcopy.hpp):
// the guest resumes before its memory is all here, pages come on demand and
// pushed; a cut pauses it and a recovery takes the sender back (stream.hpp:
// RESUME, MISSING).
#include "migration/receiver_impl.hpp"

#include <fmt/format.h>
#include <thread>

#include "base/error.hpp"
#include "migration/postcopy.hpp"

namespace mvm::migration {
namespace detail {

// On the fault thread: ask the sender for the page a fault waits on (a
// broken connection shows in the channels' reads).
void Receiver::request(uint64_t gpa)
{
    try {
        write_out(RecordType::Request, encode_gpas({&gpa, 1}));
    } catch (...) {
    }
}

// The guest resumes here before all of its memory arrived: pages come on
// demand (FaultServer) while the sender pushes the rest on every channel.
void Receiver::postcopy(RecordReader& in, Handover& h, double post_run_s)
{
    check_guest();  // reads guest memory: before any page is missing
    rep_.postcopy = true;
    FaultServer faults(dst_, [this](uint64_t gpa) { request(gpa); });
    Resumed at;
    try {
        faults.arm(h.discard);
        const auto t = clock::now();
        // The channels are read before the guest resumes: resuming touches
        // its memory, and a fault needs the page to come in.
        receive_postcopy(faults, [&] {
            at = resume_here(h.states);
            faults.guest_started();
            rep_.switchover_ms += ms_since(t);
            phase("running");
        });
        faults.finish();  // throws when a page is missing
        rep_.postcopy_ms = ms_since(t);
    } catch (...) {
        rep_.postcopy_figures = faults.figures();
        rep_.postcopy_figures.pauses = pauses_;
        rep_.postcopy_figures.paused_ms = paused_ms_;
        if (faults.missing()) {
            rep_.guest_lost = true;
            faults.abandon();  // a vCPU waiting on a page would never leave KVM_RUN
            rep_.guest = "killed: postcopy broke off with pages missing here (the guest is lost)";
        }
        if (dst_.started())
            dst_.kill();
        throw;
    }
    rep_.postcopy_figures = faults.figures();
    rep_.postcopy_figures.pauses = pauses_;
    rep_.postcopy_figures.paused_ms = paused_ms_;
    if (on_postcopy_)
        on_postcopy_(rep_.postcopy_figures);
    ResultRecord done;
    done.ok = 1;
    done.text = "postcopy complete";
    done.details = rep_.postcopy_figures.to_json().dump();
    write_out(RecordType::Result, done.encode());
    RecordReader now(*ch_[0]);  // a recovery's channel 0 after a cut
    verify(pauses_ ? now : in, at);
    run_and_report(at, post_run_s);
}

// Postcopy: every channel on its own thread placing pages while the guest
// resumes on another (`started`: resuming touches guest memory, and a fault
// there may wait across a recovery). A cut pauses here when recovery is on
// (recover()); else, or once it is given up, the pages still missing will
// not come: every thread that waits on one is released before the guest is
// killed.
void Receiver::receive_postcopy(FaultServer& faults, const std::function<void()>& started)
{
    std::exception_ptr start_err;
    std::thread starter;
    auto join_starter = [&] {
        if (starter.joinable())
            starter.join();
    };
    auto launch = [&] {
        if (starter.joinable() || start_err)
            return;
        starter = std::thread([&] {
            try {
                started();
            } catch (...) {
                start_err = std::current_exception();
                fatal_ = true;
                std::lock_guard lk(mu_);
                for (auto& ch : ch_)
                    ch->shutdown();  // the pumps stop: the guest did not resume
            }
        });
    };
    for (;;) {
        std::exception_ptr err = pump_postcopy(faults, launch);
        if (!err)
            break;
        if (!recover(faults, err)) {
            if (faults.missing())
                faults.abandon();  // the resume may wait on a page that will not come
            join_starter();
            std::rethrow_exception(start_err ? start_err : err);
        }
    }
    join_starter();
    if (start_err)
        std::rethrow_exception(start_err);
    if (recovery_ && recovery_->pause)
        recovery_->pause->detach_all();
}

// One set of channels up to their CHANNEL_DONE or the first error (returned);
// meanwhile this thread tells the sender it is still here while nothing
// faults (its --io-timeout).
std::exception_ptr Receiver::pump_postcopy(FaultServer& faults, const std::function<void()>& launched)
{
    std::exception_ptr err;
    std::vector<std::thread> threads;
    std::atomic<size_t> done{0};
    if (recovery_ && recovery_->pause)
        for (auto& ch : ch_)
            recovery_->pause->attach(ch.get());
    for (size_t c = 0; c < ch_.size(); c++)
        threads.emplace_back([&, c] {
            try {
                pump(static_cast<uint32_t>(c), false, &faults);
            } catch (...) {
                std::lock_guard lk(mu_);
                if (!err)
                    err = std::current_exception();
                for (auto& ch : ch_)
                    ch->shutdown();
            }
            done++;
        });
    launched();
    auto beat = clock::now();
    while (done.load() < ch_.size()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        if (clock::now() - beat > std::chrono::seconds(1)) {
            beat = clock::now();
            try {
                write_out(RecordType::Request, encode_gpas({}));
            } catch (...) {
            }
        }
    }
    for (auto& t : threads)
        t.join();
    if (recovery_ && recovery_->pause)
        recovery_->pause->detach_all();
    return err;
}

// A cut in postcopy with recovery on: QEMU's postcopy-paused until the
// sender connects again (postcopy-recover), then postcopy-active on the new
// channels. False: no recovery here, or it was given up.
bool Receiver::recover(FaultServer& faults, std::exception_ptr cut)
{
    if (!recovery_ || !recovery_->reconnect || fatal_.load())
        return false;
    std::string why = what_of(cut, "the connection broke");
    const auto t = clock::now();
    fmt::print(stderr, "receive: postcopy paused ({}): {} page(s) missing here; the guest runs on, a fault on one "
                       "waits for the sender to resume\n",
               why, faults.missing());
    phase("postcopy-paused");
    for (;;) {
        std::vector<std::unique_ptr<Transport>> nc;
        bool taken = false;
        try {
            nc = recovery_->reconnect(session_, static_cast<uint32_t>(ch_.size()), [&] {
                taken = true;
                phase("postcopy-recover");
            });
        } catch (const std::exception& e) {
            fmt::print(stderr, "receive: postcopy recovery failed: {}; still paused\n", e.what());
            phase("postcopy-paused");
            std::this_thread::sleep_for(std::chrono::milliseconds(200));  // a busy address: not in a tight loop
            continue;
        }
        if (nc.empty())
            return false;
        if (!taken)
            phase("postcopy-recover");
        if (!reconnected(faults, std::move(nc))) {
            phase("postcopy-paused");
            continue;
        }
        pauses_++;
        paused_ms_ += ms_since(t);
        fmt::print(stderr, "receive: postcopy recovered after {:.0f} ms: {} page(s) still to come\n", ms_since(t),
                   faults.missing());
        phase("postcopy");
        return true;
    }
}

// The new channels in place of the cut ones, and the sender told what is
// still missing here, then which of it faults wait on. False: that failed.
bool Receiver::reconnected(FaultServer& faults, std::vector<std::unique_ptr<Transport>> nc)
{
    if (nc.size() != ch_.size()) {
        fmt::print(stderr, "receive: postcopy recovery: {} connections, the migration has {}; still paused\n",
                   nc.size(), ch_.size());
        return false;
    }
    try {
        // Under out_mu_: the fault thread's REQUESTs come after MISSING.
        std::lock_guard lk(out_mu_);
        {
            std::lock_guard lk2(mu_);
            ch_ = std::move(nc);
        }
        out_.emplace(*ch_[0]);
        if (recovery_->pause)
            recovery_->pause->attach(ch_[0].get());
        const std::vector<uint64_t> missing = faults.missing_units();
        constexpr size_t kPerRecord = 512 * 1024;
        for (size_t i = 0; i < missing.size(); i += kPerRecord)
            out_->write(RecordType::Missing,
                        encode_gpas(std::span(missing).subspan(i, std::min(kPerRecord, missing.size() - i))));
        out_->write(RecordType::Missing, encode_gpas({}));
        const std::vector<uint64_t> waited = faults.waited_units();
        if (!waited.empty())
            out_->write(RecordType::Request, encode_gpas(waited));
    } catch (const std::exception& e) {
        fmt::print(stderr, "receive: postcopy recovery: {}; still paused\n", e.what());
        if (recovery_->pause)
            recovery_->pause->detach_all();
        return false;
    }
    return true;
}

}  // namespace detail

bool PauseSwitch::pause()
{
    std::lock_guard lk(mu_);
    for (Transport* t : t_)
        t->shutdown();
    return !t_.empty();
}

void PauseSwitch::attach(Transport* t)
{
    std::lock_guard lk(mu_);
    t_.push_back(t);
}

void PauseSwitch::detach_all()
{
    std::lock_guard lk(mu_);
    t_.clear();
}

}  // namespace mvm::migration
