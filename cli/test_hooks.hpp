// cli/test_hooks.hpp - faults that tests inject into a real minivmm process.
//
// A test sets MINIVMM_TEST_<NAME> in the environment of the one minivmm it
// starts; the command reads it here and hands the engine a wrapper or a
// callback (a fault-injecting transport, a destination that goes away, a
// pause at a phase, another judge of placement). No option a user sees and
// no engine option struct carries a test field. A bad value is one line
// naming the variable, like any bad input.
#pragma once

#include <string>

namespace mvm::cli {

// The value of MINIVMM_TEST_<name>, "" when the test did not set it.
std::string test_hook(const char* name);

}  // namespace mvm::cli
