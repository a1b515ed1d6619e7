// tests/kvm/kvm_test_util.hpp - helpers for tests against the real /dev/kvm.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "vmm/kvm/error.hpp"
#include "vmm/kvm/kvm.hpp"

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

struct CmdResult {
    int exit_code;
    std::string out, err;
};

// Runs the minivmm binary with `args` (shell words) and captures everything.
CmdResult run_minivmm(const std::string& args);

}  // namespace mvm::test

// Skips (with the reason printed) when /dev/kvm cannot be used.
#define REQUIRE_KVM()                                                \
    std::string kvm_why_;                                            \
    const ::mvm::Kvm* kvm_ptr_ = ::mvm::test::host_kvm(&kvm_why_);   \
    if (!kvm_ptr_)                                                   \
        GTEST_SKIP() << "needs /dev/kvm: " << kvm_why_;              \
    [[maybe_unused]] const ::mvm::Kvm& kvm = *kvm_ptr_
