#include "migration/migrate.hpp"

#include <chrono>
#include <thread>

namespace mvm::migration {

MigrateReport migrate(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel,
                      const SenderHooks& hooks)
{
    Sender s(src, tracker, opt, cancel, hooks);
    run_phases(s);
    return s.report();
}

void run_phases(Sender& s)
{
    try {
        s.setup();
        s.bulk();
        while (s.precopy_round()) {
        }
        if (s.postcopy_due()) {
            s.postcopy_switch();
            s.postcopy();
        } else {
            s.stop_and_copy();
            s.switchover();
        }
        s.finish();
    } catch (const std::exception& e) {
        s.fail(e.what());
    }
}

SourceCheck stop_and_check_source(StressVm& src)
{
    SourceCheck c;
    const uint64_t before = src.snapshot(0).pages_written;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    c.running = src.snapshot(0).pages_written > before || src.snapshot(0).state == MVM_STATE_DONE;
    src.request_stop();
    if (!src.wait_finished(std::chrono::seconds(10)))
        src.kill();
    c.stamps = verify_stamps(src);
    return c;
}

}  // namespace mvm::migration
