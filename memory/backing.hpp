// memory/backing.hpp - the host memory behind a memslot. Each kind knows its
// page size and alignment rules; create() maps it but never touches it, so a
// NUMA policy can still be applied before the first fault.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "vmm/kvm/fd.hpp"

namespace mvm {

class Vm;

enum class BackingKind { Anon, Shm, Thp, Hugetlb2M, Hugetlb1G, Gmem };

std::string_view backing_name(BackingKind k);
std::optional<BackingKind> parse_backing(std::string_view s);
std::string_view backing_names();  // "anon|shm|thp|hugetlb2m|hugetlb1g|gmem"
// The page size the backing allocates in (and memslot sizes must be a multiple of).
uint64_t backing_page_size(BackingKind k);
// Host mapping alignment that lets KVM use the backing's huge pages.
uint64_t backing_alignment(BackingKind k);

class Backing {
public:
    // Maps `size` bytes of `kind`. gmem needs the VM (guest_memfd belongs to it).
    static Backing create(BackingKind kind, uint64_t size, Vm* vm, const std::string& name);

    BackingKind kind() const noexcept { return kind_; }
    uint8_t* host() const noexcept { return map_.bytes(); }
    uint64_t size() const noexcept { return size_; }
    int fd() const noexcept { return fd_.get(); }  // memfd or guest_memfd; -1 for anonymous
    uint64_t page_size() const noexcept { return backing_page_size(kind_); }

private:
    BackingKind kind_ = BackingKind::Anon;
    uint64_t size_ = 0;
    UniqueFd fd_;
    Mapping map_;
};

}  // namespace mvm
