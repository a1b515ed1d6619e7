#include "cli/qmp/options.hpp"

#include <cstdio>
#include <fmt/format.h>

#include "base/error.hpp"
#include "cli/qmp/monitor.hpp"

namespace mvm::qmp {

void QmpOptions::add_to(CLI::App& c)
{
    c.add_option("--qmp", spec,
                 "serve QMP (QEMU's machine protocol) at unix:PATH (owner-only, removed at exit) or tcp:HOST:PORT "
                 "(loopback): query, steer and migrate the guest as QEMU's QMP does (docs/qmp.md)");
    c.add_flag("--qmp-allow-remote", allow_remote, "let --qmp tcp: bind an address other than loopback");
}

std::optional<Address> QmpOptions::address() const
{
    if (spec.empty()) {
        if (allow_remote)
            throw UsageError("--qmp-allow-remote: only with --qmp tcp:HOST:PORT");
        return std::nullopt;
    }
    return parse_address("--qmp", spec, allow_remote);
}

void serve(Monitor& m)
{
    m.start();
    fmt::print(stderr, "qmp: serving on {}\n", m.bound());
    std::fflush(stderr);
}

}  // namespace mvm::qmp
