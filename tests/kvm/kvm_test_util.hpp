// tests/kvm/kvm_test_util.hpp - helpers for tests against the real /dev/kvm.
#pragma once

#include <gtest/gtest.h>

#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "base/error.hpp"
#include "vmm/config.hpp"
#include "vmm/kvm/kvm.hpp"

// Where the built minivmm and the sources are: compiled into one file only
// (tests/kvm_test_paths.cpp), so every other test file compiles the same in
// any checkout and a fresh clone elsewhere hits ccache for all of them.
namespace mvm::test {
const char* minivmm_binary_path();
const char* fuzz_dir_path();
const char* source_dir_path();
}  // namespace mvm::test
#define MINIVMM_BINARY (::mvm::test::minivmm_binary_path())
#define MINIVMM_FUZZ_DIR (::mvm::test::fuzz_dir_path())
#define MINIVMM_SOURCE_DIR (::mvm::test::source_dir_path())

namespace mvm::test {

// The host's KVM, or nullptr with the reason in *why.
inline const Kvm* host_kvm(std::string* why)
{
    static std::unique_ptr<Kvm> kvm;
    static std::string reason;
    static bool tried = false;
    if (!tried) {
        tried = true;
        try {
            kvm = std::make_unique<Kvm>();
        } catch (const std::exception& e) {
            reason = e.what();
        }
    }
    *why = reason;
    return kvm.get();
}

// Empty when this host's KVM offers guest_memfd the way the gmem backing needs
// it (KVM_CAP_GUEST_MEMFD, flags MMAP|INIT_SHARED), else why not and where the
// gmem tests run instead. Our own host has lacked it since 2026-12-04.
inline std::string why_no_gmem(const Kvm& kvm)
{
    std::string why = check_gmem_support("backing gmem", kvm.cap(KVM_CAP_GUEST_MEMFD), kvm.cap(KVM_CAP_GUEST_MEMFD_FLAGS));
    if (!why.empty())
        why += "; the gmem tests run in the emulated host on Linux 7.x: scripts/test svm";
    return why;
}

// `gmem` where this host has it, else `other`, saying so once per test: for
// tests whose point is not guest_memfd itself but a second backing beside it.
inline const char* gmem_or(const Kvm& kvm, const char* other)
{
    if (why_no_gmem(kvm).empty())
        return "gmem";
    std::printf("no guest_memfd on this host: backing %s instead of gmem\n", other);
    return other;
}

// The whole of a file ("" if it cannot be read).
std::string read_file(const std::string& path);

struct CmdResult {
    int exit_code = -1;  // its exit status, or 128 + the signal that killed it
    std::string out, err;
    bool signaled = false;  // WIFSIGNALED of minivmm's own wait status
    int term_signal = 0;
};

// Runs the minivmm binary with `args` (shell words) and captures everything.
// `wrapper` (shell words, e.g. "env VAR=x" or "setpriv ...") runs it and must
// exec it: the wait status is minivmm's own, so a signal shows as one.
CmdResult run_minivmm(const std::string& args, const std::string& wrapper = "");

// A TCP port for a test's listener, different on every call.
uint16_t free_port();

// `minivmm receive ARGS` in the background; waits until it listens (or has
// exited). Killed, if still running, when it goes out of scope. `wrapper`
// as for run_minivmm (e.g. "env MINIVMM_TEST_DIE_IN=bulk").
struct Receiver {
    explicit Receiver(const std::string& args, const std::string& wrapper = "");
    ~Receiver();
    Receiver(const Receiver&) = delete;
    Receiver& operator=(const Receiver&) = delete;
    // Its exit code (128 + signal if killed by one), or -1 if it had to be
    // killed after 30 s; result() then has the whole of it.
    int wait();
    const CmdResult& result() const { return result_; }
    std::string output() const;  // stdout then stderr, so far

    pid_t pid = -1;

private:
    std::string out_path_, err_path_;
    CmdResult result_;
};

}  // namespace mvm::test

// Skips (with the reason printed) when /dev/kvm cannot be used.
#define REQUIRE_KVM()                                                \
    std::string kvm_why_;                                            \
    const ::mvm::Kvm* kvm_ptr_ = ::mvm::test::host_kvm(&kvm_why_);   \
    if (!kvm_ptr_)                                                   \
        GTEST_SKIP() << "needs /dev/kvm: " << kvm_why_;              \
    [[maybe_unused]] const ::mvm::Kvm& kvm = *kvm_ptr_

// REQUIRE_KVM() and guest_memfd as the gmem backing needs it, or a skip saying why.
#define REQUIRE_GMEM()                                                          \
    REQUIRE_KVM();                                                              \
    if (std::string gmem_why_ = ::mvm::test::why_no_gmem(kvm); !gmem_why_.empty()) \
        GTEST_SKIP() << gmem_why_
