// base/stop_signal.hpp - SIGINT/SIGTERM for the whole process: the handler
// only records the signal; the commands and the engines poll it and stop
// their guest cleanly.
#pragma once

#include <atomic>

namespace mvm {

// Set by the SIGINT/SIGTERM handler (install_stop_signals); 0 when none came.
extern std::atomic<int> g_stop_signal;
void install_stop_signals();

}  // namespace mvm
