// cli/value_kinds.cpp - what kind of value each option takes, as --help
// shows it: one table for every command, so an option reads the same
// everywhere and a unit is never left to guess (SIZE takes K/M/G suffixes,
// MS and SECONDS take us/ms/s/m).
#include <map>
#include <string>

#include "cli/options.hpp"

namespace mvm::cli {

namespace {

const std::map<std::string, const char*, std::less<>>& kinds()
{
    static const std::map<std::string, const char*, std::less<>> t = {
        // sizes and rates
        {"--mem", "SIZE"}, {"-b", "SIZE"}, {"--ring", "SIZE"}, {"--clear-chunk", "SIZE"},
        {"--bandwidth", "SIZE/s"}, {"--rate", "PAGES/s"},
        // durations
        {"--duration", "SECONDS"}, {"--period", "SECONDS"}, {"--warmup", "SECONDS"}, {"--steady", "SECONDS"},
        {"--logging", "SECONDS"}, {"--timeout", "SECONDS"}, {"--io-timeout", "SECONDS"}, {"--post-run", "SECONDS"},
        {"--probe-ring-reset", "SECONDS"}, {"--interval", "SECONDS"}, {"--baseline", "SECONDS"},
        {"--max-downtime", "MS"}, {"--scan-period", "MS|kernel"}, {"--harvest-ms", "MS"}, {"--threshold-ms", "MS"}, {"--watchdog-ms", "MS"},
        // counts
        {"--vcpus", "N"}, {"-v", "N"}, {"-i", "N"}, {"-x", "N"}, {"--passes", "N"}, {"--seed", "N"},
        {"--max-iterations", "N"}, {"--postcopy-after", "N"}, {"--postcopy-recover", "SECONDS"}, {"--channels", "N"}, {"--compress", "none|zstd[:LEVEL]"}, {"--sample", "PAGES"}, {"--sample-pages", "PAGES"},
        {"--repeat", "N"}, {"--write-pct", "PCT"}, {"-w", "PCT"},
        // choices and lists
        {"--backing", "KIND"}, {"-s", "KIND"}, {"--pattern", "seq|random"}, {"--touch", "qword|page"},
        {"--fill", "zero|stamp|random|ratio:R"},
        {"--access", "local|remote|mixed:P"}, {"--numa", "SPEC"}, {"--mode", "MODE"}, {"--tracker", "MODE"},
        {"--dirty-log", "MODE"}, {"--throttle", "POLICY"}, {"--eager-split", "on|off"}, {"--variants", "LIST"},
        {"--enable-logging", "per-node|unbound|host-node:N"},
        // places
        {"--json", "FILE|-"}, {"--timeline", "FILE"}, {"--to", "inproc|tcp:HOST:PORT|unix:PATH|fd:N|file:PATH"},
        {"--listen", "tcp:ADDR:PORT|unix:PATH|fd:N|file:PATH|defer"}, {"--restore", "file:PATH"}, {"--out", "FILE"}, {"--qmp", "unix:PATH|tcp:HOST:PORT"},
        {"--tls-creds", "x509:DIR|psk:FILE"}, {"--uuid", "UUID"}, {"--tls-hostname", "NAME"}, {"--tls-authz", "IDENTITY"},
    };
    return t;
}

std::string long_or_short_name(const CLI::Option& o)
{
    if (!o.get_lnames().empty())
        return "--" + o.get_lnames().front();
    if (!o.get_snames().empty())
        return "-" + o.get_snames().front();
    return "";
}

void label(CLI::App& app)
{
    for (CLI::Option* o : app.get_options())
        if (o->get_type_size() != 0)
            if (const char* k = value_kind(long_or_short_name(*o)))
                o->type_name(k);
    for (CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
        label(*sub);
}

}  // namespace

const char* value_kind(std::string_view option_name)
{
    auto it = kinds().find(option_name);
    return it == kinds().end() ? nullptr : it->second;
}

void label_value_kinds(CLI::App& app) { label(app); }

}  // namespace mvm::cli
