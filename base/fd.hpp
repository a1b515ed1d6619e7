// base/fd.hpp - move-only owners of file descriptors and mappings.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace mvm {

class UniqueFd {
public:
    UniqueFd() = default;
    explicit UniqueFd(int fd) noexcept : fd_(fd) {}
    UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept
    {
        if (this != &o)
            reset(std::exchange(o.fd_, -1));
        return *this;
    }
    UniqueFd(const UniqueFd&) = delete;
    UniqueFd& operator=(const UniqueFd&) = delete;
    ~UniqueFd() { reset(); }

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    int release() noexcept { return std::exchange(fd_, -1); }
    void reset(int fd = -1) noexcept
    {
        if (fd_ >= 0)
            ::close(fd_);
        fd_ = fd;
    }

private:
    int fd_ = -1;
};

// An mmap()ed range, unmapped on destruction.
class Mapping {
public:
    Mapping() = default;
    Mapping(void* addr, size_t size) noexcept : addr_(addr), size_(size) {}
    Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    Mapping& operator=(Mapping&& o) noexcept
    {
        if (this != &o) {
            reset();
            addr_ = std::exchange(o.addr_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping() { reset(); }

    // mmap() or throw SysError naming `what`.
    static Mapping map(const std::string& what, size_t size, int prot, int flags, int fd = -1, off_t offset = 0,
                       void* hint = nullptr);

    void* get() const noexcept { return addr_; }
    uint8_t* bytes() const noexcept { return static_cast<uint8_t*>(addr_); }
    size_t size() const noexcept { return size_; }
    explicit operator bool() const noexcept { return addr_ != nullptr; }
    // Gives up ownership without unmapping.
    void* release() noexcept
    {
        size_ = 0;
        return std::exchange(addr_, nullptr);
    }
    void reset() noexcept
    {
        if (addr_)
            ::munmap(addr_, size_);
        addr_ = nullptr;
        size_ = 0;
    }

private:
    void* addr_ = nullptr;
    size_t size_ = 0;
};

}  // namespace mvm
