#include "numa/page_tables.hpp"

#include <dirent.h>

#include <cstdio>
#include <cstdlib>
#include <fmt/format.h>
#include <fstream>
#include <sstream>

namespace mvm::numa {

namespace {

// "Node 0 SecPageTables:      12 kB": the value of `field`, if the line is it.
bool parse_line(const std::string& line, const std::string& field, uint64_t& kib)
{
    std::istringstream in(line);
    std::string node_word, name;
    int node = 0;
    if (!(in >> node_word >> node >> name) || name != field + ":")
        return false;
    return static_cast<bool>(in >> kib);
}

}  // namespace

// The node counters in meminfo are the global sums; each CPU keeps a
// difference of up to its stat threshold (tens of pages) that it folds in only
// at the threshold or every vm.stat_interval. Writing vm.stat_refresh folds
// them all now (root), so a count of a few dozen page-table pages is exact.
static void fold_per_cpu_counters()
{
    if (FILE* f = std::fopen("/proc/sys/vm/stat_refresh", "w")) {
        std::fputs("1", f);
        std::fclose(f);
    }
}

NodeKib node_meminfo_kib(const std::string& field)
{
    fold_per_cpu_counters();
    NodeKib r;
    DIR* d = ::opendir("/sys/devices/system/node");
    if (!d)
        return r;
    while (dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name.rfind("node", 0) != 0 || name.size() == 4 || name.find_first_not_of("0123456789", 4) != std::string::npos)
            continue;
        std::ifstream f("/sys/devices/system/node/" + name + "/meminfo");
        for (std::string line; std::getline(f, line);) {
            uint64_t kib = 0;
            if (parse_line(line, field, kib)) {
                r.kib[std::atoi(name.c_str() + 4)] = kib;
                r.available = true;
            }
        }
    }
    ::closedir(d);
    return r;
}

NodeKibDelta operator-(const NodeKib& after, const NodeKib& before)
{
    NodeKibDelta d;
    d.available = after.available && before.available;
    if (!d.available)
        return d;
    for (const auto& [node, kib] : after.kib) {
        auto it = before.kib.find(node);
        d.kib[node] = static_cast<int64_t>(kib) - static_cast<int64_t>(it == before.kib.end() ? 0 : it->second);
    }
    return d;
}

int64_t NodeKibDelta::total() const
{
    int64_t t = 0;
    for (const auto& [node, kib] : kib)
        t += kib;
    return t;
}

int64_t NodeKibDelta::on(int node) const
{
    auto it = kib.find(node);
    return it == kib.end() ? 0 : it->second;
}

std::string NodeKibDelta::summary() const
{
    if (!available)
        return "unavailable (no SecPageTables in the nodes' meminfo: a kernel before 6.0)";
    std::string s;
    for (const auto& [node, v] : kib)
        s += fmt::format("{}n{} {:+} KiB", s.empty() ? "" : ", ", node, v);
    return s;
}

nlohmann::json NodeKibDelta::json() const
{
    nlohmann::json per = nlohmann::json::object();
    for (const auto& [node, v] : kib)
        per[std::to_string(node)] = v;
    return {{"available", available}, {"per_host_node_kib", per}, {"total_kib", total()}};
}

}  // namespace mvm::numa
