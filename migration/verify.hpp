// migration/verify.hpp - verification outside the downtime window.
//
// The destination hashes every page as it arrives (XXH3-64 of its 4 KiB, from
// Debian's libxxhash), so it knows the hash of the last copy of each page it
// took. Once it runs, the parked source hashes its frozen memory the same
// way; the two must agree page for page. Over TCP the source sends one digest
// per 2 MiB range (XXH3-64 over the range's page hashes) in a DIGESTS record.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "migration/stream.hpp"
#include "vmm/stress/stress_vm.hpp"

struct XXH3_state_s;  // xxhash.h's state, opaque here

namespace mvm::migration {

constexpr uint64_t kDigestRangeBytes = 2ull << 20;

uint64_t page_hash(const void* page);  // XXH3-64 of 4 KiB
uint64_t zero_page_hash();             // page_hash() of a page of zeros

// XXH3-64 over several pieces (frame checksums: stream.cpp, page_codec.cpp).
class Xxh3 {
public:
    Xxh3();
    ~Xxh3();
    Xxh3(const Xxh3&) = delete;
    Xxh3& operator=(const Xxh3&) = delete;
    void reset();
    void add(const void* p, size_t n);
    uint64_t value() const;

private:
    XXH3_state_s* s_;
};

// One hash per 4 KiB page of every memslot of a machine's layout.
class PageHashes {
public:
    PageHashes() = default;
    // The hash of every page of `m`'s memory as it is now.
    static PageHashes of_memory(const StressVm& m);

    // Notes the page at `gpa` as it now is in `m` (after its copy landed).
    // Pages of different slots may be noted from different threads.
    void note(const StressVm& m, uint64_t gpa);
    void note_zero(uint64_t gpa);
    // The page at `gpa` landed with hash `h` (page_codec.hpp hashed it).
    void set(uint64_t gpa, uint64_t h);
    bool empty() const { return slots_.empty(); }

    // Per kDigestRangeBytes range of each slot: XXH3-64 of its page hashes.
    std::vector<Digest> digests() const;
    // GPAs whose hash differs from `other`'s (same layout), first `max`; `count` all of them.
    std::vector<uint64_t> differences(const PageHashes& other, uint64_t& count, uint64_t& pages, size_t max = 16) const;
    // Checks `source` digests against ours: ranges that differ, first `max`; `pages` checked.
    std::vector<uint64_t> differences(std::span<const Digest> source, uint64_t& count, uint64_t& pages,
                                      size_t max = 16) const;

private:
    struct Slot {
        uint64_t gpa = 0;
        std::vector<uint64_t> hash;
    };
    uint64_t* find(uint64_t gpa);
    const Slot* slot_of(uint64_t gpa) const;
    std::vector<Slot> slots_;
};

// The destination's pages as they landed against the source's frozen memory
// (`source` null: no verification, ok with 0 pages checked).
ResultRecord check_landed(const PageHashes& landed, const PageHashes* source);
// The same against the source's per-range digests (over TCP).
ResultRecord check_landed(const PageHashes& landed, std::span<const Digest> source);

}  // namespace mvm::migration
