#include "memory/prealloc.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <fmt/format.h>
#include <mutex>
#include <exception>
#include <optional>
#include <pthread.h>
#include <thread>

#include "base/error.hpp"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace mvm {

std::vector<PreallocResult> prealloc_parallel(const std::vector<PreallocJob>& jobs,
                                              const std::function<void(uint64_t, uint64_t)>& progress)
{
    using clock = std::chrono::steady_clock;
    std::vector<PreallocResult> results(jobs.size());
    std::atomic<uint64_t> done{0};
    std::atomic<size_t> running{jobs.size()};
    std::mutex mu;
    std::exception_ptr error;
    uint64_t total = 0;
    for (const auto& j : jobs)
        total += j.len;

    auto work = [&](size_t i) {
        const PreallocJob& j = jobs[i];
        auto t0 = clock::now();
        try {
            if (!j.cpus.empty())
                numa::pin_current_thread(j.cpus);
            std::optional<numa::ThreadPolicyScope> scope;
            if (j.policy.policy != numa::Policy::Default)
                scope.emplace(j.policy);
            // 64 MiB steps (whole pages) so progress moves and errors name an offset.
            const uint64_t step = std::max<uint64_t>(64ull << 20, j.page_size) / j.page_size * j.page_size;
            for (uint64_t off = 0; off < j.len; off += step) {
                const uint64_t n = std::min(step, j.len - off);
                if (::madvise(j.addr + off, n, MADV_POPULATE_WRITE) != 0) {
                    int e = errno;
                    std::string hint = e == ENOMEM || e == EFAULT
                                           ? " (out of memory on the policy's nodes, or the hugetlb pool ran dry)"
                                           : e == EINVAL ? " (kernel without MADV_POPULATE_WRITE: needs 5.14+)" : "";
                    throw SysError(fmt::format("prealloc {}: MADV_POPULATE_WRITE at +{:#x}{}", j.name, off, hint), e);
                }
                done += n;
            }
        } catch (...) {
            std::lock_guard lk(mu);
            if (!error)
                error = std::current_exception();
        }
        results[i] = {j.name, j.len, std::chrono::duration<double>(clock::now() - t0).count()};
        running--;
    };

    std::vector<std::thread> threads;
    for (size_t i = 0; i < jobs.size(); i++) {
        threads.emplace_back(work, i);
        pthread_setname_np(threads.back().native_handle(), fmt::format("prealloc{}", i).substr(0, 15).c_str());
    }
    auto last = clock::now();
    while (running.load() > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        if (progress && clock::now() - last > std::chrono::milliseconds(200)) {
            progress(done.load(), total);
            last = clock::now();
        }
    }
    for (auto& t : threads)
        t.join();
    if (error)
        std::rethrow_exception(error);
    return results;
}

}  // namespace mvm
