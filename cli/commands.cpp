#include "cli/command.hpp"

namespace mvm::cli {

std::vector<std::unique_ptr<Command>> all_commands()
{
    std::vector<std::unique_ptr<Command>> t;
    t.push_back(caps_command());
    t.push_back(run_command());
    t.push_back(numa_check_command());
    t.push_back(numa_balancing_command());
    t.push_back(dirty_log_perf_command());
    t.push_back(dirty_rate_command());
    t.push_back(migrate_command());
    t.push_back(receive_command());
    t.push_back(lockup_command());
    return t;
}

}  // namespace mvm::cli
