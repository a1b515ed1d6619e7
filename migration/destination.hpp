// migration/destination.hpp - where the sender's pages and state go: a
// second VM in this process (memory copied directly), or a `minivmm receive`
// over TCP with one connection per channel (it reports back in RESULT
// records). Either hashes every page as it lands (verify.hpp), so that
// verification runs after the destination resumed, outside the downtime.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "migration/page_codec.hpp"
#include "migration/resume.hpp"
#include "migration/stream.hpp"
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
};

// A second VM in this process, made like the source with its memory populated.
class InprocDestination : public Destination {
public:
    InprocDestination(StressVm& src, bool verify, double post_run_s) : src_(src), verify_(verify), post_run_s_(post_run_s)
    {
    }
    void open(const StreamHeader& h) override;
    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override;
    ResultRecord switchover(const std::vector<VcpuState>& states) override;
    ResultRecord verify(const PageHashes* source) override;
    ResultRecord finish() override;
    void abort() override;
    void enter_phase(const char* phase) override;

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
    std::shared_ptr<TransportWrapper> wrapper;  // around every connection (tests' faults)
};

// `minivmm receive` at host:port: one connection per channel.
class RemoteDestination : public Destination {
public:
    // Throws UsageError for unusable TLS credentials.
    RemoteDestination(StressVm& src, std::string host, uint16_t port, LinkOptions link);
    void open(const StreamHeader& h) override;
    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override;
    ResultRecord switchover(const std::vector<VcpuState>& states) override;
    ResultRecord verify(const PageHashes* source) override;
    ResultRecord finish() override { return read_result("the destination's stamp check"); }
    void abort() override;
    void enter_phase(const char* phase) override;
    PageCounts page_counts() const override;

private:
    ResultRecord read_result(const char* what);

    IoLimits limits(bool deadline, double extra_idle_s = 0) const;
    void limit(bool deadline, double extra_idle_s = 0);
    void connect_all(const StreamHeader& h);

    StressVm& src_;
    std::string host_;
    uint16_t port_;
    LinkOptions link_;
    std::shared_ptr<const tls::Context> tls_;
    double receiver_post_run_s_ = 0;  // told in its "resumed" RESULT
    std::vector<std::unique_ptr<Transport>> ch_;
    std::vector<std::unique_ptr<PageEncoder>> enc_;  // one per channel, used by its thread only
    std::atomic<bool> frozen_{false};                // the source is parked: pages go unstaged
};

// `to` is "inproc" or "tcp:HOST:PORT" (throws UsageError naming --to otherwise;
// compression applies to TCP only: the caller refuses it in-process).
std::unique_ptr<Destination> make_destination(StressVm& src, const std::string& to, bool verify, double post_run_s,
                                              LinkOptions link = {});

}  // namespace mvm::migration
