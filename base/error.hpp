// base/error.hpp - the project's error types. Each carries one line that
// names what failed and, where the user can act, how to fix it.
#pragma once

#include <exception>

#include <stdexcept>
#include <string>

namespace mvm {

// Process exit codes (documented in docs/exit-codes.md).
enum ExitCode : int {
    kExitOk = 0,
    kExitFailure = 1,      // runtime failure: a KVM call, a guest exception, ...
    kExitUsage = 2,        // bad input: an option value, a missing host resource
    kExitMisplaced = 3,    // numa-check: pages are not where their policy says
    kExitNoKvm = 4,        // /dev/kvm missing or not accessible
    kExitMigration = 5,    // migration failed; the source kept running
    kExitNoSender = 6,     // receive: no sender was admitted within --timeout
    kExitGuestLost = 7,    // migrate/receive: postcopy broke off; neither side holds the whole guest
};

// Errors reach users as one line, and they often quote what the user (or a
// peer over the network) sent: control characters are shown escaped ("\n").
std::string one_line(const std::string& text);

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& what, int exit_code = kExitFailure)
        : std::runtime_error(one_line(what)), exit_code_(exit_code) {}
    int exit_code() const noexcept { return exit_code_; }

private:
    int exit_code_;
};

// A failed system call or ioctl: "KVM_RUN failed, rc: -1 errno: 22 (Invalid argument)".
class SysError : public Error {
public:
    SysError(const std::string& call, long rc, int err);
    SysError(const std::string& call, int err) : SysError(call, -1, err) {}
    int err() const noexcept { return errno_; }

private:
    int errno_;
};

// Bad user input: names the option and the fix. Thrown before anything is created.
class UsageError : public Error {
public:
    explicit UsageError(const std::string& what) : Error(what, kExitUsage) {}
};

// A capability or host resource the requested work needs is absent.
class Unsupported : public Error {
public:
    explicit Unsupported(const std::string& what) : Error(what, kExitUsage) {}
};

class KvmUnavailable : public Error {
public:
    explicit KvmUnavailable(const std::string& what) : Error(what, kExitNoKvm) {}
};

std::string errno_text(int err);

// What an exception_ptr says (its what()), or `otherwise` for one that is not
// a std::exception.
inline std::string what_of(std::exception_ptr e, const std::string& otherwise)
{
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    } catch (...) {
    }
    return otherwise;
}

}  // namespace mvm
