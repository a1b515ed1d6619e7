#include "vmm/workload.hpp"

#include <cstring>
#include <fmt/format.h>

#include "vmm/machine.hpp"

namespace mvm {

std::string StampCheck::summary() const
{
    std::string s = fmt::format("{} pages checked, {} mismatches", pages_checked, mismatches);
    for (size_t i = 0; i < first.size() && i < 4; i++)
        s += fmt::format("{} vCPU {} gpa {:#x}: expected {:#x}, found {:#x}", i ? ";" : ":", first[i].vcpu,
                         first[i].gpa, first[i].expected, first[i].found);
    return s;
}

namespace {

uint64_t page_gpa(const mvm_vcpu_params& vp, uint64_t idx)
{
    for (uint32_t k = 0; k < vp.nr_segments; k++) {
        if (idx < vp.seg[k].pages)
            return vp.seg[k].gpa + idx * MVM_PAGE_SIZE;
        idx -= vp.seg[k].pages;
    }
    return ~0ull;
}

}  // namespace

void verify_vcpu_stamps(const mvm_boot_params& bp, const mvm_vcpu_params& vp, WorkloadProgress p, const PageReader& page,
                        StampCheck& out)
{
    const uint64_t n = vp.total_pages;
    const uint32_t v = vp.vcpu_id;
    const uint64_t visits = mvm_visits_per_pass(bp.pattern, n);
    uint64_t G = p.generation, C = p.cursor;
    // Between "generation = G+1" and "cursor = 0" the cursor is still the
    // previous pass's (full). A full cursor of an unfinished pass is that.
    if (G == p.passes + 1 && C >= visits)
        C = 0;
    if (C > visits)
        C = visits;

    // Which pages pass G has visited, and which one it was about to write
    // (the vCPU may have stopped between the stamp and the cursor store).
    std::vector<uint8_t> visited(G ? n : 0, 0);
    uint64_t in_flight = ~0ull;
    if (G) {
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
    }

    auto last_write_before = [&](uint64_t idx, uint64_t g) -> uint64_t {
        if (bp.write_pct == 0)
            return 0;
        for (; g >= 1; g--)
            if (mvm_writes(bp.write_pct, bp.seed, v, g, idx))
                return MVM_STAMP(v, g);
        return 0;
    };

    const uint64_t qwords = bp.touch == MVM_TOUCH_PAGE ? MVM_PAGE_SIZE / 8 : 1;
    for (uint64_t idx = 0; idx < n; idx++) {
        uint64_t older = G ? last_write_before(idx, G - 1) : 0;
        uint64_t expected = older;
        if (G && visited[idx] && mvm_writes(bp.write_pct, bp.seed, v, G, idx))
            expected = MVM_STAMP(v, G);
        // The in-flight page may hold the new stamp, the old one, or (touch=page) a mix.
        uint64_t alt = (idx == in_flight && mvm_writes(bp.write_pct, bp.seed, v, G, idx)) ? MVM_STAMP(v, G) : expected;
        uint64_t gpa = page_gpa(vp, idx);
        const uint8_t* p8 = page(gpa);
        out.pages_checked++;
        bool bad = false;
        uint64_t found = 0;
        for (uint64_t q = 0; q < qwords && !bad; q++) {
            std::memcpy(&found, p8 + q * 8, 8);
            bad = found != expected && found != alt;
        }
        if (bad) {
            out.mismatches++;
            if (out.first.size() < 16)
                out.first.push_back({v, gpa, expected, found});
        }
    }
}

StampCheck verify_stamps(const Machine& m)
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

}  // namespace mvm
