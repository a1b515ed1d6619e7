// migration/stream.hpp - minivmm's migration stream, version 5 (2: DIGESTS after the resume, RESULT tail, VCPU
// state v2; 3: XXH3 frame checksums, PAGES_ZSTD; 4: HELLO carries the version and a session number, RESULT the
// receiver's post-run; 5: postcopy: DISCARD, POSTCOPY_RUN, REQUEST, RESULT details).
//
// A stream is a sequence of records, each framed as
//     u32 type | u32 payload length | payload | u64 checksum
// The checksum is XXH3-64 over the type, the length and the payload, except
// that a PAGES record's page data enters it as one XXH3-64 per 4 KiB page
// (record_checksum()): the hash the receiver computes anyway for the
// verification (verify.hpp), so a page is read once after it landed.
// Channel 0 (the control channel) starts with HEADER and carries the vCPU
// states and END; every channel (one per virtual node, plus the system
// memory on channel 0) carries PAGES records and ends its memory with
// CHANNEL_DONE. Zero pages are sent as a flag, without data. After END the
// receiver resumes the guest and answers RESULT ("resumed"); only then does
// the parked sender hash its frozen memory and send DIGESTS (empty without
// verification), answered by RESULT (the check), then RESULT (stamp check).
//
// HELLO    (first on every connection) stream version, channel index, channel
//          count, session: a random number, the same on each of one migration's
//          connections (the receiver groups connections by it).
// HEADER   magic "MVMMIGv1", version, page size, vCPU count, channel count,
//          then every memslot (slot, flags, GPA, size, vnode, backing page size):
//          the receiver refuses a layout that differs from its own before it
//          accepts a byte of memory.
// PAGES    u32 count, u32 data bytes, then count x u64 (GPA | 1 for a zero
//          page), then the data of the non-zero pages in order.
// PAGES_ZSTD  the same with the data as one zstd frame (page_codec.hpp); the
//          data bytes field says what it decompresses to.
// VCPU     one vCPU's state (vcpu_state.hpp).
// DIGESTS  (after the receiver resumed) count x {GPA, bytes, digest}: per
//          2 MiB range, XXH3-64 over the range's page hashes (verify.hpp).
// RESULT   receiver -> sender: status, text, mismatching GPAs, stamp check;
//          then (optional tail) the receiver's restore time, the guest's
//          own downtime, the MSRs it refused, its post-run and a JSON text
//          of details (postcopy's figures).
//
// Postcopy (postcopy.hpp) replaces END: after the VCPU records channel 0
// carries DISCARD records (u32 count, count x u64 GPA: pages the receiver
// must drop, sent later) and POSTCOPY_RUN; the receiver resumes and answers
// RESULT ("resumed"). Then every channel carries PAGES again (placed with
// UFFDIO_COPY) up to a second CHANNEL_DONE, while the receiver sends
// REQUEST records (u32 count, count x u64 GPA; count 0: nothing, still
// here) on channel 0 for the pages its faults wait on; RESULT ("postcopy
// complete", with the figures) ends them. DIGESTS and the last two RESULTs
// follow as after END.
//
// Postcopy recovery (QEMU's postcopy-paused / migrate-recover / resume): a
// connection cut while pages are missing pauses both sides. The sender then
// connects anew (every channel, HELLO with the paused migration's session)
// and sends RESUME (u64 session) on channel 0 instead of HEADER; the
// receiver answers MISSING (as DISCARD: the pages it still lacks, whatever
// was in flight when the cut came), then REQUESTs for the faults that wait,
// and postcopy goes on from there.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vmm/stress/stress_vm.hpp"

namespace mvm::migration {

constexpr char kStreamMagic[8] = {'M', 'V', 'M', 'M', 'I', 'G', 'v', '1'};
constexpr uint32_t kStreamVersion = 6;
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
    PagesZstd = 9,
    Discard = 10,      // postcopy: pages the receiver drops (they come later)
    PostcopyRun = 11,  // postcopy: resume now, pages on demand
    Request = 12,      // postcopy, receiver -> sender: pages faults wait on
    Resume = 13,       // postcopy recovery, sender -> receiver: the paused migration's session
    Missing = 14,      // postcopy recovery, receiver -> sender: the pages it still lacks
};
constexpr uint32_t kLastRecordType = static_cast<uint32_t>(RecordType::Missing);
const char* record_name(RecordType t);

// The frame's checksum of a record whose payload is `payload` (see above).
uint64_t record_checksum(RecordType type, std::span<const uint8_t> payload);

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
    // QEMU's validate-uuid: the VM's UUID when the sender checks it ("" else:
    // nothing to check); of() fills it from the VM's config.
    std::string uuid;
    // The source's guest was stopped (QMP stop) before the migration: the
    // destination keeps it paused until cont, as QEMU does.
    bool guest_stopped = false;
    // Postcopy-preempt (QEMU's capability): the last of nr_channels carries
    // only the pages the destination's faults ask for in postcopy.
    bool preempt = false;
    uint32_t data_channels() const { return nr_channels - (preempt ? 1 : 0); }

    static StreamHeader of(const StressVm& m, uint32_t channels);
    std::vector<uint8_t> encode() const;
    static StreamHeader decode(std::span<const uint8_t> p);
    // "" when `other` (the sender's) can be received into this one; else why
    // not. A UUID is compared only when both have one (as QEMU does).
    std::string incompatibility(const StreamHeader& sender) const;
};

struct Hello {
    uint32_t version = kStreamVersion;
    uint32_t channel = 0, channels = 1;
    uint64_t session = 0;  // the same random number on every connection of one migration
    std::vector<uint8_t> encode() const;
    // nullopt when the payload is not a HELLO's 20 bytes (the receiver words the error).
    static std::optional<Hello> decode(std::span<const uint8_t> p);
};

// A fresh random session number for a migration's HELLOs.
uint64_t new_session_id();

// RESUME: the paused migration's session (resume_session_of throws Error
// for a payload that is not 8 bytes).
std::vector<uint8_t> encode_resume(uint64_t session);

// DISCARD, REQUEST and MISSING: u32 count, then count x u64 GPA.
std::vector<uint8_t> encode_gpas(std::span<const uint64_t> gpas);
std::vector<uint64_t> decode_gpas(std::span<const uint8_t> p, const char* what);

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
    double post_run_s = -1;              // the receiver's --post-run (in "resumed"): the sender waits that longer
    std::string details;                 // JSON text (postcopy's figures in "postcopy complete"); "" none
    std::vector<uint8_t> encode() const;
    static ResultRecord decode(std::span<const uint8_t> p);
};

// How long a socket transport may wait on its peer. Each read or write that
// makes no progress for idle_s fails ("nothing for 30 s"), and none goes on
// past `deadline` (the sender's --timeout): a peer that stops reading or
// sending cannot hold either side. Other transports ignore them.
struct IoLimits {
    using time_point = std::chrono::steady_clock::time_point;
    double idle_s = 0;                       // 0: no limit
    std::string idle_what = "--io-timeout";  // the option the message names
    time_point deadline = time_point::max();
    std::string deadline_what;               // e.g. "--timeout 10 s"
};

// A byte pipe: a socket, a pipe, or memory (tests, fuzzers).
class Transport {
public:
    virtual ~Transport() = default;
    // Throws Error on failure or EOF ("connection closed").
    virtual void write_all(const void* data, size_t len) = 0;
    virtual void read_exact(void* data, size_t len) = 0;
    // Scatter-gather: by default gathered into one write_all (a wrapper sees
    // the same bytes at the same offsets) and read piece by piece.
    virtual void writev_all(std::span<const iovec> iov);
    virtual void readv_exact(std::span<const iovec> iov);
    virtual void shutdown() {}
    virtual void set_limits(const IoLimits& limits) { (void)limits; }
};

class FdTransport : public Transport {
public:
    explicit FdTransport(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {}
    ~FdTransport() override;
    void write_all(const void* data, size_t len) override;
    void read_exact(void* data, size_t len) override;
    void writev_all(std::span<const iovec> iov) override;  // sendmsg: no staging copy
    void readv_exact(std::span<const iovec> iov) override;  // readv: straight into place
    void shutdown() override;
    void set_limits(const IoLimits& limits) override;
    int fd() const { return fd_; }
    const std::string& peer() const { return peer_; }
    const IoLimits& limits() const { return limits_; }

    // For a layer that does its own I/O on fd() (TLS): before each blocking
    // call, arm() fits the socket's timeouts to the limits (throws once one
    // passed); when the call timed out (EAGAIN), expired() throws the message.
    void arm(bool sending);
    [[noreturn]] void expired(bool sending) const;

private:
    int fd_;
    std::string peer_;
    IoLimits limits_;
    bool limited_ = false;
    double armed_s_[2] = {0, 0};  // SO_RCVTIMEO, SO_SNDTIMEO as set (0: none, -1: to set)
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

constexpr size_t kFrameHead = 8, kFrameTrailer = 8;

class RecordWriter {
public:
    explicit RecordWriter(Transport& t) : t_(t) {}
    void write(RecordType type, std::span<const uint8_t> payload);
    // A frame already laid out by the caller: `iov` is the 8-byte head, the
    // payload's pieces and the 8-byte checksum (page_codec.cpp).
    void write_frame(std::span<const iovec> iov, uint64_t frame_bytes);
    Transport& transport() { return t_; }
    uint64_t bytes() const { return bytes_; }

private:
    Transport& t_;
    uint64_t bytes_ = 0;
};

struct Record {
    RecordType type{};
    std::vector<uint8_t> payload;
};

uint64_t resume_session_of(const Record& r);

// A frame's head, read and checked (known type, length under the limit).
struct FrameHead {
    RecordType type;
    uint32_t len;
    uint64_t at;  // byte offset in the stream
    uint64_t number;
};

class RecordReader {
public:
    explicit RecordReader(Transport& t) : t_(t) {}
    // Validates the frame and the checksum; throws Error naming the record
    // number and byte offset of what is wrong.
    Record read() { return payload(next()); }
    // In two steps: the head, then the payload (generic), or the payload in
    // pieces (page_codec.cpp reads PAGES data straight into guest memory).
    FrameHead next();
    Record payload(const FrameHead& f);
    void read_part(void* data, size_t len) { t_.read_exact(data, len); }
    void readv_part(std::span<const iovec> iov) { t_.readv_exact(iov); }
    // The trailer against `want`; the frame is done.
    void end_frame(const FrameHead& f, uint64_t want);
    [[noreturn]] void bad(const FrameHead& f, const std::string& what) const;
    uint64_t offset() const { return offset_; }

private:
    Transport& t_;
    uint64_t offset_ = 0, count_ = 0;
};

}  // namespace mvm::migration
