// memory/backing.hpp - the host memory behind a memslot. Each kind knows its
// page size and alignment rules; create() maps it but never touches it, so a
// NUMA policy can still be applied before the first fault.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "base/fd.hpp"

namespace mvm {

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
    // guest_memfd belongs to a VM: the VM layer passes a function that creates
    // one of `size` bytes that can be mmapped (or throws saying why not) and
    // returns its fd, which the Backing then owns.
    using GuestMemfdFactory = std::function<int(uint64_t size)>;
    // Maps `size` bytes of `kind`; gmem calls `gmem`.
    static Backing create(BackingKind kind, uint64_t size, const GuestMemfdFactory& gmem, const std::string& name);

    BackingKind kind() const noexcept { return kind_; }
    uint8_t* host() const noexcept { return map_.bytes(); }
    uint64_t size() const noexcept { return size_; }
    int fd() const noexcept { return fd_.get(); }  // memfd or guest_memfd; -1 for anonymous
    uint64_t page_size() const noexcept { return backing_page_size(kind_); }
    // Before asking where its pages are (move_pages, pagemap): the guest
    // reaches guest_memfd pages through KVM, not through our mapping, so map
    // what exists into it (a read fault finds the existing folio). Other
    // backings are mapped already. Throws SysError.
    void map_for_query() const;

private:
    BackingKind kind_ = BackingKind::Anon;
    uint64_t size_ = 0;
    UniqueFd fd_;
    Mapping map_;
};

}  // namespace mvm
