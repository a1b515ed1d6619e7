#include <cstdio>
#include <thread>
#include <fmt/format.h>
#include "vmm/machine.hpp"
using namespace mvm;
int main(int argc, char** argv)
{
    try {
        Kvm kvm;
        auto cfg = single_node_config(argc > 1 ? atoi(argv[1]) : 2, 256ull << 20);
        Machine m(kvm, cfg);
        auto before = m.vcpu_stats(0);
        m.start();
        for (int t = 0; t < 20; t++) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            auto s = m.snapshot(0);
            fmt::print("gen {} cursor {} written {} state {}\n", s.generation, s.cursor, s.pages_written, s.state);
            if (m.failure()) break;
        }
        m.request_stop();
        m.wait_finished(std::chrono::seconds(2));
        m.kill();
        if (auto f = m.failure()) fmt::print("FAIL {}\n{}\n", f->reason, f->register_dump);
        auto d = stat_delta(before, m.vcpu_stats(0));
        for (auto& [k, v] : d) if (v) fmt::print("{} {}\n", k, v);
    } catch (const std::exception& e) {
        fmt::print(stderr, "error: {}\n", e.what());
        return 1;
    }
}
