#include "vmm/stress/workload.hpp"

#include <algorithm>
#include <cstring>
#include <fmt/format.h>

#include "vmm/stress/stress_vm.hpp"

namespace mvm {

std::string StampCheck::summary() const
{
    std::string s = fmt::format("{} pages checked, {} mismatches", pages_checked, mismatches);
    if (foreign)
        s += fmt::format(" ({} hold another VM's stamp: a foreign write, not a lost one)", foreign);
    for (size_t i = 0; i < first.size() && i < 4; i++)
        s += fmt::format("{} vCPU {} gpa {:#x}{}: expected {:#x}, found {:#x}", i ? ";" : ":", first[i].vcpu,
                         first[i].gpa, first[i].qword ? fmt::format(" qword {}", first[i].qword) : "",
                         first[i].expected, first[i].found);
    return s;
}

namespace {

uint64_t page_gpa(const mvm_vcpu_params& vp, uint64_t idx)
{
    for (uint32_t k = 0; k < vp.nr_segments && k < MVM_MAX_SEGMENTS; k++) {
        if (idx < vp.seg[k].pages)
            return vp.seg[k].gpa + idx * MVM_PAGE_SIZE;
        idx -= vp.seg[k].pages;
    }
    return ~0ull;
}

constexpr uint64_t kPageQwords = MVM_PAGE_SIZE / 8;

// What a page written with `stamp` holds (guest/workload.c, write_page) in
// its first `qwords` qwords, under the boot parameters' fill. Stamp 0: never
// written, all zero.
void fill_page(const mvm_boot_params& bp, uint64_t stamp, uint64_t idx, uint64_t* out, uint64_t qwords)
{
    const bool random = bp.fill == MVM_FILL_RANDOM || bp.fill == MVM_FILL_RATIO;
    const uint64_t fill_qwords = random ? std::min<uint64_t>(bp.fill_qwords, kPageQwords) : 0;
    const uint64_t rest = stamp && bp.fill == MVM_FILL_STAMP ? stamp : 0;
    std::fill(out, out + qwords, rest);
    if (stamp && random) {
        const uint64_t key = mvm_fill_key(stamp, idx);
        for (uint64_t q = 1; q < std::min(fill_qwords, qwords); q++)
            out[q] = mvm_fill_random(key, q);
    }
    out[0] = stamp;
}

// The first of `qwords` qwords of `p8` that is neither want[q] nor other[q], or -1.
int64_t first_difference(const uint8_t* p8, const uint64_t* want, const uint64_t* other, uint64_t qwords)
{
    if (std::memcmp(p8, want, qwords * 8) == 0)
        return -1;
    for (uint64_t q = 0; q < qwords; q++) {
        uint64_t found;
        std::memcpy(&found, p8 + q * 8, 8);
        if (found != want[q] && found != other[q])
            return static_cast<int64_t>(q);
    }
    return -1;
}

// Which of the `n` pages pass G has visited after `C` visits, and (in
// `in_flight`) which one it was about to write: the vCPU may have stopped
// between the stamp and the cursor store. Empty for G = 0 (no pass begun).
std::vector<uint8_t> visited_pages(const mvm_boot_params& bp, uint32_t v, uint64_t G, uint64_t C, uint64_t n,
                                   uint64_t visits, uint64_t& in_flight)
{
    std::vector<uint8_t> visited(G ? n : 0, 0);
    in_flight = ~0ull;
    if (!G)
        return visited;
    mvm_perm perm = mvm_perm_for(bp.seed, v, G, n);
    auto idx_of = [&](uint64_t i) { return bp.pattern == MVM_PATTERN_RANDOM ? mvm_perm_apply(&perm, i) : i; };
    for (uint64_t i = 0; i < C; i++) {
        uint64_t idx = idx_of(i);
        if (idx < n)
            visited[idx] = 1;
    }
    for (uint64_t i = C; i < visits; i++) {
        uint64_t idx = idx_of(i);
        if (idx < n) {
            in_flight = idx;
            break;
        }
    }
    return visited;
}

}  // namespace

void verify_vcpu_stamps(const mvm_boot_params& bp, const mvm_vcpu_params& vp, WorkloadProgress p, const PageReader& page,
                        StampCheck& out)
{
    const uint64_t n = vp.total_pages;
    const uint32_t v = vp.vcpu_id;
    const uint32_t vm = bp.vm_tag;
    const uint64_t visits = mvm_visits_per_pass(bp.pattern, n);
    // The guest's order (guest/workload.c) gives every observable state one
    // meaning: passes is stored before the cursor reads full, then the
    // generation moves, then the cursor resets. So
    //   passes >= G            pass G is complete, whatever the cursor says
    //   passes < G, C < visits pass G has visited C
    //   passes < G, C full     the generation moved, the cursor is still the
    //                          previous pass's: pass G has visited nothing
    uint64_t G = p.generation, C = p.cursor;
    if (G && p.passes >= G)
        C = visits;
    else if (C >= visits)
        C = 0;

    uint64_t in_flight = ~0ull;
    const std::vector<uint8_t> visited = visited_pages(bp, v, G, C, n, visits, in_flight);

    auto last_write_before = [&](uint64_t idx, uint64_t g) -> uint64_t {
        if (bp.write_pct == 0)
            return 0;
        for (; g >= 1; g--)
            if (mvm_writes(bp.write_pct, bp.seed, v, g, idx))
                return MVM_STAMP(vm, v, g);
        return 0;
    };

    // Fill zero: qword 0 only (the rest is whatever was there); the other
    // fills decide every qword of the page.
    const uint64_t qwords = bp.fill == MVM_FILL_ZERO ? 1 : kPageQwords;
    uint64_t want[kPageQwords], other[kPageQwords];
    for (uint64_t idx = 0; idx < n; idx++) {
        uint64_t older = G ? last_write_before(idx, G - 1) : 0;
        uint64_t expected = older;
        if (G && visited[idx] && mvm_writes(bp.write_pct, bp.seed, v, G, idx))
            expected = MVM_STAMP(vm, v, G);
        // The in-flight page may hold the new stamp, the old one, or (a whole-page fill) a mix.
        uint64_t alt = (idx == in_flight && mvm_writes(bp.write_pct, bp.seed, v, G, idx)) ? MVM_STAMP(vm, v, G) : expected;
        fill_page(bp, expected, idx, want, qwords);
        if (alt != expected)
            fill_page(bp, alt, idx, other, qwords);
        uint64_t gpa = page_gpa(vp, idx);
        const uint8_t* p8 = gpa == ~0ull ? nullptr : page(gpa);
        out.pages_checked++;
        // Outside guest memory: never what the guest wrote.
        const int64_t q = p8 ? first_difference(p8, want, alt != expected ? other : want, qwords) : 0;
        if (q < 0)
            continue;
        uint64_t first = 0, found = 0;
        if (p8) {
            std::memcpy(&first, p8, 8);
            std::memcpy(&found, p8 + q * 8, 8);
        }
        out.mismatches++;
        if (first >> 56 == MVM_STAMP_TAG && MVM_STAMP_VM(first) != (vm & 0xff))
            out.foreign++;
        if (out.first.size() < 16)
            out.first.push_back({v, gpa, want[q], found, static_cast<uint32_t>(q)});
    }
}

StampCheck verify_stamps(const StressVm& m)
{
    StampCheck out;
    const mvm_boot_params* bp = m.boot_params();
    for (uint32_t v = 0; v < m.vcpu_count(); v++) {
        auto s = m.snapshot(v);
        verify_vcpu_stamps(*bp, m.vcpu_params(v), {s.generation, s.cursor, s.passes},
                           [&](uint64_t gpa) { return m.host_ptr(gpa, MVM_PAGE_SIZE); }, out);
    }
    return out;
}

std::vector<WdRingEntry> watchdog_events(const mvm_mailbox& mb, uint64_t total, uint64_t since)
{
    std::vector<WdRingEntry> out;
    const uint64_t oldest = total > MVM_WD_RING ? total - MVM_WD_RING : 0;
    for (uint64_t e = std::max(since, oldest); e < total; e++) {
        const auto& ev = mb.wd[e % MVM_WD_RING];
        out.push_back({ev.start_tsc, ev.len_tsc});
    }
    return out;
}

std::string boot_params_difference(std::span<const uint8_t> guest, std::span<const uint8_t> host)
{
    if (host.size() < sizeof(mvm_boot_params))
        return "the host's boot parameters are missing";
    if (guest.size() < host.size())
        return fmt::format("guest boot parameters are {} bytes, the host wrote {}", guest.size(), host.size());
    mvm_boot_params g{}, h{};
    std::memcpy(&g, guest.data(), sizeof(g));
    std::memcpy(&h, host.data(), sizeof(h));
    auto differ = [](const char* field, uint64_t a, uint64_t b) {
        return fmt::format("guest boot parameter {} is {:#x}, the host wrote {:#x}", field, a, b);
    };
#define MVM_SAME(field)             \
    if (g.field != h.field)         \
        return differ(#field, g.field, h.field);
    MVM_SAME(magic)
    MVM_SAME(abi_version)
    MVM_SAME(nr_vcpus)
    MVM_SAME(pattern)
    MVM_SAME(fill)
    MVM_SAME(fill_qwords)
    MVM_SAME(write_pct)
    MVM_SAME(seed)
    MVM_SAME(nr_vnodes)
#undef MVM_SAME
    if (std::memcmp(g.vnode, h.vnode, sizeof(g.vnode)) != 0)
        return "the guest's vNUMA table differs from the host's";
    // nr_vcpus agrees with the host's, so the host's size bounds the vCPU array.
    if (sizeof(mvm_boot_params) + h.nr_vcpus * sizeof(mvm_vcpu_params) > host.size())
        return "the host's boot parameters are shorter than their vCPU count";
    for (uint32_t v = 0; v < h.nr_vcpus; v++) {
        mvm_vcpu_params gv{}, hv{};
        const size_t at = offsetof(mvm_boot_params, vcpu) + v * sizeof(mvm_vcpu_params);
        std::memcpy(&gv, guest.data() + at, sizeof(gv));
        std::memcpy(&hv, host.data() + at, sizeof(hv));
        if (gv.vcpu_id != hv.vcpu_id || gv.vnode != hv.vnode || gv.mailbox_gpa != hv.mailbox_gpa ||
            gv.nr_segments != hv.nr_segments || gv.total_pages != hv.total_pages ||
            std::memcmp(gv.seg, hv.seg, sizeof(gv.seg)) != 0)
            return fmt::format("the guest's working set of vCPU {} differs from the host's", v);
    }
    return "";
}

int owner_of_gpa(const StressVm& m, uint64_t gpa)
{
    for (uint32_t v = 0; v < m.vcpu_count(); v++) {
        const auto& vp = m.vcpu_params(v);
        for (uint32_t k = 0; k < vp.nr_segments; k++)
            if (gpa >= vp.seg[k].gpa && gpa < vp.seg[k].gpa + vp.seg[k].pages * 4096)
                return static_cast<int>(v);
    }
    return -1;
}

MailboxSnapshot read_mailbox(const mvm_mailbox& mb)
{
    const mvm_mailbox* m = &mb;
    MailboxSnapshot s{};
    s.generation = m->generation;
    s.cursor = m->cursor;
    s.pages_written = m->pages_written;
    s.pages_read = m->pages_read;
    s.passes = m->passes;
    s.last_tsc = m->last_tsc;
    s.start_tsc = m->start_tsc;
    s.warm_tsc = m->warm_tsc;
    s.warm_pages = m->warm_pages;
    s.wd_events = m->wd_events;
    s.wd_max_gap_tsc = m->wd_max_gap_tsc;
    s.state = m->state;
    return s;
}

}  // namespace mvm
