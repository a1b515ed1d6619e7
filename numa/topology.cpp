#include "numa/topology.hpp"

#include <fstream>

#include <numa.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <fmt/format.h>
#include <stdexcept>

namespace mvm::numa {

const Node* Topology::node(int id) const
{
    for (const auto& n : nodes)
        if (n.id == id)
            return &n;
    return nullptr;
}

bool Topology::has_cpu(int cpu) const { return node_of_cpu(cpu) >= 0; }

int Topology::node_of_cpu(int cpu) const
{
    for (const auto& n : nodes)
        if (std::find(n.cpus.begin(), n.cpus.end(), cpu) != n.cpus.end())
            return n.id;
    return -1;
}

std::vector<int> Topology::all_cpus() const
{
    std::vector<int> c;
    for (const auto& n : nodes)
        c.insert(c.end(), n.cpus.begin(), n.cpus.end());
    std::sort(c.begin(), c.end());
    return c;
}

int node_id_limit()
{
    static const int limit = [] {
        std::ifstream f("/sys/devices/system/node/possible");
        std::string list;
        if (f >> list)
            try {
                auto ids = parse_cpu_list(list);
                if (!ids.empty())
                    return ids.back() + 1;
            } catch (const std::exception&) {
            }
        int possible = numa_available() < 0 ? 1 : numa_num_possible_nodes();
        return possible > 0 ? possible : 1;
    }();
    return limit;
}

Topology host_topology()
{
    Topology t;
    if (numa_available() < 0) {
        Node n;
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        for (int c = 0; c < ncpu; c++)
            n.cpus.push_back(c);
        long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        n.mem_total_bytes = static_cast<uint64_t>(pages) * static_cast<uint64_t>(psz);
        n.mem_free_bytes = static_cast<uint64_t>(avail) * static_cast<uint64_t>(psz);
        t.nodes.push_back(n);
        t.distance = {{10}};
        return t;
    }
    int maxnode = numa_max_node();
    int ncpus = numa_num_configured_cpus();
    bitmask* cpus = numa_allocate_cpumask();
    for (int id = 0; id <= maxnode; id++) {
        if (!numa_bitmask_isbitset(numa_nodes_ptr, static_cast<unsigned>(id)))
            continue;
        Node n;
        n.id = id;
        long long free_b = 0;
        long long total = numa_node_size64(id, &free_b);
        n.mem_total_bytes = total > 0 ? static_cast<uint64_t>(total) : 0;
        n.mem_free_bytes = free_b > 0 ? static_cast<uint64_t>(free_b) : 0;
        if (numa_node_to_cpus(id, cpus) == 0)
            for (int c = 0; c < ncpus; c++)
                if (numa_bitmask_isbitset(cpus, static_cast<unsigned>(c)))
                    n.cpus.push_back(c);
        t.nodes.push_back(n);
    }
    numa_free_cpumask(cpus);
    for (const auto& a : t.nodes) {
        std::vector<int> row;
        for (const auto& b : t.nodes)
            row.push_back(numa_distance(a.id, b.id));
        t.distance.push_back(row);
    }
    return t;
}

std::vector<int> parse_cpu_list(const std::string& s)
{
    constexpr int kMaxCpu = 65535;  // keeps a range like 0-2147483647 from exhausting memory
    std::vector<int> out;
    size_t i = 0;
    auto number = [&](int& v) {
        auto [p, ec] = std::from_chars(s.data() + i, s.data() + s.size(), v);
        if (ec != std::errc() || v < 0 || v > kMaxCpu)
            throw std::invalid_argument(fmt::format("'{}' is not a CPU list like 0-3,8", s));
        i = static_cast<size_t>(p - s.data());
    };
    if (s.empty())
        throw std::invalid_argument("empty CPU list");
    while (i < s.size()) {
        int a, b;
        number(a);
        b = a;
        if (i < s.size() && s[i] == '-') {
            i++;
            number(b);
            if (b < a)
                throw std::invalid_argument(fmt::format("'{}': range {}-{} runs backwards", s, a, b));
        }
        for (int c = a; c <= b; c++)
            out.push_back(c);
        if (i < s.size()) {
            if (s[i] != ',' && s[i] != ':')
                throw std::invalid_argument(fmt::format("'{}' is not a CPU list like 0-3,8", s));
            i++;
        }
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
}

std::string format_cpu_list(const std::vector<int>& cpus)
{
    std::string s;
    for (size_t i = 0; i < cpus.size();) {
        size_t j = i;
        while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1)
            j++;
        if (!s.empty())
            s += ',';
        s += j == i ? fmt::format("{}", cpus[i]) : fmt::format("{}-{}", cpus[i], cpus[j]);
        i = j + 1;
    }
    return s;
}

uint64_t host_mem_available_bytes()
{
    std::ifstream f("/proc/meminfo");
    std::string key, unit;
    uint64_t kib;
    while (f >> key >> kib) {
        std::getline(f, unit);
        if (key == "MemAvailable:")
            return kib * 1024;
    }
    return 0;
}

}  // namespace mvm::numa
