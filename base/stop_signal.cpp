#include "base/stop_signal.hpp"

#include <signal.h>

namespace mvm {

std::atomic<int> g_stop_signal{0};

static void on_stop_signal(int sig) { g_stop_signal.store(sig); }

void install_stop_signals()
{
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
}

}  // namespace mvm
