#include "migration/migrate.hpp"

#include <chrono>
#include <thread>

namespace mvm::migration {

MigrateReport migrate(StressVm& src, dirty::Tracker& tracker, const MigrateOptions& opt, const std::atomic<int>* cancel,
                      const SenderHooks& hooks)
{
    SenderEvents ev;
    if (opt.postcopy_recover_s > 0) {
        // The receiver listens on its address again: try it every second.
        ev.postcopy_paused = [&opt, cancel, until = std::optional<std::chrono::steady_clock::time_point>()](
                                 const std::string&) mutable -> std::string {
            const auto now = std::chrono::steady_clock::now();
            if (!until)
                until = now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                  std::chrono::duration<double>(opt.postcopy_recover_s));
            for (int i = 0; i < 10 && !(cancel && cancel->load()); i++)
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
            if ((cancel && cancel->load()) || std::chrono::steady_clock::now() > *until)
                return "";
            return opt.to;
        };
    }
    Sender s(src, tracker, opt, cancel, hooks, std::move(ev));
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
