// QMP commands only minivmm has (x-minivmm-): the vNUMA placement.
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

// Where each virtual node's memory is on the host right now (move_pages on
// every page, or `sample-pages` spread over each node), against its policy:
// numa-check's placement figures for a guest that runs.
json Monitor::query_placement(const json& args) const
{
    Args a(args, {"sample-pages"});
    const int64_t sample = a.int_or("sample-pages", 4096);
    if (sample < 0)
        throw QmpError("Parameter 'sample-pages' expects an integer >= 0 (0: every page)");
    json out = json::array();
    for (const NodeConfig& n : vm_.config().nodes) {
        json nodes = json::object();
        uint64_t total = 0, queried = 0, present = 0, on_policy = 0, not_present = 0;
        bool sampled = false, readable = true;
        for (const auto& r : vm_.memslots().regions()) {
            if (r.vnode != static_cast<int>(n.id))
                continue;
            if (!r.host) {
                readable = false;  // guest_memfd without a mapping of ours
                continue;
            }
            const numa::Placement p =
                numa::query_placement(r.host, r.size, 4096, n.host_policy.nodes, static_cast<size_t>(sample));
            total += p.pages_total;
            queried += p.pages_queried;
            sampled = sampled || p.sampled;
            not_present += p.pages_not_present;
            for (const auto& [node, pages] : p.pages_per_node) {
                const std::string k = std::to_string(node);
                nodes[k] = nodes.value(k, uint64_t{0}) + pages;
                present += pages;
                if (n.host_policy.nodes.empty() ||
                    std::find(n.host_policy.nodes.begin(), n.host_policy.nodes.end(), node) != n.host_policy.nodes.end())
                    on_policy += pages;
            }
        }
        json v = {{"vnode", n.id},
                  {"backing", std::string(backing_name(n.backing))},
                  {"host_policy", numa::to_string(n.host_policy)},
                  {"pages", total},
                  {"pages_queried", queried},
                  {"sampled", sampled},
                  {"pages_per_host_node", nodes},
                  {"pages_not_present", not_present},
                  {"on_policy_pct", present ? 100.0 * static_cast<double>(on_policy) / static_cast<double>(present) : 0}};
        if (!readable)
            v["note"] = "guest_memfd pages without a host mapping of minivmm's are not queried";
        out.push_back(v);
    }
    return out;
}

}  // namespace mvm::qmp
