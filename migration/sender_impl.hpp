// migration/sender_impl.hpp - small helpers the Sender's files share (not part
// of its interface): sender.cpp (the phase driver, its state and failure
// path), sender_precopy.cpp, sender_switchover.cpp, sender_postcopy.cpp.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "migration/migrate.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

// Seconds (ms) since `t0`.
inline double since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline double ms_since(std::chrono::steady_clock::time_point t0) { return since(t0) * 1e3; }

// --channels, or one per virtual node (fd:N: its one connection; a file:
// one stream, or with mapped-ram its writers, --channels or one).
inline uint32_t channel_count(const StressVm& src, const MigrateOptions& opt)
{
    if (opt.to.rfind("file:", 0) == 0)
        return opt.mapped_ram && opt.channels ? opt.channels : 1;
    if (!opt.channels && opt.to.rfind("fd:", 0) == 0)
        return 1;
    return opt.channels ? opt.channels : static_cast<uint32_t>(std::max<size_t>(1, src.config().nodes.size()));
}

}  // namespace mvm::migration
