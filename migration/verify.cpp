#include "migration/verify.hpp"

#include <xxhash.h>

#include <algorithm>
#include <fmt/format.h>
#include <map>

namespace mvm::migration {

uint64_t page_hash(const void* page) { return XXH3_64bits(page, 4096); }

Xxh3::Xxh3() : s_(XXH3_createState()) { reset(); }
Xxh3::~Xxh3() { XXH3_freeState(s_); }
void Xxh3::reset() { XXH3_64bits_reset(s_); }
void Xxh3::add(const void* p, size_t n) { XXH3_64bits_update(s_, p, n); }
uint64_t Xxh3::value() const { return XXH3_64bits_digest(s_); }

uint64_t zero_page_hash()
{
    static const uint64_t h = [] {
        static const uint8_t zero[4096] = {};
        return page_hash(zero);
    }();
    return h;
}

PageHashes PageHashes::of_memory(const StressVm& m)
{
    PageHashes out;
    for (const auto& r : m.memslots().regions()) {
        Slot s;
        s.gpa = r.gpa;
        s.hash.resize(r.size / 4096);
        const uint8_t* base = m.host_ptr(r.gpa, r.size);
        for (uint64_t i = 0; i < s.hash.size(); i++)
            s.hash[i] = page_hash(base + i * 4096);
        out.slots_.push_back(std::move(s));
    }
    return out;
}

const PageHashes::Slot* PageHashes::slot_of(uint64_t gpa) const
{
    for (const auto& s : slots_)
        if (gpa >= s.gpa && gpa - s.gpa < s.hash.size() * 4096)
            return &s;
    return nullptr;
}

uint64_t* PageHashes::find(uint64_t gpa)
{
    const Slot* s = slot_of(gpa);
    return s ? const_cast<uint64_t*>(&s->hash[(gpa - s->gpa) / 4096]) : nullptr;
}

void PageHashes::note(const StressVm& m, uint64_t gpa)
{
    if (uint64_t* h = find(gpa))
        *h = page_hash(m.host_ptr(gpa, 4096));
}

void PageHashes::set(uint64_t gpa, uint64_t h)
{
    if (uint64_t* p = find(gpa))
        *p = h;
}

void PageHashes::note_zero(uint64_t gpa)
{
    if (uint64_t* h = find(gpa))
        *h = zero_page_hash();
}

std::vector<Digest> PageHashes::digests() const
{
    std::vector<Digest> out;
    constexpr uint64_t per = kDigestRangeBytes / 4096;
    for (const auto& s : slots_)
        for (uint64_t i = 0; i < s.hash.size(); i += per) {
            const uint64_t n = std::min(per, s.hash.size() - i);
            out.push_back({s.gpa + i * 4096, n * 4096, XXH3_64bits(s.hash.data() + i, n * sizeof(uint64_t))});
        }
    return out;
}

std::vector<uint64_t> PageHashes::differences(const PageHashes& other, uint64_t& count, uint64_t& pages,
                                              size_t max) const
{
    std::vector<uint64_t> out;
    count = pages = 0;
    for (const auto& s : slots_) {
        const Slot* o = other.slot_of(s.gpa);
        for (uint64_t i = 0; i < s.hash.size(); i++) {
            pages++;
            if (o && o->gpa == s.gpa && i < o->hash.size() && o->hash[i] == s.hash[i])
                continue;
            count++;
            if (out.size() < max)
                out.push_back(s.gpa + i * 4096);
        }
    }
    return out;
}

std::vector<uint64_t> PageHashes::differences(std::span<const Digest> source, uint64_t& count, uint64_t& pages,
                                              size_t max) const
{
    std::map<uint64_t, Digest> mine;
    for (const Digest& d : digests())
        mine[d.gpa] = d;
    std::vector<uint64_t> out;
    count = pages = 0;
    for (const auto& d : source) {
        pages += d.bytes / 4096;
        const auto it = mine.find(d.gpa);
        if (it != mine.end() && it->second.bytes == d.bytes && it->second.value == d.value)
            continue;
        count += d.bytes / 4096;
        if (out.size() < max)
            out.push_back(d.gpa);
    }
    return out;
}

namespace {

ResultRecord verdict(std::vector<uint64_t> gpas, uint64_t count, uint64_t pages, const char* what)
{
    ResultRecord r;
    r.ok = count == 0;
    r.pages_checked = pages;
    r.mismatches = count;
    r.mismatched_gpas = std::move(gpas);
    r.text = count ? fmt::format("{} of {} pages differ from the parked source ({}), first at GPA {:#x}", count, pages,
                                 what, r.mismatched_gpas[0])
                   : fmt::format("{} pages match the parked source", pages);
    return r;
}

}  // namespace

ResultRecord check_landed(const PageHashes& landed, const PageHashes* source)
{
    if (!source) {
        ResultRecord r;
        r.ok = 1;
        r.text = "not verified (--no-verify)";
        return r;
    }
    uint64_t count = 0, pages = 0;
    auto gpas = landed.differences(*source, count, pages);
    return verdict(std::move(gpas), count, pages, "page hashes");
}

ResultRecord check_landed(const PageHashes& landed, std::span<const Digest> source)
{
    if (source.empty()) {
        ResultRecord r;
        r.ok = 1;
        r.text = "not verified (--no-verify)";
        return r;
    }
    uint64_t count = 0, pages = 0;
    auto gpas = landed.differences(source, count, pages);
    return verdict(std::move(gpas), count, pages, "2 MiB range digests: pages of differing ranges");
}

}  // namespace mvm::migration
