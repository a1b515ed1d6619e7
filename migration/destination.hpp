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

// `minivmm receive` at host:port: one connection per channel, each through
// `wrapper` when there is one.
class RemoteDestination : public Destination {
public:
    RemoteDestination(StressVm& src, std::string host, uint16_t port, Compression compression,
                      std::shared_ptr<TransportWrapper> wrapper)
        : src_(src), host_(std::move(host)), port_(port), compression_(compression), wrapper_(std::move(wrapper))
    {
    }
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

    StressVm& src_;
    std::string host_;
    uint16_t port_;
    Compression compression_;
    std::shared_ptr<TransportWrapper> wrapper_;
    std::vector<std::unique_ptr<Transport>> ch_;
    std::vector<std::unique_ptr<PageEncoder>> enc_;  // one per channel, used by its thread only
    std::atomic<bool> frozen_{false};                // the source is parked: pages go unstaged
};

// `to` is "inproc" or "tcp:HOST:PORT" (throws UsageError naming --to otherwise;
// compression applies to TCP only: the caller refuses it in-process).
std::unique_ptr<Destination> make_destination(StressVm& src, const std::string& to, bool verify, double post_run_s,
                                              Compression compression = {},
                                              std::shared_ptr<TransportWrapper> wrapper = {});

}  // namespace mvm::migration
