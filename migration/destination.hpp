// migration/destination.hpp - where the sender's pages and state go: a
// second VM in this process (memory copied directly), or a `minivmm receive`
// over TCP with one connection per channel (it reports back in RESULT
// records). Either hashes every page as it lands (verify.hpp), so that
// verification runs after the destination resumed, outside the downtime.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "migration/page_codec.hpp"
#include "migration/resume.hpp"
#include "migration/stream.hpp"
#include "migration/transport/tcp.hpp"
#include "migration/transport/tls.hpp"
#include "migration/transport/wrapper.hpp"
#include "migration/verify.hpp"
#include "migration/vcpu_state.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

class Destination {
public:
    virtual ~Destination() = default;
    virtual void open(const StreamHeader& h) = 0;
    // Called by one thread per channel.
    virtual void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) = 0;
    // All pages are sent and the source is parked: hand over the vCPU
    // states and resume the destination. ok once it runs; restore_ms and
    // refused_msrs filled.
    virtual ResultRecord switchover(const std::vector<VcpuState>& states) = 0;
    // After switchover(), the destination running: its pages as they landed
    // against `source` (the parked source's frozen memory; null: no
    // verification), and guest_gap_ms, the guest's own view of the downtime.
    virtual ResultRecord verify(const PageHashes* source) = 0;
    // After the destination ran: its stamp check.
    virtual ResultRecord finish() = 0;
    virtual void abort() = 0;
    // The migration moved to another phase (bulk, precopy, stop, ...).
    virtual void enter_phase(const char*) {}
    // What the PAGES frames carried so far, all channels (none in-process).
    virtual PageCounts page_counts() const { return {}; }
    // A file (file.hpp): nothing answers; the guest runs again only where it
    // is restored, which checks it then.
    virtual bool one_way() const { return false; }

    // ---- postcopy (postcopy.hpp) ----
    // Every pre-copy page sent and the source parked: the vCPU states and
    // the pages the destination must drop (they come later). From here
    // send() places pages and requests() hears of faults: the caller starts
    // serving them, then waits in postcopy_resumed() (resuming the guest
    // touches its memory: a fault may come before it runs).
    virtual void begin_postcopy(const std::vector<VcpuState>& states, std::span<const uint64_t> discard) = 0;
    // ok once the guest runs there (restore_ms, refused_msrs filled).
    virtual ResultRecord postcopy_resumed() = 0;
    // The return path: up to `wait` for the GPAs faults wait on (appended to
    // `out`). False once postcopy is over. Throws when the destination is gone.
    virtual bool requests(std::vector<uint64_t>& out, std::chrono::milliseconds wait) = 0;
    // Every page pushed: the destination's "postcopy complete" RESULT
    // (details: its PostcopyFigures as JSON). Throws when it is gone.
    virtual ResultRecord end_postcopy() = 0;

    // ---- postcopy recovery (stream.hpp: RESUME, MISSING) ----
    // A destination that can be reached again after a cut (a connection).
    virtual bool can_recover() const { return false; }
    // After a cut, the pushers and the return path stopped: connects anew
    // to `uri` as the paused migration. Throws when that fails.
    virtual void reconnect(const std::string& uri);
    // Then: the units the destination still lacks; the return path runs
    // again (requests() hears of its faults).
    virtual std::vector<uint64_t> resume_postcopy();
};

// The return path's requests, from whichever thread learns of them to the
// sender's thread that asks.
class RequestQueue {
public:
    void push(std::span<const uint64_t> gpas);
    void end(std::exception_ptr error = nullptr);  // no more requests (error: why)
    bool pop(std::vector<uint64_t>& out, std::chrono::milliseconds wait);  // false once ended; throws its error
    bool ended() const;
    void reset();  // a recovery's new return path: open again, empty

private:
    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::vector<uint64_t> q_;
    bool ended_ = false;
    std::exception_ptr error_;
};

class FaultServer;

// A second VM in this process, made like the source with its memory populated.
class InprocDestination : public Destination {
public:
    InprocDestination(StressVm& src, bool verify, double post_run_s);
    void open(const StreamHeader& h) override;
    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override;
    ResultRecord switchover(const std::vector<VcpuState>& states) override;
    ResultRecord verify(const PageHashes* source) override;
    ResultRecord finish() override;
    void abort() override;
    void enter_phase(const char* phase) override;
    void begin_postcopy(const std::vector<VcpuState>& states, std::span<const uint64_t> discard) override;
    ResultRecord postcopy_resumed() override;
    bool requests(std::vector<uint64_t>& out, std::chrono::milliseconds wait) override;
    ResultRecord end_postcopy() override;
    ~InprocDestination() override;

private:
    StressVm& src_;
    bool verify_;
    double post_run_s_;
    std::unique_ptr<StressVm> dst_;
    PageHashes landed_;  // every page as it landed
    // Pages copied in stop-and-copy, per channel: copied from the frozen
    // source, they are hashed from it after the resume, not in the downtime.
    bool stopped_ = false;
    std::vector<std::vector<uint64_t>> copied_at_stop_;
    Resumed resumed_;
    std::unique_ptr<FaultServer> faults_;  // postcopy
    std::vector<VcpuState> postcopy_states_;
    RequestQueue requests_;
    std::mutex abort_mu_;  // abort() from any of the pushers
    std::mutex start_mu_;  // the postcopy resume against abort()
};

// How the sender talks to a remote destination.
struct LinkOptions {
    Compression compression;
    // Every wait on the receiver: a send or read that makes no progress this
    // long fails (and the final RESULT may also take the receiver's post-run).
    double io_timeout_s = 30;
    // Nothing before the switchover goes on past this (the sender's --timeout),
    // blocked sends included; deadline_what names it in the message.
    IoLimits::time_point deadline = IoLimits::time_point::max();
    std::string deadline_what;
    tls::Options tls;                           // --tls-creds, --tls-hostname: every channel over TLS
    bool mapped_ram = false, direct_io = false;  // a file destination's layout (file.hpp)
    std::shared_ptr<TransportWrapper> wrapper;  // around every connection (tests' faults)
};

// `minivmm receive` at host:port: one connection per channel.
class RemoteDestination : public Destination {
public:
    // Throws UsageError for unusable TLS credentials.
    RemoteDestination(StressVm& src, Endpoint to, LinkOptions link);
    void open(const StreamHeader& h) override;
    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override;
    ResultRecord switchover(const std::vector<VcpuState>& states) override;
    ResultRecord verify(const PageHashes* source) override;
    ResultRecord finish() override { return read_result("the destination's stamp check"); }
    void abort() override;
    void enter_phase(const char* phase) override;
    PageCounts page_counts() const override;
    void begin_postcopy(const std::vector<VcpuState>& states, std::span<const uint64_t> discard) override;
    ResultRecord postcopy_resumed() override;
    bool requests(std::vector<uint64_t>& out, std::chrono::milliseconds wait) override;
    ResultRecord end_postcopy() override;
    bool can_recover() const override { return true; }
    void reconnect(const std::string& uri) override;
    std::vector<uint64_t> resume_postcopy() override;
    ~RemoteDestination() override;

private:
    void read_return_path();
    ResultRecord read_result(const char* what);

    IoLimits limits(bool deadline, double extra_idle_s = 0) const;
    void limit(bool deadline, double extra_idle_s = 0);
    void connect_all(const StreamHeader& h);

    StressVm& src_;
    Endpoint to_;
    LinkOptions link_;
    std::shared_ptr<const tls::Context> tls_;
    double receiver_post_run_s_ = 0;  // told in its "resumed" RESULT
    uint64_t session_ = 0;            // the HELLOs' (a recovery's RESUME names it)
    uint32_t nch_ = 0;
    Transport* connecting_ = nullptr;  // a recovery's connection in its TLS handshake (abort() cuts it)
    std::vector<std::unique_ptr<Transport>> ch_;
    std::vector<std::unique_ptr<PageEncoder>> enc_;  // one per channel, used by its thread only
    std::atomic<bool> frozen_{false};                // the source is parked: pages go unstaged
    // Postcopy: channel 0's reader (REQUEST records, then the RESULT that ends them).
    RequestQueue requests_;
    std::thread reader_;
    std::mutex abort_mu_;  // abort() from any of the pushers or the return path
    std::mutex result_mu_;
    std::condition_variable result_cv_;
    std::vector<ResultRecord> results_;  // "resumed", then "postcopy complete"
    bool reader_done_ = false;
};

// `to` is "inproc", "tcp:HOST:PORT", "unix:PATH", "fd:N" or a file (file.hpp) (throws UsageError naming --to otherwise;
// compression applies to TCP only: the caller refuses it in-process).
std::unique_ptr<Destination> make_destination(StressVm& src, const std::string& to, bool verify, double post_run_s,
                                              LinkOptions link = {});

}  // namespace mvm::migration
