// migration/page_codec.hpp - PAGES records on the wire, per channel.
//
// Sending: a batch of GPAs becomes one frame written with one sendmsg: the
// head and index from a small buffer, each non-zero page's 4 KiB as its own
// iovec. While the source runs (bulk, pre-copy) a page is first copied into
// the channel's staging buffer: the guest may write it while the kernel
// copies it into the socket, and the frame's checksum must describe the
// bytes sent. Once the source is parked (stop-and-copy) its memory is frozen
// and pages go from guest memory to the socket directly. With compression
// the staged pages of a batch become one zstd frame (PAGES_ZSTD).
//
// Receiving: the index is read and checked first (every GPA in a memslot,
// the length what the index says), then the data is read with readv straight
// into guest memory, hashed there (the verification's page hashes double as
// the frame checksum's), and only then are zero pages cleared. A compressed
// frame is checked before it is decompressed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "migration/stream.hpp"
#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

// --compress none|zstd[:LEVEL]
struct Compression {
    bool zstd = false;
    int level = 1;  // ZSTD's levels: negative (fastest) .. 19
    // Zero pages go as an index entry alone (QEMU's zero-page-detection
    // multifd/legacy); false: sent whole like any page (QEMU's none).
    bool detect_zero = true;
    // Throws UsageError naming `option`.
    static Compression parse(const std::string& option, const std::string& spec);
    std::string name() const;  // "none", "zstd:1"
};

// What a channel's frames carried.
struct PageCounts {
    uint64_t pages = 0, zero_pages = 0;
    uint64_t data_bytes = 0;     // the non-zero pages' 4 KiB each, before compression
    uint64_t payload_bytes = 0;  // what their data took on the wire (compressed or not)
    uint64_t frame_bytes = 0;    // every byte of the frames, heads and checksums included
    double codec_cpu_s = 0;      // thread CPU time in zstd (compress or decompress)
    uint64_t zstd_frames = 0;    // PAGES_ZSTD frames among them
    void add(const PageCounts& o);
};

// The 4 KiB page at `p` is all zero bytes.
bool is_zero_page(const uint8_t* p);

class PageEncoder {
public:
    explicit PageEncoder(Compression c);
    ~PageEncoder();
    PageEncoder(const PageEncoder&) = delete;
    PageEncoder& operator=(const PageEncoder&) = delete;

    // One frame for `gpas` (at most kBatchPages) of `m`'s memory. `frozen`:
    // the source is parked and its pages go unstaged.
    void write(RecordWriter& w, const StressVm& m, std::span<const uint64_t> gpas, bool frozen);
    // The whole frame as bytes (tests, seeds).
    std::vector<uint8_t> encode(const StressVm& m, std::span<const uint64_t> gpas);
    const PageCounts& counts() const { return counts_; }

private:
    struct Impl;
    std::unique_ptr<Impl> d_;
    PageCounts counts_;
};

// A PAGES (or PAGES_ZSTD) payload for `gpas` of `m`'s memory, for
// RecordWriter::write (tests, seeds, fuzzers).
struct EncodedPages {
    RecordType type = RecordType::Pages;
    std::vector<uint8_t> payload;
};
EncodedPages encode_pages(const StressVm& m, std::span<const uint64_t> gpas, Compression c = {});

// Told each page once it is in place, with its XXH3-64.
using LandedFn = std::function<void(uint64_t gpa, uint64_t hash)>;

// Where a frame's pages go instead of straight into guest memory (postcopy:
// a page must appear whole and at once, so it is read into a staging buffer
// and placed with UFFDIO_COPY once the frame checked out).
class PageTarget {
public:
    virtual ~PageTarget() = default;
    // Where the i-th non-zero page of the frame (at gpa) is read to.
    virtual uint8_t* stage(size_t i, uint64_t gpa) = 0;
    // After the frame's checksum held, each page in index order: its staged
    // data (null: a zero page).
    virtual void place(uint64_t gpa, const uint8_t* data) = 0;
};

class PageDecoder {
public:
    PageDecoder();
    ~PageDecoder();
    PageDecoder(const PageDecoder&) = delete;
    PageDecoder& operator=(const PageDecoder&) = delete;

    // The payload of a PAGES or PAGES_ZSTD frame whose head `f` was just
    // read, into `m`'s memory. Returns the pages applied; throws Error naming
    // the record and what is wrong.
    // With `target`, pages go through it instead (postcopy).
    uint64_t read(RecordReader& r, const FrameHead& f, StressVm& m, const LandedFn& landed,
                  PageTarget* target = nullptr);
    const PageCounts& counts() const { return counts_; }

private:
    struct Impl;
    std::unique_ptr<Impl> d_;
    PageCounts counts_;
};

}  // namespace mvm::migration
