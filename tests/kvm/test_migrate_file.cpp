// Issue 31: migration to a file (QEMU's file: URI, plain and mapped-ram) and
// its restore: every page of the restored guest checked against the source's
// digests in the file; a damaged, truncated or unfinished file refused.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kvm_test_util.hpp"

using mvm::test::run_minivmm;

namespace {

// Two virtual nodes (two memslots of 32 MiB besides the system slot).
const char* kVm = "--numa cpus=0,mem=32M,host-nodes=0 --numa cpus=1,mem=32M,host-nodes=0 --rate 100000";
const char* kRun = "--warmup 0.3 --bandwidth 400M --max-iterations 4";

nlohmann::json parse(const std::string& s)
{
    auto j = nlohmann::json::parse(s, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << s;
    return j;
}

class TempDir {
public:
    TempDir()
    {
        char t[] = "/tmp/minivmm-file.XXXXXX";
        path_ = ::mkdtemp(t);
    }
    ~TempDir() { std::filesystem::remove_all(path_); }
    std::string file(const char* name) const { return path_ + "/" + name; }

private:
    std::string path_;
};

uint64_t file_size(const std::string& p)
{
    struct stat st {};
    EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
    return static_cast<uint64_t>(st.st_size);
}

std::vector<uint8_t> read_at(const std::string& p, uint64_t off, size_t len)
{
    std::vector<uint8_t> b(len);
    const int fd = ::open(p.c_str(), O_RDONLY);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::pread(fd, b.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
    ::close(fd);
    return b;
}

void write_at(const std::string& p, uint64_t off, const void* data, size_t len)
{
    const int fd = ::open(p.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, data, len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
    ::close(fd);
}

template <class T>
T get(const std::vector<uint8_t>& b, size_t at)
{
    T v;
    std::memcpy(&v, b.data() + at, sizeof v);
    return v;
}

// migrate --to URI (extra options), which must complete and leave the guest in the file.
void save(const std::string& uri, const std::string& extra)
{
    auto r = run_minivmm(fmt::format("migrate --to {} {} {} {} --json -", uri, kVm, kRun, extra));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "completed") << j.dump();
    EXPECT_EQ(j["destination_state"], "file") << j.dump();
}

// receive --listen URI: its report.
mvm::test::CmdResult restore(const std::string& uri)
{
    return run_minivmm(fmt::format("receive --listen {} {} --post-run 0.5 --json -", uri, kVm));
}

void expect_every_page_checked(const mvm::test::CmdResult& r)
{
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "completed") << j.dump();
    EXPECT_EQ(j["sender"]["security"], "file");
    EXPECT_TRUE(j["verify"]["enabled"].get<bool>()) << j.dump();
    // Every page of the layout: 2 x 32 MiB and the system slot.
    EXPECT_GT(j["verify"]["switchover_pages_checked"].get<uint64_t>(), 16384u) << j.dump();
    EXPECT_EQ(j["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
    EXPECT_GT(j["verify"]["pages_checked"].get<uint64_t>(), 0u);  // the stamps after the post-run
    EXPECT_EQ(j["verify"]["mismatches"].get<uint64_t>(), 0u);
    EXPECT_TRUE(j["downtime_guest_ms"].is_null()) << "a restore has no downtime to measure: " << j.dump();
}

}  // namespace

TEST(MigrateFile, PlainStreamRestoresWithEveryPageChecked)
{
    REQUIRE_KVM();
    TempDir d;
    const std::string f = d.file("guest.mig");
    save("file:" + f, "");
    expect_every_page_checked(restore("file:" + f));
    // The same file through run --restore.
    auto r = run_minivmm(fmt::format("run --restore file:{} {} --duration 0.5 --json -", f, kVm));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(parse(r.out)["verify"]["switchover_mismatches"].get<uint64_t>(), 0u);
}

// Mapped-ram: pages at fixed places, so the file stays within the guest's
// size however many rounds rewrote them; two writers; an offset leaves what
// lies before it alone.
TEST(MigrateFile, MappedRamStaysWithinTheGuestAndRestores)
{
    REQUIRE_KVM();
    TempDir d;
    const std::string f = d.file("guest.mig");
    const std::vector<uint8_t> marker(4096, 'X');
    {
        const int fd = ::open(f.c_str(), O_CREAT | O_WRONLY, 0600);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::write(fd, marker.data(), marker.size()), 4096);
        ::close(fd);
    }
    save(fmt::format("file:{},offset=4096", f), "--mapped-ram --channels 2 --max-downtime 1");
    EXPECT_EQ(read_at(f, 0, 4096), marker) << "the bytes before the offset changed";
    EXPECT_EQ(std::memcmp(read_at(f, 4096, 8).data(), "MVMMRAM1", 8), 0);
    // 64 MiB of nodes plus the system slot, their bitmaps, alignment and the tail.
    EXPECT_LT(file_size(f), 4096 + (64ull << 20) + (8ull << 20)) << "4 rounds must not grow a mapped-ram file";
    expect_every_page_checked(restore(fmt::format("file:{},offset=4096", f)));
}

// The restore's check can fail: a byte changed in a page the file holds is
// found (mapped-ram: the page against the source's digests; plain: the
// frame's checksum), and the restore fails with exit 5.
TEST(MigrateFile, DamagedPageIsFound)
{
    REQUIRE_KVM();
    TempDir d;
    const std::string f = d.file("guest.mig");
    save("file:" + f, "--mapped-ram");
    // The head: per memslot (from byte 32, 40 bytes each) slot, GPA, size, bitmap and pages offsets.
    const auto head = read_at(f, 0, 4096);
    const uint32_t n = get<uint32_t>(head, 12);
    ASSERT_GE(n, 2u);
    const size_t at = 32 + 40 * (n - 1);  // the last node's slot
    const uint64_t size = get<uint64_t>(head, at + 16), bitmap = get<uint64_t>(head, at + 24),
                   pages = get<uint64_t>(head, at + 32);
    const auto bits = read_at(f, bitmap, size / 4096 / 8);
    size_t page = SIZE_MAX;
    for (size_t i = 0; i < bits.size() * 8 && page == SIZE_MAX; i++)
        if ((bits[i / 8] >> (i % 8)) & 1)
            page = i;
    ASSERT_NE(page, SIZE_MAX) << "no page of the node's memory is in the file";
    auto byte = read_at(f, pages + page * 4096 + 100, 1);
    byte[0] ^= 0x5a;
    write_at(f, pages + page * 4096 + 100, byte.data(), 1);
    auto r = restore("file:" + f);
    EXPECT_EQ(r.exit_code, 5) << r.err;
    const auto j = parse(r.out);
    EXPECT_EQ(j["status"], "failed");
    EXPECT_GE(j["verify"]["switchover_mismatches"].get<uint64_t>(), 1u) << j.dump();
    EXPECT_NE(r.err.find("verification failed"), std::string::npos) << r.err;

    const std::string p = d.file("plain.mig");
    save("file:" + p, "");
    const uint64_t mid = file_size(p) / 2;
    auto b = read_at(p, mid, 1);
    b[0] ^= 0x5a;
    write_at(p, mid, b.data(), 1);
    auto rp = restore("file:" + p);
    EXPECT_EQ(rp.exit_code, 5) << rp.err;
    EXPECT_NE(rp.err.find("checksum"), std::string::npos) << rp.err;
}

// A file cut short, or a mapped-ram file whose migration never finished
// (its head's tail length still 0), is refused before the guest runs.
TEST(MigrateFile, TruncatedOrUnfinishedFileIsRefused)
{
    REQUIRE_KVM();
    TempDir d;
    const std::string p = d.file("plain.mig");
    save("file:" + p, "");
    ASSERT_EQ(::truncate(p.c_str(), static_cast<off_t>(file_size(p) / 2)), 0);
    auto r = restore("file:" + p);
    EXPECT_EQ(r.exit_code, 5) << r.err;
    EXPECT_NE(r.err.find("the file is truncated"), std::string::npos) << r.err;
    EXPECT_EQ(parse(r.out)["guest"], "never started");

    const std::string m = d.file("mapped.mig");
    save("file:" + m, "--mapped-ram");
    const uint64_t zero = 0;
    write_at(m, 24, &zero, sizeof zero);
    auto rm = restore("file:" + m);
    EXPECT_EQ(rm.exit_code, 5) << rm.err;
    EXPECT_NE(rm.err.find("is incomplete"), std::string::npos) << rm.err;
}
