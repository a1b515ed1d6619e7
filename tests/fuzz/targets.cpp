#include "tests/fuzz/targets.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "migration/migrate.hpp"
#include "migration/stream.hpp"
#include "numa/policy.hpp"
#include "numa/topology.hpp"
#include "cli/options.hpp"
#include "base/error.hpp"
#include "vmm/kvm/kvm.hpp"
#include "vmm/stress/stress_vm.hpp"
#include "base/units.hpp"
#include "vmm/stress/workload.hpp"

namespace mvm::fuzz {

namespace {

[[noreturn]] void finding(const std::string& what)
{
    std::fprintf(stderr, "fuzz finding: %s\n", what.c_str());
    std::abort();
}

// Errors reach users as one line; a message with a newline in it is a defect.
void expect_one_line(const std::string& what, const char* where)
{
    if (what.empty() || what.find('\n') != std::string::npos)
        finding(std::string(where) + " produced an empty or multi-line error: '" + what + "'");
}

constexpr uint32_t kFrame = 16;  // type + length + XXH3 checksum
constexpr uint32_t kMaxChannels = 4;

}  // namespace

// ---- the migration receiver ------------------------------------------------------

MachineConfig stream_rig_config()
{
    // Two vCPUs (VCPU x 2), a small RAM slot beside the system slot; a fixed
    // VM tag, so the seeds made from it are the same on every run.
    MachineConfig c = single_node_config(2, 2ull << 20);
    c.workload.vm_tag = 0x5e;
    return c;
}

int stream_one(const uint8_t* data, size_t size)
{
    using namespace migration;
    static std::unique_ptr<Kvm> kvm;
    static std::unique_ptr<StressVm> m;
    if (!kvm) {
        try {
            kvm = std::make_unique<Kvm>();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "stream fuzzing needs /dev/kvm: %s\n", e.what());
            std::exit(3);
        }
    }
    if (!m)
        m = std::make_unique<StressVm>(*kvm, stream_rig_config());

    // Split the input into connections at HELLO records.
    std::vector<std::vector<uint8_t>> chans(1);
    bool opened[kMaxChannels] = {};
    size_t cur = 0, pos = 0;
    while (pos < size) {
        uint32_t hdr[2] = {0, 0};
        const size_t left = size - pos;
        if (left >= 8)
            std::memcpy(hdr, data + pos, 8);
        if (left < kFrame || hdr[1] > left - kFrame) {
            chans[cur].insert(chans[cur].end(), data + pos, data + size);
            break;
        }
        const size_t len = kFrame + hdr[1];
        const uint8_t* payload = data + pos + 8;
        if (hdr[0] == static_cast<uint32_t>(RecordType::Hello) && hdr[1] == 20) {
            uint32_t ch;
            std::memcpy(&ch, payload + 4, 4);  // version, channel, channels, session
            cur = ch % kMaxChannels;
            if (chans.size() <= cur)
                chans.resize(cur + 1);
            if (!opened[cur]) {
                opened[cur] = true;
                chans[cur].insert(chans[cur].end(), data + pos, data + pos + len);
            }
            pos += len;
            continue;
        }
        if (hdr[0] == static_cast<uint32_t>(RecordType::Result)) {
            // What the sender does with a RESULT from the receiver.
            try {
                ResultRecord::decode({payload, hdr[1]});
            } catch (const Error& e) {
                expect_one_line(e.what(), "ResultRecord::decode");
            }
        }
        chans[cur].insert(chans[cur].end(), data + pos, data + pos + len);
        pos += len;
    }

    std::vector<std::unique_ptr<Transport>> ts;
    for (const auto& c : chans)
        ts.push_back(std::make_unique<MemoryTransport>(c));
    ReceiveReport r = receive_from(*m, std::move(ts), 0);
    static const bool verbose = std::getenv("MINIVMM_FUZZ_VERBOSE") != nullptr;
    if (verbose)
        std::fprintf(stderr, "receive: %s %s\n", r.status.c_str(), r.error.c_str());
    if (r.status != "completed")
        expect_one_line(r.error, "receive_from");
    // A resumed guest has had its life; the next input gets a new machine.
    if (m->started())
        m.reset();
    return 0;
}

// ---- option parsers ------------------------------------------------------------------

namespace {

numa::Topology four_nodes()
{
    numa::Topology t;
    for (int n = 0; n < 4; n++) {
        numa::Node node;
        node.id = n;
        for (int c = 0; c < 4; c++)
            node.cpus.push_back(n * 4 + c);
        node.mem_total_bytes = node.mem_free_bytes = 64ull << 30;
        t.nodes.push_back(node);
    }
    t.distance.assign(4, std::vector<int>(4, 20));
    for (int n = 0; n < 4; n++)
        t.distance[n][n] = 10;
    return t;
}

// Splits at '\n' into at most `n` fields.
std::vector<std::string> fields(const std::string& s, size_t n)
{
    std::vector<std::string> out;
    size_t at = 0;
    while (out.size() + 1 < n) {
        size_t nl = s.find('\n', at);
        if (nl == std::string::npos)
            break;
        out.push_back(s.substr(at, nl - at));
        at = nl + 1;
    }
    out.push_back(s.substr(at));
    return out;
}

}  // namespace

int options_one(const uint8_t* data, size_t size)
{
    if (size < 1)
        return 0;
    const uint8_t which = data[0];
    const std::string s(reinterpret_cast<const char*>(data + 1), size - 1);
    try {
        switch (which % 7) {
        case 0: {
            auto v = parse_size(s);
            if (v) {
                // format_size promises the exact form parse_size accepts.
                auto back = parse_size(format_size(*v));
                if (!back || *back != *v)
                    finding("parse_size(format_size(" + std::to_string(*v) + ")) does not round-trip");
            }
            parse_size_option("--mem", s);
            break;
        }
        case 1:
            cli::parse_numa_option(s, which >> 3, BackingKind::Anon);
            break;
        case 2:
            cli::parse_access(s);
            break;
        case 3:
            try {
                auto cpus = numa::parse_cpu_list(s);
                numa::parse_cpu_list(numa::format_cpu_list(cpus));
            } catch (const std::invalid_argument&) {
                // documented: bad syntax
            }
            break;
        case 4:
            numa::parse_policy(s);
            break;
        case 5:
            cli::parse_uint("--vcpus", s, 1, 4096);
            cli::parse_seconds("--duration", s);
            break;
        default: {
            // A whole VM option set: vcpus, mem, backing, pattern, write-pct,
            // touch, rate, seed, watchdog-ms, passes, access, then --numa values.
            auto f = fields(s, 16);
            cli::VmOptions o;
            std::string* slot[] = {&o.vcpus, &o.mem,  &o.backing,     &o.pattern, &o.write_pct, &o.touch,
                                   &o.rate,  &o.seed, &o.watchdog_ms, &o.passes,  &o.access};
            size_t i = 0;
            for (; i < f.size() && i < std::size(slot); i++)
                *slot[i] = f[i];
            for (; i < f.size(); i++)
                o.numa.push_back(f[i]);
            o.vcpus_given = o.mem_given = (which & 0x80) != 0;
            static const numa::Topology topo = four_nodes();
            MachineConfig c = o.parse(topo);
            plan_layout(c);
            break;
        }
        }
    } catch (const Error& e) {
        expect_one_line(e.what(), "an option parser");
    }
    return 0;
}

// ---- guest memory as the host decodes it --------------------------------------------

int guest_state_one(const uint8_t* data, size_t size)
{
    if (size < 1)
        return 0;
    // The host's side: a real configuration and the boot parameters it writes.
    static const uint32_t kPatterns[] = {MVM_PATTERN_SEQ, MVM_PATTERN_RANDOM};
    static const uint32_t kWritePct[] = {100, 50, 0, 7};
    MachineConfig cfg = single_node_config(2, 1ull << 20);
    cfg.workload.pattern = kPatterns[data[0] & 1];
    // Fill: bit 1 (zero/stamp), bit 7 (random/ratio:4 instead).
    static const uint32_t kFills[] = {MVM_FILL_ZERO, MVM_FILL_STAMP, MVM_FILL_RANDOM, MVM_FILL_RATIO};
    cfg.workload.fill = kFills[((data[0] >> 1) & 1) | ((data[0] >> 7) << 1)];
    cfg.workload.fill_ratio = 4;
    cfg.workload.write_pct = kWritePct[(data[0] >> 2) & 3];
    cfg.workload.seed = data[0] >> 4;
    const GuestLayout layout = plan_layout(cfg);
    std::vector<uint8_t> host(layout.boot_params_bytes);
    write_boot_params(cfg, layout, reinterpret_cast<mvm_boot_params*>(host.data()));
    data++;
    size--;

    // Guest boot parameters: the host's, XORed with the input (mostly zero
    // bytes keep them equal, so both outcomes are reachable).
    std::vector<uint8_t> guest = host;
    const size_t nb = std::min(size, guest.size());
    for (size_t i = 0; i < nb; i++)
        guest[i] ^= data[i];
    const std::string why = boot_params_difference(guest, host);
    if (why.find('\n') != std::string::npos)
        finding("boot_params_difference: multi-line text");
    if (why.empty() && std::memcmp(guest.data(), host.data(), sizeof(mvm_boot_params)) != 0) {
        // Equal where it matters; the rest (TSC fields, max_passes, faults) may differ.
        const auto* g = reinterpret_cast<const mvm_boot_params*>(guest.data());
        const auto* h = reinterpret_cast<const mvm_boot_params*>(host.data());
        if (g->seed != h->seed || g->nr_vcpus != h->nr_vcpus || g->pattern != h->pattern || g->fill != h->fill ||
            g->fill_qwords != h->fill_qwords)
            finding("boot_params_difference missed a difference");
    }
    // Truncated guest copies must be refused, not read past.
    if (boot_params_difference({guest.data(), guest.size() / 2}, host).empty())
        finding("boot_params_difference accepted a truncated copy");
    data += nb;
    size -= nb;

    // A mailbox page the guest wrote, then pages of its working set.
    alignas(64) mvm_mailbox mb{};
    const size_t mbn = std::min(size, sizeof(mb));
    std::memcpy(&mb, data, mbn);
    data += mbn;
    size -= mbn;
    const MailboxSnapshot s = read_mailbox(mb);
    auto events = watchdog_events(mb, s.wd_events, s.wd_events > 3 ? s.wd_events - 3 : 0);
    if (events.size() > MVM_WD_RING)
        finding("watchdog_events returned more than the ring holds");
    const auto* bp = reinterpret_cast<const mvm_boot_params*>(host.data());
    std::vector<uint8_t> zero(MVM_PAGE_SIZE, 0);
    StampCheck out;
    for (uint32_t v = 0; v < cfg.vcpus; v++) {
        const mvm_vcpu_params& vp = bp->vcpu[v];
        // Page i of the working set: the input's i-th page where there is one,
        // zeros after it, and nothing (outside memory) for one odd GPA.
        auto page = [&](uint64_t gpa) -> const uint8_t* {
            uint64_t off = gpa - vp.seg[0].gpa;
            if (off % (64 * MVM_PAGE_SIZE) == 63 * MVM_PAGE_SIZE)
                return nullptr;
            uint64_t i = off / MVM_PAGE_SIZE;
            if ((i + 1) * MVM_PAGE_SIZE <= size)
                return data + i * MVM_PAGE_SIZE;
            return zero.data();
        };
        // Progress straight from the (fuzzed) mailbox, and bounded variants of
        // it so the interesting (small) generations are reached too.
        verify_vcpu_stamps(*bp, vp, {s.generation, s.cursor, s.passes}, page, out);
        verify_vcpu_stamps(*bp, vp, {s.generation & 7, s.cursor & 1023, s.passes & 7}, page, out);
    }
    if (out.first.size() > 16)
        finding("StampCheck kept more than 16 mismatches");
    return 0;
}

// ---- structure-aware mutation --------------------------------------------------------

size_t stream_mutate(uint8_t* data, size_t size, size_t max_size, unsigned seed, const Mutator& mutate)
{
    std::minstd_rand rng(seed);
    struct Rec {
        uint32_t type;
        std::vector<uint8_t> payload;
    };
    std::vector<Rec> recs;
    size_t pos = 0;
    while (size - pos >= kFrame) {
        uint32_t hdr[2];
        std::memcpy(hdr, data + pos, 8);
        if (hdr[1] > size - pos - kFrame)
            break;
        recs.push_back({hdr[0], std::vector<uint8_t>(data + pos + 8, data + pos + 8 + hdr[1])});
        pos += kFrame + hdr[1];
    }
    const bool tail = pos != size;
    // Raw bytes now and then (and whenever there is no frame to work on).
    if (recs.empty() || rng() % 8 == 0)
        return mutate(data, size, max_size);

    const size_t k = rng() % recs.size();
    switch (rng() % 8) {
    case 0:  // drop a record
        recs.erase(recs.begin() + static_cast<long>(k));
        break;
    case 1:  // repeat a record
        recs.insert(recs.begin() + static_cast<long>(k), recs[k]);
        break;
    case 2:  // another type
        recs[k].type = 1 + rng() % migration::kLastRecordType;
        break;
    case 3: {  // swap two records
        const size_t j = rng() % recs.size();
        std::swap(recs[k], recs[j]);
        break;
    }
    default: {  // mutate inside the payload
        auto& p = recs[k].payload;
        const size_t old = p.size();
        const size_t grow = std::min<size_t>(max_size > size ? max_size - size : 0, 64u << 10);
        p.resize(std::max<size_t>(old + grow, 1));
        size_t n = mutate(p.data(), old, p.size());
        p.resize(n);
        break;
    }
    }
    std::vector<uint8_t> out;
    for (const auto& r : recs) {
        uint32_t hdr[2] = {r.type, static_cast<uint32_t>(r.payload.size())};
        const uint64_t crc = migration::record_checksum(static_cast<migration::RecordType>(r.type), r.payload);
        const auto* h = reinterpret_cast<const uint8_t*>(hdr);
        out.insert(out.end(), h, h + 8);
        out.insert(out.end(), r.payload.begin(), r.payload.end());
        const auto* c = reinterpret_cast<const uint8_t*>(&crc);
        out.insert(out.end(), c, c + 8);
    }
    if (tail && rng() % 2)
        out.insert(out.end(), data + pos, data + size);
    if (out.size() > max_size)
        return mutate(data, size, max_size);
    if (!out.empty())
        std::memcpy(data, out.data(), out.size());
    return out.size();
}

}  // namespace mvm::fuzz
