#include "migration/file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <fmt/format.h>

#include "base/error.hpp"
#include "base/units.hpp"

namespace mvm::migration {

namespace {

constexpr uint64_t kPage = 4096;
constexpr char kMappedMagic[8] = {'M', 'V', 'M', 'M', 'R', 'A', 'M', '1'};
constexpr uint32_t kMappedVersion = 1;
constexpr uint64_t kHeadBytes = 4096;
constexpr uint64_t kHeadFixed = 32, kHeadSlot = 40;
constexpr uint64_t kMaxMappedSlots = (kHeadBytes - kHeadFixed) / kHeadSlot;
constexpr uint64_t kPagesAlign = 1 << 20;
constexpr uint64_t kRunPages = 256;  // pages per pwrite/pread at most

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// QEMU's offset: a byte count, 0x hex, or a number with a K/M/G/T suffix (hex
// takes no suffix); nullopt when it is none of those.
std::optional<uint64_t> parse_offset(const std::string& v)
{
    if (v.rfind("0x", 0) == 0 || v.rfind("0X", 0) == 0) {
        uint64_t x = 0;
        const auto [end, ec] = std::from_chars(v.data() + 2, v.data() + v.size(), x, 16);
        if (v.size() == 2 || ec != std::errc() || end != v.data() + v.size())
            return std::nullopt;
        return x;
    }
    return parse_size(v);
}

[[noreturn]] void io_failed(const std::string& what, const std::string& name, int err)
{
    throw Error(fmt::format("{} {}: {}", what, name, std::strerror(err)));
}

void pwrite_all(int fd, const void* data, size_t len, uint64_t off, const std::string& name)
{
    const auto* p = static_cast<const uint8_t*>(data);
    while (len) {
        const ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(off));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            io_failed("writing", name, n < 0 ? errno : ENOSPC);
        p += n;
        len -= static_cast<size_t>(n);
        off += static_cast<uint64_t>(n);
    }
}

void pread_all(int fd, void* data, size_t len, uint64_t off, const std::string& name)
{
    auto* p = static_cast<uint8_t*>(data);
    while (len) {
        const ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            io_failed("reading", name, errno);
        if (n == 0)
            throw Error(fmt::format("{} ends at byte {} before the migration in it does: the file is truncated", name,
                                    off));
        p += n;
        len -= static_cast<size_t>(n);
        off += static_cast<uint64_t>(n);
    }
}

template <class T>
void put(std::vector<uint8_t>& b, size_t at, T v)
{
    std::memcpy(b.data() + at, &v, sizeof v);
}

template <class T>
T get(const std::vector<uint8_t>& b, size_t at)
{
    T v;
    std::memcpy(&v, b.data() + at, sizeof v);
    return v;
}

}  // namespace

std::string FileUri::str() const
{
    const std::string where = fd >= 0 ? fmt::format("fd:{}", fd) : "file:" + path;
    return offset ? fmt::format("{},offset={}", where, offset) : where;
}

std::optional<FileUri> parse_file_uri(const std::string& option, const std::string& spec)
{
    FileUri f;
    if (spec.rfind("fd:", 0) == 0) {
        const size_t comma = std::min(spec.find(','), spec.size());
        int fd = -1;
        const auto [end, ec] = std::from_chars(spec.data() + 3, spec.data() + comma, fd);
        struct stat st {};
        if (ec != std::errc() || end != spec.data() + comma || fd < 0 || ::fstat(fd, &st) != 0 ||
            !S_ISREG(st.st_mode))
            return std::nullopt;  // a socket, or nothing: the socket transports' parse words it
        f.fd = fd;
        f.path = spec.substr(comma);  // its options, if any, parsed below
    } else if (spec.rfind("file:", 0) == 0) {
        f.path = spec.substr(5);
    } else {
        return std::nullopt;
    }
    if (const size_t comma = f.path.find(','); comma != std::string::npos) {
        const std::string opt = f.path.substr(comma + 1);
        f.path.resize(comma);
        if (opt.rfind("offset=", 0) != 0)
            throw UsageError(fmt::format("{}: '{}': the only option of a file URI is offset=BYTES", option, spec));
        const auto off = parse_offset(opt.substr(7));
        if (!off)  // QEMU's words, then the option
            throw UsageError(fmt::format("file URI has bad offset {} ({}: offset=BYTES, a number, 0x hex, or with a "
                                         "K/M/G suffix)",
                                         opt.substr(7), option));
        f.offset = *off;
        f.has_offset = true;
    }
    if (f.fd >= 0) {
        f.path.clear();
        return f;
    }
    if (f.path.empty())
        throw UsageError(fmt::format("{}: '{}' names no file; use file:PATH[,offset=BYTES]", option, spec));
    return f;
}

void check_restorable(const std::string& option, const FileUri& f)
{
    struct stat st {};
    if (f.fd >= 0)
        return;  // parse_file_uri saw a regular file
    if (::stat(f.path.c_str(), &st) != 0)
        throw UsageError(fmt::format("{}: {}: {} (a file a migration wrote with migrate --to file:PATH)", option,
                                     f.path, std::strerror(errno)));
    if (!S_ISREG(st.st_mode))
        throw UsageError(fmt::format("{}: {} is not a regular file", option, f.path));
    if (::access(f.path.c_str(), R_OK) != 0)
        throw UsageError(fmt::format("{}: {}: {}", option, f.path, std::strerror(errno)));
    if (static_cast<uint64_t>(st.st_size) <= f.offset)
        throw UsageError(fmt::format("{}: {} holds {} bytes, nothing at offset {}", option, f.path, st.st_size,
                                     f.offset));
}

// ---- the file as a transport -------------------------------------------------------

void FileTransport::write_all(const void* data, size_t len)
{
    if (drop_writes_)
        return;
    pwrite_all(fd_, data, len, pos_, name_);
    pos_ += len;
}

void FileTransport::read_exact(void* data, size_t len)
{
    pread_all(fd_, data, len, pos_, name_);
    pos_ += len;
}

void FileTransport::writev_all(std::span<const iovec> iov)
{
    for (const iovec& v : iov)
        write_all(v.iov_base, v.iov_len);
}

void FileTransport::readv_exact(std::span<const iovec> iov)
{
    for (const iovec& v : iov)
        read_exact(v.iov_base, v.iov_len);
}

// ---- writing ------------------------------------------------------------------------

FileDestination::FileDestination(StressVm& src, FileUri uri, Compression c, FileOptions f)
    : src_(src), uri_(std::move(uri)), compression_(c), opt_(f)
{
    if (opt_.direct_io && !opt_.mapped_ram)
        throw UsageError("direct-io: needs mapped-ram (pages at fixed, aligned places in the file)");
    if (opt_.direct_io && uri_.offset % kPage)
        throw UsageError(fmt::format("direct-io: the offset {} is not a multiple of 4096", uri_.offset));
    if (opt_.mapped_ram && c.zstd)
        throw UsageError("--compress: mapped-ram writes each page in place; compression does not apply (as in QEMU)");
}

FileDestination::~FileDestination() = default;

void FileDestination::open(const StreamHeader& h)
{
    const std::string name = uri_.str();
    if (uri_.fd >= 0) {
        fd_.reset(uri_.fd);  // the migration's now
        if (!uri_.has_offset)  // QEMU's fd: from where it stands; an fdset's file as a path (below)
            uri_.offset = static_cast<uint64_t>(std::max<off_t>(0, ::lseek(uri_.fd, 0, SEEK_CUR)));
        else if (::ftruncate(fd_.get(), static_cast<off_t>(uri_.offset)) != 0)
            io_failed("truncating", name, errno);
    } else {
        fd_.reset(::open(uri_.path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
        if (!fd_)
            io_failed("creating", uri_.path, errno);
        // As QEMU: what lies before the offset stays, the rest is rewritten.
        if (::ftruncate(fd_.get(), static_cast<off_t>(uri_.offset)) != 0)
            io_failed("truncating", uri_.path, errno);
    }
    StreamHeader one = h;
    one.nr_channels = 1;  // one stream of records, whatever wrote the pages
    if (opt_.mapped_ram) {
        open_mapped_ram();
    } else {
        out_ = std::make_unique<FileTransport>(fd_.get(), uri_.offset, name);
        enc_ = std::make_unique<PageEncoder>(compression_);
    }
    RecordWriter w(*out_);
    w.write(RecordType::Hello, Hello{kStreamVersion, 0, 1, new_session_id()}.encode());
    w.write(RecordType::Header, one.encode());
}

void FileDestination::open_mapped_ram()
{
    const auto& regions = src_.memslots().regions();
    if (regions.size() > kMaxMappedSlots)
        throw Error(fmt::format("mapped-ram: {} memslots, the file's head holds {}", regions.size(), kMaxMappedSlots));
    uint64_t pos = kHeadBytes;
    for (const MemoryRegion& r : regions) {
        SlotArea a;
        a.r = &r;
        a.words = (r.pages() + 63) / 64;
        a.bits = std::make_unique<std::atomic<uint64_t>[]>(a.words);
        a.bitmap_off = pos;
        pos = align_up(pos + a.words * 8, kPagesAlign);
        a.pages_off = pos;
        pos += r.size;
        areas_.push_back(std::move(a));
        data_pages_ += r.pages();
    }
    tail_off_ = align_up(pos, kPage);
    write_head(0);  // a file whose head says 0 is incomplete until the end
    if (opt_.direct_io) {
        // A descriptor's file is opened again (its own file status flags).
        const std::string path = uri_.fd >= 0 ? fmt::format("/proc/self/fd/{}", fd_.get()) : uri_.path;
        direct_fd_.reset(::open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
        if (!direct_fd_)
            throw Error(fmt::format("direct-io: {} cannot be opened with O_DIRECT: {} (its file system may not "
                                    "support it)",
                                    uri_.str(), std::strerror(errno)));
    }
    out_ = std::make_unique<FileTransport>(fd_.get(), uri_.offset + tail_off_, uri_.str() + " (tail)");
}

void FileDestination::write_head(uint64_t tail_bytes)
{
    std::vector<uint8_t> b(kHeadBytes, 0);
    std::memcpy(b.data(), kMappedMagic, 8);
    put<uint32_t>(b, 8, kMappedVersion);
    put<uint32_t>(b, 12, static_cast<uint32_t>(areas_.size()));
    put<uint64_t>(b, 16, tail_off_);
    put<uint64_t>(b, 24, tail_bytes);
    for (size_t i = 0; i < areas_.size(); i++) {
        const size_t at = kHeadFixed + i * kHeadSlot;
        put<uint32_t>(b, at, areas_[i].r->slot);
        put<uint64_t>(b, at + 8, areas_[i].r->gpa);
        put<uint64_t>(b, at + 16, areas_[i].r->size);
        put<uint64_t>(b, at + 24, areas_[i].bitmap_off);
        put<uint64_t>(b, at + 32, areas_[i].pages_off);
    }
    pwrite_all(fd_.get(), b.data(), b.size(), uri_.offset, uri_.str());
}

FileDestination::SlotArea& FileDestination::area_of(uint64_t gpa)
{
    for (SlotArea& a : areas_)
        if (a.r->contains_gpa(gpa))
            return a;
    throw Error(fmt::format("mapped-ram: GPA {:#x} is in no memslot", gpa));
}

void FileDestination::send(uint32_t, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros)
{
    if (opt_.mapped_ram) {
        send_mapped(gpas, bytes, zeros);
        return;
    }
    std::lock_guard lk(mu_);
    RecordWriter w(*out_);
    const uint64_t zeros_before = enc_->counts().zero_pages;
    for (size_t i = 0; i < gpas.size(); i += kBatchPages)
        enc_->write(w, src_, gpas.subspan(i, std::min(kBatchPages, gpas.size() - i)), frozen_.load());
    bytes += w.bytes();
    zeros += enc_->counts().zero_pages - zeros_before;
}

// Each page at its place, straight from guest memory: a page the running
// guest writes meanwhile is dirty again and rewritten in a later round (or
// at stop-and-copy, from the frozen source); the restore's check against the
// source's digests proves the end state. Zero pages only clear their bit.
void FileDestination::send_mapped(std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros)
{
    for (size_t i = 0; i < gpas.size();) {
        SlotArea& a = area_of(gpas[i]);
        const uint64_t idx = (gpas[i] - a.r->gpa) / kPage;
        const uint8_t* p = a.r->host + idx * kPage;
        if (compression_.detect_zero && is_zero_page(p)) {
            a.bits[idx / 64].fetch_and(~(1ull << (idx % 64)));
            zeros++;
            mapped_zeros_++;
            i++;
            continue;
        }
        size_t n = 1;  // a run of pages contiguous in the slot, none of them zero
        while (i + n < gpas.size() && n < kRunPages && gpas[i + n] == gpas[i] + n * kPage &&
               a.r->contains_gpa(gpas[i + n]) && !(compression_.detect_zero && is_zero_page(p + n * kPage)))
            n++;
        write_run(a, idx, n);
        bytes += n * kPage;
        mapped_pages_ += n;
        i += n;
    }
}

void FileDestination::write_run(SlotArea& a, uint64_t first, uint64_t n)
{
    const int fd = direct_fd_ ? direct_fd_.get() : fd_.get();
    pwrite_all(fd, a.r->host + first * kPage, n * kPage, uri_.offset + a.pages_off + first * kPage, uri_.str());
    for (uint64_t k = first; k < first + n; k++)
        a.bits[k / 64].fetch_or(1ull << (k % 64));
}

ResultRecord FileDestination::switchover(const std::vector<VcpuState>& states)
{
    std::lock_guard lk(mu_);
    RecordWriter w(*out_);
    w.write(RecordType::ChannelDone, {});
    for (const auto& s : states)
        w.write(RecordType::Vcpu, s.serialize());
    w.write(RecordType::End, {});
    ResultRecord r;
    r.ok = 1;
    r.text = "written to " + uri_.str();
    return r;
}

ResultRecord FileDestination::verify(const PageHashes* source)
{
    std::lock_guard lk(mu_);
    const std::vector<Digest> d = source ? source->digests() : std::vector<Digest>{};
    RecordWriter(*out_).write(RecordType::Digests, encode_digests(d));
    if (opt_.mapped_ram) {
        for (const SlotArea& a : areas_) {
            std::vector<uint64_t> words(a.words);
            for (uint64_t i = 0; i < a.words; i++)
                words[i] = a.bits[i].load();
            pwrite_all(fd_.get(), words.data(), words.size() * 8, uri_.offset + a.bitmap_off, uri_.str());
        }
        write_head(out_->pos() - uri_.offset - tail_off_);  // now the file is whole
    }
    ResultRecord r;
    r.ok = 1;
    r.text = source ? "the source's digests are in the file: the restore checks every page against them"
                    : "no verification (the file carries no digests)";
    r.text += "; downtime_guest_ms not measured: the guest runs again only where the file is restored";
    return r;
}

ResultRecord FileDestination::finish()
{
    const uint64_t end = out_->pos();
    if (::fdatasync(fd_.get()) != 0)
        io_failed("syncing", uri_.str(), errno);
    fd_.reset();
    direct_fd_.reset();
    ResultRecord r;
    r.ok = 1;
    r.text = fmt::format("{} holds the guest: {} from offset {}", uri_.str(), human_bytes(static_cast<double>(end - uri_.offset)),
                         uri_.offset);
    return r;
}

void FileDestination::abort() {}

void FileDestination::enter_phase(const char* phase)
{
    frozen_ = std::string(phase) == "stop";
}

PageCounts FileDestination::page_counts() const
{
    if (enc_)
        return enc_->counts();
    PageCounts c;
    c.pages = mapped_pages_.load() + mapped_zeros_.load();
    c.zero_pages = mapped_zeros_.load();
    c.data_bytes = c.payload_bytes = c.frame_bytes = mapped_pages_.load() * kPage;
    return c;
}

void FileDestination::begin_postcopy(const std::vector<VcpuState>&, std::span<const uint64_t>)
{
    throw Error("postcopy: a file has no return path for the pages the guest asks for");
}

ResultRecord FileDestination::postcopy_resumed() { throw Error("postcopy: not to a file"); }

bool FileDestination::requests(std::vector<uint64_t>&, std::chrono::milliseconds) { return false; }

ResultRecord FileDestination::end_postcopy() { throw Error("postcopy: not to a file"); }

// ---- restoring ----------------------------------------------------------------------

namespace {

struct MappedHead {
    uint64_t tail_off = 0, tail_bytes = 0;
    struct Slot {
        uint32_t slot = 0;
        uint64_t gpa = 0, size = 0, bitmap_off = 0, pages_off = 0;
    };
    std::vector<Slot> slots;
};

MappedHead read_head(int fd, const FileUri& f, uint64_t file_size)
{
    std::vector<uint8_t> b(kHeadBytes);
    pread_all(fd, b.data(), b.size(), f.offset, f.str());
    MappedHead h;
    if (get<uint32_t>(b, 8) != kMappedVersion)
        throw Error(fmt::format("{}: mapped-ram version {}, this minivmm reads {}", f.str(), get<uint32_t>(b, 8),
                                kMappedVersion));
    const uint32_t n = get<uint32_t>(b, 12);
    h.tail_off = get<uint64_t>(b, 16);
    h.tail_bytes = get<uint64_t>(b, 24);
    if (h.tail_bytes == 0)
        throw Error(fmt::format("{} is incomplete: the migration that wrote it did not finish", f.str()));
    if (n > kMaxMappedSlots || f.offset + h.tail_off + h.tail_bytes > file_size)
        throw Error(fmt::format("{}: its mapped-ram head is damaged ({} memslots, tail at {} for {} bytes in a file "
                                "of {})",
                                f.str(), n, h.tail_off, h.tail_bytes, file_size));
    for (uint32_t i = 0; i < n; i++) {
        const size_t at = kHeadFixed + i * kHeadSlot;
        MappedHead::Slot s{get<uint32_t>(b, at), get<uint64_t>(b, at + 8), get<uint64_t>(b, at + 16),
                           get<uint64_t>(b, at + 24), get<uint64_t>(b, at + 32)};
        if (s.size % kPage || s.bitmap_off + (s.size / kPage + 63) / 64 * 8 > h.tail_off ||
            s.pages_off + s.size > h.tail_off)
            throw Error(fmt::format("{}: its mapped-ram head is damaged (slot {})", f.str(), s.slot));
        h.slots.push_back(s);
    }
    return h;
}

// The pages the bitmap says are in the file, read straight into guest
// memory; every other page made zero. Returns the pages read.
uint64_t load_slot(StressVm& dst, int fd, const FileUri& f, const MappedHead::Slot& s, uint64_t& zeros)
{
    const MemoryRegion* r = dst.memslots().by_slot(s.slot);
    if (!r || r->gpa != s.gpa || r->size != s.size)
        throw Error(fmt::format("{}: memslot {} at GPA {:#x} ({} bytes) is not this VM's", f.str(), s.slot, s.gpa,
                                s.size));
    const uint64_t pages = s.size / kPage;
    std::vector<uint64_t> bits((pages + 63) / 64);
    pread_all(fd, bits.data(), bits.size() * 8, f.offset + s.bitmap_off, f.str());
    auto set = [&](uint64_t i) { return (bits[i / 64] >> (i % 64)) & 1; };
    uint64_t loaded = 0;
    for (uint64_t i = 0; i < pages;) {
        if (!set(i)) {
            uint8_t* p = r->host + i * kPage;
            if (!is_zero_page(p))
                std::memset(p, 0, kPage);
            zeros++;
            i++;
            continue;
        }
        uint64_t n = 1;
        while (i + n < pages && n < kRunPages && set(i + n))
            n++;
        pread_all(fd, r->host + i * kPage, n * kPage, f.offset + s.pages_off + i * kPage, f.str());
        loaded += n;
        i += n;
    }
    return loaded;
}

}  // namespace

namespace {

// Mapped-ram's pages, into `dst`: its layout checked first (the HEADER in
// the tail), before a byte of memory moves. Returns where the tail starts.
uint64_t load_mapped(StressVm& dst, int fd, const FileUri& at, const PhaseHook& on_phase, ReceiveReport& r)
{
    struct stat st {};
    ::fstat(fd, &st);
    const MappedHead h = read_head(fd, at, static_cast<uint64_t>(st.st_size));
    FileTransport t(fd, at.offset + h.tail_off, at.str(), true);
    RecordReader in(t);
    Record rec = in.read();
    if (rec.type == RecordType::Hello)
        rec = in.read();
    if (rec.type != RecordType::Header)
        throw Error(fmt::format("{}: expected HEADER first in its tail, got {}", at.str(), record_name(rec.type)));
    const StreamHeader sender = StreamHeader::decode(rec.payload);
    if (auto why = StreamHeader::of(dst, 1).incompatibility(sender); !why.empty())
        throw Error("incompatible stream: " + why);
    r.failed_step = "memory";
    if (on_phase)
        on_phase("bulk");
    const auto t0 = std::chrono::steady_clock::now();
    uint64_t loaded = 0, zeros = 0;
    for (const auto& s : h.slots)
        loaded += load_slot(dst, fd, at, s, zeros);
    r.memory_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    r.pages = loaded + zeros;
    r.zero_pages = zeros;
    r.bytes = loaded * kPage;
    r.failed_step.clear();
    return at.offset + h.tail_off;
}

}  // namespace

ReceiveReport restore_file(StressVm& dst, const FileUri& f, const ReceiveOptions& opt, const PhaseHook& on_phase)
{
    UniqueFd fd(f.fd >= 0 ? f.fd : ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd)
        io_failed("opening", f.path, errno);
    FileUri at = f;
    if (f.fd >= 0 && !f.has_offset)
        at.offset = static_cast<uint64_t>(std::max<off_t>(0, ::lseek(f.fd, 0, SEEK_CUR)));
    char magic[8] = {};
    pread_all(fd.get(), magic, sizeof magic, at.offset, at.str());
    const bool mapped = std::memcmp(magic, kMappedMagic, 8) == 0;
    fmt::print(stderr, "receive: restoring from {}{}\n", at.str(), mapped ? " (mapped-ram)" : "");
    ReceiveReport loaded;  // mapped-ram's pages, loaded before the stream
    loaded.peer = at.str() + (mapped ? " (mapped-ram)" : "");
    loaded.security = "file";
    uint64_t stream_at = at.offset;
    if (mapped) {
        const auto t0 = std::chrono::steady_clock::now();
        try {
            loaded.failed_step = "header";
            stream_at = load_mapped(dst, fd.get(), at, on_phase, loaded);
        } catch (const std::exception& e) {  // a failed restore, as a failed migration: its report
            loaded.status = "failed";
            loaded.error = e.what();
            loaded.total_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (loaded.failed_step == "memory")
                loaded.memory_ms = loaded.total_ms;
            return loaded;
        }
    }
    PageHashes before = PageHashes::of_memory(dst);
    std::vector<std::unique_ptr<Transport>> ch;
    ch.push_back(std::make_unique<FileTransport>(fd.get(), stream_at, at.str(), true));
    ReceiveReport r = receive_from(dst, std::move(ch), opt.post_run_s, on_phase, std::move(before), std::nullopt,
                                   opt.on_postcopy, opt.wait_cont, true);
    r.peer = loaded.peer;
    r.security = "file";
    r.pages += loaded.pages;
    r.zero_pages += loaded.zero_pages;
    r.bytes += loaded.bytes;
    r.memory_ms += loaded.memory_ms;
    return r;
}

}  // namespace mvm::migration
