// vmm/stress/workload.hpp - what the guest workload must have left in memory.
//
// Every pass visits each page of a vCPU's working set once; written pages
// hold MVM_STAMP(vm, vcpu, generation) in qword 0 and the fill (--fill) in
// the rest. From the mailbox (generation, cursor, passes) the VMM recomputes,
// for every page, the stamp the guest last wrote, and checks memory against
// it (the whole page unless the fill is zero). This is the lost-page check of the dirty
// tracking and migration work: run it on paused or finished vCPUs.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "guest/abi.h"

namespace mvm {

class StressVm;

struct StampMismatch {
    uint32_t vcpu;
    uint64_t gpa;
    uint64_t expected;  // stamp; 0 = never written (at `qword`: what the fill puts there)
    uint64_t found;
    uint32_t qword = 0;  // the first qword of the page that differs
};

struct StampCheck {
    uint64_t pages_checked = 0;
    uint64_t mismatches = 0;
    uint64_t foreign = 0;  // of the mismatches: pages holding another VM's tag
    std::vector<StampMismatch> first;  // up to 16
    bool ok() const { return mismatches == 0; }
    std::string summary() const;  // "32768 pages checked, 0 mismatches" or names the first GPAs
};

// A copy of a mailbox's progress fields.
struct MailboxSnapshot {
    uint64_t generation, cursor, pages_written, pages_read, passes, last_tsc, start_tsc, warm_tsc, warm_pages;
    uint64_t wd_events, wd_max_gap_tsc;
    uint32_t state;
};

// Decodes a mailbox page (guest-written: any bit pattern is possible).
MailboxSnapshot read_mailbox(const mvm_mailbox& mb);

struct WorkloadProgress {
    uint64_t generation, cursor, passes;
};

// Host view of guest memory: pointer to the 4 KiB page at `gpa`.
using PageReader = std::function<const uint8_t*(uint64_t gpa)>;

// Checks one vCPU's working set given its progress.
void verify_vcpu_stamps(const mvm_boot_params& bp, const mvm_vcpu_params& vp, WorkloadProgress progress,
                        const PageReader& page, StampCheck& out);
// Every vCPU of a machine whose vCPUs are paused or finished.
StampCheck verify_stamps(const StressVm& m);

// The vCPU whose working set holds `gpa`, or -1.
int owner_of_gpa(const StressVm& m, uint64_t gpa);

// The guest watchdog's events numbered [since, total) that the mailbox ring
// still holds (the newest MVM_WD_RING), oldest first. `total` is the
// mailbox's wd_events as read once by the caller.
struct WdRingEntry {
    uint64_t start_tsc, len_tsc;
};
std::vector<WdRingEntry> watchdog_events(const mvm_mailbox& mb, uint64_t total, uint64_t since = 0);

// Boot parameters as found in guest memory (`guest`, any bytes at all) against
// the host's own copy (`host`, as StressVm wrote it): "" when every field the
// host decodes the guest's work with (workload knobs, vNUMA table, working
// sets) agrees, else one line naming the first field that differs.
std::string boot_params_difference(std::span<const uint8_t> guest, std::span<const uint8_t> host);

}  // namespace mvm
