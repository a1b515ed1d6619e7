#include "vmm/dirty/tracker.hpp"

#include <sched.h>

#include <algorithm>
#include <fmt/format.h>
#include <map>
#include <optional>
#include <thread>

#include "numa/policy.hpp"
#include "numa/topology.hpp"
#include "base/error.hpp"
#include "vmm/kvm/ioctl.hpp"
#include "base/units.hpp"

namespace mvm::dirty {

namespace {

using clock = std::chrono::steady_clock;
double since(clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); }

constexpr uint32_t kDirtyGfnDirty = 1u << 0;  // KVM_DIRTY_GFN_F_DIRTY
constexpr uint32_t kDirtyGfnReset = 1u << 1;  // KVM_DIRTY_GFN_F_RESET
constexpr uint64_t kManualEnable = 1u << 0;   // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
constexpr uint64_t kInitiallySet = 1u << 1;   // KVM_DIRTY_LOG_INITIALLY_SET

// Merges the counts and bits of `from` into `into` (same slots, same order).
void merge(Harvest& into, const Harvest& from)
{
    for (size_t i = 0; i < into.slots.size(); i++) {
        SlotDirty& a = into.slots[i];
        const SlotDirty& b = from.slots[i];
        if (!b.count)
            continue;
        a.count = 0;
        for (size_t w = 0; w < a.bits.size(); w++) {
            a.bits[w] |= b.bits[w];
            a.count += static_cast<uint64_t>(__builtin_popcountll(a.bits[w]));
        }
    }
    for (size_t v = 0; v < into.per_vcpu.size(); v++)
        into.per_vcpu[v] += from.per_vcpu[v];
    into.entries += from.entries;
    into.reset += from.reset;
    into.ring_full_harvests += from.ring_full_harvests;
    into.get_s += from.get_s;
    into.clear_s += from.clear_s;
}

void finish(Harvest& h)
{
    h.dirty_pages = 0;
    for (const auto& s : h.slots)
        h.dirty_pages += s.count;
}

// ---- bitmap ----------------------------------------------------------------

class BitmapTracker : public Tracker {
public:
    BitmapTracker(Machine& m, const TrackerOptions& opt) : Tracker(m, opt) {}

    Harvest harvest() override
    {
        Harvest h = empty_harvest();
        if (opt_.kick == Kick::On) {
            auto t0 = clock::now();
            m_.sync_vcpus();
            h.sync_s = since(t0);
        }
        const uint64_t chunk_pages =
            opt_.clear_chunk_bytes ? std::max<uint64_t>(64, opt_.clear_chunk_bytes / 4096 / 64 * 64) : 0;
        for (SlotDirty& s : h.slots) {
            auto t0 = clock::now();
            m_.vm().get_dirty_log(s.slot, s.bits.data());
            h.get_s += since(t0);
            s.count = 0;
            for (uint64_t w : s.bits)
                s.count += static_cast<uint64_t>(__builtin_popcountll(w));
            if (!opt_.manual_protect || !s.count)
                continue;
            // Re-protect what we are about to copy; chunks without a dirty page are skipped.
            auto t1 = clock::now();
            const uint64_t step = chunk_pages ? chunk_pages : s.pages;
            for (uint64_t first = 0; first < s.pages; first += step) {
                const uint64_t n = std::min(step, s.pages - first);
                bool any = false;
                for (uint64_t w = first / 64; w < (first + n + 63) / 64 && !any; w++)
                    any = s.bits[w] != 0;
                if (!any)
                    continue;
                m_.vm().clear_dirty_log(s.slot, first, static_cast<uint32_t>(n), s.bits.data() + first / 64);
                h.clear_calls++;
            }
            h.clear_s += since(t1);
        }
        finish(h);
        return h;
    }
};

// ---- ring ------------------------------------------------------------------

class RingTracker : public Tracker {
public:
    RingTracker(Machine& m, const TrackerOptions& opt) : Tracker(m, opt), rings_(m.vcpu_count())
    {
        kick_ = opt.kick == Kick::On || (opt.kick == Kick::Auto && ring_needs_kick(m.kvm()));
        pending_ = empty_harvest();
        for (uint32_t i = 0; i < m.vcpu_count(); i++)
            rings_[i].size = m.vcpu(i).dirty_ring_entries();
        // A vCPU whose ring is full exits; harvest its ring on its own thread
        // and re-arm it before it re-enters (it would exit again at once).
        // pending_mu_ is held from collecting to merging, so a concurrent
        // harvest() either sees these entries in pending_ or after them.
        m.set_dirty_ring_full_handler([this](uint32_t vcpu) {
            const auto t0 = clock::now();
            {
                std::lock_guard lk(pending_mu_);
                Harvest h = empty_harvest();
                collect(vcpu, h);
                h.reset = reset();
                h.ring_full_harvests = 1;
                merge(pending_, h);
            }
            if (ring_full_hook_)
                ring_full_hook_(vcpu, t0, clock::now());
        });
    }
    ~RingTracker() override
    {
        try {
            if (enabled_)
                disable();
        } catch (...) {
        }
        m_.set_dirty_ring_full_handler({});
    }

    Harvest harvest() override
    {
        Harvest h = empty_harvest();
        if (kick_) {
            auto t0 = clock::now();
            m_.sync_vcpus();
            h.sync_s = since(t0);
        }
        auto t0 = clock::now();
        for (uint32_t v = 0; v < m_.vcpu_count(); v++)
            collect(v, h);
        h.get_s = since(t0);
        auto t1 = clock::now();
        h.reset = reset();
        h.clear_s = since(t1);
        {
            std::lock_guard lk(pending_mu_);
            merge(h, pending_);
            pending_ = empty_harvest();
        }
        finish(h);
        return h;
    }

    // Soft limit: harvest rings holding at least ring_soft_limit entries now,
    // before KVM has to stop their vCPUs. Returns the entries collected.
    uint64_t poll() override
    {
        if (!opt_.ring_soft_limit)
            return 0;
        std::lock_guard plk(pending_mu_);
        Harvest h = empty_harvest();
        for (uint32_t v = 0; v < m_.vcpu_count(); v++) {
            Ring& r = rings_[v];
            std::lock_guard lk(r.mu);
            const kvm_dirty_gfn& e = m_.vcpu(v).dirty_ring()[(r.fetch + opt_.ring_soft_limit - 1) & (r.size - 1)];
            if (!(__atomic_load_n(&e.flags, __ATOMIC_ACQUIRE) & kDirtyGfnDirty))
                continue;
            collect_locked(v, r, h);
        }
        if (!h.entries)
            return 0;
        h.reset = reset();
        merge(pending_, h);
        return h.entries;
    }

private:
    struct Ring {
        std::mutex mu;
        uint32_t fetch = 0;  // our next entry (free-running; KVM's index mod size)
        uint32_t size = 0;
    };

    uint64_t reset()
    {
        return opt_.reset_signal_guard ? m_.vm().reset_dirty_rings() : m_.vm().reset_dirty_rings_unguarded();
    }

    void collect(uint32_t vcpu, Harvest& h)
    {
        Ring& r = rings_[vcpu];
        std::lock_guard lk(r.mu);
        collect_locked(vcpu, r, h);
    }

    void collect_locked(uint32_t vcpu, Ring& r, Harvest& h)
    {
        kvm_dirty_gfn* ring = m_.vcpu(vcpu).dirty_ring();
        for (;;) {
            kvm_dirty_gfn& e = ring[r.fetch & (r.size - 1)];
            // Acquire: the slot/offset KVM wrote before publishing DIRTY.
            if (!(__atomic_load_n(&e.flags, __ATOMIC_ACQUIRE) & kDirtyGfnDirty))
                break;
            const uint32_t slot = e.slot & 0xffff;  // as_id in the high half
            const uint64_t off = e.offset;
            for (SlotDirty& s : h.slots)
                if (s.slot == slot && off < s.pages) {
                    s.set(off);
                    break;
                }
            // Release: hand the entry back only after we read it.
            __atomic_store_n(&e.flags, kDirtyGfnReset, __ATOMIC_RELEASE);
            r.fetch++;
            h.per_vcpu[vcpu]++;
            h.entries++;
        }
    }

    std::vector<Ring> rings_;
    bool kick_ = false;
    std::mutex pending_mu_;
    Harvest pending_;  // what ring-full and soft-limit harvests collected meanwhile
};

}  // namespace

uint32_t min_dirty_ring_bytes(const Kvm& kvm)
{
    static uint32_t cached = ~0u;
    if (cached != ~0u)
        return cached;
    int cap = kvm.cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0 ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING;
    const int max = kvm.cap(cap);
    cached = 0;
    for (uint32_t b = 4096; max > 0 && b <= static_cast<uint32_t>(max); b *= 2) {
        Vm vm = kvm.create_vm();
        kvm_enable_cap ec{};
        ec.cap = static_cast<uint32_t>(cap);
        ec.args[0] = b;
        if (kvm_ioctl_raw(vm.fd(), KVM_ENABLE_CAP, &ec) == 0) {
            cached = b;
            break;
        }
    }
    return cached;
}

bool ring_needs_kick(const Kvm& kvm)
{
    // KVM reserves ring space for a PML buffer's worth of entries where the
    // CPU logs dirty pages in hardware (x86 PML: 512); those reach the ring
    // only when the vCPU exits. 64 reserved entries fit a 4 KiB ring.
    const uint32_t min = min_dirty_ring_bytes(kvm);
    return min > 4096;
}

namespace {
struct ModeName {
    Mode mode;
    std::string_view name;
};
constexpr ModeName kModes[] = {{Mode::Bitmap, "bitmap"}, {Mode::Ring, "ring"}};
}  // namespace

const char* mode_name(Mode m)
{
    for (const auto& s : kModes)
        if (s.mode == m)
            return s.name.data();
    return "?";
}

std::optional<Mode> parse_mode(std::string_view name)
{
    for (const auto& s : kModes)
        if (s.name == name)
            return s.mode;
    return std::nullopt;
}

std::string mode_names()
{
    std::string o;
    for (size_t i = 0; i < std::size(kModes); i++)
        o += fmt::format("{}{}", i == 0 ? "" : i + 1 == std::size(kModes) ? " or " : ", ", kModes[i].name);
    return o;
}

Mode parse_mode_option(std::string_view option, const std::string& value, std::string_view noun,
                       std::string_view choices)
{
    if (auto m = parse_mode(value))
        return *m;
    throw UsageError(fmt::format("{}: unknown {} '{}'; use {}", option, noun, value,
                                 choices.empty() ? mode_names() : std::string(choices)));
}

const SlotDirty* Harvest::slot(uint32_t id) const
{
    for (const auto& s : slots)
        if (s.slot == id)
            return &s;
    return nullptr;
}

bool Harvest::contains_gpa(uint64_t gpa) const
{
    for (const auto& s : slots)
        if (gpa >= s.gpa && gpa < s.gpa + s.pages * 4096)
            return s.test((gpa - s.gpa) / 4096);
    return false;
}

Tracker::Tracker(Machine& m, const TrackerOptions& opt) : m_(m), opt_(opt)
{
    for (const auto& r : m.memslots().regions()) {
        if (r.is_gmem())
            untracked_.emplace_back(r.slot, "guest_memfd slots cannot be dirty-logged (KVM refuses "
                                            "KVM_MEM_LOG_DIRTY_PAGES with KVM_MEM_GUEST_MEMFD); copy them whole "
                                            "while the vCPUs are stopped");
        else
            tracked_.push_back(r.slot);
    }
}

Tracker::~Tracker()
{
    try {
        if (enabled_)
            set_logging(false);
    } catch (...) {
    }
}

std::unique_ptr<Tracker> Tracker::create(Machine& m, const TrackerOptions& opt)
{
    Vm& vm = m.vm();
    if (opt.mode == Mode::Ring) {
        if (!m.config().dirty_ring_bytes)
            throw UsageError("dirty ring tracking needs the ring set up before the vCPUs exist: give --ring SIZE");
        if (opt.ring_soft_limit && opt.ring_soft_limit > m.config().dirty_ring_bytes / sizeof(kvm_dirty_gfn))
            throw UsageError(fmt::format("ring soft limit {} exceeds the ring's {} entries", opt.ring_soft_limit,
                                         m.config().dirty_ring_bytes / sizeof(kvm_dirty_gfn)));
        return std::unique_ptr<Tracker>(new RingTracker(m, opt));
    }
    if (m.config().dirty_ring_bytes)
        throw UsageError("this VM logs dirty pages into rings; bitmap tracking needs a VM made without --ring");
    if (opt.manual_protect) {
        const int caps = vm.cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
        uint64_t want = kManualEnable | (opt.initially_set ? kInitiallySet : 0);
        if ((static_cast<uint64_t>(std::max(caps, 0)) & want) != want)
            throw Unsupported(fmt::format("this host's KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is {:#x}, needed {:#x}{}; "
                                          "use -g (GET_DIRTY_LOG alone){}",
                                          caps, want, opt.initially_set ? " (with INITIALLY_SET)" : "",
                                          opt.initially_set ? " or drop INITIALLY_SET" : ""));
        vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, want);
    } else if (opt.initially_set) {
        throw UsageError("INITIALLY_SET needs manual protection (KVM_CLEAR_DIRTY_LOG); drop -g");
    }
    return std::unique_ptr<Tracker>(new BitmapTracker(m, opt));
}

Harvest Tracker::empty_harvest() const
{
    Harvest h;
    for (uint32_t id : tracked_) {
        const MemoryRegion* r = m_.memslots().by_slot(id);
        SlotDirty s;
        s.slot = id;
        s.vnode = r->vnode;
        s.gpa = r->gpa;
        s.pages = r->pages();
        s.bits.assign((s.pages + 63) / 64, 0);
        h.slots.push_back(std::move(s));
    }
    h.per_vcpu.assign(m_.vcpu_count(), 0);
    return h;
}

EnableReport Tracker::enable()
{
    if (enabled_)
        throw Error("dirty logging is already enabled");
    auto r = set_logging(true);
    enabled_ = true;
    return r;
}

EnableReport Tracker::disable()
{
    if (!enabled_)
        throw Error("dirty logging is not enabled");
    enabled_ = false;
    return set_logging(false);
}

namespace {

// Where a group of slots is enabled from: `vnode` >= 0 is a virtual node's
// thread (its host CPUs, its policy); kHostNodeGroup is one thread on host
// node `host_node` (its CPUs, bound to its memory); -1 the calling thread.
constexpr int kHostNodeGroup = -2;

void place_enabling_thread(const MachineConfig& cfg, int vnode, int host_node,
                           std::optional<numa::ThreadPolicyScope>& scope)
{
    if (vnode == kHostNodeGroup) {
        const numa::Topology topo = numa::host_topology();
        const numa::Node* n = topo.node(host_node);
        if (!n)
            throw UsageError(fmt::format("enabling thread: host node {} does not exist", host_node));
        if (!n->cpus.empty())
            numa::pin_current_thread(n->cpus);
        scope.emplace(numa::NodePolicy{numa::Policy::Bind, {host_node}});
        return;
    }
    for (const auto& n : cfg.nodes)
        if (vnode >= 0 && static_cast<int>(n.id) == vnode) {
            // On the node's CPUs and under its policy: KVM allocates the page
            // tables it needs (splitting huge pages, rmaps) with this task's policy.
            if (!n.host_cpus.empty())
                numa::pin_current_thread(n.host_cpus);
            if (n.host_policy.policy != numa::Policy::Default)
                scope.emplace(n.host_policy);
        }
}

}  // namespace

EnableReport Tracker::set_logging(bool on)
{
    EnableReport rep;
    const MachineConfig& cfg = m_.config();
    // Group the slots by where they are enabled from; the system slot (-1)
    // stays on this thread unless one host node's thread enables everything.
    std::map<int, std::vector<uint32_t>> groups;
    for (uint32_t id : tracked_)
        groups[opt_.enable_host_node >= 0 ? kHostNodeGroup
               : opt_.per_node_enable    ? m_.memslots().by_slot(id)->vnode
                                         : -1]
            .push_back(id);
    rep.enabled_from = opt_.enable_host_node >= 0 ? fmt::format("one thread on host node {}", opt_.enable_host_node)
                       : opt_.per_node_enable && cfg.nodes.size() > 1 ? "per-node threads (each on its node)"
                                                                      : "the calling thread (as it is placed)";
    std::mutex mu;
    std::exception_ptr error;
    auto run_group = [&](int group, const std::vector<uint32_t>& ids) {
        try {
            std::optional<numa::ThreadPolicyScope> scope;
            place_enabling_thread(cfg, group, opt_.enable_host_node, scope);
            for (uint32_t id : ids) {
                uint32_t flags = m_.memslots().by_slot(id)->flags;
                flags = on ? (flags | KVM_MEM_LOG_DIRTY_PAGES) : (flags & ~KVM_MEM_LOG_DIRTY_PAGES);
                auto s0 = clock::now();
                m_.set_slot_flags(id, flags);
                SlotTiming st{id, m_.memslots().by_slot(id)->vnode, since(s0), sched_getcpu()};
                std::lock_guard lk(mu);
                rep.slots.push_back(st);
            }
        } catch (...) {
            std::lock_guard lk(mu);
            if (!error)
                error = std::current_exception();
        }
    };
    // The page-table counters are read outside the timed part (each read
    // folds every CPU's counters: work on every CPU, not the enable's).
    const numa::NodeKib pt0 = numa::secondary_page_tables();
    const auto t0 = clock::now();
    // A group other than this thread's own (-1) runs on a thread of its own.
    std::vector<std::thread> threads;
    for (const auto& [group, ids] : groups)
        if (group != -1 && (groups.size() > 1 || group == kHostNodeGroup))
            threads.emplace_back(run_group, group, ids);
    for (const auto& [group, ids] : groups)
        if (group == -1 || (groups.size() == 1 && group != kHostNodeGroup))
            run_group(group, ids);
    for (auto& t : threads)
        t.join();
    rep.wall_s = since(t0);
    rep.page_tables = numa::secondary_page_tables() - pt0;
    if (error)
        std::rethrow_exception(error);
    std::sort(rep.slots.begin(), rep.slots.end(), [](const auto& a, const auto& b) { return a.slot < b.slot; });
    return rep;
}

std::string summary(const Harvest& h)
{
    return fmt::format("{} pages ({}) get {:.3f} ms clear {:.3f} ms", h.dirty_pages,
                       human_bytes(static_cast<double>(h.dirty_pages * 4096)), h.get_s * 1e3, h.clear_s * 1e3);
}

}  // namespace mvm::dirty
