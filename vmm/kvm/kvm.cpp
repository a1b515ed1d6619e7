#include "vmm/kvm/kvm.hpp"

#include <pthread.h>
#include <signal.h>

#include <algorithm>

#include <atomic>

#include <fcntl.h>

#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "vmm/kvm/caps.hpp"
#include "base/error.hpp"
#include "vmm/kvm/ioctl.hpp"

namespace mvm {

Kvm::Kvm(const std::string& path)
{
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err == ENOENT)
            throw KvmUnavailable(fmt::format("{} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
                                             "or run on a host with KVM",
                                             path));
        if (err == EACCES || err == EPERM)
            throw KvmUnavailable(fmt::format("no permission to open {}: run as root or add your user to the "
                                             "group that owns it (usually 'kvm')",
                                             path));
        throw KvmUnavailable(fmt::format("cannot open {}: {}", path, errno_text(err)));
    }
    fd_.reset(fd);
    api_version_ = KVM_IOCTL(fd_.get(), KVM_GET_API_VERSION, 0);
    if (api_version_ != KVM_API_VERSION)
        throw KvmUnavailable(fmt::format("{} speaks KVM API {}, minivmm needs {}", path, api_version_, KVM_API_VERSION));
    vcpu_mmap_size_ = static_cast<size_t>(KVM_IOCTL(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0));
}

int Kvm::cap(int c) const
{
    std::lock_guard lock(cap_mutex_);
    if (auto it = cap_cache_.find(c); it != cap_cache_.end())
        return it->second;
    int v = kvm_ioctl_raw(fd_.get(), KVM_CHECK_EXTENSION, c);
    if (v < 0)
        v = 0;
    cap_cache_[c] = v;
    return v;
}

int Kvm::require(int c, const std::string& why) const
{
    int v = cap(c);
    if (v <= 0)
        throw Unsupported(fmt::format("this host's KVM lacks {} (needed for {})", cap_name(c), why));
    return v;
}

std::vector<kvm_cpuid_entry2> Kvm::supported_cpuid() const
{
    require(KVM_CAP_EXT_CPUID, "KVM_GET_SUPPORTED_CPUID");
    for (uint32_t n = 64;; n *= 2) {
        std::vector<uint8_t> buf(sizeof(abi::cpuid2_header) + n * sizeof(kvm_cpuid_entry2));
        auto* h = reinterpret_cast<abi::cpuid2_header*>(buf.data());
        h->nent = n;
        int rc = kvm_ioctl_raw(fd_.get(), MVM_KVM_GET_SUPPORTED_CPUID, h);
        if (rc < 0 && errno == E2BIG && n < 4096)
            continue;  // documented: the array was too small
        if (rc < 0)
            throw SysError("KVM_GET_SUPPORTED_CPUID", rc, errno);
        std::vector<kvm_cpuid_entry2> out(h->nent);
        std::memcpy(out.data(), buf.data() + sizeof(*h), h->nent * sizeof(kvm_cpuid_entry2));
        return out;
    }
}

Vm Kvm::create_vm(unsigned long type) const
{
    int fd;
    // KVM_CREATE_VM may fail with EINTR while the kernel sets up; retry.
    do {
        fd = kvm_ioctl_raw(fd_.get(), KVM_CREATE_VM, type);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        throw SysError("KVM_CREATE_VM", fd, errno);
    return Vm(*this, UniqueFd(fd));
}

Vm::Vm(const Kvm& kvm, UniqueFd fd) : kvm_(&kvm), fd_(std::move(fd))
{
    has_region2_ = cap(KVM_CAP_USER_MEMORY2) > 0;
}

int Vm::cap(int c) const
{
    int v = kvm_ioctl_raw(fd_.get(), KVM_CHECK_EXTENSION, c);
    return v < 0 ? 0 : v;
}

int Vm::require(int c, const std::string& why) const
{
    int v = cap(c);
    if (v <= 0)
        throw Unsupported(fmt::format("this host's KVM lacks {} (needed for {})", cap_name(c), why));
    return v;
}

void Vm::enable_cap(uint32_t c, uint64_t arg0, uint64_t arg1)
{
    kvm_enable_cap ec{};
    ec.cap = c;
    ec.args[0] = arg0;
    ec.args[1] = arg1;
    int rc = kvm_ioctl_raw(fd_.get(), KVM_ENABLE_CAP, &ec);
    if (rc < 0)
        throw SysError(fmt::format("KVM_ENABLE_CAP({}, {:#x})", cap_name(static_cast<int>(c)), arg0), rc, errno);
}

void Vm::set_memory_region(const kvm_userspace_memory_region2& r)
{
    if (has_region2_) {
        KVM_IOCTL(fd_.get(), KVM_SET_USER_MEMORY_REGION2, &r);
        return;
    }
    if (r.flags & KVM_MEM_GUEST_MEMFD)
        throw Unsupported("this host's KVM lacks KVM_CAP_USER_MEMORY2 (needed for guest_memfd memslots)");
    kvm_userspace_memory_region r1{r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr};
    KVM_IOCTL(fd_.get(), KVM_SET_USER_MEMORY_REGION, &r1);
}

int Vm::create_guest_memfd(uint64_t size, uint64_t flags)
{
    require(KVM_CAP_GUEST_MEMFD, "guest_memfd backing");
    kvm_create_guest_memfd g{};
    g.size = size;
    g.flags = flags;
    return KVM_IOCTL(fd_.get(), KVM_CREATE_GUEST_MEMFD, &g);
}

void Vm::enable_dirty_ring(uint32_t bytes, bool acq_rel)
{
    int c = acq_rel ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING;
    int max = require(c, "dirty ring tracking");
    if (bytes > static_cast<uint32_t>(max))
        throw Unsupported(fmt::format("dirty ring of {} bytes per vCPU exceeds this host's maximum {} ({})", bytes,
                                      max, cap_name(c)));
    enable_cap(static_cast<uint32_t>(c), bytes);
    dirty_ring_bytes_ = bytes;
}

Vcpu Vm::create_vcpu(uint32_t id)
{
    int fd = KVM_IOCTL(fd_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(id));
    return Vcpu(id, UniqueFd(fd), kvm_->vcpu_mmap_size(), dirty_ring_bytes_);
}

void Vm::get_dirty_log(uint32_t slot, uint64_t* bitmap)
{
    kvm_dirty_log d{};
    d.slot = slot;
    d.dirty_bitmap = bitmap;
    KVM_IOCTL(fd_.get(), KVM_GET_DIRTY_LOG, &d);
}

void Vm::clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages, uint64_t* bitmap)
{
    kvm_clear_dirty_log c{};
    c.slot = slot;
    c.first_page = first_page;
    c.num_pages = num_pages;
    c.dirty_bitmap = bitmap;
    KVM_IOCTL(fd_.get(), KVM_CLEAR_DIRTY_LOG, &c);
}

uint64_t Vm::reset_dirty_rings()
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    const long rc = kvm_ioctl_raw(fd_.get(), KVM_RESET_DIRTY_RINGS, 0);
    const int err = errno;
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (rc < 0)
        throw SysError("KVM_RESET_DIRTY_RINGS", rc, err);
    return static_cast<uint64_t>(rc);
}

uint64_t Vm::reset_dirty_rings_unguarded()
{
    return static_cast<uint64_t>(KVM_IOCTL(fd_.get(), KVM_RESET_DIRTY_RINGS, 0));
}

UniqueFd Vm::stats_fd() const
{
    require(KVM_CAP_BINARY_STATS_FD, "KVM stats");
    return UniqueFd(KVM_IOCTL(fd_.get(), KVM_GET_STATS_FD, 0));
}

Vcpu::Vcpu(uint32_t id, UniqueFd fd, size_t mmap_size, uint32_t dirty_ring_bytes)
    : id_(id), fd_(std::move(fd))
{
    run_ = Mapping::map(fmt::format("kvm_run of vCPU {}", id), mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                        fd_.get(), 0);
    if (dirty_ring_bytes)
        ring_ = Mapping::map(fmt::format("dirty ring of vCPU {}", id), dirty_ring_bytes, PROT_READ | PROT_WRITE,
                             MAP_SHARED, fd_.get(),
                             static_cast<off_t>(MINIVMM_DIRTY_LOG_PAGE_OFFSET) * ::getpagesize());
}

namespace {
std::atomic<uint32_t> g_fault_every{0}, g_fault_burst{1};
std::atomic<int> g_fault_err{EINTR};
std::atomic<uint64_t> g_faults_injected{0};
}  // namespace

void inject_run_faults(const RunFaults& f)
{
    g_fault_err.store(f.err);
    // The guest must still get in: at most every - 1 failures in a row.
    g_fault_burst.store(f.every ? std::min(std::max<uint32_t>(f.burst, 1), f.every - 1) : 1);
    g_fault_every.store(f.every);
}

uint64_t injected_run_faults() { return g_faults_injected.load(); }

int Vcpu::run() noexcept
{
    // One relaxed load per KVM_RUN when off.
    if (const uint32_t every = g_fault_every.load(std::memory_order_relaxed)) {
        const uint64_t n = runs_++;
        if (n % every < g_fault_burst.load(std::memory_order_relaxed)) {
            g_faults_injected.fetch_add(1, std::memory_order_relaxed);
            return -g_fault_err.load(std::memory_order_relaxed);
        }
    }
    int rc = kvm_ioctl_raw(fd_.get(), KVM_RUN, 0);
    return rc < 0 ? -errno : 0;
}

kvm_regs Vcpu::regs() const
{
    kvm_regs r{};
    KVM_IOCTL(fd_.get(), KVM_GET_REGS, &r);
    return r;
}

void Vcpu::set_regs(const kvm_regs& r) { KVM_IOCTL(fd_.get(), KVM_SET_REGS, &r); }

kvm_sregs Vcpu::sregs() const
{
    kvm_sregs s{};
    KVM_IOCTL(fd_.get(), KVM_GET_SREGS, &s);
    return s;
}

void Vcpu::set_sregs(const kvm_sregs& s) { KVM_IOCTL(fd_.get(), KVM_SET_SREGS, &s); }

void Vcpu::set_cpuid(const std::vector<kvm_cpuid_entry2>& entries)
{
    std::vector<uint8_t> buf(sizeof(abi::cpuid2_header) + entries.size() * sizeof(kvm_cpuid_entry2));
    auto* h = reinterpret_cast<abi::cpuid2_header*>(buf.data());
    h->nent = static_cast<uint32_t>(entries.size());
    std::memcpy(buf.data() + sizeof(*h), entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
    kvm_ioctl_checked("KVM_SET_CPUID2", fd_.get(), MVM_KVM_SET_CPUID2, h);
}

namespace {
std::vector<uint8_t> msr_buffer(size_t n)
{
    std::vector<uint8_t> buf(sizeof(abi::msrs_header) + n * sizeof(kvm_msr_entry));
    reinterpret_cast<abi::msrs_header*>(buf.data())->nmsrs = static_cast<uint32_t>(n);
    return buf;
}
kvm_msr_entry* msr_entries(std::vector<uint8_t>& buf)
{
    return reinterpret_cast<kvm_msr_entry*>(buf.data() + sizeof(abi::msrs_header));
}
}  // namespace

void Vcpu::set_msrs(const std::vector<std::pair<uint32_t, uint64_t>>& msrs)
{
    auto buf = msr_buffer(msrs.size());
    for (size_t i = 0; i < msrs.size(); i++)
        msr_entries(buf)[i] = kvm_msr_entry{msrs[i].first, 0, msrs[i].second};
    int n = kvm_ioctl_checked("KVM_SET_MSRS", fd_.get(), MVM_KVM_SET_MSRS, buf.data());
    // KVM_SET_MSRS returns how many it set; it stops at the first it refuses.
    if (static_cast<size_t>(n) != msrs.size())
        throw Error(fmt::format("KVM_SET_MSRS set {} of {} MSRs; MSR {:#x} was refused", n, msrs.size(),
                                msrs[static_cast<size_t>(n)].first));
}

std::vector<std::pair<uint32_t, uint64_t>> Vcpu::msrs(const std::vector<uint32_t>& indices) const
{
    auto buf = msr_buffer(indices.size());
    for (size_t i = 0; i < indices.size(); i++)
        msr_entries(buf)[i] = kvm_msr_entry{indices[i], 0, 0};
    int n = kvm_ioctl_checked("KVM_GET_MSRS", fd_.get(), MVM_KVM_GET_MSRS, buf.data());
    std::vector<std::pair<uint32_t, uint64_t>> out;
    for (int i = 0; i < n; i++)
        out.emplace_back(msr_entries(buf)[i].index, msr_entries(buf)[i].data);
    return out;
}

uint32_t Vcpu::tsc_khz() const { return static_cast<uint32_t>(KVM_IOCTL(fd_.get(), KVM_GET_TSC_KHZ, 0)); }

UniqueFd Vcpu::stats_fd() const { return UniqueFd(KVM_IOCTL(fd_.get(), KVM_GET_STATS_FD, 0)); }

}  // namespace mvm
