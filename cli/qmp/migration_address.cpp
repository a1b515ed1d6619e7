// QMP migration addresses (QEMU qapi/migration.json): the `uri` string or the
// `channels` list (MigrationChannel: one "main" channel whose MigrationAddress
// is a socket, inet or unix or fd, or a file), turned into the one URI form
// minivmm's migration takes: tcp:HOST:PORT, unix:PATH, fd:NAME, file:PATH; the
// named file descriptors fd:NAME refers to (getfd, closefd: misc.json) and the
// fd sets file:/dev/fdset/N refers to (add-fd, remove-fd, query-fdsets).
#include "cli/qmp/monitor_impl.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <charconv>
#include <cstring>
#include <fmt/format.h>

#include "migration/file.hpp"

namespace mvm::qmp {

namespace {

const json& member(const json& o, const char* name, const char* where)
{
    if (!o.is_object() || !o.contains(name))
        throw QmpError(fmt::format("Parameter '{}.{}' is missing", where, name));
    return o.at(name);
}

std::string string_member(const json& o, const char* name, const char* where)
{
    const json& v = member(o, name, where);
    if (!v.is_string())
        throw QmpError(fmt::format("Invalid parameter type for '{}.{}', expected: string", where, name));
    return v.get<std::string>();
}

// One MigrationAddress as a URI.
std::string uri_of_address(const json& addr)
{
    const std::string transport = string_member(addr, "transport", "addr");
    if (transport == "socket") {
        const std::string type = string_member(addr, "type", "addr");
        if (type == "inet")
            return fmt::format("tcp:{}:{}", string_member(addr, "host", "addr"), string_member(addr, "port", "addr"));
        if (type == "unix")
            return "unix:" + string_member(addr, "path", "addr");
        if (type == "fd")
            return "fd:" + string_member(addr, "str", "addr");
        if (type == "vsock")
            throw QmpError("vsock sockets are not supported by minivmm; use inet, unix or fd");
        throw QmpError(fmt::format("Parameter 'addr.type' does not accept value '{}'", type));
    }
    if (transport == "exec" || transport == "rdma" || transport == "file")
        throw QmpError(fmt::format("migration transport '{}' is not supported by minivmm; use a socket (inet, unix "
                                   "or fd)",
                                   transport));
    throw QmpError(fmt::format("Parameter 'addr.transport' does not accept value '{}'", transport));
}

}  // namespace

std::string migration_uri(const Args& a)
{
    if (a.has("uri") == a.has("channels"))
        throw QmpError("need either 'uri' or 'channels' argument");
    if (a.has("uri"))
        return a.str("uri");
    const json& list = a.array("channels");
    if (list.empty())
        throw QmpError("Parameter 'channels' is missing");  // QEMU: an empty list is no list
    std::string uri;
    for (const json& ch : list) {
        const std::string type = string_member(ch, "channel-type", "channels");
        if (type == "cpr")
            throw QmpError("the cpr channel is for cpr-transfer mode, which minivmm does not have");
        if (type != "main")
            throw QmpError(fmt::format("Parameter 'channel-type' does not accept value '{}'", type));
        if (!uri.empty())
            throw QmpError("Channel list has more than one main entry");
        uri = uri_of_address(member(ch, "addr", "channels"));
    }
    return uri;
}

json Monitor::getfd(const json& args)
{
    Args a(args, {"fdname"});
    const std::string name = a.str("fdname");
    if (name.empty() || std::isdigit(static_cast<unsigned char>(name[0])))
        throw QmpError("Parameter 'fdname' expects a name not starting with a digit");
    const int fd = server_.take_fd();
    if (fd < 0)
        throw QmpError("No file descriptor supplied via SCM_RIGHTS");
    std::lock_guard lk(mu_);
    if (auto it = named_fds_.find(name); it != named_fds_.end()) {  // QEMU replaces it
        ::close(it->second);
        it->second = fd;
    } else {
        named_fds_[name] = fd;
    }
    return json::object();
}

json Monitor::closefd(const json& args)
{
    Args a(args, {"fdname"});
    const std::string name = a.str("fdname");
    std::lock_guard lk(mu_);
    auto it = named_fds_.find(name);
    if (it == named_fds_.end())
        throw QmpError(fmt::format("File descriptor named '{}' not found", name));
    ::close(it->second);
    named_fds_.erase(it);
    return json::object();
}

// QEMU's fd sets (misc.json): add-fd puts a descriptor passed with it in a
// set, file:/dev/fdset/N opens the set's file; remove-fd, query-fdsets.
json Monitor::add_fd(const json& args)
{
    Args a(args, {"fdset-id", "opaque"});
    const int fd = server_.take_fd();
    if (fd < 0)
        throw QmpError("No file descriptor supplied via SCM_RIGHTS");
    std::lock_guard lk(mu_);
    int64_t id = 0;
    if (a.has("fdset-id")) {
        id = a.integer("fdset-id");
        if (id < 0) {
            ::close(fd);
            throw QmpError("Parameter 'fdset-id' expects a non-negative value");
        }
    } else {
        while (fdsets_.count(id))  // the first free one, as QEMU
            id++;
    }
    fdsets_[id].push_back({fd, a.str_or("opaque", "")});
    return {{"fdset-id", id}, {"fd", fd}};
}

json Monitor::remove_fd(const json& args)
{
    Args a(args, {"fdset-id", "fd"});
    const int64_t id = a.integer("fdset-id");
    std::lock_guard lk(mu_);
    auto set = fdsets_.find(id);
    bool found = false;
    if (set != fdsets_.end()) {
        auto& fds = set->second;
        for (auto it = fds.begin(); it != fds.end();) {
            if (!a.has("fd") || it->fd == a.integer("fd")) {
                ::close(it->fd);
                it = fds.erase(it);
                found = true;
            } else {
                ++it;
            }
        }
        if (fds.empty())
            fdsets_.erase(set);
    }
    if (!found)  // QEMU's words
        throw QmpError(a.has("fd") ? fmt::format("File descriptor named 'fdset-id:{}, fd:{}' not found", id,
                                                 a.integer("fd"))
                                   : fmt::format("File descriptor named 'fdset-id:{}' not found", id));
    return json::object();
}

json Monitor::query_fdsets() const
{
    std::lock_guard lk(mu_);
    json v = json::array();
    for (const auto& [id, fds] : fdsets_) {
        json list = json::array();
        for (const auto& f : fds) {
            json e = {{"fd", f.fd}};
            if (!f.opaque.empty())
                e["opaque"] = f.opaque;
            list.push_back(e);
        }
        v.push_back({{"fdset-id", id}, {"fds", list}});
    }
    return v;
}

std::string Monitor::take_fdset_uri(const std::string& uri, bool write, const char* cmd)
{
    const std::string prefix = "file:/dev/fdset/";
    if (uri.rfind(prefix, 0) != 0)
        return uri;
    const size_t comma = std::min(uri.find(','), uri.size());
    const std::string n = uri.substr(prefix.size(), comma - prefix.size());
    int64_t id = -1;
    const auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), id);
    if (n.empty() || ec != std::errc() || end != n.data() + n.size())
        throw QmpError(fmt::format("{}: '{}' is not /dev/fdset/N", cmd, uri.substr(5, comma - 5)));
    std::lock_guard lk(mu_);
    auto set = fdsets_.find(id);
    if (set == fdsets_.end())
        throw QmpError(fmt::format("{}: there is no fdset {} (add-fd makes one)", cmd, id));
    // A descriptor open for what the migration does; one without O_DIRECT
    // first (direct-io opens the file again with it).
    int pick = -1;
    for (bool direct : {false, true})
        for (const auto& f : set->second) {
            const int fl = ::fcntl(f.fd, F_GETFL);
            const int mode = fl & O_ACCMODE;
            if (pick < 0 && fl >= 0 && ((fl & O_DIRECT) != 0) == direct &&
                (mode == O_RDWR || mode == (write ? O_WRONLY : O_RDONLY)))
                pick = f.fd;
        }
    if (pick < 0)
        throw QmpError(fmt::format("{}: no descriptor of fdset {} is open for {} (add-fd one opened {})", cmd, id,
                                   write ? "writing" : "reading", write ? "O_WRONLY" : "O_RDONLY"));
    const int dup = ::fcntl(pick, F_DUPFD_CLOEXEC, 0);
    if (dup < 0)
        throw QmpError(fmt::format("{}: cannot duplicate fdset {}'s descriptor: {}", cmd, id, std::strerror(errno)));
    return fmt::format("fd:{}{}", dup, uri.substr(comma));
}

std::string Monitor::take_fd_uri(const std::string& uri, const char* cmd)
{
    if (uri.rfind("fd:", 0) != 0)
        return uri;
    const std::string name = uri.substr(3);
    int fd = -1;
    {
        std::lock_guard lk(mu_);
        if (auto it = named_fds_.find(name); it != named_fds_.end()) {
            fd = it->second;
            named_fds_.erase(it);
        }
    }
    if (fd < 0) {
        if (name.empty() || !std::all_of(name.begin(), name.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
            throw QmpError(fmt::format("File descriptor named '{}' has not been found", name));
        return uri;  // a number: a descriptor this process holds, as QEMU takes it
    }
    const std::string out = fmt::format("fd:{}", fd);
    try {
        if (!migration::parse_file_uri(cmd, out))  // a regular file: a migration to or from it
            migration::parse_fd_uri(cmd, out);
    } catch (const std::exception& e) {
        ::close(fd);
        throw QmpError(e.what());
    }
    return out;
}

}  // namespace mvm::qmp
