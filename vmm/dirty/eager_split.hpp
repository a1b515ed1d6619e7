// vmm/dirty/eager_split.hpp - KVM's eager huge-page splitting as this
// host has it: x86's `eager_page_split` module parameter (upstream splits
// eagerly only on the TDP MMU, so `tdp_mmu` too), or arm64's
// KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE. Where the parameter is writable it can
// be set for a run and is restored afterwards.
#pragma once

#include <optional>
#include <string>

namespace mvm::dirty {

struct EagerSplitInfo {
    std::string param;        // "Y", "N", or "" when the parameter does not exist
    std::string tdp_mmu;      // "Y", "N", or ""
    std::string mmu;          // which MMU maps guests: "tdp", "shadow", or "" (vmm/host_info guest_mmu)
    std::string mmu_why;      // "kvm_amd npt=N, kvm.tdp_mmu=Y" ...
    std::string path;         // sysfs file of the parameter
    bool writable = false;
    bool effective = false;   // param Y and the TDP MMU maps guests (x86)
    std::string note;         // why it does or does not take effect
};

EagerSplitInfo eager_split_info();

// Sets eager_page_split to on/off for its lifetime and restores the old
// value. When the host does not let it change, changed() is false and
// note() says why; callers go on with what the host has.
class EagerSplitSetting {
public:
    explicit EagerSplitSetting(std::optional<bool> want);
    ~EagerSplitSetting();
    EagerSplitSetting(const EagerSplitSetting&) = delete;
    EagerSplitSetting& operator=(const EagerSplitSetting&) = delete;
    bool changed() const { return changed_; }
    const std::string& note() const { return note_; }

private:
    std::string path_, old_;
    bool changed_ = false;
    std::string note_;
};

}  // namespace mvm::dirty
