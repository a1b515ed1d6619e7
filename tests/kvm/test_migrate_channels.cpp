// Issue 16: several channels per virtual node (QEMU's multifd), each tracker;
// zstd-compressed PAGES frames and what a receiver does with a damaged one.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <set>

#include "kvm_test_util.hpp"
#include "migration/channels.hpp"
#include "migration/page_codec.hpp"
#include "migration/receiver.hpp"
#include "migration/stream.hpp"
#include "vmm/stress/stress_vm.hpp"

using namespace mvm;
using namespace mvm::migration;
using mvm::test::free_port;
using mvm::test::Receiver;
using mvm::test::run_minivmm;

namespace {

nlohmann::json parse(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j;
}

// Two virtual nodes on host node 0, one vCPU each.
const char* kVm = "--numa cpus=0,mem=32M,host-nodes=0 --numa cpus=1,mem=32M,host-nodes=0 --rate 100000";
const char* kRun = "--warmup 0.3 --post-run 0.5 --bandwidth 400M --max-iterations 4";

struct ChannelCase {
    const char* to;  // inproc | tcp | unix
    const char* tracker;
    uint32_t channels;
    const char* compress;
};
std::ostream& operator<<(std::ostream& os, const ChannelCase& c)
{
    return os << c.to << " " << c.tracker << " " << c.channels << " channels " << c.compress;
}

class MigrateChannels : public ::testing::TestWithParam<ChannelCase> {};

}  // namespace

TEST_P(MigrateChannels, EveryPageArrivesZeroMismatches)
{
    REQUIRE_KVM();
    const ChannelCase c = GetParam();
    const bool tcp = std::string(c.to) != "inproc";  // over a socket: TCP, or a unix socket (QEMU's unix:)
    const bool zstd = std::string(c.compress) != "none";
    std::unique_ptr<Receiver> recv;
    std::string to = "inproc";
    if (tcp) {
        const uint16_t port = free_port();
        to = std::string(c.to) == "unix" ? fmt::format("unix:/tmp/minivmm-test-{}.sock", port)
                                         : fmt::format("tcp:127.0.0.1:{}", port);
        recv = std::make_unique<Receiver>(fmt::format("{} --post-run 0.5 --listen {} --json -", kVm, to));
    }
    auto r = run_minivmm(fmt::format("migrate --to {} --tracker {} --channels {} --compress {} {} {} --max-downtime 20 "
                                     "--json -",
                                     to, c.tracker, c.channels, c.compress, kVm, kRun));
    ASSERT_EQ(r.exit_code, 0) << r.err << (recv ? recv->output() : "");
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "completed") << j.dump();
    EXPECT_EQ(j["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
    EXPECT_GT(j["verify"]["switchover_pages_checked"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_GT(j["verify"]["pages_checked"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["channels"].get<uint32_t>(), c.channels);
    EXPECT_EQ(j["config"]["channels"].get<uint32_t>(), c.channels);
    // The level is always named: zstd means zstd:1.
    EXPECT_EQ(j["config"]["compress"], std::string(c.compress) == "zstd" ? "zstd:1" : std::string(c.compress));
    const auto& cj = j["compression"];
    if (zstd) {
        // Pages that are one stamp and zeros compress far below their 4 KiB.
        EXPECT_GT(cj["data_bytes"].get<uint64_t>(), 0u) << cj.dump();
        EXPECT_LT(cj["wire_bytes"].get<uint64_t>(), cj["data_bytes"].get<uint64_t>()) << cj.dump();
        EXPECT_GT(cj["ratio"].get<double>(), 1.0) << cj.dump();
        EXPECT_GT(cj["cpu_ms"].get<double>(), 0.0) << cj.dump();
    } else {
        EXPECT_EQ(cj["method"], "none");
        if (tcp)
            EXPECT_EQ(cj["wire_bytes"], cj["data_bytes"]) << "uncompressed: data goes as it is";
    }
    if (!tcp)
        return;
    ASSERT_EQ(recv->wait(), 0) << recv->output();
    const auto rj = parse(recv->result().out);
    EXPECT_EQ(rj["channels"].get<uint32_t>(), c.channels);
    EXPECT_EQ(rj["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
    // Both ends counted the same frames.
    EXPECT_EQ(rj["compression"]["data_bytes"], cj["data_bytes"]) << rj.dump();
    EXPECT_EQ(rj["compression"]["wire_bytes"], cj["wire_bytes"]) << rj.dump();
    EXPECT_EQ(rj["compression"]["method"], zstd ? "zstd" : "none");
}

INSTANTIATE_TEST_SUITE_P(Cases, MigrateChannels,
                         ::testing::Values(ChannelCase{"tcp", "bitmap", 3, "none"},
                                           ChannelCase{"unix", "ring", 2, "none"},
                                           ChannelCase{"tcp", "ring", 3, "zstd"},
                                           ChannelCase{"tcp", "bitmap", 1, "zstd:3"},
                                           ChannelCase{"inproc", "bitmap", 4, "none"},
                                           ChannelCase{"inproc", "ring", 4, "none"}),
                         [](const auto& info) {
                             const ChannelCase& c = info.param;
                             std::string n = fmt::format("{}_{}_{}ch_{}", c.to, c.tracker, c.channels, c.compress);
                             for (auto& ch : n)
                                 if (ch == ':')
                                     ch = '_';
                             return n;
                         });

// A node's pages go only to its own channels, dealt by 2 MiB range; each
// channel is pinned to its node.
// QEMU's fd: migration on the command line: the two ends of a socketpair,
// inherited by receive (--listen fd:N) and migrate (--to fd:M); one channel.
TEST(MigrateFd, AnInheritedSocketpairCarriesTheMigration)
{
    REQUIRE_KVM();
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);  // no CLOEXEC: the children inherit both
    Receiver recv(fmt::format("{} --post-run 0.5 --listen fd:{} --json -", kVm, sv[0]));
    ::close(sv[0]);
    auto r = run_minivmm(fmt::format("migrate --to fd:{} {} {} --max-downtime 20 --json -", sv[1], kVm, kRun));
    ::close(sv[1]);
    ASSERT_EQ(r.exit_code, 0) << r.err << recv.output();
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "completed") << j.dump();
    EXPECT_EQ(j["channels"].get<uint32_t>(), 1u);
    EXPECT_EQ(j["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
    EXPECT_GT(j["verify"]["switchover_pages_checked"].get<uint64_t>(), 0u);
    EXPECT_EQ(j["verify"]["mismatches"].get<uint64_t>(), 0u);
    ASSERT_EQ(recv.wait(), 0) << recv.output();
    EXPECT_NE(recv.result().err.find(fmt::format("reading the connected socket fd:{}", sv[0])), std::string::npos)
        << recv.result().err;
    // More than one channel over one socket is refused before anything starts.
    int sp[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sp), 0);
    auto bad = run_minivmm(fmt::format("migrate --to fd:{} --channels 2 {} {}", sp[1], kVm, kRun));
    ::close(sp[0]);
    ::close(sp[1]);
    EXPECT_EQ(bad.exit_code, 2) << bad.err;
    EXPECT_NE(bad.err.find("one connected socket, one channel"), std::string::npos) << bad.err;
}

TEST(ChannelMap, ChannelsServeOneNodeEachAndDealItsMemoryBy2MiB)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(1, 16ull << 20);
    NodeConfig n1 = cfg.nodes[0];
    n1.id = 1;
    n1.vcpus = {1};
    cfg.nodes.push_back(n1);
    cfg.vcpus = 2;
    StressVm m(kvm, cfg);
    for (uint32_t nch : {1u, 2u, 3u, 5u}) {
        ChannelMap map(m, nch);
        std::map<uint32_t, std::set<int>> nodes_of_channel;
        for (const auto& r : m.memslots().regions()) {
            std::set<uint32_t> used;
            for (uint64_t off = 0; off < r.size; off += 4096) {
                const uint32_t ch = map.channel_of(r.slot, r.gpa + off);
                ASSERT_LT(ch, nch);
                used.insert(ch);
                if (off % (2 << 20))  // within a 2 MiB range: the range's channel
                    EXPECT_EQ(ch, map.channel_of(r.slot, r.gpa + off - off % (2 << 20)));
                if (r.vnode >= 0)
                    nodes_of_channel[ch].insert(r.vnode);
            }
            if (r.vnode >= 0) {
                // As many channels as the node has (nch >= 2 nodes: ceil or floor of nch / 2).
                const uint32_t own = nch >= 2 ? (nch + 1 - static_cast<uint32_t>(r.vnode)) / 2 : 1;
                EXPECT_EQ(used.size(), own) << "node " << r.vnode << " with " << nch << " channels";
            }
        }
        if (nch >= 2)
            for (const auto& [ch, nodes] : nodes_of_channel) {
                EXPECT_EQ(nodes.size(), 1u) << "channel " << ch << " of " << nch << " carries two nodes";
                ASSERT_NE(map.node_of(ch), nullptr);
                EXPECT_EQ(static_cast<int>(map.node_of(ch)->id), *nodes.begin());
            }
    }
}

// A PAGES_ZSTD frame damaged in each way the receiver can see: one clear
// error naming the record, never a crash or a page taken from a bad frame.
TEST(MigrationStream, DamagedCompressedFramesAreRefusedWithAClearError)
{
    REQUIRE_KVM();
    MachineConfig cfg = single_node_config(1, 8ull << 20);
    StressVm src(kvm, cfg);
    std::vector<uint64_t> gpas;
    for (int i = 0; i < 64; i++) {
        const uint64_t gpa = MVM_RAM_GPA + static_cast<uint64_t>(i) * 4096;
        std::memset(src.host_ptr(gpa, 4096), i % 3 ? 0x40 + i : 0, 4096);  // some zero pages among them
        gpas.push_back(gpa);
    }
    const EncodedPages z = encode_pages(src, gpas, Compression::parse("--compress", "zstd"));
    ASSERT_EQ(z.type, RecordType::PagesZstd);
    auto stream = [&](RecordType type, const std::vector<uint8_t>& payload) {
        MemoryTransport sink({});
        RecordWriter w(sink);
        w.write(RecordType::Header, StreamHeader::of(src, 1).encode());
        w.write(type, payload);
        return sink.written();
    };
    auto feed = [&](const std::vector<uint8_t>& bytes) {
        StressVm dst(kvm, cfg);
        std::vector<std::unique_ptr<Transport>> ch;
        ch.push_back(std::make_unique<MemoryTransport>(bytes));
        const ReceiveReport r = receive_from(dst, std::move(ch), 0);
        EXPECT_EQ(r.status, "failed");
        EXPECT_EQ(r.error.find('\n'), std::string::npos) << "one line: " << r.error;
        return r.error;
    };
    const std::vector<uint8_t> good = stream(z.type, z.payload);
    const size_t zstart = good.size() - 8 - (z.payload.size() - 8 - gpas.size() * 8);  // the zstd frame's first byte
    // Truncated inside the zstd frame.
    EXPECT_NE(feed({good.begin(), good.begin() + static_cast<long>(zstart + 5)}).find("truncated"), std::string::npos);
    // A flipped bit in it: the frame checksum catches it before zstd reads it.
    auto flipped = good;
    flipped[zstart + 3] ^= 0x20;
    EXPECT_NE(feed(flipped).find("PAGES_ZSTD) at byte"), std::string::npos);
    EXPECT_NE(feed(flipped).find("fails its checksum"), std::string::npos);
    // A frame whose checksum holds but whose zstd data is not zstd's.
    auto forged = z.payload;
    for (size_t i = 8 + gpas.size() * 8; i < forged.size(); i++)
        forged[i] ^= 0x5a;
    EXPECT_NE(feed(stream(z.type, forged)).find("does not decompress: zstd"), std::string::npos);
    // Valid zstd that decompresses to fewer pages than the index names.
    EncodedPages fewer = encode_pages(src, std::span<const uint64_t>(gpas).subspan(0, 32), Compression{true, 1});
    auto lie = z.payload;
    lie.resize(8 + gpas.size() * 8);
    lie.insert(lie.end(), fewer.payload.begin() + 8 + 32 * 8, fewer.payload.end());
    EXPECT_NE(feed(stream(z.type, lie)).find("decompresses to"), std::string::npos);
    // The data-bytes field disagreeing with the index.
    auto wrong = z.payload;
    wrong[4] ^= 0x10;
    EXPECT_NE(feed(stream(z.type, wrong)).find("data bytes for its"), std::string::npos);
    // And the intact frame lands: every page as the source has it.
    StressVm dst(kvm, cfg);
    MemoryTransport in(good);
    RecordReader rd(in);
    rd.read();  // HEADER
    PageDecoder dec;
    const FrameHead f = rd.next();
    EXPECT_EQ(dec.read(rd, f, dst, {}), gpas.size());
    for (uint64_t gpa : gpas)
        EXPECT_EQ(std::memcmp(dst.host_ptr(gpa, 4096), src.host_ptr(gpa, 4096), 4096), 0) << std::hex << gpa;
    EXPECT_EQ(dec.counts().zero_pages, 22u);  // i % 3 == 0 for 22 of 0..63
    EXPECT_EQ(dec.counts().data_bytes, 42u * 4096);
}

TEST(MigrateCompressBadInput, OneLineAndExit2)
{
    REQUIRE_KVM();
    for (const char* bad : {"--to tcp:127.0.0.1:1 --compress lz4", "--to tcp:127.0.0.1:1 --compress zstd:99",
                            "--to tcp:127.0.0.1:1 --compress zstd:x", "--to inproc --compress zstd"}) {
        auto r = run_minivmm(fmt::format("migrate {} --mem 16M", bad));
        EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
        EXPECT_NE(r.err.find("--compress"), std::string::npos) << bad << ": " << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << bad << ": " << r.err;
    }
}
