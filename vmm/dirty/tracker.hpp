// vmm/dirty/tracker.hpp - dirty-page tracking with either of KVM's two
// interfaces, behind one interface:
//  - bitmap: KVM_MEM_LOG_DIRTY_PAGES per memslot, harvested with
//    KVM_GET_DIRTY_LOG, and with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (optionally
//    INITIALLY_SET) followed by KVM_CLEAR_DIRTY_LOG in chunks of a set size;
//  - ring: per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, or plain
//    DIRTY_LOG_RING), collected with acquire/release on each entry's flags
//    and re-armed with KVM_RESET_DIRTY_RINGS; a vCPU that fills its ring
//    exits with KVM_EXIT_DIRTY_RING_FULL and is harvested on its own thread
//    before it re-enters.
// Either way a harvest returns the dirty pages per memslot (and, for the
// ring, per vCPU) with the time each step took. Logging is enabled per slot
// by a thread per virtual node, pinned to the node's CPUs and running under
// its memory policy, so the page tables KVM allocates meanwhile land there.
// guest_memfd slots cannot be dirty-logged: they are listed as untracked.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <string>
#include <vector>

#include "numa/page_tables.hpp"
#include "vmm/machine.hpp"

namespace mvm::dirty {

enum class Mode { Bitmap, Ring };

// The one registry of tracking modes every command names (--dirty-log,
// --tracker, dirty-rate --mode): name <-> mode, and one error text.
const char* mode_name(Mode m);
std::optional<Mode> parse_mode(std::string_view name);
// "bitmap or ring" (the names joined for an error message).
std::string mode_names();
// The mode named by `value`; else UsageError "OPTION: unknown NOUN 'VALUE';
// use CHOICES" (CHOICES: what the option accepts, by default mode_names()).
Mode parse_mode_option(std::string_view option, const std::string& value, std::string_view noun = "mode",
                       std::string_view choices = {});

// Whether to kick the vCPUs out of KVM_RUN before a harvest. Hardware dirty
// logging (x86 PML) reaches the rings only when a vCPU exits, so a ring
// harvest must kick first there; KVM_GET_DIRTY_LOG kicks by itself. Auto:
// ring harvests kick where the host reserves ring space for PML.
// This host (kvm-pvm, shadow MMU) has no PML, so Auto does not kick here.
// (A kick that lands while a vCPU thread resets its full ring used to lose
// entries: see Vm::reset_dirty_rings, which now blocks signals around it.)
enum class Kick { Auto, On, Off };

// Smallest ring KVM accepts here (probed on scratch VMs; 0 without rings).
uint32_t min_dirty_ring_bytes(const Kvm& kvm);
bool ring_needs_kick(const Kvm& kvm);

struct TrackerOptions {
    Mode mode = Mode::Bitmap;
    bool manual_protect = true;      // bitmap: GET then CLEAR (else GET alone clears)
    bool initially_set = false;      // bitmap + manual: enabling does not write-protect
    uint64_t clear_chunk_bytes = 0;  // bitmap + manual: bytes per KVM_CLEAR_DIRTY_LOG; 0 = whole slot
    uint32_t ring_soft_limit = 0;    // ring: harvest a ring early once this many entries wait (0: only when KVM says full)
    bool per_node_enable = true;     // enable from one pinned, policy-bound thread per node, in parallel
    int enable_host_node = -1;       // >= 0: one thread pinned to this host node's CPUs and bound to its memory
                                     // enables every slot (overrides per_node_enable)
    Kick kick = Kick::Auto;
    // ring: KVM_RESET_DIRTY_RINGS with every signal blocked in the resetting
    // thread (Vm::reset_dirty_rings). Off only to probe a host for the bug
    // that makes necessary (engines/ring_probe).
    bool reset_signal_guard = true;
};

// Dirty pages of one memslot: one bit per 4 KiB page.
struct SlotDirty {
    uint32_t slot = 0;
    int vnode = -1;
    uint64_t gpa = 0, pages = 0;
    std::vector<uint64_t> bits;
    uint64_t count = 0;  // set bits

    bool test(uint64_t page) const { return (bits[page / 64] >> (page % 64)) & 1; }
    void set(uint64_t page)
    {
        uint64_t& w = bits[page / 64];
        const uint64_t m = 1ull << (page % 64);
        count += !(w & m);
        w |= m;
    }
    template <class F>
    void for_each(F&& f) const
    {
        for (size_t w = 0; w < bits.size(); w++)
            for (uint64_t b = bits[w]; b; b &= b - 1)
                f(w * 64 + static_cast<uint64_t>(__builtin_ctzll(b)));
    }
};

struct Harvest {
    std::vector<SlotDirty> slots;   // the tracked slots, in tracked_slots() order
    std::vector<uint64_t> per_vcpu; // ring: entries collected per vCPU (ring-full harvests included)
    uint64_t dirty_pages = 0;       // distinct dirty pages over all slots
    uint64_t entries = 0;           // ring: entries collected
    uint64_t reset = 0;             // ring: entries KVM_RESET_DIRTY_RINGS re-armed
    uint64_t ring_full_harvests = 0;// ring: harvests done on vCPU threads since the last harvest
    double sync_s = 0;              // kicking vCPUs out of KVM_RUN
    double get_s = 0;               // bitmap: KVM_GET_DIRTY_LOG; ring: collecting entries
    double clear_s = 0;             // bitmap: KVM_CLEAR_DIRTY_LOG; ring: KVM_RESET_DIRTY_RINGS
    uint64_t clear_calls = 0;       // bitmap: KVM_CLEAR_DIRTY_LOG calls

    const SlotDirty* slot(uint32_t id) const;
    bool contains_gpa(uint64_t gpa) const;
};

struct SlotTiming {
    uint32_t slot = 0;
    int vnode = -1;
    double seconds = 0;
    int cpu = -1;  // where the enabling thread ran
};

struct EnableReport {
    double wall_s = 0;
    std::vector<SlotTiming> slots;
    // How KVM's page tables (SecPageTables) grew per host node while the
    // slots' flags changed: the split page tables of an eager split at enable
    // land on the node of the thread that enabled (its mempolicy and CPU).
    numa::NodeKibDelta page_tables;
    std::string enabled_from;  // "per-node threads", "one thread on host node 1", "the calling thread (unbound)"
};

class Tracker {
public:
    virtual ~Tracker();
    Tracker(const Tracker&) = delete;
    Tracker& operator=(const Tracker&) = delete;

    // Checks the host and the machine fit `opt` (dirty ring configured when
    // the machine was made, caps present) and makes the tracker. Throws
    // Unsupported / UsageError naming what is missing.
    static std::unique_ptr<Tracker> create(Machine& m, const TrackerOptions& opt);

    Mode mode() const { return opt_.mode; }
    const TrackerOptions& options() const { return opt_; }
    const std::vector<uint32_t>& tracked_slots() const { return tracked_; }
    // Slots that cannot be logged (guest_memfd), with why: callers copy them whole.
    const std::vector<std::pair<uint32_t, std::string>>& untracked_slots() const { return untracked_; }

    EnableReport enable();
    EnableReport disable();
    bool enabled() const { return enabled_; }
    // Everything dirtied since the previous harvest (or since enable).
    virtual Harvest harvest() = 0;
    // Between harvests, from the harvesting thread: collect rings that hold
    // at least ring_soft_limit entries, so KVM need not stop their vCPUs.
    // Returns the entries collected (kept for the next harvest); 0 for bitmaps.
    virtual uint64_t poll() { return 0; }
    // Ring: called on the vCPU's thread after each ring-full harvest with its
    // start and end (steady clock), for timelines.
    using RingFullHook = std::function<void(uint32_t vcpu, std::chrono::steady_clock::time_point,
                                            std::chrono::steady_clock::time_point)>;
    void set_ring_full_hook(RingFullHook h) { ring_full_hook_ = std::move(h); }

protected:
    Tracker(Machine& m, const TrackerOptions& opt);
    Harvest empty_harvest() const;
    EnableReport set_logging(bool on);

    Machine& m_;
    TrackerOptions opt_;
    std::vector<uint32_t> tracked_;
    std::vector<std::pair<uint32_t, std::string>> untracked_;
    bool enabled_ = false;
    RingFullHook ring_full_hook_;
};

// Human-readable one-liner of a harvest ("1234 pages (4.8 MiB) get 0.12 ms clear 0.40 ms").
std::string summary(const Harvest& h);

}  // namespace mvm::dirty
