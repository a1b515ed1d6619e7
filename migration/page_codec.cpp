#include "migration/page_codec.hpp"

#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <fmt/format.h>

#include "base/error.hpp"
#include "migration/verify.hpp"

namespace mvm::migration {

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kIndexZero = 1;

double thread_cpu_s()
{
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}


// A buffer of pages, allocated on first use by the thread that uses it (so
// under that channel's NUMA policy).
struct PageBuffer {
    std::unique_ptr<uint8_t[]> p;
    size_t cap = 0;
    uint8_t* get(size_t bytes)  // never null, also for 0 bytes
    {
        if (!p || bytes > cap) {
            cap = std::max<size_t>(bytes, 1);
            p.reset(new uint8_t[cap]);
        }
        return p.get();
    }
};

}  // namespace

bool is_zero_page(const uint8_t* p)
{
    const auto* w = reinterpret_cast<const uint64_t*>(p);
    uint64_t acc = 0;
    for (size_t i = 0; i < kPage / 8; i += 8)
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    return acc == 0;
}

// ---- --compress ------------------------------------------------------------------------

Compression Compression::parse(const std::string& option, const std::string& spec)
{
    Compression c;
    if (spec == "none" || spec.empty())
        return c;
    const std::string algo = spec.substr(0, spec.find(':'));
    if (algo != "zstd")
        throw UsageError(fmt::format("{}: unknown compression '{}'; use none or zstd[:LEVEL]", option, spec));
    c.zstd = true;
    if (spec.size() > 4) {
        const std::string lv = spec.substr(5);
        size_t used = 0;
        int v = 0;
        try {
            v = std::stoi(lv, &used);
        } catch (...) {
            used = 0;
        }
        if (lv.empty() || used != lv.size() || v < ZSTD_minCLevel() || v > ZSTD_maxCLevel() || v == 0)
            throw UsageError(fmt::format("{}: zstd level '{}' is not a level zstd has; use {}..-1 or 1..{} "
                                         "(e.g. zstd:1, the default, or zstd:-3 for faster and bigger)",
                                         option, lv, ZSTD_minCLevel(), ZSTD_maxCLevel()));
        c.level = v;
    }
    return c;
}

std::string Compression::name() const { return zstd ? fmt::format("zstd:{}", level) : "none"; }

void PageCounts::add(const PageCounts& o)
{
    pages += o.pages;
    zero_pages += o.zero_pages;
    data_bytes += o.data_bytes;
    payload_bytes += o.payload_bytes;
    frame_bytes += o.frame_bytes;
    codec_cpu_s += o.codec_cpu_s;
    zstd_frames += o.zstd_frames;
}

// ---- sending ---------------------------------------------------------------------------

struct PageEncoder::Impl {
    Compression c;
    ZSTD_CCtx* cctx = nullptr;
    std::vector<uint8_t> head;  // frame head, count, data bytes, index
    std::vector<uint64_t> hashes;
    std::vector<iovec> iov;
    PageBuffer stage, zbuf;
    Xxh3 sum;
    ~Impl()
    {
        if (cctx)
            ZSTD_freeCCtx(cctx);
    }
};

PageEncoder::PageEncoder(Compression c) : d_(std::make_unique<Impl>())
{
    d_->c = c;
    if (c.zstd) {
        d_->cctx = ZSTD_createCCtx();
        if (!d_->cctx)
            throw Error("zstd: cannot create a compression context");
        ZSTD_CCtx_setParameter(d_->cctx, ZSTD_c_compressionLevel, c.level);
    }
}

PageEncoder::~PageEncoder() = default;

void PageEncoder::write(RecordWriter& w, const StressVm& m, std::span<const uint64_t> gpas, bool frozen)
{
    Impl& d = *d_;
    const size_t n = gpas.size();
    const bool zstd = d.c.zstd;
    d.head.resize(kFrameHead + 8 + n * 8);
    d.hashes.clear();
    d.iov.clear();
    d.iov.push_back({d.head.data(), d.head.size()});
    const bool stage = zstd || !frozen;
    uint8_t* staged = stage ? d.stage.get(n * kPage) : nullptr;
    uint32_t k = 0;
    const uint8_t* next = n ? m.host_ptr(gpas[0], kPage) : nullptr;
    for (size_t i = 0; i < n; i++) {
        const uint8_t* p = next;
        if (!p)
            throw Error(fmt::format("GPA {:#x} is in no memslot", gpas[i]));
        // The hardware prefetchers stop at 4 KiB (physical) boundaries: ask for the next page now.
        next = i + 1 < n ? m.host_ptr(gpas[i + 1], kPage) : nullptr;
        if (next)
            for (size_t line = 0; line < kPage; line += 64)
                __builtin_prefetch(next + line);
        uint64_t e = gpas[i];
        if (d.c.detect_zero && is_zero_page(p)) {
            e |= kIndexZero;
        } else {
            if (stage) {
                std::memcpy(staged + k * kPage, p, kPage);
                p = staged + k * kPage;
            }
            if (!zstd) {
                d.hashes.push_back(page_hash(p));
                d.iov.push_back({const_cast<uint8_t*>(p), kPage});
            }
            k++;
        }
        std::memcpy(d.head.data() + kFrameHead + 8 + i * 8, &e, 8);
    }
    const uint32_t count = static_cast<uint32_t>(n), data_bytes = k * static_cast<uint32_t>(kPage);
    uint64_t payload = 0;
    if (zstd) {
        const size_t cap = ZSTD_compressBound(data_bytes);
        uint8_t* z = d.zbuf.get(cap);
        const double c0 = thread_cpu_s();
        const size_t zn = ZSTD_compress2(d.cctx, z, cap, staged, data_bytes);
        counts_.codec_cpu_s += thread_cpu_s() - c0;
        if (ZSTD_isError(zn))
            throw Error(fmt::format("zstd: compressing {} pages: {}", k, ZSTD_getErrorName(zn)));
        d.iov.push_back({z, zn});
        payload = zn;
    } else {
        payload = data_bytes;
    }
    const uint32_t type = static_cast<uint32_t>(zstd ? RecordType::PagesZstd : RecordType::Pages);
    const uint32_t len = static_cast<uint32_t>(8 + n * 8 + payload);
    if (len > kMaxPayload)
        throw Error(fmt::format("a PAGES record of {} bytes exceeds the stream's limit", len));
    std::memcpy(d.head.data(), &type, 4);
    std::memcpy(d.head.data() + 4, &len, 4);
    std::memcpy(d.head.data() + 8, &count, 4);
    std::memcpy(d.head.data() + 12, &data_bytes, 4);
    // The checksum: as record_checksum() computes it, without a second pass.
    d.sum.reset();
    d.sum.add(d.head.data(), d.head.size());
    if (zstd)
        d.sum.add(d.iov.back().iov_base, payload);
    else
        d.sum.add(d.hashes.data(), d.hashes.size() * 8);
    const uint64_t sum = d.sum.value();
    d.iov.push_back({const_cast<uint64_t*>(&sum), sizeof(sum)});
    const uint64_t frame = kFrameHead + len + kFrameTrailer;
    w.write_frame(d.iov, frame);
    counts_.pages += n;
    counts_.zero_pages += n - k;
    counts_.data_bytes += data_bytes;
    counts_.payload_bytes += payload;
    counts_.frame_bytes += frame;
    counts_.zstd_frames += zstd ? 1 : 0;
}

namespace {

// Collects what a RecordWriter writes.
class Collect : public Transport {
public:
    std::vector<uint8_t> out;
    void write_all(const void* data, size_t len) override
    {
        out.insert(out.end(), static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + len);
    }
    void read_exact(void*, size_t) override { throw Error("write-only"); }
};

}  // namespace

std::vector<uint8_t> PageEncoder::encode(const StressVm& m, std::span<const uint64_t> gpas)
{
    Collect c;
    RecordWriter w(c);
    write(w, m, gpas, false);
    return std::move(c.out);
}

EncodedPages encode_pages(const StressVm& m, std::span<const uint64_t> gpas, Compression c)
{
    PageEncoder e(c);
    std::vector<uint8_t> frame = e.encode(m, gpas);
    EncodedPages out;
    uint32_t type;
    std::memcpy(&type, frame.data(), 4);
    out.type = static_cast<RecordType>(type);
    out.payload.assign(frame.begin() + kFrameHead, frame.end() - kFrameTrailer);
    return out;
}

// ---- receiving -------------------------------------------------------------------------

struct PageDecoder::Impl {
    ZSTD_DCtx* dctx = nullptr;
    std::vector<uint64_t> index;
    std::vector<uint8_t*> dst;
    std::vector<iovec> iov;
    PageBuffer stage, zbuf;
    Xxh3 sum;
    ~Impl()
    {
        if (dctx)
            ZSTD_freeDCtx(dctx);
    }

    // After the frame checked: each of the `n` pages of `index` lands (zero
    // pages written as zeros, the others already in place or staged for
    // `target`), and `landed` learns its hash.
    void land(uint32_t n, const std::vector<uint64_t>& hashes, StressVm& m, const LandedFn& landed,
              PageTarget* target) const
    {
        size_t j = 0;
        for (uint32_t i = 0; i < n; i++) {
            const uint64_t gpa = index[i] & ~(kPage - 1);
            if (index[i] & kIndexZero) {
                if (target)
                    target->place(gpa, nullptr);
                else
                    std::memset(m.host_ptr(gpa, kPage), 0, kPage);
                if (landed)
                    landed(gpa, zero_page_hash());
            } else {
                if (target)
                    target->place(gpa, dst[j]);
                if (landed)
                    landed(gpa, hashes[j]);
                j++;
            }
        }
    }
};

PageDecoder::PageDecoder() : d_(std::make_unique<Impl>()) {}
PageDecoder::~PageDecoder() = default;

uint64_t PageDecoder::read(RecordReader& r, const FrameHead& f, StressVm& m, const LandedFn& landed,
                           PageTarget* target)
{
    Impl& d = *d_;
    const bool zstd = f.type == RecordType::PagesZstd;
    if (f.len < 8)
        r.bad(f, "is too short for its page count");
    uint32_t fixed[2];
    r.read_part(fixed, sizeof(fixed));
    const uint32_t n = fixed[0], data_bytes = fixed[1];
    if (uint64_t{n} * 8 > f.len - 8)
        r.bad(f, fmt::format("claims {} pages but holds {} bytes", n, f.len));
    d.index.resize(n);
    if (n)
        r.read_part(d.index.data(), n * 8);
    d.dst.clear();
    for (uint32_t i = 0; i < n; i++) {
        const uint64_t e = d.index[i], gpa = e & ~(kPage - 1);
        if (e & (kPage - 1) & ~kIndexZero)
            r.bad(f, fmt::format("has unknown flags {:#x} on GPA {:#x}", e & (kPage - 1), gpa));
        uint8_t* p = m.host_ptr(gpa, kPage);
        if (!p)
            r.bad(f, fmt::format("names GPA {:#x}, outside every memslot", gpa));
        if (!(e & kIndexZero))
            d.dst.push_back(target ? target->stage(d.dst.size(), gpa) : p);
    }
    const uint64_t k = d.dst.size(), payload = f.len - 8 - uint64_t{n} * 8;
    if (data_bytes != k * kPage)
        r.bad(f, fmt::format("says {} data bytes for its {} non-zero pages", data_bytes, k));
    const uint32_t head[2] = {static_cast<uint32_t>(f.type), f.len};
    d.sum.reset();
    d.sum.add(head, sizeof(head));
    d.sum.add(fixed, sizeof(fixed));
    d.sum.add(d.index.data(), n * 8);
    std::vector<uint64_t> hashes(k);
    if (!zstd) {
        if (payload != k * kPage)
            r.bad(f, fmt::format("holds {} data bytes, its index says {} pages of 4 KiB", payload, k));
        d.iov.resize(k);
        for (size_t i = 0; i < k; i++)
            d.iov[i] = {d.dst[i], kPage};
        r.readv_part(d.iov);  // straight into guest memory
        for (size_t i = 0; i < k; i++)
            hashes[i] = page_hash(d.dst[i]);
        d.sum.add(hashes.data(), k * 8);
        r.end_frame(f, d.sum.value());
    } else {
        uint8_t* z = d.zbuf.get(payload);
        r.read_part(z, payload);
        d.sum.add(z, payload);
        r.end_frame(f, d.sum.value());  // checked before zstd sees a byte
        if (!d.dctx && !(d.dctx = ZSTD_createDCtx()))
            throw Error("zstd: cannot create a decompression context");
        uint8_t* out = d.stage.get(k * kPage + 1);
        const double c0 = thread_cpu_s();
        const size_t got = ZSTD_decompressDCtx(d.dctx, out, k * kPage + 1, z, payload);
        counts_.codec_cpu_s += thread_cpu_s() - c0;
        if (ZSTD_isError(got))
            r.bad(f, fmt::format("does not decompress: zstd: {}", ZSTD_getErrorName(got)));
        if (got != k * kPage)
            r.bad(f, fmt::format("decompresses to {} bytes, its index says {} pages of 4 KiB", got, k));
        for (size_t i = 0; i < k; i++) {
            std::memcpy(d.dst[i], out + i * kPage, kPage);
            hashes[i] = page_hash(d.dst[i]);
        }
    }
    d.land(n, hashes, m, landed, target);
    counts_.pages += n;
    counts_.zero_pages += n - k;
    counts_.data_bytes += k * kPage;
    counts_.payload_bytes += payload;
    counts_.frame_bytes += kFrameHead + f.len + kFrameTrailer;
    counts_.zstd_frames += zstd ? 1 : 0;
    return n;
}

}  // namespace mvm::migration
