// file: URIs (migration/file.hpp): QEMU's offset forms, fd:N of a regular file, and the refusals.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "base/error.hpp"
#include "migration/file.hpp"

using mvm::UsageError;
using mvm::migration::parse_file_uri;

TEST(FileUri, PathAndOffsetsAsQemuWritesThem)
{
    auto f = parse_file_uri("--to", "file:/var/tmp/g.mig");
    ASSERT_TRUE(f);
    EXPECT_EQ(f->path, "/var/tmp/g.mig");
    EXPECT_EQ(f->offset, 0u);
    EXPECT_FALSE(f->has_offset);
    EXPECT_EQ(f->str(), "file:/var/tmp/g.mig");
    for (const auto& [spec, want] : {std::pair<std::string, uint64_t>{"4096", 4096}, {"0x1000", 4096},
                                     {"4K", 4096}, {"2M", 2u << 20}, {"0", 0}}) {
        auto o = parse_file_uri("--to", "file:/tmp/x,offset=" + spec);
        ASSERT_TRUE(o) << spec;
        EXPECT_EQ(o->offset, want) << spec;
        EXPECT_TRUE(o->has_offset) << spec;
        EXPECT_EQ(o->path, "/tmp/x");
    }
    EXPECT_FALSE(parse_file_uri("--to", "tcp:127.0.0.1:4444"));
    EXPECT_FALSE(parse_file_uri("--to", "unix:/tmp/s"));
    EXPECT_FALSE(parse_file_uri("--to", "inproc"));
}

TEST(FileUri, BadOffsetsAndPathsAreRefusedNamingTheOption)
{
    for (const char* bad : {"file:/tmp/x,offset=0x20M", "file:/tmp/x,offset=", "file:/tmp/x,offset=-1",
                            "file:/tmp/x,offset=lots", "file:/tmp/x,offset=0x"}) {
        try {
            parse_file_uri("--to", bad);
            ADD_FAILURE() << bad << " was taken";
        } catch (const UsageError& e) {
            EXPECT_NE(std::string(e.what()).find("file URI has bad offset"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("--to"), std::string::npos) << e.what();
        }
    }
    EXPECT_THROW(parse_file_uri("--to", "file:"), UsageError);
    EXPECT_THROW(parse_file_uri("--to", "file:/tmp/x,size=4"), UsageError);
}

// fd:N is a file migration only when N is an open regular file; a socket or a
// closed number is left to the socket transports.
TEST(FileUri, FdOfARegularFileOnly)
{
    char path[] = "/tmp/minivmm-fileuri-XXXXXX";
    const int fd = ::mkstemp(path);
    ASSERT_GE(fd, 0);
    ::unlink(path);
    auto f = parse_file_uri("--to", "fd:" + std::to_string(fd));
    ASSERT_TRUE(f);
    EXPECT_EQ(f->fd, fd);
    EXPECT_FALSE(f->has_offset);
    auto o = parse_file_uri("--to", "fd:" + std::to_string(fd) + ",offset=4096");
    ASSERT_TRUE(o);
    EXPECT_EQ(o->offset, 4096u);
    EXPECT_TRUE(o->has_offset);
    EXPECT_EQ(o->str(), "fd:" + std::to_string(fd) + ",offset=4096");
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    EXPECT_FALSE(parse_file_uri("--to", "fd:" + std::to_string(sv[0])));
    ::close(sv[0]);
    ::close(sv[1]);
    ::close(fd);
    EXPECT_FALSE(parse_file_uri("--to", "fd:" + std::to_string(fd)));  // closed now
}
