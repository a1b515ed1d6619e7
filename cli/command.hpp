// cli/command.hpp - one minivmm command: its options and what it does. Each
// command is a file in cli/commands/, a thin adapter from its options to an
// engine call and a report; cli/commands.cpp is the table that names them.
// A new command is a new file and a row in that table.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <vector>

namespace mvm::cli {

class Command {
public:
    virtual ~Command() = default;
    // Registers the command and its options on `app`.
    virtual CLI::App* add_to(CLI::App& app) = 0;
    // Checks every option before it creates anything, runs, reports; returns
    // the exit code. Errors are thrown as mvm::Error (one line).
    virtual int run() = 0;
};

// The table, in the order `minivmm --help` lists the commands.
std::vector<std::unique_ptr<Command>> all_commands();

std::unique_ptr<Command> caps_command();
std::unique_ptr<Command> run_command();
std::unique_ptr<Command> numa_check_command();
std::unique_ptr<Command> numa_balancing_command();
std::unique_ptr<Command> dirty_log_perf_command();
std::unique_ptr<Command> dirty_rate_command();
std::unique_ptr<Command> migrate_command();
std::unique_ptr<Command> receive_command();
std::unique_ptr<Command> lockup_command();

}  // namespace mvm::cli
