#include "cli/test_hooks.hpp"

#include <cstdlib>

namespace mvm::cli {

std::string test_hook(const char* name)
{
    const char* v = std::getenv((std::string("MINIVMM_TEST_") + name).c_str());
    return v ? v : "";
}

}  // namespace mvm::cli
