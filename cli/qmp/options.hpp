// cli/qmp/options.hpp - the --qmp options every command that runs a guest
// takes, and starting its monitor.
#pragma once

#include <CLI/CLI.hpp>

#include <optional>
#include <string>

#include "cli/qmp/server.hpp"

namespace mvm::qmp {

class Monitor;

struct QmpOptions {
    std::string spec;
    bool allow_remote = false;

    void add_to(CLI::App& c);
    // Where to serve, checked (one line, exit 2, before anything is made); none without --qmp.
    std::optional<Address> address() const;
};

// Starts serving and says where on stderr ("qmp: serving on unix:PATH"):
// scripts wait for that line before they connect.
void serve(Monitor& m);

}  // namespace mvm::qmp
