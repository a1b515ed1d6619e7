// fuzz_make_seeds DIR - writes the seed corpora under DIR/{stream,options,guest_state}.
//
// The stream seeds are real records made by the sender's own encoders from a
// VM like the fuzzing rig's (targets.hpp): whole migrations on one and on two
// connections, and streams that stop or go wrong in each phase, so that every
// record type (HELLO, HEADER, PAGES, CHANNEL_DONE, VCPU, DIGESTS, END, RESULT)
// is in the corpus. The committed corpus (tests/fuzz/corpus) was made by it;
// the replay test checks that it still covers every record type.
#include <sys/stat.h>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "migration/page_codec.hpp"
#include "migration/stream.hpp"
#include "migration/vcpu_state.hpp"
#include "migration/verify.hpp"
#include "tests/fuzz/targets.hpp"
#include "vmm/kvm/kvm.hpp"
#include "vmm/stress/stress_vm.hpp"

using namespace mvm;
using namespace mvm::migration;

namespace {

std::string dir;

void save(const std::string& sub, const std::string& name, const std::vector<uint8_t>& bytes)
{
    ::mkdir((dir + "/" + sub).c_str(), 0755);
    std::ofstream f(dir + "/" + sub + "/" + name, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    std::printf("%s/%s: %zu bytes\n", sub.c_str(), name.c_str(), bytes.size());
}

void save_text(const std::string& name, uint8_t which, const std::string& text)
{
    std::vector<uint8_t> b{which};
    b.insert(b.end(), text.begin(), text.end());
    save("options", name, b);
}

struct Stream {
    MemoryTransport t{{}};
    RecordWriter w{t};
    void rec(RecordType type, const std::vector<uint8_t>& p) { w.write(type, p); }
    std::vector<uint8_t> bytes() const { return t.written(); }
};

std::vector<uint8_t> hello(uint32_t ch, uint32_t n) { return Hello{kStreamVersion, ch, n, 0x5eed}.encode(); }

}  // namespace

int main(int argc, char** argv)
{
    if (argc != 2) {
        std::fprintf(stderr, "usage: fuzz_make_seeds DIR\n");
        return 2;
    }
    dir = argv[1];
    ::mkdir(dir.c_str(), 0755);
    Kvm kvm;
    StressVm m(kvm, fuzz::stream_rig_config());
    // Some recognisable non-zero pages: RAM and a system-slot page.
    const uint64_t ram = MVM_RAM_GPA;
    for (int i = 0; i < 3; i++)
        std::memset(m.host_ptr(ram + i * 4096ull, 4096), 0x11 * (i + 1), 4096);
    std::vector<uint64_t> gpas = {ram, ram + 4096, ram + 2 * 4096, ram + 8 * 4096 /* zero */};
    std::vector<uint64_t> gpas2 = {ram + 16 * 4096, ram + 17 * 4096};
    auto pages = [&](std::span<const uint64_t> g) { return encode_pages(m, g).payload; };
    auto zpages = [&](std::span<const uint64_t> g) { return encode_pages(m, g, Compression{true, 1}).payload; };
    std::vector<uint8_t> vcpu0 = save_vcpu(kvm, m.vcpu(0)).serialize();
    std::vector<uint8_t> vcpu1 = save_vcpu(kvm, m.vcpu(1)).serialize();
    // After END and the receiver's "resumed": the source's range digests.
    auto digests = [&](bool right) {
        std::vector<Digest> d = PageHashes::of_memory(m).digests();
        if (!right)
            d[0].value ^= 1;
        return encode_digests(d);
    };
    ResultRecord res;
    res.ok = 1;
    res.text = "layout accepted";
    res.mismatched_gpas = {ram};

    {  // A whole migration on one connection.
        Stream s;
        s.rec(RecordType::Header, StreamHeader::of(m, 1).encode());
        s.rec(RecordType::Pages, pages(gpas));
        s.rec(RecordType::PagesZstd, zpages(gpas2));
        s.rec(RecordType::ChannelDone, {});
        s.rec(RecordType::Vcpu, vcpu0);
        s.rec(RecordType::Vcpu, vcpu1);
        s.rec(RecordType::End, {});
        s.rec(RecordType::Digests, digests(true));
        save("stream", "whole-1-channel", s.bytes());
    }
    {  // Two connections, each opened by HELLO, the second's pages in between.
        Stream s;
        s.rec(RecordType::Hello, hello(0, 2));
        s.rec(RecordType::Header, StreamHeader::of(m, 2).encode());
        s.rec(RecordType::Pages, pages(gpas));
        s.rec(RecordType::ChannelDone, {});
        s.rec(RecordType::Hello, hello(1, 2));
        s.rec(RecordType::Pages, pages(gpas2));
        s.rec(RecordType::ChannelDone, {});
        s.rec(RecordType::Hello, hello(0, 2));  // back to connection 0
        s.rec(RecordType::Vcpu, vcpu0);
        s.rec(RecordType::Vcpu, vcpu1);
        s.rec(RecordType::End, {});
        s.rec(RecordType::Digests, digests(true));
        save("stream", "whole-2-channels", s.bytes());
    }
    {  // Stops in each phase.
        Stream s;
        s.rec(RecordType::Header, StreamHeader::of(m, 1).encode());
        save("stream", "header-only", s.bytes());
        s.rec(RecordType::Pages, pages(gpas));
        save("stream", "stops-in-bulk", s.bytes());
        s.rec(RecordType::Pages, pages(gpas));  // a page again: pre-copy
        save("stream", "stops-in-precopy", s.bytes());
        s.rec(RecordType::ChannelDone, {});
        s.rec(RecordType::Vcpu, vcpu0);
        save("stream", "stops-in-stop-and-copy", s.bytes());
        s.rec(RecordType::Vcpu, vcpu1);
        s.rec(RecordType::End, {});
        s.rec(RecordType::Digests, digests(false));
        save("stream", "digest-mismatch", s.bytes());
    }
    {  // Postcopy: the guest resumes with pages dropped, then they come (placed with userfaultfd).
        Stream s;
        s.rec(RecordType::Header, StreamHeader::of(m, 1).encode());
        s.rec(RecordType::Pages, pages(gpas));
        s.rec(RecordType::ChannelDone, {});
        s.rec(RecordType::Vcpu, vcpu0);
        s.rec(RecordType::Vcpu, vcpu1);
        s.rec(RecordType::Discard, encode_gpas(gpas2));
        s.rec(RecordType::PostcopyRun, {});
        s.rec(RecordType::Pages, pages(gpas2));
        s.rec(RecordType::ChannelDone, {});
        s.rec(RecordType::Digests, digests(true));
        save("stream", "postcopy-1-channel", s.bytes());
        Stream r;  // a REQUEST goes the other way: refused where PAGES belong
        r.rec(RecordType::Header, StreamHeader::of(m, 1).encode());
        r.rec(RecordType::Request, encode_gpas(gpas));
        save("stream", "request-where-pages-belong", r.bytes());
        Stream q;  // postcopy recovery's records out of place: RESUME where HEADER belongs, MISSING in postcopy
        q.rec(RecordType::Resume, encode_resume(0x1234));
        save("stream", "resume-where-header-belongs", q.bytes());
        Stream k;
        k.rec(RecordType::Header, StreamHeader::of(m, 1).encode());
        k.rec(RecordType::Pages, pages(gpas));
        k.rec(RecordType::ChannelDone, {});
        k.rec(RecordType::Vcpu, vcpu0);
        k.rec(RecordType::Vcpu, vcpu1);
        k.rec(RecordType::Discard, encode_gpas(gpas2));
        k.rec(RecordType::PostcopyRun, {});
        k.rec(RecordType::Missing, encode_gpas(gpas2));
        save("stream", "missing-where-pages-belong", k.bytes());
    }
    {  // Wrong things in the right frames.
        Stream s;
        s.rec(RecordType::Result, res.encode());
        save("stream", "result-where-header-belongs", s.bytes());
        Stream o;
        MachineConfig other = fuzz::stream_rig_config();
        other.vcpus = 1;
        other.nodes[0].vcpus = {0};
        StressVm m1(kvm, other);
        o.rec(RecordType::Header, StreamHeader::of(m1, 1).encode());
        o.rec(RecordType::Pages, pages(gpas));
        save("stream", "other-layout", o.bytes());
        Stream e;
        e.rec(RecordType::Header, StreamHeader::of(m, 1).encode());
        e.rec(RecordType::ChannelDone, {});
        e.rec(RecordType::End, {});
        save("stream", "end-without-vcpus", e.bytes());
    }

    // Option parsers: the first byte picks the parser (targets.cpp).
    save_text("size", 0, "256M");
    save_text("size-suffix", 0, "1536KiB");
    save_text("numa", 1, "node=0,cpus=0-1,mem=512M,backing=hugetlb2m,host-nodes=0,policy=bind,prealloc=on");
    save_text("numa-interleave", 1, "cpus=0,cpus=4,mem=1G,host-nodes=0-1,policy=interleave,host-cpus=0-3");
    save_text("access", 2, "mixed:25");
    save_text("cpulist", 3, "0-3,8,10-11");
    save_text("policy", 4, "preferred:1");
    save_text("uint", 5, "32");
    save_text("vm", 6, "4\n1G\nanon\nrandom\n50\npage\n1000\n7\n20\n0\nmixed:30\n"
                       "cpus=0-1,mem=512M,host-nodes=0\ncpus=2-3,mem=512M,host-nodes=1,backing=gmem");

    // Guest state: config byte, boot-parameter XOR mask, mailbox, pages.
    {
        std::vector<uint8_t> b{0x05};  // random pattern, write 50%, seed 0
        save("guest_state", "equal-params", b);
        b.resize(1 + 6000, 0);
        b[1 + offsetof(mvm_boot_params, seed)] = 0x01;  // seed differs
        save("guest_state", "seed-differs", b);
        mvm_mailbox mb{};
        mb.generation = 2;
        mb.cursor = 17;
        mb.passes = 1;
        mb.wd_events = 70;
        mb.wd[3] = {1000, 50};
        std::vector<uint8_t> c{0x00};
        const MachineConfig cfg = single_node_config(2, 1ull << 20);
        c.resize(1 + plan_layout(cfg).boot_params_bytes, 0);
        const auto* p = reinterpret_cast<const uint8_t*>(&mb);
        c.insert(c.end(), p, p + sizeof(mb));
        std::vector<uint8_t> page(4096, 0);
        const uint64_t stamp = MVM_STAMP(1, 0, 1);
        std::memcpy(page.data(), &stamp, 8);
        c.insert(c.end(), page.begin(), page.end());
        save("guest_state", "progress-and-a-page", c);
    }
    return 0;
}
