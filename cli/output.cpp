#include "cli/output.hpp"
#include "vmm/host_info.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fmt/format.h>
#include <fstream>

#include "base/error.hpp"

namespace mvm::cli {

void write_json(const std::string& dest, const nlohmann::json& j)
{
    if (dest == "-") {
        fmt::print("{}\n", j.dump(2));
        return;
    }
    std::ofstream f(dest);
    if (!f)
        throw UsageError(fmt::format("--json: cannot write '{}': {}", dest, errno_text(errno)));
    f << j.dump(2) << "\n";
}

void check_output_path(std::string_view option, const std::string& dest, std::string_view fix)
{
    if (dest.empty())
        return;
    struct stat st {};
    int err = 0;
    if (::stat(dest.c_str(), &st) == 0) {
        if (S_ISDIR(st.st_mode))
            err = EISDIR;
        else if (::access(dest.c_str(), W_OK) != 0)
            err = errno;
    } else if (errno != ENOENT) {
        err = errno;
    } else {
        const auto slash = dest.rfind('/');
        const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : dest.substr(0, slash);
        if (::access(dir.c_str(), W_OK | X_OK) != 0)
            err = errno;
    }
    if (err)
        throw UsageError(fmt::format("{}: cannot write '{}': {}; {}", option, dest, errno_text(err), fix));
}

void check_json_dest(const std::string& dest)
{
    if (dest != "-")
        check_output_path("--json", dest, "give a writable path or - for stdout");
}

void echo_config(nlohmann::json& report, const MachineConfig& cfg)
{
    report["config"]["machine"] = machine_echo(cfg);
    report["config"]["host"] = host_echo();
}

std::FILE* table_stream(const std::string& json_dest) { return json_dest == "-" ? stderr : stdout; }

std::string kvm_device()
{
    const char* dev = std::getenv("MINIVMM_KVM_DEVICE");
    return dev && *dev ? dev : "/dev/kvm";
}

bool stderr_is_terminal() { return ::isatty(STDERR_FILENO); }

}  // namespace mvm::cli
