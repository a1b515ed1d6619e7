#include "migration/vcpu_state.hpp"

#include <algorithm>
#include <cstring>
#include <fmt/format.h>
#include <mutex>
#include <time.h>

#include "base/error.hpp"
#include "vmm/kvm/ioctl.hpp"

#define MVM_KVM_GET_XSAVE2 _IOC(_IOC_READ, KVMIO, 0xcf, 4096)

namespace mvm::migration {

namespace {

constexpr uint32_t kMsrTsc = 0x10;
constexpr uint32_t kStateVersion = 2;  // 2: + tsc_khz, tsc_realtime_ns (1 is still read)

int64_t realtime_ns()
{
    timespec ts{};
    ::clock_gettime(CLOCK_REALTIME, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

template <class T>
void put(std::vector<uint8_t>& out, const T& v)
{
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
}

class Cursor {
public:
    explicit Cursor(std::span<const uint8_t> d) : d_(d) {}
    template <class T>
    T get(const char* what)
    {
        T v;
        if (d_.size() - pos_ < sizeof(T) || pos_ > d_.size())
            throw Error(fmt::format("vCPU state record truncated at {} (offset {})", what, pos_));
        std::memcpy(&v, d_.data() + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::vector<uint8_t> bytes(size_t n, const char* what)
    {
        if (d_.size() - pos_ < n)
            throw Error(fmt::format("vCPU state record truncated at {} (offset {})", what, pos_));
        std::vector<uint8_t> v(d_.begin() + static_cast<long>(pos_), d_.begin() + static_cast<long>(pos_ + n));
        pos_ += n;
        return v;
    }
    bool done() const { return pos_ == d_.size(); }

private:
    std::span<const uint8_t> d_;
    size_t pos_ = 0;
};

}  // namespace

std::vector<uint8_t> VcpuState::serialize() const
{
    std::vector<uint8_t> out;
    put(out, kStateVersion);
    put(out, id);
    put(out, regs);
    put(out, sregs);
    put(out, fpu);
    put(out, static_cast<uint32_t>(xsave.size()));
    out.insert(out.end(), xsave.begin(), xsave.end());
    put(out, static_cast<uint32_t>(has_xcrs));
    put(out, xcrs);
    put(out, events);
    put(out, mp_state);
    put(out, static_cast<uint32_t>(msrs.size()));
    for (const auto& [idx, val] : msrs) {
        put(out, idx);
        put(out, val);
    }
    put(out, tsc_khz);
    put(out, tsc_realtime_ns);
    return out;
}

VcpuState VcpuState::parse(std::span<const uint8_t> data)
{
    Cursor c(data);
    VcpuState s;
    const auto version = c.get<uint32_t>("version");
    if (version != kStateVersion && version != 1)
        throw Error(fmt::format("vCPU state version {} is not 1 or {} (the ones this minivmm reads)", version,
                                kStateVersion));
    s.id = c.get<uint32_t>("id");
    s.regs = c.get<kvm_regs>("regs");
    s.sregs = c.get<kvm_sregs>("sregs");
    s.fpu = c.get<kvm_fpu>("fpu");
    const auto xs = c.get<uint32_t>("xsave size");
    if (xs > (1u << 20))
        throw Error(fmt::format("vCPU state: xsave size {} is implausible", xs));
    s.xsave = c.bytes(xs, "xsave");
    s.has_xcrs = c.get<uint32_t>("has_xcrs") != 0;
    s.xcrs = c.get<kvm_xcrs>("xcrs");
    s.events = c.get<kvm_vcpu_events>("events");
    s.mp_state = c.get<kvm_mp_state>("mp_state");
    const auto n = c.get<uint32_t>("msr count");
    if (n > 4096)
        throw Error(fmt::format("vCPU state: {} MSRs is implausible", n));
    for (uint32_t i = 0; i < n; i++) {
        auto idx = c.get<uint32_t>("msr index");
        auto val = c.get<uint64_t>("msr value");
        s.msrs.emplace_back(idx, val);
    }
    if (version >= 2) {
        s.tsc_khz = c.get<uint32_t>("tsc_khz");
        s.tsc_realtime_ns = c.get<int64_t>("tsc_realtime_ns");
    }
    if (!c.done())
        throw Error("vCPU state record has trailing bytes");
    return s;
}

const std::vector<uint32_t>& saveable_msrs(const Kvm& kvm)
{
    static std::once_flag once;
    static std::vector<uint32_t> list;
    std::call_once(once, [&] {
        std::vector<uint8_t> buf(sizeof(abi::msr_list_header) + 4096 * sizeof(uint32_t));
        auto* h = reinterpret_cast<abi::msr_list_header*>(buf.data());
        h->nmsrs = 4096;
        if (kvm_ioctl_raw(kvm.fd(), MVM_KVM_GET_MSR_INDEX_LIST, h) == 0) {
            const auto* idx = reinterpret_cast<const uint32_t*>(buf.data() + sizeof(*h));
            list.assign(idx, idx + h->nmsrs);
        }
        list.erase(std::remove(list.begin(), list.end(), kMsrTsc), list.end());
    });
    return list;
}

VcpuState save_vcpu(const Kvm& kvm, const Vcpu& vcpu)
{
    VcpuState s;
    s.id = vcpu.id();
    s.regs = vcpu.regs();
    s.sregs = vcpu.sregs();
    const int fd = vcpu.fd();
    KVM_IOCTL(fd, KVM_GET_FPU, &s.fpu);
    if (int size = kvm.cap(KVM_CAP_XSAVE2); size > 0) {
        s.xsave.assign(static_cast<size_t>(std::max(size, 4096)), 0);
        kvm_ioctl_checked("KVM_GET_XSAVE2", fd, MVM_KVM_GET_XSAVE2, s.xsave.data());
    } else if (kvm.cap(KVM_CAP_XSAVE) > 0) {
        s.xsave.assign(4096, 0);
        kvm_ioctl_checked("KVM_GET_XSAVE", fd, MVM_KVM_GET_XSAVE, s.xsave.data());
    }
    if (kvm.cap(KVM_CAP_XCRS) > 0) {
        KVM_IOCTL(fd, KVM_GET_XCRS, &s.xcrs);
        s.has_xcrs = true;
    }
    KVM_IOCTL(fd, KVM_GET_VCPU_EVENTS, &s.events);
    KVM_IOCTL(fd, KVM_GET_MP_STATE, &s.mp_state);
    // One at a time: KVM_GET_MSRS stops at the first MSR it cannot read.
    for (uint32_t idx : saveable_msrs(kvm)) {
        auto v = vcpu.msrs({idx});
        if (!v.empty())
            s.msrs.push_back(v[0]);
    }
    auto tsc = vcpu.msrs({kMsrTsc});
    s.tsc_realtime_ns = realtime_ns();
    if (!tsc.empty())
        s.msrs.push_back(tsc[0]);  // last, so nothing after it moves the TSC
    if (kvm.cap(KVM_CAP_GET_TSC_KHZ) > 0)
        s.tsc_khz = vcpu.tsc_khz();
    return s;
}

namespace {

// The source's TSC frequency, when it differs from ours and KVM can scale.
void set_tsc_khz(const Kvm& kvm, Vcpu& vcpu, uint32_t khz)
{
    if (!khz || kvm.cap(KVM_CAP_GET_TSC_KHZ) <= 0 || vcpu.tsc_khz() == khz)
        return;
    if (kvm.cap(KVM_CAP_TSC_CONTROL) <= 0)
        throw Unsupported(fmt::format("the source's TSC runs at {} kHz, this vCPU's at {} kHz, and this KVM lacks "
                                      "KVM_CAP_TSC_CONTROL to match it",
                                      khz, vcpu.tsc_khz()));
    kvm_ioctl_checked("KVM_SET_TSC_KHZ", vcpu.fd(), KVM_SET_TSC_KHZ, static_cast<unsigned long>(khz));
}

}  // namespace

uint64_t restored_tsc(const VcpuState& s, int64_t now_ns)
{
    uint64_t saved = 0;
    for (const auto& [idx, val] : s.msrs)
        if (idx == kMsrTsc)
            saved = val;
    if (!s.tsc_khz || !s.tsc_realtime_ns)
        return saved;  // a version 1 record: as saved
    const int64_t elapsed_ns = now_ns - s.tsc_realtime_ns;
    if (elapsed_ns <= 0)
        return saved;  // clocks disagree: never move the TSC back
    return saved + static_cast<uint64_t>(static_cast<__int128>(elapsed_ns) * s.tsc_khz / 1000000);
}

std::vector<uint32_t> restore_vcpu(const Kvm& kvm, Vcpu& vcpu, const VcpuState& s)
{
    const int fd = vcpu.fd();
    vcpu.set_sregs(s.sregs);
    vcpu.set_regs(s.regs);
    KVM_IOCTL(fd, KVM_SET_FPU, &s.fpu);
    if (!s.xsave.empty()) {
        if (kvm.cap(KVM_CAP_XSAVE) <= 0)
            throw Unsupported("the destination's KVM lacks KVM_CAP_XSAVE for the source's XSAVE state");
        std::vector<uint8_t> buf = s.xsave;
        kvm_ioctl_checked("KVM_SET_XSAVE", fd, MVM_KVM_SET_XSAVE, buf.data());
    }
    if (s.has_xcrs) {
        kvm_xcrs x = s.xcrs;
        KVM_IOCTL(fd, KVM_SET_XCRS, &x);
    }
    kvm_vcpu_events ev = s.events;
    KVM_IOCTL(fd, KVM_SET_VCPU_EVENTS, &ev);
    kvm_mp_state mp = s.mp_state;
    KVM_IOCTL(fd, KVM_SET_MP_STATE, &mp);
    std::vector<uint32_t> refused;
    set_tsc_khz(kvm, vcpu, s.tsc_khz);
    for (auto m : s.msrs) {
        if (m.first == kMsrTsc)
            m.second = restored_tsc(s, realtime_ns());
        try {
            vcpu.set_msrs({m});
        } catch (const Error&) {
            refused.push_back(m.first);
        }
    }
    return refused;
}

}  // namespace mvm::migration
