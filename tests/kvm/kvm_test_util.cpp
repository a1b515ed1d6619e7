#include "kvm_test_util.hpp"

#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <unistd.h>

namespace mvm::test {

static std::string slurp(const std::string& path)
{
    std::ifstream f(path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

CmdResult run_minivmm(const std::string& args)
{
    char out_path[] = "/tmp/minivmm-test-out-XXXXXX";
    char err_path[] = "/tmp/minivmm-test-err-XXXXXX";
    int o = mkstemp(out_path), e = mkstemp(err_path);
    close(o);
    close(e);
    std::string cmd = std::string(MINIVMM_BINARY) + " " + args + " >" + out_path + " 2>" + err_path + " </dev/null";
    int st = std::system(cmd.c_str());
    CmdResult r;
    r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r.out = slurp(out_path);
    r.err = slurp(err_path);
    unlink(out_path);
    unlink(err_path);
    return r;
}

}  // namespace mvm::test
