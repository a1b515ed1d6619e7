// minivmm - command line. Each command validates every option before it
// creates anything; bad input is one line on stderr and exit code 2.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/error.hpp"
#include "cli/command.hpp"
#include "cli/options.hpp"

using namespace mvm;

int main(int argc, char** argv)
{
    spdlog::set_pattern("%^%l%$: %v");
    spdlog::set_level(spdlog::level::warn);
    CLI::App app{"minivmm - a small VMM for dirty-rate, vNUMA placement and soft-lockup experiments on /dev/kvm"};
    app.require_subcommand(1);
    app.set_help_all_flag("--help-all", "help for every command");
    bool verbose = false;
    app.add_flag("-v,--verbose", verbose, "debug logging");

    auto commands = cli::all_commands();
    std::vector<std::pair<CLI::App*, cli::Command*>> table;
    for (auto& c : commands)
        table.emplace_back(c->add_to(app), c.get());
    cli::label_value_kinds(app);

    if (argc > 1 && argv[1][0] != '-') {
        std::string cmd = argv[1];
        bool known = false;
        std::string names;
        for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; })) {
            known |= sc->get_name() == cmd;
            names += (names.empty() ? "" : ", ") + sc->get_name();
        }
        if (!known) {
            fmt::print(stderr, "minivmm: unknown command '{}'; use one of {} (see 'minivmm --help')\n", cmd, names);
            return kExitUsage;
        }
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::string what = e.what();
        // argv[1], if a command, is a known one (checked above): point at its help.
        fmt::print(stderr, "minivmm: {}; see 'minivmm {}--help'\n", what,
                   argc > 1 && argv[1][0] != '-' ? std::string(argv[1]) + " " : "");
        return kExitUsage;
    }
    if (verbose)
        spdlog::set_level(spdlog::level::debug);
    try {
        for (auto& [sub, cmd] : table)
            if (*sub)
                return cmd->run();
    } catch (const Error& e) {
        fmt::print(stderr, "minivmm: {}\n", e.what());
        return e.exit_code();
    } catch (const std::exception& e) {
        fmt::print(stderr, "minivmm: {}\n", e.what());
        return kExitFailure;
    }
    return kExitUsage;
}
