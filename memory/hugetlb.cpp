#include "memory/hugetlb.hpp"

#include <dirent.h>

#include <algorithm>
#include <fstream>
#include <fmt/format.h>

namespace mvm {

namespace {

uint64_t read_u64(const std::string& path)
{
    std::ifstream f(path);
    uint64_t v = 0;
    f >> v;
    return v;
}

bool write_u64(const std::string& path, uint64_t v)
{
    std::ofstream f(path);
    f << v;
    f.flush();
    return static_cast<bool>(f);
}

std::vector<std::pair<uint64_t, std::string>> size_dirs(const std::string& base)
{
    std::vector<std::pair<uint64_t, std::string>> out;
    DIR* d = ::opendir(base.c_str());
    if (!d)
        return out;
    while (dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n.rfind("hugepages-", 0) != 0)
            continue;
        uint64_t kb = std::stoull(n.substr(10));
        out.emplace_back(kb * 1024, base + "/" + n);
    }
    ::closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

HugetlbPool read_pool(uint64_t bytes, int node, const std::string& dir)
{
    HugetlbPool p;
    p.page_bytes = bytes;
    p.node = node;
    p.nr = read_u64(dir + "/nr_hugepages");
    p.free = read_u64(dir + "/free_hugepages");
    p.surplus = read_u64(dir + "/surplus_hugepages");
    p.resv = read_u64(dir + "/resv_hugepages");  // absent per node: reads 0
    p.nr_path = dir + "/nr_hugepages";
    return p;
}

}  // namespace

std::vector<HugetlbPool> hugetlb_pools()
{
    std::vector<HugetlbPool> out;
    for (auto& [bytes, dir] : size_dirs("/sys/kernel/mm/hugepages"))
        out.push_back(read_pool(bytes, -1, dir));
    for (int node = 0; node < 1024; node++) {
        std::string base = fmt::format("/sys/devices/system/node/node{}/hugepages", node);
        auto dirs = size_dirs(base);
        if (dirs.empty() && node > 0 && !std::ifstream(fmt::format("/sys/devices/system/node/node{}/cpulist", node)))
            break;
        for (auto& [bytes, dir] : dirs)
            out.push_back(read_pool(bytes, node, dir));
    }
    return out;
}

HugetlbPool hugetlb_pool(uint64_t page_bytes, int node)
{
    for (const auto& p : hugetlb_pools())
        if (p.page_bytes == page_bytes && p.node == node)
            return p;
    return {};
}

HugetlbReservation::HugetlbReservation(uint64_t page_bytes, uint64_t pages, int node)
{
    HugetlbPool p = hugetlb_pool(page_bytes, node);
    if (!p.page_bytes) {
        why_not_ = fmt::format("this kernel has no {} KiB hugetlb pages", page_bytes / 1024);
        return;
    }
    path_ = p.nr_path;
    old_nr_ = p.nr;
    if (p.free >= pages) {
        ok_ = true;
        return;
    }
    changed_ = true;
    if (!write_u64(path_, p.nr + (pages - p.free))) {
        why_not_ = fmt::format("cannot write {} (needs root)", path_);
        return;
    }
    HugetlbPool now = hugetlb_pool(page_bytes, node);
    ok_ = now.free >= pages;
    if (!ok_)
        why_not_ = fmt::format("raised {} but only {} of {} pages are free (memory fragmented or short)", path_,
                               now.free, pages);
}

HugetlbReservation::~HugetlbReservation()
{
    if (changed_)
        write_u64(path_, old_nr_);
}

}  // namespace mvm
