#include "migration/stream.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "base/error.hpp"

namespace mvm::migration {

namespace {

template <class T>
void put(std::vector<uint8_t>& out, const T& v)
{
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
}

class Reader {
public:
    Reader(std::span<const uint8_t> d, const char* what) : d_(d), what_(what) {}
    template <class T>
    T get()
    {
        if (d_.size() - pos_ < sizeof(T))
            throw Error(fmt::format("migration stream: {} record is truncated at byte {}", what_, pos_));
        T v;
        std::memcpy(&v, d_.data() + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::span<const uint8_t> rest() const { return d_.subspan(pos_); }
    void skip(size_t n) { pos_ += n; }
    size_t left() const { return d_.size() - pos_; }

private:
    std::span<const uint8_t> d_;
    size_t pos_ = 0;
    const char* what_;
};

constexpr size_t kCoalesceBytes = 64 << 10;

bool is_zero_page(const uint8_t* p)
{
    const auto* w = reinterpret_cast<const uint64_t*>(p);
    uint64_t acc = 0;
    for (size_t i = 0; i < 512; i += 8)
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    return acc == 0;
}

}  // namespace

const char* record_name(RecordType t)
{
    switch (t) {
    case RecordType::Header: return "HEADER";
    case RecordType::Pages: return "PAGES";
    case RecordType::ChannelDone: return "CHANNEL_DONE";
    case RecordType::Vcpu: return "VCPU";
    case RecordType::Digests: return "DIGESTS";
    case RecordType::End: return "END";
    case RecordType::Result: return "RESULT";
    case RecordType::Hello: return "HELLO";
    }
    return "UNKNOWN";
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t* p, size_t len)
{
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = static_cast<uint32_t>(c);
    while (len--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

static uint32_t crc32c_sw(uint32_t crc, const uint8_t* p, size_t len)
{
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
    }
    return crc;
}

uint32_t crc32c(uint32_t crc, const void* data, size_t len)
{
    static const bool hw = __builtin_cpu_supports("sse4.2");
    const auto* p = static_cast<const uint8_t*>(data);
    return ~(hw ? crc32c_hw(~crc, p, len) : crc32c_sw(~crc, p, len));
}

// ---- header ---------------------------------------------------------------

StreamHeader StreamHeader::of(const StressVm& m, uint32_t channels)
{
    StreamHeader h;
    h.nr_vcpus = m.vcpu_count();
    h.nr_channels = channels;
    for (const auto& r : m.memslots().regions())
        h.slots.push_back({r.slot, r.flags & ~static_cast<uint32_t>(KVM_MEM_LOG_DIRTY_PAGES), r.gpa, r.size, r.vnode,
                           static_cast<uint32_t>(backing_page_size(r.backing))});
    return h;
}

std::vector<uint8_t> StreamHeader::encode() const
{
    std::vector<uint8_t> out(kStreamMagic, kStreamMagic + 8);
    put(out, version);
    put(out, page_size);
    put(out, nr_vcpus);
    put(out, nr_channels);
    put(out, static_cast<uint32_t>(slots.size()));
    for (const auto& s : slots) {
        put(out, s.slot);
        put(out, s.flags);
        put(out, s.gpa);
        put(out, s.size);
        put(out, s.vnode);
        put(out, s.page_size);
    }
    return out;
}

StreamHeader StreamHeader::decode(std::span<const uint8_t> p)
{
    if (p.size() < 8 || std::memcmp(p.data(), kStreamMagic, 8) != 0)
        throw Error("migration stream: not a minivmm stream (bad magic); is the sender minivmm migrate?");
    Reader r(p.subspan(8), "HEADER");
    StreamHeader h;
    h.version = r.get<uint32_t>();
    if (h.version != kStreamVersion)
        throw Error(fmt::format("migration stream: version {} but this minivmm reads version {}; use the same "
                                "minivmm on both ends",
                                h.version, kStreamVersion));
    h.page_size = r.get<uint32_t>();
    h.nr_vcpus = r.get<uint32_t>();
    h.nr_channels = r.get<uint32_t>();
    const auto n = r.get<uint32_t>();
    if (n > 32768 || h.nr_channels == 0 || h.nr_channels > 64)
        throw Error(fmt::format("migration stream: implausible header ({} slots, {} channels)", n, h.nr_channels));
    for (uint32_t i = 0; i < n; i++) {
        SlotLayout s;
        s.slot = r.get<uint32_t>();
        s.flags = r.get<uint32_t>();
        s.gpa = r.get<uint64_t>();
        s.size = r.get<uint64_t>();
        s.vnode = r.get<int32_t>();
        s.page_size = r.get<uint32_t>();
        h.slots.push_back(s);
    }
    if (r.left())
        throw Error("migration stream: HEADER has trailing bytes");
    return h;
}

std::string StreamHeader::incompatibility(const StreamHeader& s) const
{
    if (s.page_size != page_size)
        return fmt::format("page size {} differs from ours ({})", s.page_size, page_size);
    if (s.nr_vcpus != nr_vcpus)
        return fmt::format("the sender has {} vCPUs, this destination {}; start receive with the same VM options",
                           s.nr_vcpus, nr_vcpus);
    if (s.slots.size() != slots.size())
        return fmt::format("the sender has {} memslots, this destination {}; start receive with the same VM options",
                           s.slots.size(), slots.size());
    for (size_t i = 0; i < slots.size(); i++) {
        const auto &a = s.slots[i], &b = slots[i];
        if (a.slot != b.slot || a.gpa != b.gpa || a.size != b.size || a.vnode != b.vnode)
            return fmt::format("memslot {} differs: sender GPA {:#x} size {:#x} vnode {}, here slot {} GPA {:#x} size "
                               "{:#x} vnode {}; start receive with the same --mem/--numa",
                               a.slot, a.gpa, a.size, a.vnode, b.slot, b.gpa, b.size, b.vnode);
    }
    return {};
}

// ---- hello, digests, result -------------------------------------------------------

std::vector<uint8_t> Hello::encode() const
{
    std::vector<uint8_t> out;
    put(out, channel);
    put(out, channels);
    return out;
}

std::optional<Hello> Hello::decode(std::span<const uint8_t> p)
{
    if (p.size() != 8)
        return std::nullopt;
    Hello h;
    std::memcpy(&h.channel, p.data(), 4);
    std::memcpy(&h.channels, p.data() + 4, 4);
    return h;
}

static_assert(sizeof(Digest) == 24, "a DIGESTS entry is three u64 on the wire");

std::vector<uint8_t> encode_digests(std::span<const Digest> digests)
{
    std::vector<uint8_t> out;
    put(out, static_cast<uint32_t>(digests.size()));
    for (const auto& d : digests)
        put(out, d);
    return out;
}

std::vector<Digest> decode_digests(std::span<const uint8_t> p)
{
    if (p.size() < 4)
        throw Error("migration stream: DIGESTS is truncated");
    uint32_t n;
    std::memcpy(&n, p.data(), 4);
    if (p.size() != 4 + static_cast<size_t>(n) * sizeof(Digest))
        throw Error("migration stream: DIGESTS length does not match its count");
    std::vector<Digest> out(n);
    if (n)
        std::memcpy(out.data(), p.data() + 4, n * sizeof(Digest));
    return out;
}

std::vector<uint8_t> ResultRecord::encode() const
{
    std::vector<uint8_t> out;
    put(out, ok);
    put(out, pages_checked);
    put(out, mismatches);
    put(out, static_cast<uint32_t>(text.size()));
    out.insert(out.end(), text.begin(), text.end());
    put(out, static_cast<uint32_t>(mismatched_gpas.size()));
    for (uint64_t g : mismatched_gpas)
        put(out, g);
    put(out, restore_ms);
    put(out, guest_gap_ms);
    put(out, static_cast<uint32_t>(refused_msrs.size()));
    for (uint32_t m : refused_msrs)
        put(out, m);
    return out;
}

ResultRecord ResultRecord::decode(std::span<const uint8_t> p)
{
    Reader r(p, "RESULT");
    ResultRecord res;
    res.ok = r.get<uint32_t>();
    res.pages_checked = r.get<uint64_t>();
    res.mismatches = r.get<uint64_t>();
    const auto len = r.get<uint32_t>();
    if (len > r.left())
        throw Error("migration stream: RESULT text overruns the record");
    res.text.assign(reinterpret_cast<const char*>(r.rest().data()), len);
    r.skip(len);
    const auto n = r.get<uint32_t>();
    if (n > 4096)
        throw Error("migration stream: RESULT lists too many GPAs");
    for (uint32_t i = 0; i < n; i++)
        res.mismatched_gpas.push_back(r.get<uint64_t>());
    if (!r.left())
        return res;  // no tail
    res.restore_ms = r.get<double>();
    res.guest_gap_ms = r.get<double>();
    const auto nm = r.get<uint32_t>();
    if (nm > 4096)
        throw Error("migration stream: RESULT lists too many MSRs");
    for (uint32_t i = 0; i < nm; i++)
        res.refused_msrs.push_back(r.get<uint32_t>());
    if (r.left())
        throw Error("migration stream: RESULT has trailing bytes");
    return res;
}

// ---- transports -----------------------------------------------------------------

FdTransport::~FdTransport()
{
    if (fd_ >= 0)
        ::close(fd_);
}

void FdTransport::write_all(const void* data, size_t len)
{
    const auto* p = static_cast<const uint8_t*>(data);
    while (len) {
        ssize_t n = ::send(fd_, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == ENOTSOCK)
            n = ::write(fd_, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            throw Error(fmt::format("sending to {}: {}", peer_, n < 0 ? errno_text(errno) : "connection closed"));
        p += n;
        len -= static_cast<size_t>(n);
    }
}

void FdTransport::read_exact(void* data, size_t len)
{
    auto* p = static_cast<uint8_t*>(data);
    while (len) {
        ssize_t n = ::read(fd_, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw Error(fmt::format("receiving from {}: {}", peer_, errno_text(errno)));
        if (n == 0)
            throw Error(fmt::format("{} closed the connection mid-stream", peer_));
        p += n;
        len -= static_cast<size_t>(n);
    }
}

void FdTransport::shutdown()
{
    if (fd_ >= 0)
        ::shutdown(fd_, SHUT_RDWR);
}

void MemoryTransport::write_all(const void* data, size_t len)
{
    const auto* p = static_cast<const uint8_t*>(data);
    out_.insert(out_.end(), p, p + len);
}

void MemoryTransport::read_exact(void* data, size_t len)
{
    if (in_.size() - pos_ < len)
        throw Error(fmt::format("migration stream ends at byte {} (truncated)", in_.size()));
    std::memcpy(data, in_.data() + pos_, len);
    pos_ += len;
}

// ---- records --------------------------------------------------------------------

void RecordWriter::write(RecordType type, std::span<const uint8_t> payload)
{
    if (payload.size() > kMaxPayload)
        throw Error(fmt::format("{} record of {} bytes exceeds the stream's limit", record_name(type), payload.size()));
    uint32_t hdr[2] = {static_cast<uint32_t>(type), static_cast<uint32_t>(payload.size())};
    uint32_t crc = crc32c(0, hdr, sizeof(hdr));
    crc = crc32c(crc, payload.data(), payload.size());
    if (payload.size() <= kCoalesceBytes) {
        // One write: a record split into small writes waits on Nagle and
        // delayed ACKs (~40 ms) when the peer has nothing to send back.
        std::vector<uint8_t> frame(sizeof(hdr) + payload.size() + sizeof(crc));
        std::memcpy(frame.data(), hdr, sizeof(hdr));
        if (!payload.empty())
            std::memcpy(frame.data() + sizeof(hdr), payload.data(), payload.size());
        std::memcpy(frame.data() + sizeof(hdr) + payload.size(), &crc, sizeof(crc));
        t_.write_all(frame.data(), frame.size());
    } else {
        t_.write_all(hdr, sizeof(hdr));
        t_.write_all(payload.data(), payload.size());
        t_.write_all(&crc, sizeof(crc));
    }
    bytes_ += sizeof(hdr) + payload.size() + sizeof(crc);
}

Record RecordReader::read()
{
    uint32_t hdr[2];
    const uint64_t at = offset_;
    t_.read_exact(hdr, sizeof(hdr));
    const uint32_t type = hdr[0], len = hdr[1];
    if (type < static_cast<uint32_t>(RecordType::Header) || type > static_cast<uint32_t>(RecordType::Hello))
        throw Error(fmt::format("migration stream: record {} at byte {} has unknown type {}", count_, at, type));
    if (len > kMaxPayload)
        throw Error(fmt::format("migration stream: record {} ({}) at byte {} claims {} bytes, over the limit {}", count_,
                                record_name(static_cast<RecordType>(type)), at, len, kMaxPayload));
    Record r{static_cast<RecordType>(type), std::vector<uint8_t>(len)};
    if (len)
        t_.read_exact(r.payload.data(), len);
    uint32_t crc;
    t_.read_exact(&crc, sizeof(crc));
    uint32_t want = crc32c(crc32c(0, hdr, sizeof(hdr)), r.payload.data(), len);
    if (crc != want)
        throw Error(fmt::format("migration stream: record {} ({}) at byte {} fails its checksum (corrupt stream)",
                                count_, record_name(r.type), at));
    offset_ += sizeof(hdr) + len + sizeof(crc);
    count_++;
    return r;
}

std::vector<uint8_t> encode_pages(const StressVm& m, std::span<const uint64_t> gpas, uint64_t* zero_pages)
{
    std::vector<uint8_t> out;
    out.reserve(8 + gpas.size() * (8 + 4096));
    put(out, static_cast<uint32_t>(gpas.size()));
    put(out, uint32_t{0});
    std::vector<const uint8_t*> data;
    const size_t index_at = out.size();
    out.resize(out.size() + gpas.size() * 8);
    for (size_t i = 0; i < gpas.size(); i++) {
        const uint8_t* p = m.host_ptr(gpas[i], 4096);
        if (!p)
            throw Error(fmt::format("GPA {:#x} is in no memslot", gpas[i]));
        uint64_t e = gpas[i];
        if (is_zero_page(p)) {
            e |= 1;
            if (zero_pages)
                (*zero_pages)++;
        } else {
            data.push_back(p);
        }
        std::memcpy(out.data() + index_at + i * 8, &e, 8);
    }
    for (const uint8_t* p : data)
        out.insert(out.end(), p, p + 4096);
    return out;
}

uint64_t apply_pages(StressVm& m, std::span<const uint8_t> payload, uint64_t* zero_pages,
                     const std::function<void(uint64_t gpa)>& landed)
{
    Reader r(payload, "PAGES");
    const auto n = r.get<uint32_t>();
    r.get<uint32_t>();
    if (static_cast<uint64_t>(n) * 8 > r.left())
        throw Error(fmt::format("migration stream: PAGES claims {} pages but holds {} bytes", n, payload.size()));
    std::span<const uint8_t> index = r.rest().subspan(0, static_cast<size_t>(n) * 8);
    std::span<const uint8_t> data = r.rest().subspan(static_cast<size_t>(n) * 8);
    size_t data_pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t e;
        std::memcpy(&e, index.data() + i * 8, 8);
        const uint64_t gpa = e & ~uint64_t{4095};
        uint8_t* dst = m.host_ptr(gpa, 4096);
        if (!dst)
            throw Error(fmt::format("migration stream: PAGES names GPA {:#x}, outside every memslot", gpa));
        if (e & 1) {
            std::memset(dst, 0, 4096);
            if (zero_pages)
                (*zero_pages)++;
        } else {
            if (data.size() - data_pos < 4096)
                throw Error(fmt::format("migration stream: PAGES data ends before page {} of {}", i, n));
            std::memcpy(dst, data.data() + data_pos, 4096);
            data_pos += 4096;
        }
        if (landed)
            landed(gpa);
    }
    if (data_pos != data.size())
        throw Error("migration stream: PAGES has more data than its index says");
    return n;
}

}  // namespace mvm::migration
