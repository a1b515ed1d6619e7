// migration/file.hpp - a migration to a file and back (QEMU's file: URI and
// its mapped-ram capability). The sender writes what it would send to a
// receiver, less what needs an answer; the guest runs again wherever the file
// is restored (receive --listen file:, run --restore, QMP migrate-incoming),
// and that side checks every page against the digests of the source's frozen
// memory the file ends with, as a live destination does.
//
// Two layouts, told apart by their first bytes (both start at the URI's
// offset; what lies before it is left alone):
//  stream      the migration stream (stream.hpp) as one channel: HELLO, HEADER,
//              PAGES of the bulk pass and of every pre-copy round (a later
//              copy of a page overrides an earlier one), CHANNEL_DONE, VCPU...,
//              END, DIGESTS. The file grows with the rounds.
//  mapped-ram  every page at a fixed place, as QEMU's mapped-ram: a 4 KiB head
//              (magic "MVMMRAM1", version, where the tail is and how long;
//              per memslot its GPA, size, and where its bitmap and pages are),
//              per memslot a bitmap (set: the page is in the file; clear: a
//              zero page) and its pages, rewritten in place when dirtied again
//              (the file never outgrows the guest; multifd channels write their
//              own pages side by side; direct-io writes them with O_DIRECT);
//              then the tail: HELLO, HEADER, CHANNEL_DONE, VCPU..., END,
//              DIGESTS. The head's tail length is written last: 0 means the
//              migration that wrote the file did not finish.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/fd.hpp"
#include "migration/destination.hpp"
#include "migration/receiver.hpp"

namespace mvm::migration {

struct FileUri {
    std::string path;     // file:PATH
    int fd = -1;          // fd:N naming an open regular file
    uint64_t offset = 0;  // where the migration starts in the file
    bool has_offset = false;  // fd:N without one: from its current position, nothing truncated
    std::string str() const;
};

// file:PATH[,offset=BYTES] (BYTES: a number, 0x hex, or with a K/M/G suffix),
// or fd:N[,offset=BYTES] when N is an open regular file (QMP's fdsets resolve
// to one); nullopt for anything else. Throws UsageError naming `option` for a
// bad path or offset.
std::optional<FileUri> parse_file_uri(const std::string& option, const std::string& spec);
// A file URI whose file cannot be read (missing, not a file): UsageError
// naming `option`, before anything is allocated for the restore.
void check_restorable(const std::string& option, const FileUri& f);

// A file as a transport at a running position (pread/pwrite): the sender's
// records, or the restore's reading with the receiver's answers dropped (a
// file has no one to answer to).
class FileTransport : public Transport {
public:
    FileTransport(int fd, uint64_t pos, std::string name, bool drop_writes = false)
        : fd_(fd), pos_(pos), name_(std::move(name)), drop_writes_(drop_writes)
    {
    }
    void write_all(const void* data, size_t len) override;
    void read_exact(void* data, size_t len) override;
    void writev_all(std::span<const iovec> iov) override;
    void readv_exact(std::span<const iovec> iov) override;
    uint64_t pos() const { return pos_; }

private:
    int fd_;  // not owned
    uint64_t pos_;
    std::string name_;
    bool drop_writes_;
};

struct FileOptions {
    bool mapped_ram = false;  // QEMU's mapped-ram capability
    bool direct_io = false;   // QEMU's direct-io parameter (mapped-ram only): page data written with O_DIRECT
};

// The sender's destination for a file URI.
class FileDestination : public Destination {
public:
    // Throws UsageError when the options do not fit (direct-io without
    // mapped-ram or at an offset not 4 KiB-aligned, compression with it).
    FileDestination(StressVm& src, FileUri uri, Compression c, FileOptions f);
    ~FileDestination() override;
    void open(const StreamHeader& h) override;
    void send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros) override;
    ResultRecord switchover(const std::vector<VcpuState>& states) override;
    ResultRecord verify(const PageHashes* source) override;
    ResultRecord finish() override;
    void abort() override;
    void enter_phase(const char* phase) override;
    PageCounts page_counts() const override;
    bool one_way() const override { return true; }
    void begin_postcopy(const std::vector<VcpuState>&, std::span<const uint64_t>) override;
    ResultRecord postcopy_resumed() override;
    bool requests(std::vector<uint64_t>&, std::chrono::milliseconds) override;
    ResultRecord end_postcopy() override;

private:
    struct SlotArea {
        const MemoryRegion* r = nullptr;
        uint64_t bitmap_off = 0, pages_off = 0;  // from the URI's offset
        std::unique_ptr<std::atomic<uint64_t>[]> bits;
        uint64_t words = 0;
    };
    void open_mapped_ram();
    void send_mapped(std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros);
    void write_run(SlotArea& a, uint64_t first, uint64_t n);
    void write_head(uint64_t tail_bytes);
    SlotArea& area_of(uint64_t gpa);

    StressVm& src_;
    FileUri uri_;
    Compression compression_;
    FileOptions opt_;
    UniqueFd fd_, direct_fd_;
    std::unique_ptr<FileTransport> out_;  // the stream (mapped-ram: its tail)
    std::mutex mu_;                       // the stream's writers (one record at a time)
    std::unique_ptr<PageEncoder> enc_;
    std::atomic<bool> frozen_{false};
    std::vector<SlotArea> areas_;
    uint64_t tail_off_ = 0, data_pages_ = 0;
    std::atomic<uint64_t> mapped_pages_{0}, mapped_zeros_{0};
};

// The restore: the guest in the file at `f` into `dst` (made with the same VM
// options, not started), checked as a live destination checks a migration,
// then run and checked as receive() does (opt.listen is the file's URI).
ReceiveReport restore_file(StressVm& dst, const FileUri& f, const ReceiveOptions& opt, const PhaseHook& on_phase);

}  // namespace mvm::migration
