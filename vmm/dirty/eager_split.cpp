#include "vmm/dirty/eager_split.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fstream>

#include "vmm/host_info.hpp"
#include "base/sysfs.hpp"

namespace mvm::dirty {

namespace {

std::string read_first(const std::string& path)
{
    std::ifstream f(path);
    std::string v;
    f >> v;
    return v;
}

std::string param_path(const char* name)
{
    for (const char* mod : {"kvm", "kvm_intel", "kvm_amd"}) {
        std::string p = fmt::format("/sys/module/{}/parameters/{}", mod, name);
        if (::access(p.c_str(), R_OK) == 0)
            return p;
    }
    return {};
}

}  // namespace

EagerSplitInfo eager_split_info()
{
    EagerSplitInfo i;
    i.path = param_path("eager_page_split");
    if (i.path.empty()) {
        i.note = "no eager_page_split parameter (not x86 KVM, or a kernel before 5.19)";
        return i;
    }
    i.param = read_first(i.path);
    std::string tdp = param_path("tdp_mmu");
    i.tdp_mmu = tdp.empty() ? "" : read_first(tdp);
    const GuestMmu mmu = guest_mmu();
    i.mmu = mmu.name;
    i.mmu_why = mmu.why;
    i.writable = param_file_writable(i.path);
    i.effective = i.param == "Y" && mmu.tdp();
    if (!mmu.tdp())
        i.note = fmt::format("eager_page_split={} has no effect: guests run on the shadow MMU ({}), and upstream KVM "
                             "splits eagerly only on the TDP MMU",
                             i.param, mmu.why);
    else if (i.param == "Y")
        i.note = "enabling dirty logging splits huge pages eagerly (under the MMU lock)";
    else
        i.note = "huge pages are split lazily, on the first write fault after logging is enabled";
    return i;
}

EagerSplitSetting::EagerSplitSetting(std::optional<bool> want)
{
    if (!want)
        return;
    EagerSplitInfo i = eager_split_info();
    const std::string value = *want ? "Y" : "N";
    if (i.path.empty()) {
        note_ = "--eager-split: " + i.note + "; going on with what the host has";
        return;
    }
    if (i.param == value) {
        note_ = fmt::format("--eager-split: eager_page_split is already {}", value);
        return;
    }
    if (!i.writable) {
        note_ = fmt::format("--eager-split: {} is read-only here (value {}); going on with what the host has", i.path,
                            i.param);
        return;
    }
    std::ofstream f(i.path);
    f << value;
    f.flush();
    if (!f || read_first(i.path) != value) {
        note_ = fmt::format("--eager-split: could not write {} to {}; going on with {}", value, i.path, i.param);
        return;
    }
    path_ = i.path;
    old_ = i.param;
    changed_ = true;
    note_ = fmt::format("eager_page_split set to {} for this run (was {}; restored at exit)", value, old_);
}

EagerSplitSetting::~EagerSplitSetting()
{
    if (!changed_)
        return;
    std::ofstream f(path_);
    f << old_;
}

}  // namespace mvm::dirty
