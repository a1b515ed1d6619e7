// migration/receiver_impl.hpp - the Receiver behind receive_from(), for its
// files only: receiver.cpp (header, memory, switchover, verification, post-run)
// and receiver_postcopy.cpp (postcopy, its pauses and recoveries).
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "migration/receiver.hpp"
#include "migration/resume.hpp"
#include "migration/stream.hpp"
#include "migration/vcpu_state.hpp"

namespace mvm::migration {

class FaultServer;

namespace detail {

using clock = std::chrono::steady_clock;

// One incoming migration into `dst` from connected channels, channel 0
// (the control channel) first.
class Receiver {
public:
    Receiver(StressVm& dst, std::vector<std::unique_ptr<Transport>> channels, const PhaseHook& on_phase,
             PageHashes before, std::optional<Record> header, double post_run_s, const PostcopyHook& on_postcopy,
             const ContGate& wait_cont, bool from_file, const Recovery* recovery)
        : dst_(dst), ch_(std::move(channels)), on_phase_(on_phase), on_postcopy_(on_postcopy), wait_cont_(wait_cont),
          from_file_(from_file), recovery_(recovery), session_(recovery ? recovery->session : 0),
          landed_(std::move(before)), header_(std::move(header)), post_run_s_(post_run_s)
    {
        out_.emplace(*ch_[0]);
        for (const auto& r : dst_.memslots().regions())
            layout_pages_ += r.pages();
    }
    ReceiveReport run(double post_run_s);
    ReceiveReport& report() { return rep_; }

private:
    void check_header(RecordReader& in);
    void receive_memory();
    void receive_postcopy(FaultServer& faults, const std::function<void()>& started);
    std::exception_ptr pump_postcopy(FaultServer& faults, const std::function<void()>& launched);
    bool recover(FaultServer& faults, std::exception_ptr cut);
    bool reconnected(FaultServer& faults, std::vector<std::unique_ptr<Transport>> nc);
    void pump(uint32_t c, bool skip_hello, FaultServer* postcopy);
    struct Handover {
        std::vector<VcpuState> states;
        bool postcopy = false;
        std::vector<uint64_t> discard;
    };
    Handover read_state(RecordReader& in);
    void postcopy(RecordReader& in, Handover& h, double post_run_s);
    void request(uint64_t gpa);
    void write_out(RecordType type, std::span<const uint8_t> payload);
    void check_guest();
    Resumed resume_here(const std::vector<VcpuState>& states);
    bool held_until_cont(Resumed& at);
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
    const PostcopyHook& on_postcopy_;
    const ContGate& wait_cont_;
    const bool from_file_;       // a restore: the guest's gap is the file's age, not a downtime
    const Recovery* recovery_;   // postcopy recovery (null: a cut loses the guest)
    uint64_t session_;           // the sender's HELLOs' session (what its RESUME must name)
    uint32_t data_channels_ = 1;  // the channels pages are mapped to (a preempt channel comes after them)
    std::atomic<bool> fatal_{false};  // the failure is here (not the connection's): nothing to recover
    uint32_t pauses_ = 0;
    double paused_ms_ = 0;
    bool hold_paused_ = false;  // the sender's guest was stopped and a gate waits for cont
    std::optional<RecordWriter> out_;  // to the sender, on channel 0 (a recovery's new one after a cut)
    std::mutex out_mu_;  // postcopy: the fault thread's REQUESTs and this thread's RESULTs
    uint64_t layout_pages_ = 0;
    std::atomic<uint64_t> received_{0};
    std::mutex mu_;  // guards rep_ while the channels pump
    ReceiveReport rep_;
    PageHashes landed_;  // every page as it landed
    std::optional<Record> header_;  // channel 0's HEADER, when admission read it
    double post_run_s_;
    const clock::time_point t0_ = clock::now();
};

}  // namespace detail
}  // namespace mvm::migration
