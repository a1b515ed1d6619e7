// migration/destination.hpp - where the sender's pages and state go: a
// second VM in this process (memory copied directly, compared page by page
// at the switchover), or a `minivmm receive` over TCP with one connection
// per channel (it checks digests and reports back in RESULT records).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "migration/resume.hpp"
#include "migration/stream.hpp"
#include "migration/transport/wrapper.hpp"
#include "migration/vcpu_state.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

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
    // Whether switchover() verifies by digests of the source's memory.
    virtual bool wants_digests() const { return true; }
    // MSRs the destination would not load at the switchover.
    virtual std::vector<uint32_t> refused_msrs() const { return {}; }
    // Time switchover() spent verifying here (the sender's digests are timed by the sender).
    virtual double verify_seconds() const { return 0; }
};

// A second VM in this process, made like the source with its memory populated.
class InprocDestination : public Destination {
public:
    InprocDestination(StressVm& src, bool verify, double post_run_s) : src_(src), verify_(verify), post_run_s_(post_run_s)
    {
    }
    void open(const StreamHeader& h) override;
    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override;
    ResultRecord switchover(const std::vector<VcpuState>& states, const std::vector<Digest>& digests) override;
    ResultRecord finish() override;
    void abort() override;
    bool wants_digests() const override { return false; }  // it compares the pages themselves
    std::vector<uint32_t> refused_msrs() const override { return resumed_.refused_msrs; }
    double verify_seconds() const override { return verify_s_; }

private:
    ResultRecord compare_with_source() const;

    StressVm& src_;
    bool verify_;
    double post_run_s_;
    std::unique_ptr<StressVm> dst_;
    Resumed resumed_;
    double verify_s_ = 0;
};

// `minivmm receive` at host:port: one connection per channel, each through
// `wrapper` when there is one.
class RemoteDestination : public Destination {
public:
    RemoteDestination(StressVm& src, std::string host, uint16_t port, std::shared_ptr<TransportWrapper> wrapper)
        : src_(src), host_(std::move(host)), port_(port), wrapper_(std::move(wrapper))
    {
    }
    void open(const StreamHeader& h) override;
    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override;
    ResultRecord switchover(const std::vector<VcpuState>& states, const std::vector<Digest>& digests) override;
    ResultRecord finish() override { return read_result("the destination's stamp check"); }
    void abort() override;
    void enter_phase(const char* phase) override;

private:
    ResultRecord read_result(const char* what);

    StressVm& src_;
    std::string host_;
    uint16_t port_;
    std::shared_ptr<TransportWrapper> wrapper_;
    std::vector<std::unique_ptr<Transport>> ch_;
};

// `to` is "inproc" or "tcp:HOST:PORT" (throws UsageError naming --to otherwise).
std::unique_ptr<Destination> make_destination(StressVm& src, const std::string& to, bool verify, double post_run_s,
                                              std::shared_ptr<TransportWrapper> wrapper = {});

}  // namespace mvm::migration
