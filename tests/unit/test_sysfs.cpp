// One answer to "may this process change that kernel parameter?" (issue 29's
// first figure: caps said writable where the parameter file is 0444).
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "base/sysfs.hpp"

TEST(ParamFileWritable, TheModeDecidesEvenForRoot)
{
    char dir[] = "/tmp/minivmm-sysfs-XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    const std::string ro = std::string(dir) + "/ro", rw = std::string(dir) + "/rw";
    std::ofstream(ro) << "Y\n";
    std::ofstream(rw) << "Y\n";
    ASSERT_EQ(chmod(ro.c_str(), 0444), 0);
    ASSERT_EQ(chmod(rw.c_str(), 0644), 0);
    // access(W_OK) says yes to root for a 0444 file; sysfs would then refuse the write.
    if (geteuid() == 0) {
        EXPECT_EQ(access(ro.c_str(), W_OK), 0) << "root passes access(W_OK) whatever the mode";
    }
    EXPECT_FALSE(mvm::param_file_writable(ro));
    EXPECT_TRUE(mvm::param_file_writable(rw));
    EXPECT_FALSE(mvm::param_file_writable(std::string(dir) + "/missing"));
    unlink(ro.c_str());
    unlink(rw.c_str());
    rmdir(dir);
}

// A real kernel parameter, where the host has one: the answer agrees with its mode.
TEST(ParamFileWritable, AgreesWithAKernelParametersMode)
{
    const char* path = "/sys/module/kvm/parameters/eager_page_split";
    struct stat st {};
    if (stat(path, &st) != 0)
        GTEST_SKIP() << path << " is absent here (no kvm module)";
    if (!(st.st_mode & S_IWUSR)) {
        EXPECT_FALSE(mvm::param_file_writable(path)) << path << " is read-only";
    }
}
