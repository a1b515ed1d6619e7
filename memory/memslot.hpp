// memory/memslot.hpp - what the VMM knows about each memslot: the
// kvm_userspace_memory_region2 fields plus its backing, virtual node and name.
// The registry refuses overlaps (in GPA or host address), duplicate slots and
// slot counts over the KVM limit, naming both offenders.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "memory/backing.hpp"

namespace mvm {

struct MemoryRegion {
    uint32_t slot = 0;
    uint32_t flags = 0;  // KVM_MEM_*
    uint64_t gpa = 0;
    uint64_t size = 0;
    uint8_t* host = nullptr;
    BackingKind backing = BackingKind::Anon;
    int gmem_fd = -1;  // guest_memfd for gmem slots
    uint64_t gmem_offset = 0;
    int vnode = -1;    // virtual NUMA node, -1 for the system slot
    std::string name;

    uint64_t gpa_end() const { return gpa + size; }
    uint64_t pages() const { return size / 4096; }
    bool contains_gpa(uint64_t a) const { return a >= gpa && a < gpa + size; }
    bool is_gmem() const { return gmem_fd >= 0; }
    std::string describe() const;  // "slot 1 'node0' gpa [0x100000000, 0x110000000) host 0x7f.. anon"
};

class MemslotRegistry {
public:
    explicit MemslotRegistry(uint32_t max_slots = 32764) : max_slots_(max_slots) {}

    // Throws UsageError naming both regions on overlap or duplicate slot.
    const MemoryRegion& add(MemoryRegion r);
    const MemoryRegion* by_slot(uint32_t slot) const;
    const MemoryRegion* by_gpa(uint64_t gpa) const;
    const MemoryRegion* by_host(const void* p) const;
    // Host pointer for [gpa, gpa+len) if it lies inside one region, else nullptr.
    uint8_t* host_ptr(uint64_t gpa, uint64_t len = 1) const;
    const std::vector<MemoryRegion>& regions() const { return regions_; }
    // Changes a slot's KVM_MEM_* flags (the caller re-registers it with KVM).
    void set_flags(uint32_t slot, uint32_t flags);
    uint32_t max_slots() const { return max_slots_; }

private:
    uint32_t max_slots_;
    std::vector<MemoryRegion> regions_;  // sorted by gpa
};

}  // namespace mvm
