#include "migration/transport/fault.hpp"

#include <fmt/format.h>

#include <vector>

#include "base/error.hpp"
#include "base/units.hpp"

namespace mvm::migration {

StreamFault parse_stream_fault(const std::string& spec)
{
    auto bad = [&](const std::string& why) {
        return UsageError(fmt::format("MINIVMM_TEST_STREAM_FAULT '{}': {}; use flip|cut:bulk|precopy|stop:OFFSET[@CHANNEL]",
                                      spec, why));
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

FaultInjectingTransport::FaultInjectingTransport(std::unique_ptr<Transport> inner, StreamFault f, SharedPhase phase)
    : inner_(std::move(inner)), f_(std::move(f)), phase_(std::move(phase))
{
}

void FaultInjectingTransport::write_all(const void* data, size_t len)
{
    const char* phase = phase_->load();
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
        throw Error(fmt::format("stream cut at byte {} of {} on channel {} (test hook MINIVMM_TEST_STREAM_FAULT)",
                                f_.offset, f_.phase, f_.channel));
    }
    std::vector<uint8_t> copy(p, p + len);
    copy[k] ^= 0x10;
    fmt::print(stderr, "migrate: flipped a bit at byte {} of {} on channel {} (test hook MINIVMM_TEST_STREAM_FAULT)\n",
               f_.offset, f_.phase, f_.channel);
    at_ += len;
    inner_->write_all(copy.data(), len);
}

void StreamFaultInjector::check(uint32_t channels)
{
    if (f_.channel >= channels)
        throw UsageError(fmt::format("MINIVMM_TEST_STREAM_FAULT: channel {} but the migration has {} channel(s)",
                                     f_.channel, channels));
}

std::unique_ptr<Transport> StreamFaultInjector::wrap(uint32_t channel, std::unique_ptr<Transport> t)
{
    if (channel != f_.channel)
        return t;
    return std::make_unique<FaultInjectingTransport>(std::move(t), f_, phase_);
}

}  // namespace mvm::migration
