// QMP KVM statistics (QEMU qapi/stats.json): query-stats.
#include "cli/qmp/monitor_impl.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <iterator>
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/stop_signal.hpp"
#include "memory/backing.hpp"
#include "migration/transport/tcp.hpp"
#include "numa/placement.hpp"
#include "numa/policy.hpp"

namespace mvm::qmp {

using migration::Phase;

json Monitor::query_stats(const json& args) const
{
    Args a(args, {"target", "providers", "vcpus"});
    const std::string target = a.str("target");
    if (target != "vm" && target != "vcpu")
        throw QmpError(target == "cryptodev" ? "query-stats: target cryptodev has no statistics in minivmm"
                                             : fmt::format("Parameter 'target' does not accept value '{}'", target));
    std::vector<std::string> names;
    bool kvm_wanted = true;
    if (a.has("providers")) {
        kvm_wanted = false;
        for (const json& p : a.array("providers")) {
            if (!p.is_object() || !p.contains("provider") || !p["provider"].is_string())
                throw QmpError("Parameter 'providers' expects a list of {\"provider\": NAME, \"names\": [...]}");
            if (p["provider"] != "kvm")
                continue;  // QEMU: other providers contribute nothing here
            kvm_wanted = true;
            if (p.contains("names"))
                for (const json& n : p["names"])
                    if (n.is_string())
                        names.push_back(n.get<std::string>());
        }
    }
    json out = json::array();
    if (!kvm_wanted)
        return out;
    auto stats = [&](const StatSnapshot& s) {
        json v = json::array();
        for (const auto& [name, value] : s)
            if (names.empty() || std::find(names.begin(), names.end(), name) != names.end())
                v.push_back({{"name", name}, {"value", value}});
        return v;
    };
    if (target == "vm") {
        out.push_back({{"provider", "kvm"}, {"stats", stats(vm_.vm_stats())}});
        return out;
    }
    std::vector<std::string> want;
    if (a.has("vcpus"))
        for (const json& p : a.array("vcpus"))
            if (p.is_string())
                want.push_back(p.get<std::string>());
    for (uint32_t i = 0; i < vm_.vcpu_count(); i++) {
        const std::string path = fmt::format("/machine/unattached/device[{}]", i);
        if (!want.empty() && std::find(want.begin(), want.end(), path) == want.end())
            continue;
        out.push_back({{"provider", "kvm"}, {"qom-path", path}, {"stats", stats(vm_.vcpu_stats(i))}});
    }
    return out;
}

}  // namespace mvm::qmp
