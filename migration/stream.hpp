// migration/stream.hpp - minivmm's migration stream, version 2 (2: DIGESTS after the resume, RESULT tail, VCPU state v2).
//
// A stream is a sequence of records, each framed as
//     u32 type | u32 payload length | payload | u32 CRC32C(type, length, payload)
// Channel 0 (the control channel) starts with HEADER and carries the vCPU
// states and END; every channel (one per virtual node, plus the system
// memory on channel 0) carries PAGES records and ends its memory with
// CHANNEL_DONE. Zero pages are sent as a flag, without data. After END the
// receiver resumes the guest and answers RESULT ("resumed"); only then does
// the parked sender hash its frozen memory and send DIGESTS (empty without
// verification), answered by RESULT (the check), then RESULT (stamp check).
//
// HELLO    (first on every connection) channel index, channel count.
// HEADER   magic "MVMMIGv1", version, page size, vCPU count, channel count,
//          then every memslot (slot, flags, GPA, size, vnode, backing page size):
//          the receiver refuses a layout that differs from its own before it
//          accepts a byte of memory.
// PAGES    count, then count x u64 (GPA | 1 for a zero page), then the data of
//          the non-zero pages in order.
// VCPU     one vCPU's state (vcpu_state.hpp).
// DIGESTS  (after the receiver resumed) count x {GPA, bytes, digest}: per
//          2 MiB range, XXH3-64 over the range's page hashes (verify.hpp).
// RESULT   receiver -> sender: status, text, mismatching GPAs, stamp check;
//          then (optional tail) the receiver's restore time, the guest's
//          own downtime and the MSRs it refused.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

constexpr char kStreamMagic[8] = {'M', 'V', 'M', 'M', 'I', 'G', 'v', '1'};
constexpr uint32_t kStreamVersion = 2;
constexpr uint32_t kMaxPayload = 8u << 20;
constexpr size_t kBatchPages = 256;  // pages per PAGES record the sender writes: 1 MiB of data

enum class RecordType : uint32_t {
    Header = 1,
    Pages = 2,
    ChannelDone = 3,
    Vcpu = 4,
    Digests = 5,
    End = 6,
    Result = 7,
    Hello = 8,  // first record on every connection: channel index
};
const char* record_name(RecordType t);

uint32_t crc32c(uint32_t crc, const void* data, size_t len);

struct SlotLayout {
    uint32_t slot = 0, flags = 0;
    uint64_t gpa = 0, size = 0;
    int32_t vnode = -1;
    uint32_t page_size = 4096;
    bool operator==(const SlotLayout&) const = default;
};

struct StreamHeader {
    uint32_t version = kStreamVersion;
    uint32_t page_size = 4096;
    uint32_t nr_vcpus = 0;
    uint32_t nr_channels = 1;
    std::vector<SlotLayout> slots;

    static StreamHeader of(const StressVm& m, uint32_t channels);
    std::vector<uint8_t> encode() const;
    static StreamHeader decode(std::span<const uint8_t> p);
    // "" when `other` (the sender's) can be received into this one; else why not.
    std::string incompatibility(const StreamHeader& sender) const;
};

struct Hello {
    uint32_t channel = 0, channels = 1;
    std::vector<uint8_t> encode() const;
    // nullopt when the payload is not a HELLO's 8 bytes (the receiver words the error).
    static std::optional<Hello> decode(std::span<const uint8_t> p);
};

struct Digest {
    uint64_t gpa = 0, bytes = 0, value = 0;
};
// DIGESTS: u32 count, then count x {GPA, bytes, value}.
std::vector<uint8_t> encode_digests(std::span<const Digest> digests);
std::vector<Digest> decode_digests(std::span<const uint8_t> p);

struct ResultRecord {
    uint32_t ok = 0;
    std::string text;
    std::vector<uint64_t> mismatched_gpas;  // first few
    uint64_t pages_checked = 0, mismatches = 0;
    // The tail (absent from a bare RESULT):
    double restore_ms = -1;              // the destination loading the vCPU states and starting them
    double guest_gap_ms = -1;            // downtime_guest_ms (-1: not measured; text says why)
    std::vector<uint32_t> refused_msrs;  // MSRs the destination would not load
    std::vector<uint8_t> encode() const;
    static ResultRecord decode(std::span<const uint8_t> p);
};

// A byte pipe: a socket, a pipe, or memory (tests, fuzzers).
class Transport {
public:
    virtual ~Transport() = default;
    // Throws Error on failure or EOF ("connection closed").
    virtual void write_all(const void* data, size_t len) = 0;
    virtual void read_exact(void* data, size_t len) = 0;
    virtual void shutdown() {}
};

class FdTransport : public Transport {
public:
    explicit FdTransport(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {}
    ~FdTransport() override;
    void write_all(const void* data, size_t len) override;
    void read_exact(void* data, size_t len) override;
    void shutdown() override;
    int fd() const { return fd_; }

private:
    int fd_;
    std::string peer_;
};

// Reads from a buffer: the fuzzers' and tests' stream source.
class MemoryTransport : public Transport {
public:
    explicit MemoryTransport(std::span<const uint8_t> in) : in_(in) {}
    void write_all(const void* data, size_t len) override;
    void read_exact(void* data, size_t len) override;
    const std::vector<uint8_t>& written() const { return out_; }

private:
    std::span<const uint8_t> in_;
    size_t pos_ = 0;
    std::vector<uint8_t> out_;
};

class RecordWriter {
public:
    explicit RecordWriter(Transport& t) : t_(t) {}
    void write(RecordType type, std::span<const uint8_t> payload);
    uint64_t bytes() const { return bytes_; }

private:
    Transport& t_;
    uint64_t bytes_ = 0;
};

struct Record {
    RecordType type;
    std::vector<uint8_t> payload;
};

class RecordReader {
public:
    explicit RecordReader(Transport& t) : t_(t) {}
    // Validates the frame and the checksum; throws Error naming the record
    // number and byte offset of what is wrong.
    Record read();
    uint64_t offset() const { return offset_; }

private:
    Transport& t_;
    uint64_t offset_ = 0, count_ = 0;
};

// Builds a PAGES payload for `gpas` read from `m`'s memory.
std::vector<uint8_t> encode_pages(const StressVm& m, std::span<const uint64_t> gpas, uint64_t* zero_pages);
// Applies a PAGES payload to `m`'s memory; checks every GPA lies in a slot
// of the header's layout and the data length. Returns pages applied.
// `landed`, when given, is told each GPA once its page is in place.
uint64_t apply_pages(StressVm& m, std::span<const uint8_t> payload, uint64_t* zero_pages = nullptr,
                     const std::function<void(uint64_t gpa)>& landed = {});

}  // namespace mvm::migration
