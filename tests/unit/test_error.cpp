// Unit tests for vmm/kvm/error.hpp: message format and exit codes.
#include <gtest/gtest.h>

#include <cerrno>
#include <string>

#include "base/error.hpp"

namespace mvm {
namespace {

TEST(SysError, MessageFormat)
{
    SysError e("KVM_RUN", -1, EINVAL);
    EXPECT_STREQ(e.what(), "KVM_RUN failed, rc: -1 errno: 22 (Invalid argument)");
    EXPECT_EQ(e.err(), EINVAL);
    EXPECT_EQ(e.exit_code(), kExitFailure);
}

TEST(SysError, TwoArgumentFormImpliesRcMinusOne)
{
    SysError e("open /dev/kvm", ENOENT);
    EXPECT_STREQ(e.what(), "open /dev/kvm failed, rc: -1 errno: 2 (No such file or directory)");
    EXPECT_EQ(e.err(), ENOENT);
}

TEST(SysError, OtherReturnCodesAreShown)
{
    SysError e("pread of KVM stats data", 0, EIO);
    EXPECT_STREQ(e.what(), "pread of KVM stats data failed, rc: 0 errno: 5 (Input/output error)");
    SysError big("KVM_SET_USER_MEMORY_REGION2", -4096, EEXIST);
    EXPECT_STREQ(big.what(), "KVM_SET_USER_MEMORY_REGION2 failed, rc: -4096 errno: 17 (File exists)");
}

TEST(SysError, IsAnError)
{
    try {
        throw SysError("KVM_CREATE_VM", EBUSY);
    } catch (const Error& e) {
        EXPECT_EQ(e.exit_code(), kExitFailure);
        EXPECT_EQ(std::string(e.what()), "KVM_CREATE_VM failed, rc: -1 errno: 16 (Device or resource busy)");
        return;
    }
    FAIL() << "SysError was not caught as mvm::Error";
}

TEST(ErrnoText, KnownAndUnknown)
{
    EXPECT_EQ(errno_text(EINVAL), "Invalid argument");
    EXPECT_EQ(errno_text(ENOMEM), "Cannot allocate memory");
    EXPECT_EQ(errno_text(99999), "Unknown error 99999");
}

TEST(ErrorTypes, ExitCodes)
{
    EXPECT_EQ(Error("x").exit_code(), kExitFailure);
    EXPECT_EQ(Error("x", kExitMigration).exit_code(), kExitMigration);
    EXPECT_EQ(UsageError("bad --mem").exit_code(), kExitUsage);
    EXPECT_EQ(Unsupported("no guest_memfd").exit_code(), kExitUsage);
    EXPECT_EQ(KvmUnavailable("no /dev/kvm").exit_code(), kExitNoKvm);
    EXPECT_STREQ(UsageError("bad --mem").what(), "bad --mem");
}

TEST(ErrorTypes, ExitCodeValuesAreStable)
{
    // docs/exit-codes.md documents these numbers; scripts depend on them.
    EXPECT_EQ(kExitOk, 0);
    EXPECT_EQ(kExitFailure, 1);
    EXPECT_EQ(kExitUsage, 2);
    EXPECT_EQ(kExitMisplaced, 3);
    EXPECT_EQ(kExitNoKvm, 4);
    EXPECT_EQ(kExitMigration, 5);
}

}  // namespace
}  // namespace mvm
