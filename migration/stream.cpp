#include "migration/stream.hpp"

#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fmt/format.h>

#include "base/error.hpp"
#include "migration/verify.hpp"

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
    case RecordType::PagesZstd: return "PAGES_ZSTD";
    case RecordType::Discard: return "DISCARD";
    case RecordType::PostcopyRun: return "POSTCOPY_RUN";
    case RecordType::Request: return "REQUEST";
    case RecordType::Resume: return "RESUME";
    case RecordType::Missing: return "MISSING";
    }
    return "UNKNOWN";
}

uint64_t record_checksum(RecordType type, std::span<const uint8_t> payload)
{
    const uint32_t head[2] = {static_cast<uint32_t>(type), static_cast<uint32_t>(payload.size())};
    Xxh3 h;
    h.add(head, sizeof(head));
    uint32_t n = 0;
    if (payload.size() >= 8)
        std::memcpy(&n, payload.data(), 4);
    const uint64_t index_end = 8 + uint64_t{n} * 8;
    if (type == RecordType::Pages && payload.size() >= index_end && (payload.size() - index_end) % 4096 == 0) {
        h.add(payload.data(), index_end);
        for (uint64_t off = index_end; off < payload.size(); off += 4096) {
            const uint64_t ph = page_hash(payload.data() + off);
            h.add(&ph, sizeof(ph));
        }
    } else {
        h.add(payload.data(), payload.size());
    }
    return h.value();
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
    h.uuid = m.config().uuid;
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
    put(out, static_cast<uint32_t>(uuid.size()));
    out.insert(out.end(), uuid.begin(), uuid.end());
    put(out, static_cast<uint8_t>((guest_stopped ? 1 : 0) | (preempt ? 2 : 0)));
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
    const auto u = r.get<uint32_t>();
    if (u != 0 && u != 36)
        throw Error(fmt::format("migration stream: HEADER's UUID has {} characters, not 36", u));
    for (uint32_t i = 0; i < u; i++)
        h.uuid.push_back(static_cast<char>(r.get<uint8_t>()));
    const auto flags = r.get<uint8_t>();
    if (flags > 3)
        throw Error(fmt::format("migration stream: HEADER's flags are {:#x}: only guest-stopped (1) and preempt (2) "
                                "exist",
                                flags));
    h.guest_stopped = flags & 1;
    h.preempt = flags & 2;
    if (h.preempt && h.nr_channels < 2)
        throw Error("migration stream: HEADER says preempt with one channel (it needs one beside the pages')");
    if (r.left())
        throw Error("migration stream: HEADER has trailing bytes");
    return h;
}

std::string StreamHeader::incompatibility(const StreamHeader& s) const
{
    if (!s.uuid.empty() && !uuid.empty() && s.uuid != uuid)
        return fmt::format("UUID received is {} and local is {}", s.uuid, uuid);
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
    put(out, version);
    put(out, channel);
    put(out, channels);
    put(out, session);
    return out;
}

std::optional<Hello> Hello::decode(std::span<const uint8_t> p)
{
    if (p.size() != 20)
        return std::nullopt;
    Hello h;
    std::memcpy(&h.version, p.data(), 4);
    std::memcpy(&h.channel, p.data() + 4, 4);
    std::memcpy(&h.channels, p.data() + 8, 4);
    std::memcpy(&h.session, p.data() + 12, 8);
    return h;
}

uint64_t resume_session_of(const Record& r)
{
    if (r.payload.size() != 8)
        throw Error(fmt::format("a RESUME of {} bytes, not 8", r.payload.size()));
    uint64_t s;
    std::memcpy(&s, r.payload.data(), 8);
    return s;
}

std::vector<uint8_t> encode_resume(uint64_t session)
{
    std::vector<uint8_t> p(8);
    std::memcpy(p.data(), &session, 8);
    return p;
}

uint64_t new_session_id()
{
    uint64_t v = 0;
    if (::getrandom(&v, sizeof(v), 0) != sizeof(v))
        v = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^ ::getpid();
    return v;
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
    put(out, post_run_s);
    put(out, static_cast<uint32_t>(details.size()));
    out.insert(out.end(), details.begin(), details.end());
    return out;
}

std::vector<uint8_t> encode_gpas(std::span<const uint64_t> gpas)
{
    std::vector<uint8_t> out;
    put(out, static_cast<uint32_t>(gpas.size()));
    for (uint64_t g : gpas)
        put(out, g);
    return out;
}

std::vector<uint64_t> decode_gpas(std::span<const uint8_t> p, const char* what)
{
    Reader r(p, what);
    const auto n = r.get<uint32_t>();
    if (uint64_t{n} * 8 != r.left())
        throw Error(fmt::format("migration stream: {} says {} GPAs but holds {} bytes", what, n, r.left()));
    std::vector<uint64_t> out(n);
    for (auto& g : out) {
        g = r.get<uint64_t>();
        if (g & 4095)
            throw Error(fmt::format("migration stream: {} names GPA {:#x}, not page-aligned", what, g));
    }
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
    res.post_run_s = r.get<double>();
    if (r.left()) {
        const auto dl = r.get<uint32_t>();
        if (dl > r.left())
            throw Error("migration stream: RESULT details overrun the record");
        res.details.assign(reinterpret_cast<const char*>(r.rest().data()), dl);
        r.skip(dl);
    }
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
    const iovec v{const_cast<void*>(data), len};
    writev_all({&v, 1});
}

void FdTransport::read_exact(void* data, size_t len)
{
    const iovec v{data, len};
    readv_exact({&v, 1});
}

void Transport::writev_all(std::span<const iovec> iov)
{
    size_t len = 0;
    for (const auto& v : iov)
        len += v.iov_len;
    std::vector<uint8_t> all;
    all.reserve(len);
    for (const auto& v : iov)
        all.insert(all.end(), static_cast<const uint8_t*>(v.iov_base), static_cast<const uint8_t*>(v.iov_base) + v.iov_len);
    write_all(all.data(), all.size());
}

void Transport::readv_exact(std::span<const iovec> iov)
{
    for (const auto& v : iov)
        read_exact(v.iov_base, v.iov_len);
}

namespace {

// Moves `iov` past `n` bytes done; returns the first piece not finished.
size_t advance(std::vector<iovec>& iov, size_t first, size_t n)
{
    while (n && first < iov.size()) {
        const size_t k = std::min(n, iov[first].iov_len);
        iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + k;
        iov[first].iov_len -= k;
        n -= k;
        if (!iov[first].iov_len)
            first++;
    }
    while (first < iov.size() && !iov[first].iov_len)
        first++;
    return first;
}

}  // namespace

void FdTransport::set_limits(const IoLimits& limits)
{
    limits_ = limits;
    limited_ = limits.idle_s > 0 || limits.deadline != IoLimits::time_point::max();
    armed_s_[0] = armed_s_[1] = -1;  // re-armed for the new limits
    arm(false);
    arm(true);
}

void FdTransport::arm(bool sending)
{
    const int i = sending ? 1 : 0;
    if (!limited_) {
        if (armed_s_[i] != 0) {
            const timeval tv{};
            ::setsockopt(fd_, SOL_SOCKET, sending ? SO_SNDTIMEO : SO_RCVTIMEO, &tv, sizeof(tv));
            armed_s_[i] = 0;
        }
        return;
    }
    const auto now = std::chrono::steady_clock::now();
    double s = limits_.idle_s > 0 ? limits_.idle_s : 1e9;
    if (limits_.deadline != IoLimits::time_point::max()) {
        const double left = std::chrono::duration<double>(limits_.deadline - now).count();
        if (left <= 0)
            expired(sending);
        s = std::min(s, left);
    }
    // SO_RCVTIMEO/SO_SNDTIMEO bound each call from its start. Within one set
    // of limits s only shrinks (the deadline nears), so a timeout at most
    // 50 ms longer than s is kept: a deadline costs a setsockopt per 50 ms,
    // not one per call, and a call never times out before its limit.
    if (armed_s_[i] > 0 && armed_s_[i] >= s && armed_s_[i] <= s + 0.05)
        return;
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(s);
    tv.tv_usec = static_cast<suseconds_t>((s - static_cast<double>(tv.tv_sec)) * 1e6);
    if (tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1000;
    ::setsockopt(fd_, SOL_SOCKET, sending ? SO_SNDTIMEO : SO_RCVTIMEO, &tv, sizeof(tv));
    armed_s_[i] = s;
}

void FdTransport::expired(bool sending) const
{
    const char* doing = sending ? "sending to" : "receiving from";
    if (limits_.deadline != IoLimits::time_point::max() && std::chrono::steady_clock::now() >= limits_.deadline)
        throw Error(fmt::format("{} {}: {} reached while {}", doing, peer_, limits_.deadline_what,
                                sending ? "the peer was not reading (stopped, or the network down?)"
                                        : "waiting for the peer (stopped, or the network down?)"));
    throw Error(fmt::format("{} {}: {} for {:g} s ({}); is the peer stopped or the network down?", doing, peer_,
                            sending ? "the peer took nothing" : "nothing came", limits_.idle_s, limits_.idle_what));
}

void FdTransport::writev_all(std::span<const iovec> in)
{
    std::vector<iovec> iov(in.begin(), in.end());
    size_t first = advance(iov, 0, 0);
    while (first < iov.size()) {
        if (limited_)
            arm(true);
        msghdr mh{};
        mh.msg_iov = iov.data() + first;
        mh.msg_iovlen = std::min<size_t>(iov.size() - first, IOV_MAX);
        ssize_t n = ::sendmsg(fd_, &mh, MSG_NOSIGNAL);
        if (n < 0 && errno == ENOTSOCK)
            n = ::writev(fd_, mh.msg_iov, static_cast<int>(mh.msg_iovlen));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && limited_)
            expired(true);
        if (n <= 0)
            throw Error(fmt::format("sending to {}: {}", peer_, n < 0 ? errno_text(errno) : "connection closed"));
        first = advance(iov, first, static_cast<size_t>(n));
    }
}

void FdTransport::readv_exact(std::span<const iovec> in)
{
    std::vector<iovec> iov(in.begin(), in.end());
    size_t first = advance(iov, 0, 0);
    while (first < iov.size()) {
        if (limited_)
            arm(false);
        const int cnt = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
        ssize_t n = ::readv(fd_, iov.data() + first, cnt);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && limited_)
            expired(false);
        if (n < 0)
            throw Error(fmt::format("receiving from {}: {}", peer_, errno_text(errno)));
        if (n == 0)
            throw Error(fmt::format("{} closed the connection mid-stream", peer_));
        first = advance(iov, first, static_cast<size_t>(n));
    }
}

void FdTransport::shutdown()
{
    if (fd_ >= 0)
        ::shutdown(fd_, SHUT_RDWR);
}

void MemoryTransport::write_all(const void* data, size_t len)
{
    if (!len)
        return;
    const auto* p = static_cast<const uint8_t*>(data);
    out_.insert(out_.end(), p, p + len);
}

void MemoryTransport::read_exact(void* data, size_t len)
{
    if (!len)
        return;  // `data` may be null then
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
    const uint32_t head[2] = {static_cast<uint32_t>(type), static_cast<uint32_t>(payload.size())};
    const uint64_t sum = record_checksum(type, payload);
    const iovec iov[3] = {{const_cast<uint32_t*>(head), sizeof(head)},
                          {const_cast<uint8_t*>(payload.data()), payload.size()},
                          {const_cast<uint64_t*>(&sum), sizeof(sum)}};
    // One write: a record split into small writes waits on Nagle and
    // delayed ACKs (~40 ms) when the peer has nothing to send back.
    write_frame(iov, sizeof(head) + payload.size() + sizeof(sum));
}

void RecordWriter::write_frame(std::span<const iovec> iov, uint64_t frame_bytes)
{
    t_.writev_all(iov);
    bytes_ += frame_bytes;
}

FrameHead RecordReader::next()
{
    uint32_t hdr[2];
    const uint64_t at = offset_;
    t_.read_exact(hdr, sizeof(hdr));
    const uint32_t type = hdr[0], len = hdr[1];
    if (type < static_cast<uint32_t>(RecordType::Header) || type > kLastRecordType)
        throw Error(fmt::format("migration stream: record {} at byte {} has unknown type {}", count_, at, type));
    if (len > kMaxPayload)
        throw Error(fmt::format("migration stream: record {} ({}) at byte {} claims {} bytes, over the limit {}", count_,
                                record_name(static_cast<RecordType>(type)), at, len, kMaxPayload));
    return {static_cast<RecordType>(type), len, at, count_};
}

Record RecordReader::payload(const FrameHead& f)
{
    Record r{f.type, std::vector<uint8_t>(f.len)};
    if (f.len)
        t_.read_exact(r.payload.data(), f.len);
    end_frame(f, record_checksum(f.type, r.payload));
    return r;
}

void RecordReader::end_frame(const FrameHead& f, uint64_t want)
{
    uint64_t sum;
    t_.read_exact(&sum, sizeof(sum));
    if (sum != want)
        bad(f, "fails its checksum (corrupt stream)");
    offset_ = f.at + kFrameHead + f.len + kFrameTrailer;
    count_ = f.number + 1;
}

void RecordReader::bad(const FrameHead& f, const std::string& what) const
{
    throw Error(fmt::format("migration stream: record {} ({}) at byte {} {}", f.number, record_name(f.type), f.at, what));
}

}  // namespace mvm::migration
