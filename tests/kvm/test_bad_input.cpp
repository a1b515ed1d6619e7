// Bad input to every command, one row each: wrong types, out-of-range numbers,
// conflicting options, missing host resources (hugetlb pool, host node,
// /dev/kvm missing or not permitted, a busy port) and a receiver given a
// stream of another layout. Every row must end the same clean way (see
// expect_clean_refusal): the expected exit code, no signal, exactly one line
// on stderr naming the option or resource and the fix, nothing on stdout, no
// process left behind, hugetlb pools as they were, and output files untouched
// (not created, not truncated).
//
//   kvm_tests --gtest_filter='*BadInput*'         the whole matrix
//   kvm_tests --gtest_filter='Migrate/BadInput*'  one command's rows
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <glob.h>
#include <limits.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kvm_test_util.hpp"

using mvm::test::CmdResult;
using mvm::test::free_port;
using mvm::test::read_file;
using mvm::test::Receiver;
using mvm::test::run_minivmm;

namespace {

// Wrappers that take a host resource away.
const char* const kNoKvm = "env MINIVMM_KVM_DEVICE=/nonexistent/kvm";          // /dev/kvm missing
const char* const kNobody = "setpriv --reuid=65534 --regid=65534 --clear-groups";  // no permission on /dev/kvm

// What a row needs from the host to be a bad input at all (else it skips).
enum class Need { Nothing, NoGuestMemfd };

// One row. In args (and receiver): {existing} is a file that is already there
// with known content, {new} a file that is not, {nodir} a file in a directory
// that does not exist, {dir} a directory; {port} a free TCP port, {busy} one
// the test is listening on.
struct Row {
    std::string args;     // minivmm ARGS
    int exit_code;        // 2 usage, 4 no KVM, 5 migration refused
    std::string mention;  // the option or resource the one line names
    std::string fix;      // and (part of) how to fix it
    std::string wrapper{};   // runs minivmm (kNoKvm, kNobody)
    std::string receiver{};  // `minivmm receive` args, started first: the peer refuses too
    Need need = Need::Nothing;
};

std::ostream& operator<<(std::ostream& os, const Row& r)
{
    return os << (r.wrapper.empty() ? "" : r.wrapper + " ") << "minivmm " << r.args;
}

const std::string kKnown = "known content: bad input must leave this file alone\n";

std::string replace_all(std::string s, const std::string& from, const std::string& to)
{
    for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size()))
        s.replace(p, from.size(), to);
    return s;
}

// nr_hugepages of every pool, global and per node.
std::map<std::string, std::string> hugetlb_pools()
{
    std::map<std::string, std::string> pools;
    for (const char* pattern :
         {"/sys/kernel/mm/hugepages/*/nr_hugepages", "/sys/devices/system/node/node*/hugepages/*/nr_hugepages"}) {
        glob_t g{};
        if (glob(pattern, 0, nullptr, &g) == 0)
            for (size_t i = 0; i < g.gl_pathc; i++)
                pools[g.gl_pathv[i]] = read_file(g.gl_pathv[i]);
        globfree(&g);
    }
    return pools;
}

std::vector<pid_t> all_pids()
{
    std::vector<pid_t> pids;
    if (DIR* d = opendir("/proc")) {
        while (dirent* e = readdir(d))
            if (e->d_name[0] >= '1' && e->d_name[0] <= '9')
                pids.push_back(static_cast<pid_t>(std::atoi(e->d_name)));
        closedir(d);
    }
    return pids;
}

std::string exe_of(pid_t pid)
{
    char buf[PATH_MAX];
    ssize_t n = readlink(("/proc/" + std::to_string(pid) + "/exe").c_str(), buf, sizeof(buf) - 1);
    if (n <= 0)
        return {};
    std::string s(buf, static_cast<size_t>(n));
    const std::string deleted = " (deleted)";  // the binary was rebuilt under it
    if (s.size() > deleted.size() && s.compare(s.size() - deleted.size(), deleted.size(), deleted) == 0)
        s.resize(s.size() - deleted.size());
    return s;
}

pid_t parent_of(pid_t pid)
{
    std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
    auto paren = stat.rfind(')');  // the command name may hold spaces and parentheses
    if (paren == std::string::npos)
        return -1;
    std::istringstream rest(stat.substr(paren + 1));
    std::string state;
    pid_t ppid = -1;
    rest >> state >> ppid;
    return ppid;
}

// Processes running our minivmm binary, and processes (zombies too) whose
// parent is this test.
std::set<pid_t> minivmm_processes()
{
    static const std::string binary = [] {
        char buf[PATH_MAX];
        return std::string(realpath(MINIVMM_BINARY, buf) ? buf : MINIVMM_BINARY);
    }();
    std::set<pid_t> out;
    for (pid_t p : all_pids())
        if (exe_of(p) == binary)
            out.insert(p);
    return out;
}

std::set<pid_t> our_children()
{
    std::set<pid_t> out;
    for (pid_t p : all_pids())
        if (parent_of(p) == ::getpid())
            out.insert(p);
    return out;
}

std::string cmdline_of(pid_t pid)
{
    std::string s = read_file("/proc/" + std::to_string(pid) + "/cmdline");
    std::replace(s.begin(), s.end(), '\0', ' ');
    return std::to_string(pid) + ": " + s;
}

// A directory for the row's output files, holding {existing} with kKnown.
struct RowDir {
    std::string path;
    RowDir()
    {
        char tmpl[] = "/tmp/minivmm-badinput-XXXXXX";
        path = mkdtemp(tmpl);
        std::ofstream(path + "/existing.out", std::ios::binary) << kKnown;
    }
    ~RowDir() { std::filesystem::remove_all(path); }
    std::vector<std::string> entries() const
    {
        std::vector<std::string> v;
        for (const auto& e : std::filesystem::directory_iterator(path))
            v.push_back(e.path().filename().string());
        std::sort(v.begin(), v.end());
        return v;
    }
};

// A port somebody else already listens on.
struct BusyPort {
    int fd = -1;
    uint16_t port = 0;
    BusyPort()
    {
        fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        for (int i = 0; i < 20 && fd >= 0; i++) {
            sockaddr_in a{};
            a.sin_family = AF_INET;
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            a.sin_port = htons(port = free_port());
            if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 && ::listen(fd, 1) == 0)
                return;
        }
        port = 0;
    }
    ~BusyPort()
    {
        if (fd >= 0)
            ::close(fd);
    }
};

bool one_line(const std::string& s) { return std::count(s.begin(), s.end(), '\n') == 1 && s.back() == '\n'; }

uint64_t free_2m_pages()
{
    return std::strtoull(read_file("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").c_str(), nullptr, 10);
}

// The one line `who` printed on stderr names the option/resource and the fix.
void expect_one_clear_line(const std::string& who, const std::string& err, const Row& row)
{
    EXPECT_TRUE(one_line(err)) << who << " must print exactly one line on stderr, got:\n" << err;
    EXPECT_EQ(err.rfind("minivmm: ", 0), 0u) << who << ": " << err;
    EXPECT_NE(err.find(row.mention), std::string::npos) << who << " does not name '" << row.mention << "': " << err;
    EXPECT_NE(err.find(row.fix), std::string::npos) << who << " does not say the fix '" << row.fix << "': " << err;
}

// Every check, for every row.
void expect_clean_refusal(const Row& row)
{
    if (row.wrapper == kNobody) {
        if (geteuid() != 0)
            GTEST_SKIP() << "needs root to drop to uid 65534 (nobody)";
        if (std::system("command -v setpriv >/dev/null 2>&1") != 0)
            GTEST_SKIP() << "needs setpriv (util-linux)";
        struct stat st {};
        if (stat("/dev/kvm", &st) == 0 && (st.st_mode & S_IROTH) && (st.st_mode & S_IWOTH))
            GTEST_SKIP() << "/dev/kvm is world-accessible here; nobody would be allowed in";
    }
    if (row.fix.find("nr_hugepages") != std::string::npos && free_2m_pages() >= 64 * 512)
        GTEST_SKIP() << "the 2M hugetlb pool holds 64 GiB free here; the row asks for more than exists";

    RowDir dir;
    std::optional<BusyPort> busy;
    if ((row.args + row.receiver).find("{busy}") != std::string::npos) {
        busy.emplace();
        ASSERT_NE(busy->port, 0) << "no port to occupy";
    }
    const std::string port = std::to_string(free_port());
    auto expand = [&](std::string s) {
        s = replace_all(s, "{existing}", dir.path + "/existing.out");
        s = replace_all(s, "{new}", dir.path + "/new.out");
        s = replace_all(s, "{nodir}", dir.path + "/no-such-dir/out");
        s = replace_all(s, "{dir}", dir.path);
        if (busy)
            s = replace_all(s, "{busy}", std::to_string(busy->port));
        return replace_all(s, "{port}", port);
    };
    const auto pools_before = hugetlb_pools();
    const auto procs_before = minivmm_processes();

    std::optional<Receiver> receiver;
    if (!row.receiver.empty())
        receiver.emplace(expand(row.receiver));
    CmdResult r = run_minivmm(expand(row.args), row.wrapper);

    EXPECT_FALSE(r.signaled) << "killed by signal " << r.term_signal << "; stderr:\n" << r.err;
    EXPECT_EQ(r.exit_code, row.exit_code) << r.err;
    expect_one_clear_line("minivmm " + row.args, r.err, row);
    if (receiver) {
        // Refused at the header; the source says so and shows it kept its guest.
        EXPECT_NE(r.out.find("source: kept running (made progress)"), std::string::npos) << r.out;
        EXPECT_NE(r.out.find(", 0 mismatches"), std::string::npos) << r.out;
        receiver->wait();
        const CmdResult& rr = receiver->result();
        EXPECT_FALSE(rr.signaled) << "the receiver was killed by signal " << rr.term_signal << ":\n" << rr.err;
        EXPECT_EQ(rr.exit_code, 5) << rr.err;
        // Its stderr: the "listening on" line it printed before any input
        // arrived, then the refusal.
        const auto nl = rr.err.find('\n');
        ASSERT_NE(nl, std::string::npos) << rr.err;
        EXPECT_EQ(rr.err.rfind("receive: listening on", 0), 0u) << rr.err;
        expect_one_clear_line("the receiver", rr.err.substr(nl + 1), row);
    } else {
        EXPECT_EQ(r.out, "") << "bad input printed a report";
    }

    // No process left behind: none of ours, no minivmm that was not there before.
    std::vector<std::string> left;
    for (pid_t p : our_children())
        left.push_back(cmdline_of(p));
    for (pid_t p : minivmm_processes())
        if (!procs_before.count(p) && !(receiver && p == receiver->pid))
            left.push_back(cmdline_of(p));
    EXPECT_TRUE(left.empty()) << "left behind: " << ::testing::PrintToString(left);

    EXPECT_EQ(hugetlb_pools(), pools_before) << "a hugetlb pool changed";
    // Files: the existing one byte for byte, nothing created.
    EXPECT_EQ(read_file(dir.path + "/existing.out"), kKnown) << "bad input clobbered an existing output file";
    EXPECT_EQ(dir.entries(), std::vector<std::string>{"existing.out"}) << "bad input created files";
}

class BadInput : public ::testing::TestWithParam<Row> {};

std::string row_name(const ::testing::TestParamInfo<Row>& info)
{
    const Row& r = info.param;
    std::string words = r.args.substr(std::min(r.args.size(), r.args.find(' ') + 1));  // without the command
    if (r.args.find(' ') == std::string::npos)
        words = r.args;
    if (r.args.empty())
        words = "no_command";
    if (!r.receiver.empty())
        words = "other_layout " + words;
    if (r.wrapper == kNoKvm)
        words = "no_dev_kvm " + words;
    else if (r.wrapper == kNobody)
        words = "kvm_permission " + words;
    std::string n = std::to_string(info.index) + "_";
    for (char c : words)
        if (std::isalnum(static_cast<unsigned char>(c)))
            n += c;
        else if (n.back() != '_')
            n += '_';
    while (n.back() == '_')
        n.pop_back();
    return n.substr(0, 60);
}

}  // namespace

TEST_P(BadInput, ExitsCleanlyWithOneLineNamingItAndTheFix)
{
    REQUIRE_KVM();
    if (GetParam().need == Need::NoGuestMemfd && kvm.cap(KVM_CAP_GUEST_MEMFD) > 0)
        GTEST_SKIP() << "this kernel has guest_memfd; the message for one without it is covered by "
                        "GmemCheck.KernelWithoutGuestMemfdOrItsMmapGetsOneLine";
    expect_clean_refusal(GetParam());
}

// Before any command: none, an unknown one.
INSTANTIATE_TEST_SUITE_P(
    AnyCommand, BadInput,
    ::testing::Values(Row{"", 2, "A subcommand is required", "minivmm --help"},
                      Row{"frobnicate", 2, "unknown command 'frobnicate'", "minivmm --help"},
                      Row{"--frobnicate caps", 2, "--frobnicate", "minivmm --help"}),
    row_name);

// caps takes one number (--probe-ring-reset SECONDS) and nothing that can
// conflict: a wrong type, options it does not take, and the host's KVM.
INSTANTIATE_TEST_SUITE_P(
    Caps, BadInput,
    ::testing::Values(Row{"caps --json /nonexistent/dir/caps.json", 2, "--json", "writable path"},
                      Row{"caps --vcpus 2", 2, "--vcpus", "minivmm caps --help"},
                      Row{"caps extra", 2, "extra", "minivmm caps --help"},
                      Row{"caps --probe-ring-reset soon", 2, "--probe-ring-reset", "seconds"},
                      Row{"caps --probe-ring-reset 0", 2, "--probe-ring-reset", "(0, 600]"},
                      Row{"caps --json", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
                      Row{"caps", 4, "no permission to open /dev/kvm", "add your user to the group", kNobody}),
    row_name);

INSTANTIATE_TEST_SUITE_P(
    Run, BadInput,
    ::testing::Values(
        // wrong types
        Row{"run --vcpus two", 2, "--vcpus", "whole number"},
        Row{"run --vcpus -1", 2, "--vcpus", "whole number"},
        Row{"run --mem lots", 2, "--mem", "not a size"},
        Row{"run --duration soon", 2, "--duration", "seconds"},
        Row{"run --rate fast", 2, "--rate", "whole number"},
        Row{"run --passes many", 2, "--passes", "whole number"},
        Row{"run --uuid 1234", 2, "--uuid", "8-4-4-4-12 hex digits"},
        Row{"run --pattern zigzag", 2, "--pattern", "seq or random"},
        Row{"run --touch byte", 2, "--touch", "qword or page"},
        Row{"run --backing tmpfs", 2, "--backing", "anon|shm"},
        Row{"run --access sideways", 2, "--access", "mixed:P"},
        Row{"run --dirty-log sometimes", 2, "--dirty-log", "bitmap or ring"},
        Row{"run --numa cpus=0,mem=64M,colour=red", 2, "unknown key 'colour'", "host-nodes"},
        Row{"run --no-such-option", 2, "--no-such-option", "minivmm run --help"},
        // out of range
        Row{"run --vcpus 0", 2, "--vcpus", "at least 1"},
        Row{"run --vcpus 5000", 2, "--vcpus", "limit of 1024"},  // minivmm's own, checked before /dev/kvm is opened
        Row{"run --mem 1000", 2, "--mem", "multiple of 4 KiB"},
        Row{"run --mem 12345K", 2, "--mem", "multiple of 4 KiB"},
        Row{"run --mem 4K --vcpus 2", 2, "--mem", "too small"},
        Row{"run --mem 3M --backing hugetlb2m", 2, "--mem", "page size 2M"},
        Row{"run --write-pct 150", 2, "--write-pct", "0..100"},
        Row{"run --watchdog-ms 0", 2, "--watchdog-ms", "positive"},
        Row{"run --watchdog-ms 0.02", 2, "--watchdog-ms", "write 0.02ms, or 0.02s"},
        Row{"run --watchdog-ms 20 minutes", 2, "minutes", "minivmm run --help"},
        Row{"run --dirty-log ring --ring 3000", 2, "--ring 3000", "power of two"},
        // conflicting
        Row{"run --duration 0", 2, "--duration", "unless --passes"},
        Row{"run --restore file:/nonexistent/g.mig", 2, "--restore", "No such file"},
        Row{"run --restore tcp:127.0.0.1:4444", 2, "--restore", "is not file:PATH"},
        Row{"run --restore file:{dir}/existing.out --dirty-log bitmap", 2, "--dirty-log", "not with --restore"},
        Row{"run --ring 64K", 2, "--ring", "--dirty-log ring"},
        Row{"run --numa cpus=0-1,mem=64M --numa cpus=1,mem=64M", 2, "vCPU 1 is already in virtual node 0",
            "must not overlap"},
        Row{"run --numa cpus=0,mem=64M --numa cpus=1,mem=64M --mem 1G", 2, "--mem 1G differs", "drop --mem"},
        Row{"run --numa cpus=0-1,mem=64M --access remote", 2, "--access remote", "at least 2 virtual nodes"},
        // host resources
        Row{"run --mem 64T", 2, "available memory", "smaller --mem"},
        Row{"run --mem 64G --backing hugetlb2m", 2, "--mem: hugetlb needs 32768 free 2M pages",
            "raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages by"},
        Row{"run --numa cpus=0-1,mem=64G,backing=hugetlb2m", 2, "--numa #1", "nr_hugepages by"},
        Row{"run --numa mem=64M,host-nodes=63", 2, "host node 63 does not exist", "host-nodes= within"},
        Row{"run --numa cpus=0-1,mem=64M,host-cpus=4000", 2, "host CPU 4000 does not exist", "host-cpus= within"},
        Row{"run --backing gmem --mem 64M", 2, "guest_memfd", "use another backing", {}, {}, Need::NoGuestMemfd},
        Row{"run --duration 1", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
        Row{"run --duration 1", 4, "no permission to open /dev/kvm", "add your user to the group", kNobody},
        // output files
        Row{"run --json {existing} --vcpus two", 2, "--vcpus", "whole number"},
        Row{"run --json {new} --mem lots", 2, "--mem", "not a size"},
        Row{"run --json {nodir}", 2, "--json", "writable path"},
        Row{"run --json {dir}", 2, "Is a directory", "writable path"}),
    row_name);

INSTANTIATE_TEST_SUITE_P(
    NumaCheck, BadInput,
    ::testing::Values(
        Row{"numa-check --sample many", 2, "--sample", "whole number"},
        Row{"numa-check --vcpus two", 2, "--vcpus", "whole number"},
        Row{"numa-check --numa node=99,mem=64M", 2, "--numa #1 node", "0..15"},
        Row{"numa-check --numa cpus=0-1,mem=3M,backing=hugetlb2m", 2, "not a multiple of the hugetlb2m page size",
            "use e.g. 4M"},
        Row{"numa-check --numa mem=64M,policy=interleave", 2, "policy=interleave needs host-nodes=", "host-nodes=0"},
        Row{"numa-check --numa mem=64M,host-cpus=0 --numa cpus=0-1,mem=64M", 2, "host-cpus= given for a node without "
            "vCPUs", "drop host-cpus="},
        Row{"numa-check --numa cpus=0-1,mem=64G,backing=hugetlb2m,host-nodes=0", 2, "on host node 0",
            "raise /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages by"},
        Row{"numa-check --numa mem=64M,host-nodes=63", 2, "host node 63 does not exist", "host-nodes= within"},
        Row{"numa-check", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
        Row{"numa-check", 4, "no permission to open /dev/kvm", "add your user to the group", kNobody},
        Row{"numa-check --json {existing} --sample -1", 2, "--sample", "whole number"},
        Row{"numa-check --json {nodir}", 2, "--json", "writable path"}),
    row_name);

INSTANTIATE_TEST_SUITE_P(
    DirtyLogPerf, BadInput,
    ::testing::Values(Row{"dirty-log-perf -v two", 2, "-v", "whole number"},
                      Row{"dirty-log-perf -s tmpfs", 2, "-s", "unknown backing"},
                      Row{"dirty-log-perf --eager-split maybe", 2, "--eager-split", "on or off"},
                      Row{"dirty-log-perf -b 10", 2, "-b", "4 KiB"},
                      Row{"dirty-log-perf -i 0", 2, "-i", "1.."},
                      Row{"dirty-log-perf -w 101", 2, "-w", "0..100"},
                      Row{"dirty-log-perf --ring 3000", 2, "--ring 3000", "power of two"},
                      Row{"dirty-log-perf --ring 64M", 2, "--ring 64M", "power of two"},
                      Row{"dirty-log-perf --clear-chunk 100K", 2, "--clear-chunk", "256K"},
                      Row{"dirty-log-perf -s gmem", 2, "-s gmem", "cannot be dirty-logged"},
                      Row{"dirty-log-perf -g --clear-chunk 1M", 2, "--clear-chunk", "drop -g"},
                      Row{"dirty-log-perf --ring 64K -g", 2, "--ring", "drop them with --ring"},
                      Row{"dirty-log-perf -b 64G -s hugetlb2m", 2, "-b: hugetlb needs",
                          "raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages by"},
                      Row{"dirty-log-perf -b 64T", 2, "-b: 64T of guest memory exceeds the host's available memory",
                          "use a smaller -b"},
                      Row{"dirty-log-perf", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
                      Row{"dirty-log-perf", 4, "no permission to open /dev/kvm", "add your user to the group", kNobody},
                      Row{"dirty-log-perf --json {existing} -w 101", 2, "-w", "0..100"},
                      Row{"dirty-log-perf --json {nodir}", 2, "--json", "writable path"}),
    row_name);

INSTANTIATE_TEST_SUITE_P(
    DirtyRate, BadInput,
    ::testing::Values(Row{"dirty-rate --mode psychic", 2, "--mode", "ring, bitmap or sampling"},
                      Row{"dirty-rate --period soon", 2, "--period", "seconds"},
                      Row{"dirty-rate --period 0", 2, "--period", "positive"},
                      Row{"dirty-rate --sample-pages 0", 2, "--sample-pages", "1..262144"},
                      Row{"dirty-rate --mode ring --ring 3000", 2, "--ring 3000", "power of two"},
                      Row{"dirty-rate --mode bitmap --ring 64K", 2, "--ring", "--mode ring"},
                      Row{"dirty-rate --mem 64G --backing hugetlb2m", 2, "--mem: hugetlb needs",
                          "raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages by"},
                      Row{"dirty-rate --numa mem=64M,host-nodes=63", 2, "host node 63 does not exist",
                          "host-nodes= within"},
                      Row{"dirty-rate", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
                      Row{"dirty-rate", 4, "no permission to open /dev/kvm", "add your user to the group", kNobody},
                      Row{"dirty-rate --json {existing} --mode psychic", 2, "--mode", "ring, bitmap or sampling"},
                      Row{"dirty-rate --json {nodir}", 2, "--json", "writable path"}),
    row_name);

INSTANTIATE_TEST_SUITE_P(
    Migrate, BadInput,
    ::testing::Values(Row{"migrate", 2, "--to", "inproc, tcp:HOST:PORT, unix:PATH, fd:N or file:PATH"},
                      Row{"migrate --to udp:1.2.3.4:5", 2, "--to", "tcp:HOST:PORT, unix:PATH, fd:N or file:PATH"},
                      Row{"migrate --to file:/nonexistent/g.mig", 2, "--to", "cannot write in /nonexistent"},
                      Row{"migrate --to file:", 2, "--to", "names no file"},
                      Row{"migrate --to file:{dir}/g.mig,offset=0x20M", 2, "--to: offset=BYTES", "bad offset 0x20M"},
                      Row{"migrate --to file:{dir}/g.mig,size=4", 2, "--to", "only option of a file URI is offset"},
                      Row{"migrate --to inproc --mapped-ram", 2, "--mapped-ram", "only with --to file:PATH"},
                      Row{"migrate --to file:{dir}/g.mig --direct-io", 2, "--direct-io", "needs --mapped-ram"},
                      Row{"migrate --to file:{dir}/g.mig --postcopy", 2, "--postcopy", "no return path"},
                      Row{"migrate --to inproc --postcopy-recover 5", 2, "--postcopy-recover", "only with --postcopy"},
                      Row{"migrate --to inproc --postcopy-preempt", 2, "--postcopy-preempt", "only with --postcopy"},
                      Row{"migrate --to inproc --postcopy --postcopy-preempt", 2, "--postcopy-preempt",
                          "no room for a second connection"},
                      Row{"migrate --to inproc --postcopy --postcopy-recover 5", 2, "--postcopy-recover",
                          "use tcp:HOST:PORT or unix:PATH"},
                      Row{"migrate --to inproc --postcopy --postcopy-recover -1", 2, "--postcopy-recover",
                          "not a duration"},
                      Row{"migrate --to file:{dir}/g.mig --channels 2", 2, "--channels 2", "need --mapped-ram"},
                      Row{"migrate --to file:{dir}/g.mig --mapped-ram --compress zstd", 2, "--compress",
                          "uncompressed"},
                      Row{"migrate --to file:{dir}/g.mig --tls-creds psk:{existing}", 2, "--tls-creds",
                          "not a connection"},
                      Row{"migrate --to fd:abc", 2, "--to", "fd:N with N a file descriptor number"},
                      Row{"migrate --to fd:987", 2, "--to", "not an open stream socket"},
                      Row{"migrate --to unix:", 2, "--to", "unix:PATH with a path"},
                      Row{"migrate --to unix:/tmp/minivmm-no-such.sock --tls-creds x509:{dir}", 2, "--tls-creds",
                          "give --tls-hostname"},
                      Row{"migrate --to inproc --tracker psychic", 2, "--tracker", "ring or bitmap"},
                      Row{"migrate --to inproc --throttle slow", 2, "--throttle", "auto-converge"},
                      Row{"migrate --to inproc --channels two", 2, "--channels", "0..64"},
                      Row{"migrate --to inproc --bandwidth fast", 2, "--bandwidth", "K/M/G suffix"},
                      Row{"migrate --to inproc --max-downtime 0.3", 2, "--max-downtime", "write 0.3ms, or 0.3s"},
                      Row{"migrate --to inproc --max-downtime 300 ms", 2, "ms", "minivmm migrate --help"},
                      Row{"migrate --to tcp:127.0.0.1:99999", 2, "--to", "1..65535"},
                      Row{"migrate --to inproc --channels 65", 2, "--channels", "0..64"},
                      Row{"migrate --to inproc --max-iterations 0", 2, "--max-iterations", "1..100000"},
                      Row{"migrate --to inproc --timeout 0", 2, "--timeout", "must be positive"},
                      Row{"migrate --to inproc --throttle dirty-limit:0", 2, "--throttle dirty-limit", "1.."},
                      Row{"migrate --to inproc --tracker ring --ring 3000", 2, "--ring 3000", "power of two"},
                      Row{"migrate --to inproc --ring 64K", 2, "--ring", "--tracker ring"},
                      Row{"migrate --to inproc --mem 64G --backing hugetlb2m", 2, "--mem: hugetlb needs",
                          "raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages by"},
                      Row{"migrate --to inproc --numa mem=64M,host-nodes=63", 2, "host node 63 does not exist",
                          "host-nodes= within"},
                      Row{"migrate --to inproc", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
                      Row{"migrate --to inproc", 4, "no permission to open /dev/kvm", "add your user to the group",
                          kNobody},
                      Row{"migrate --to inproc --json {existing} --tracker psychic", 2, "--tracker", "ring or bitmap"},
                      Row{"migrate --to inproc --json {nodir}", 2, "--json", "writable path"},
                      // TLS and the link (docs/tls.md)
                      Row{"migrate --to tcp:127.0.0.1:{port} --tls-creds foo:/x", 2, "--tls-creds",
                          "neither x509:DIR nor psk:FILE"},
                      Row{"migrate --to tcp:127.0.0.1:{port} --tls-creds x509:/nonexistent", 2,
                          "/nonexistent/ca-cert.pem is missing", "scripts/make-tls-creds"},
                      Row{"migrate --to tcp:127.0.0.1:{port} --tls-creds psk:{existing}", 2, "--tls-creds psk:",
                          "'username:hexkey'"},
                      Row{"migrate --to inproc --tls-creds x509:/nonexistent", 2, "--tls-creds",
                          "--to tcp:HOST:PORT"},
                      Row{"migrate --to tcp:127.0.0.1:{port} --tls-hostname dst.example", 2, "--tls-hostname",
                          "needs --tls-creds x509:DIR"},
                      Row{"migrate --to tcp:127.0.0.1:{port} --tls-authz CN=x", 2, "--tls-authz",
                          "minivmm migrate --help"},
                      Row{"migrate --to tcp:127.0.0.1:{port} --io-timeout 0", 2, "--io-timeout", "must be positive"},
                      Row{"migrate --to tcp:127.0.0.1:{port} --io-timeout soon", 2, "--io-timeout",
                          "not a duration"}),
    row_name);

INSTANTIATE_TEST_SUITE_P(
    Receive, BadInput,
    ::testing::Values(
        Row{"receive", 2, "--listen", "tcp:ADDR:PORT"},
        Row{"receive --listen tcp:nowhere:1", 2, "--listen", "IPv4 address"},
        Row{"receive --listen fd:987", 2, "--listen", "not an open stream socket"},
        Row{"receive --listen file:/nonexistent/g.mig", 2, "--listen", "No such file"},
        Row{"receive --listen file:{dir}", 2, "--listen", "not a regular file"},
        Row{"receive --listen tcp:127.0.0.1:{port} --postcopy-recover 1x", 2, "--postcopy-recover", "not a duration"},
        Row{"receive --listen tcp:127.0.0.1:{port} --timeout soon", 2, "--timeout", "seconds"},
        Row{"receive --listen tcp:127.0.0.1:{port} --vcpus two", 2, "--vcpus", "whole number"},
        Row{"receive --listen tcp:127.0.0.1:99999", 2, "--listen", "1..65535"},
        Row{"receive --listen unix:/nonexistent-dir/m.sock", 2, "--listen unix:", "writable directory"},
        Row{"receive --listen tcp:127.0.0.1:{port} --timeout 0", 2, "--timeout", "must be positive"},
        Row{"receive --listen tcp:127.0.0.1:{busy} --mem 64M", 2, "Address already in use", "pick a free port"},
        Row{"receive --listen tcp:127.0.0.1:{port} --mem 64G --backing hugetlb2m", 2, "--mem: hugetlb needs",
            "raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages by"},
        Row{"receive --listen tcp:127.0.0.1:{port} --numa mem=64M,host-nodes=63", 2, "host node 63 does not exist",
            "host-nodes= within"},
        Row{"receive --listen tcp:127.0.0.1:{port}", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
        Row{"receive --listen tcp:127.0.0.1:{port}", 4, "no permission to open /dev/kvm", "add your user to the group",
            kNobody},
        Row{"receive --listen tcp:127.0.0.1:{port} --json {existing} --post-run x", 2, "--post-run", "seconds"},
        Row{"receive --listen tcp:127.0.0.1:{port} --json {nodir}", 2, "--json", "writable path"},
        // TLS and the link (docs/tls.md)
        Row{"receive --listen tcp:127.0.0.1:{port} --tls-creds x509", 2, "--tls-creds", "neither x509:DIR nor psk:FILE"},
        Row{"receive --listen tcp:127.0.0.1:{port} --tls-creds x509:/nonexistent", 2,
            "/nonexistent/ca-cert.pem is missing", "scripts/make-tls-creds"},
        Row{"receive --listen tcp:127.0.0.1:{port} --tls-creds psk:/nonexistent/keys.psk", 2, "cannot read the file",
            "scripts/make-tls-creds --psk"},
        Row{"receive --listen tcp:127.0.0.1:{port} --tls-authz CN=x", 2, "--tls-authz", "needs --tls-creds"},
        Row{"receive --listen tcp:127.0.0.1:{port} --io-timeout 0", 2, "--io-timeout", "must be positive"},
        Row{"receive --listen tcp:127.0.0.1:{port} --io-timeout soon", 2, "--io-timeout", "not a duration"},
        // A stream of another layout: a 128M sender, a 64M receiver. Both refuse
        // at the header, before any memory moves; the sender keeps its guest.
        Row{"migrate --to tcp:127.0.0.1:{port} --mem 128M --warmup 0", 5, "memslot 1 differs",
            "start receive with the same --mem/--numa", {}, "--listen tcp:127.0.0.1:{port} --mem 64M"}),
    row_name);

INSTANTIATE_TEST_SUITE_P(
    Lockup, BadInput,
    ::testing::Values(Row{"lockup --steady soon", 2, "--steady", "seconds"},
                      Row{"lockup --vcpus two", 2, "--vcpus", "whole number"},
                      Row{"lockup --variants bitmap,teleport", 2, "--variants: unknown variant 'teleport'", "use some of"},
                      Row{"lockup --variants nosuch", 2, "--variants: unknown variant 'nosuch'", "use some of"},
                      Row{"lockup --variants ''", 2, "--variants: unknown variant ''", "use some of"},
                      Row{"lockup --threshold-ms 0", 2, "--threshold-ms", "positive"},
                      Row{"lockup --harvest-ms 0", 2, "--harvest-ms", "positive"},
                      Row{"lockup --clear-chunk 100K", 2, "--clear-chunk", "multiple of 256K"},
                      Row{"lockup --ring 3000", 2, "--ring 3000", "power of two"},
                      Row{"lockup --variants bitmap,bitmap", 2, "--variants: 'bitmap' is listed twice",
                          "list each variant once"},
                      Row{"lockup --mem 64G --backing hugetlb2m", 2, "--mem: hugetlb needs",
                          "raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages by"},
                      Row{"lockup --numa mem=64M,host-nodes=63", 2, "host node 63 does not exist", "host-nodes= within"},
                      Row{"lockup", 4, "/nonexistent/kvm does not exist", "load the kvm module", kNoKvm},
                      Row{"lockup", 4, "no permission to open /dev/kvm", "add your user to the group", kNobody},
                      Row{"lockup --timeline {existing} --steady soon", 2, "--steady", "seconds"},
                      Row{"lockup --timeline {new} --threshold-ms 0", 2, "--threshold-ms", "positive"},
                      Row{"lockup --json {existing} --ring 3000", 2, "--ring 3000", "power of two"},
                      Row{"lockup --timeline {nodir}", 2, "--timeline", "writable path"},
                      Row{"lockup --timeline {dir}", 2, "Is a directory", "writable path"}),
    row_name);
