#include "kvm_test_util.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>
#include <unistd.h>

namespace mvm::test {

std::string read_file(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

static void decode_status(int st, CmdResult& r)
{
    r.signaled = WIFSIGNALED(st);
    r.term_signal = r.signaled ? WTERMSIG(st) : 0;
    r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

CmdResult run_minivmm(const std::string& args, const std::string& wrapper)
{
    char out_path[] = "/tmp/minivmm-test-out-XXXXXX";
    char err_path[] = "/tmp/minivmm-test-err-XXXXXX";
    int o = mkstemp(out_path), e = mkstemp(err_path);
    close(o);
    close(e);
    // exec: the shell becomes minivmm (or the wrapper that execs it), so the
    // status system() returns is minivmm's, not a shell's 128 + signal.
    std::string cmd = "exec " + (wrapper.empty() ? "" : wrapper + " ") + MINIVMM_BINARY + " " + args + " >" +
                      out_path + " 2>" + err_path + " </dev/null";
    int st = std::system(cmd.c_str());
    CmdResult r;
    decode_status(st, r);
    r.out = read_file(out_path);
    r.err = read_file(err_path);
    unlink(out_path);
    unlink(err_path);
    return r;
}

uint16_t free_port()
{
    static std::atomic<uint16_t> next{static_cast<uint16_t>(20000 + (::getpid() % 20000))};
    return next++;
}

Receiver::Receiver(const std::string& args, const std::string& wrapper)
{
    char out[] = "/tmp/minivmm-recv-out-XXXXXX", err[] = "/tmp/minivmm-recv-err-XXXXXX";
    int o = mkstemp(out), e = mkstemp(err);
    out_path_ = out;
    err_path_ = err;
    pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives the test binary, even one that was killed
        dup2(o, 1);
        dup2(e, 2);
        int null = open("/dev/null", O_RDONLY);
        dup2(null, 0);
        const std::string cmd = "exec " + (wrapper.empty() ? "" : wrapper + " ") + MINIVMM_BINARY + " receive " + args;
        execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
        _exit(127);
    }
    close(o);
    close(e);
    // Listening, or reading a connected socket (it says so on stderr), or already gone.
    for (int i = 0; i < 200; i++) {
        const std::string said = read_file(err_path_);
        if (said.find("listening on") != std::string::npos ||
            said.find("reading the connected socket") != std::string::npos)
            break;
        int st = 0;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            decode_status(st, result_);
            pid = -1;
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
}

int Receiver::wait()
{
    for (int i = 0; pid > 0 && i < 300; i++) {
        int st = 0;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            decode_status(st, result_);
            pid = -1;
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
        pid = -1;
        result_.exit_code = -1;
    }
    result_.out = read_file(out_path_);
    result_.err = read_file(err_path_);
    return result_.exit_code;
}

std::string Receiver::output() const { return read_file(out_path_) + read_file(err_path_); }

Receiver::~Receiver()
{
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
    }
    unlink(out_path_.c_str());
    unlink(err_path_.c_str());
}

}  // namespace mvm::test
