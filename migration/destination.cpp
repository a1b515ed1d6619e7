#include "migration/destination.hpp"

#include <algorithm>
#include <cstring>
#include <fmt/format.h>

#include "base/error.hpp"
#include "migration/file.hpp"
#include "migration/postcopy.hpp"
#include "migration/transport/tcp.hpp"

namespace mvm::migration {

// ---- the return path's queue ------------------------------------------------------

void RequestQueue::push(std::span<const uint64_t> gpas)
{
    std::lock_guard lk(mu_);
    q_.insert(q_.end(), gpas.begin(), gpas.end());
    cv_.notify_all();
}

void RequestQueue::end(std::exception_ptr error)
{
    std::lock_guard lk(mu_);
    if (!ended_)
        error_ = error;
    ended_ = true;
    cv_.notify_all();
}

bool RequestQueue::pop(std::vector<uint64_t>& out, std::chrono::milliseconds wait)
{
    std::unique_lock lk(mu_);
    cv_.wait_for(lk, wait, [&] { return !q_.empty() || ended_; });
    out.insert(out.end(), q_.begin(), q_.end());
    q_.clear();
    if (error_)
        std::rethrow_exception(error_);
    return !ended_;
}

void RequestQueue::reset()
{
    std::lock_guard lk(mu_);
    q_.clear();
    ended_ = false;
    error_ = nullptr;
}

bool RequestQueue::ended() const
{
    std::lock_guard lk(mu_);
    return ended_;
}

// ---- in this process --------------------------------------------------------------

void InprocDestination::open(const StreamHeader& h)
{
    // The destination's memory is populated up front, on each node's CPUs
    // and under its policy (like QEMU's -mem-prealloc on the target), so
    // the copy does not pay a page fault per page while the guest waits.
    MachineConfig cfg = src_.config();
    for (auto& n : cfg.nodes)
        n.prealloc = true;
    cfg.show_progress = false;
    dst_ = std::make_unique<StressVm>(src_.kvm(), cfg);
    StreamHeader mine = StreamHeader::of(*dst_, h.nr_channels);
    if (auto why = mine.incompatibility(h); !why.empty())
        throw Error("destination layout differs: " + why);
    if (verify_)
        landed_ = PageHashes::of_memory(*dst_);
    copied_at_stop_.resize(h.nr_channels);
}

InprocDestination::InprocDestination(StressVm& src, bool verify, double post_run_s)
    : src_(src), verify_(verify), post_run_s_(post_run_s)
{
}

InprocDestination::~InprocDestination()
{
    if (faults_ && dst_ && dst_->started() && faults_->missing()) {
        faults_->abandon();
        dst_->kill();
    }
}

void InprocDestination::enter_phase(const char* phase) { stopped_ = std::string(phase) == "stop"; }

void InprocDestination::send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t&)
{
    if (faults_) {
        // Postcopy: each unit placed whole, straight from the parked source.
        for (size_t i = 0; i < gpas.size();) {
            const uint64_t gpa = gpas[i], len = FaultServer::unit_of(src_, gpa);
            faults_->place(gpa, src_.host_ptr(gpa, len), len);
            for (uint64_t off = 0; off < len; off += 4096)
                if (verify_)
                    landed_.note(src_, gpa + off);
            bytes += len;
            i += len / 4096;
        }
        return;
    }
    for (uint64_t gpa : gpas) {
        std::memcpy(dst_->host_ptr(gpa, 4096), src_.host_ptr(gpa, 4096), 4096);
        if (verify_ && stopped_)
            copied_at_stop_.at(channel).push_back(gpa);
        else if (verify_)
            landed_.note(*dst_, gpa);  // as it landed, while it is in cache
        bytes += 4096;
    }
}

ResultRecord InprocDestination::switchover(const std::vector<VcpuState>& states)
{
    resumed_ = resume(*dst_, states);
    ResultRecord r;
    r.ok = 1;
    r.text = "resumed";
    r.restore_ms = resumed_.restore_ms;
    r.refused_msrs = resumed_.refused_msrs;
    return r;
}

ResultRecord InprocDestination::verify(const PageHashes* source)
{
    for (const auto& ch : copied_at_stop_)
        for (uint64_t gpa : ch)
            landed_.note(src_, gpa);  // what was copied: the source has not run since
    ResultRecord r = check_landed(landed_, source);
    const GuestGap g = guest_gap(*dst_, resumed_, std::chrono::seconds(2));
    r.guest_gap_ms = g.max_ms;
    if (g.max_ms < 0)
        r.text += (r.text.empty() ? "" : "; ") + ("downtime_guest_ms not measured: " + g.note);
    return r;
}

ResultRecord InprocDestination::finish()
{
    return run_and_check(*dst_, resumed_, post_run_s_, std::chrono::seconds(10)).result;
}

void InprocDestination::abort()
{
    std::lock_guard lk(abort_mu_);
    requests_.end();
    if (faults_ && faults_->missing())
        faults_->abandon();  // a vCPU waiting on a page would never leave KVM_RUN
    // A postcopy resume may be under way on the sender's thread: released by
    // the abandon above if it waited on a page, it finishes starting first.
    std::lock_guard start(start_mu_);
    if (dst_)
        dst_->kill();
}

void InprocDestination::begin_postcopy(const std::vector<VcpuState>& states, std::span<const uint64_t> discard)
{
    faults_ = std::make_unique<FaultServer>(*dst_, [this](uint64_t gpa) { requests_.push({&gpa, 1}); });
    faults_->arm(discard);
    postcopy_states_ = states;
}

ResultRecord InprocDestination::postcopy_resumed()
{
    std::lock_guard lk(start_mu_);  // abort() from a pusher kills only a started guest
    ResultRecord r = switchover(postcopy_states_);
    faults_->guest_started();
    return r;
}

bool InprocDestination::requests(std::vector<uint64_t>& out, std::chrono::milliseconds wait)
{
    return requests_.pop(out, wait);
}

ResultRecord InprocDestination::end_postcopy()
{
    faults_->finish();  // throws when a page is missing
    requests_.end();
    ResultRecord r;
    r.ok = 1;
    r.text = "postcopy complete";
    r.details = faults_->figures().to_json().dump();
    return r;
}

// ---- minivmm receive over TCP -------------------------------------------------------

// The credentials are loaded in open(), on the migration's thread: like a
// connection that fails, credentials that do not apply fail the migration
// (QMP: status failed, as QEMU's), not the command that started it.
RemoteDestination::RemoteDestination(StressVm& src, Endpoint to, LinkOptions link)
    : src_(src), to_(std::move(to)), link_(std::move(link))
{
}

void RemoteDestination::connect_all(const StreamHeader& h)
{
    const uint64_t session = session_ = new_session_id();
    nch_ = h.nr_channels;
    if (to_.is_fd() && h.nr_channels != 1)
        throw UsageError(fmt::format("--to {}: a connected socket carries one channel, not {}; use --channels 1 (QMP: "
                                     "multifd off)",
                                     to_.str(), h.nr_channels));
    for (uint32_t c = 0; c < h.nr_channels; c++) {
        auto raw = std::make_unique<FdTransport>(connect_endpoint(to_, link_.deadline),
                                                 fmt::format("{} (channel {})", to_.str(), c));
        raw->set_limits(limits(true));
        std::unique_ptr<Transport> t;
        if (tls_)
            t = tls_->connect(std::move(raw)).transport;
        else
            t = std::move(raw);
        if (link_.wrapper)
            t = link_.wrapper->wrap(c, std::move(t));
        ch_.push_back(std::move(t));
        enc_.push_back(std::make_unique<PageEncoder>(link_.compression));
        RecordWriter(*ch_.back()).write(RecordType::Hello, Hello{kStreamVersion, c, h.nr_channels, session}.encode());
    }
    RecordWriter(*ch_[0]).write(RecordType::Header, h.encode());
}

void RemoteDestination::open(const StreamHeader& h)
{
    // Every connection first (the receiver groups them by the HELLOs'
    // session), then the header, whose layout check must pass before any
    // memory moves.
    if (link_.wrapper)
        link_.wrapper->check(h.nr_channels);
    if (link_.tls.enabled() && !tls_) {
        check_tls_over("--tls-creds", link_.tls.creds, link_.tls.hostname, to_);
        tls_ = tls::Context::client(link_.tls, to_.host);
    }
    try {
        connect_all(h);
    } catch (const Error& e) {
        // A receiver that refuses a sender (plain vs TLS, not authorised) says
        // why in a RESULT on channel 0 before it closes: prefer its reason.
        if (!ch_.empty()) {
            try {
                IoLimits l;
                l.idle_s = 2;
                ch_[0]->set_limits(l);
                ResultRecord r = read_result("the connection");
                if (!r.ok && !r.text.empty())
                    throw Error("the destination refused the connection: " + r.text);
            } catch (const Error& refused) {
                if (std::string(refused.what()).rfind("the destination refused", 0) == 0)
                    throw;
            }
        }
        throw;
    }
    ResultRecord r = read_result("the layout check");
    if (!r.ok)
        throw Error("the destination refused the stream: " + r.text);
}

void RemoteDestination::send(uint32_t channel, std::span<const uint64_t> gpas, uint64_t& bytes, uint64_t& zeros)
{
    RecordWriter w(*ch_.at(channel));
    PageEncoder& enc = *enc_.at(channel);
    const uint64_t zeros_before = enc.counts().zero_pages;
    for (size_t i = 0; i < gpas.size(); i += kBatchPages)
        enc.write(w, src_, gpas.subspan(i, std::min(kBatchPages, gpas.size() - i)), frozen_.load());
    bytes += w.bytes();
    zeros += enc.counts().zero_pages - zeros_before;
}

// A channel's limits: the idle one always, the deadline up to the switchover.
IoLimits RemoteDestination::limits(bool deadline, double extra_idle_s) const
{
    IoLimits l;
    l.idle_s = link_.io_timeout_s > 0 ? link_.io_timeout_s + extra_idle_s : 0;
    if (extra_idle_s > 0)
        l.idle_what = fmt::format("--io-timeout plus the receiver's --post-run {:g} s", extra_idle_s);
    if (deadline) {
        l.deadline = link_.deadline;
        l.deadline_what = link_.deadline_what;
    }
    return l;
}

void RemoteDestination::limit(bool deadline, double extra_idle_s)
{
    const IoLimits l = limits(deadline, extra_idle_s);
    for (auto& c : ch_)
        c->set_limits(l);
}

ResultRecord RemoteDestination::switchover(const std::vector<VcpuState>& states)
{
    for (auto& c : ch_)
        RecordWriter(*c).write(RecordType::ChannelDone, {});
    RecordWriter w(*ch_[0]);
    for (const auto& s : states)
        w.write(RecordType::Vcpu, s.serialize());
    w.write(RecordType::End, {});
    ResultRecord r = read_result("the switchover");
    // The destination runs the guest now: no deadline can undo that, only the
    // idle limit holds (the final RESULT also waits out the receiver's post-run).
    receiver_post_run_s_ = r.post_run_s > 0 ? r.post_run_s : 0;
    limit(false, receiver_post_run_s_);
    return r;
}

ResultRecord RemoteDestination::verify(const PageHashes* source)
{
    const std::vector<Digest> d = source ? source->digests() : std::vector<Digest>{};
    RecordWriter(*ch_[0]).write(RecordType::Digests, encode_digests(d));
    return read_result("the verification");
}

void RemoteDestination::abort()
{
    std::lock_guard lk(abort_mu_);
    for (auto& c : ch_)
        c->shutdown();
    if (connecting_)
        connecting_->shutdown();
    if (reader_.joinable() && reader_.get_id() != std::this_thread::get_id())
        reader_.join();
}

RemoteDestination::~RemoteDestination()
{
    std::lock_guard lk(abort_mu_);
    if (reader_.joinable()) {
        for (auto& c : ch_)
            c->shutdown();
        reader_.join();
    }
}

void RemoteDestination::begin_postcopy(const std::vector<VcpuState>& states, std::span<const uint64_t> discard)
{
    for (auto& c : ch_)
        RecordWriter(*c).write(RecordType::ChannelDone, {});
    RecordWriter w(*ch_[0]);
    for (const auto& s : states)
        w.write(RecordType::Vcpu, s.serialize());
    constexpr size_t kPerRecord = 512 * 1024;
    size_t i = 0;
    do {
        const size_t n = std::min(kPerRecord, discard.size() - i);
        w.write(RecordType::Discard, encode_gpas(discard.subspan(i, n)));
        i += n;
    } while (i < discard.size());
    w.write(RecordType::PostcopyRun, {});
    // The guest is about to run there: no deadline can undo that, only the
    // idle limit holds (the receiver sends an empty REQUEST every second).
    limit(false);
    reader_ = std::thread([this] { read_return_path(); });
}

ResultRecord RemoteDestination::postcopy_resumed()
{
    std::unique_lock lk(result_mu_);
    result_cv_.wait(lk, [&] { return !results_.empty() || reader_done_; });
    if (results_.empty()) {
        lk.unlock();
        std::vector<uint64_t> none;
        requests_.pop(none, std::chrono::milliseconds(0));  // throws the reader's error
        throw Error("the destination closed the connection before it resumed in postcopy");
    }
    return results_.front();
}

// Channel 0 from the receiver while postcopy runs: REQUESTs, its "resumed"
// RESULT among them, until the RESULT that ends postcopy.
void RemoteDestination::read_return_path()
{
    try {
        RecordReader r(*ch_[0]);
        for (;;) {
            Record rec = r.read();
            if (rec.type == RecordType::Request) {
                const std::vector<uint64_t> g = decode_gpas(rec.payload, "REQUEST");
                requests_.push(g);
                continue;
            }
            if (rec.type != RecordType::Result)
                throw Error(fmt::format("migration stream: {} on the return path, where REQUEST or RESULT belongs",
                                        record_name(rec.type)));
            ResultRecord res = ResultRecord::decode(rec.payload);
            {
                std::lock_guard lk(result_mu_);
                results_.push_back(res);
                result_cv_.notify_all();
            }
            if (!res.ok)
                throw Error("the destination failed in postcopy: " + res.text);
            // "resumed" first; "postcopy complete" ends it (a recovered cut
            // may have taken "resumed" with it).
            if (res.text == "postcopy complete") {
                requests_.end();
                break;
            }
        }
    } catch (const std::exception& e) {
        requests_.end(std::make_exception_ptr(Error(fmt::format("postcopy's return path: {}", e.what()))));
    }
    std::lock_guard lk(result_mu_);
    reader_done_ = true;
    result_cv_.notify_all();
}

bool RemoteDestination::requests(std::vector<uint64_t>& out, std::chrono::milliseconds wait)
{
    return requests_.pop(out, wait);
}

ResultRecord RemoteDestination::end_postcopy()
{
    for (auto& c : ch_)
        RecordWriter(*c).write(RecordType::ChannelDone, {});
    {
        std::lock_guard lk(abort_mu_);
        if (reader_.joinable())
            reader_.join();
    }
    std::vector<uint64_t> rest;
    requests_.pop(rest, std::chrono::milliseconds(0));  // throws the reader's error
    std::lock_guard lk(result_mu_);
    if (results_.empty() || results_.back().text != "postcopy complete")
        throw Error("postcopy's return path ended without the destination's RESULT");
    return results_.back();
}

void Destination::reconnect(const std::string&)
{
    throw Error("postcopy recovery needs a destination reached over a connection");
}

std::vector<uint64_t> Destination::resume_postcopy()
{
    throw Error("postcopy recovery needs a destination reached over a connection");
}

// Every channel anew to `uri` (the tests' fault wrapper left out: it cut
// the first connections already), HELLO with the paused migration's session,
// RESUME where a new migration's HEADER goes.
void RemoteDestination::reconnect(const std::string& uri)
{
    const Endpoint to = parse_endpoint("migrate", uri, true);
    if (to.is_fd() && nch_ != 1)
        throw Error(fmt::format("{}: a connected socket carries one channel, the paused migration has {}", uri, nch_));
    {
        std::lock_guard lk(abort_mu_);
        for (auto& c : ch_)
            c->shutdown();
        if (reader_.joinable())
            reader_.join();
        ch_.clear();
    }
    const auto until = IoLimits::time_point::clock::now() +
                       std::chrono::duration_cast<IoLimits::time_point::duration>(
                           std::chrono::duration<double>(link_.io_timeout_s > 0 ? link_.io_timeout_s : 30));
    for (uint32_t c = 0; c < nch_; c++) {
        auto raw = std::make_unique<FdTransport>(connect_endpoint(to, until),
                                                 fmt::format("{} (channel {})", to.str(), c));
        raw->set_limits(limits(false));
        {
            std::lock_guard lk(abort_mu_);
            connecting_ = raw.get();
        }
        std::unique_ptr<Transport> t;
        try {
            t = tls_ ? tls_->connect(std::move(raw)).transport : std::move(raw);
        } catch (...) {
            std::lock_guard lk(abort_mu_);
            connecting_ = nullptr;
            throw;
        }
        std::lock_guard lk(abort_mu_);
        connecting_ = nullptr;
        ch_.push_back(std::move(t));
    }
    for (uint32_t c = 0; c < nch_; c++)
        RecordWriter(*ch_[c]).write(RecordType::Hello, Hello{kStreamVersion, c, nch_, session_}.encode());
    RecordWriter(*ch_[0]).write(RecordType::Resume, encode_resume(session_));
}

std::vector<uint64_t> RemoteDestination::resume_postcopy()
{
    std::vector<uint64_t> missing;
    RecordReader r(*ch_[0]);
    for (;;) {
        Record rec = r.read();
        if (rec.type != RecordType::Missing)
            throw Error(fmt::format("migration stream: {} where the recovering destination's MISSING belongs",
                                    record_name(rec.type)));
        const std::vector<uint64_t> g = decode_gpas(rec.payload, "MISSING");
        if (g.empty())
            break;
        missing.insert(missing.end(), g.begin(), g.end());
    }
    requests_.reset();
    {
        std::lock_guard lk(result_mu_);
        reader_done_ = false;
    }
    std::lock_guard lk(abort_mu_);
    reader_ = std::thread([this] { read_return_path(); });
    return missing;
}

// Read between rounds, when no channel thread writes.
PageCounts RemoteDestination::page_counts() const
{
    PageCounts all;
    for (const auto& e : enc_)
        all.add(e->counts());
    return all;
}

void RemoteDestination::enter_phase(const char* phase)
{
    frozen_ = std::string(phase) == "stop" || std::string(phase) == "postcopy";
    if (link_.wrapper)
        link_.wrapper->enter_phase(phase);
}

ResultRecord RemoteDestination::read_result(const char* what)
{
    RecordReader r(*ch_[0]);
    Record rec = r.read();
    if (rec.type != RecordType::Result)
        throw Error(fmt::format("expected RESULT for {}, got {}", what, record_name(rec.type)));
    return ResultRecord::decode(rec.payload);
}

// ---------------------------------------------------------------------------------------

std::unique_ptr<Destination> make_destination(StressVm& src, const std::string& to, bool verify, double post_run_s,
                                              LinkOptions link)
{
    if (to == "inproc")
        return std::make_unique<InprocDestination>(src, verify, post_run_s);
    if (auto f = parse_file_uri("--to", to))
        return std::make_unique<FileDestination>(src, *f, link.compression, FileOptions{link.mapped_ram, link.direct_io});
    return std::make_unique<RemoteDestination>(src, parse_endpoint("--to", to, true), std::move(link));
}

}  // namespace mvm::migration
