// cli/qmp/server.hpp - QMP, QEMU's machine protocol, as docs/interop/qmp-spec
// describes it: a greeting with the version and capabilities, negotiation
// with qmp_capabilities, then one JSON object per command ({"execute",
// "arguments", "id"}) answered by {"return"} or {"error": {"class", "desc"}}
// with the same id, and asynchronous events with timestamps.
//
// The server owns one thread: it accepts clients on a unix socket (created
// owner-only, removed when the server goes) or a TCP socket (loopback unless
// allowed otherwise), reads their commands and runs the handlers one at a
// time, so a handler must be quick: long work (a migration, a dirty-rate
// measurement) runs on a thread of its own and is watched with queries.
// Several clients may be connected at once; a client that goes away, sends
// junk or an unknown command disturbs nothing but its own answer.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace mvm::qmp {

using nlohmann::json;

// A command's failure, with QEMU's error class (GenericError, CommandNotFound, ...).
class QmpError : public std::runtime_error {
public:
    explicit QmpError(const std::string& desc, std::string cls = "GenericError")
        : std::runtime_error(desc), cls_(std::move(cls))
    {
    }
    const std::string& error_class() const { return cls_; }

private:
    std::string cls_;
};

// A command's arguments as QEMU checks them: a member the command does not
// take, a missing one or one of the wrong type is a GenericError with QEMU's
// wording ("Parameter 'x' is unexpected", "Parameter 'uri' is missing",
// "Invalid parameter type for 'max-bandwidth', expected: integer").
class Args {
public:
    // `known`: every member the command takes (checked at once).
    Args(const json& args, std::span<const char* const> known);
    Args(const json& args, std::initializer_list<const char*> known)
        : Args(args, std::span<const char* const>(known.begin(), known.size())) {}
    bool has(const char* name) const { return a_.contains(name); }
    const json& raw(const char* name) const { return a_.at(name); }
    std::string str(const char* name) const;  // required
    std::string str_or(const char* name, const std::string& dflt) const;
    int64_t integer(const char* name) const;  // required
    int64_t int_or(const char* name, int64_t dflt) const;
    bool boolean_or(const char* name, bool dflt) const;
    const json& array(const char* name) const;  // required

private:
    const json& need(const char* name) const;
    const json& a_;
};

// Where the server listens: unix:PATH or tcp:HOST:PORT.
struct Address {
    enum Kind { Unix, Tcp } kind = Unix;
    std::string path;  // unix
    std::string host;  // tcp
    uint16_t port = 0;
    std::string spec;
};

// Parses `spec` for option `option` (throws UsageError in one line). A TCP
// host must be a loopback address unless `allow_remote`.
Address parse_address(const std::string& option, const std::string& spec, bool allow_remote);

class Server {
public:
    using Handler = std::function<json(const json& args)>;

    // Binds and listens at once (throws UsageError naming `option` when it
    // cannot); serves once start() is called.
    Server(const std::string& option, const Address& addr, json version);
    ~Server();  // stop()
    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    // Before start(): the commands (query-commands lists them, by name).
    void add(const std::string& name, Handler h);
    // In a command's handler: the oldest file descriptor its client passed
    // with SCM_RIGHTS and nobody took yet (now the caller's), or -1.
    int take_fd();
    // Called on the server's thread about every 100 ms.
    void on_tick(std::function<void()> f) { tick_ = std::move(f); }
    void start();
    // Closes every client and the socket (a unix socket file is removed).
    void stop();

    // To every client past negotiation, from any thread.
    void emit(const std::string& event, const json& data = nullptr);
    // From a handler: emitted once the command's reply is sent (QEMU's quit
    // answers before its SHUTDOWN event).
    void emit_after_reply(const std::string& event, const json& data = nullptr);
    // What the socket is bound to (a TCP port 0 resolved).
    std::string bound() const { return bound_; }
    std::vector<std::string> commands() const;

private:
    struct Client {
        int fd = -1;
        std::string in;           // the loop's
        std::string out;          // under mu_: owed to the client
        bool negotiated = false;  // under mu_
        bool oob = false;  // qmp_capabilities enabled out-of-band execution
        bool dead = false;        // under mu_: gone or not reading; the loop drops it
        std::deque<int> fds;      // the loop's: passed with SCM_RIGHTS, not yet taken (getfd)
        ~Client();                // closes those
    };
    void loop();
    void accept_client();
    bool read_client(Client& c);  // false: gone
    void handle(Client& c, const std::string& text);
    json dispatch(Client& c, const json& req);
    void send(Client& c, const json& msg);
    void flush(Client& c);

    Address addr_;
    json version_;
    int listen_fd_ = -1;
    int wake_[2] = {-1, -1};
    std::string bound_;
    std::map<std::string, Handler> handlers_;
    std::function<void()> tick_;
    std::vector<std::pair<std::string, json>> after_reply_;  // the server thread's
    Client* current_ = nullptr;  // the server thread's: whose command runs (take_fd)
    std::thread thread_;
    std::atomic<bool> stopping_{false};
    std::mutex mu_;  // guards clients_ (sends from emit() and the loop)
    std::vector<std::unique_ptr<Client>> clients_;
};

// Splits a byte stream into top-level JSON texts as QEMU's JSON streamer
// does: by balanced braces and brackets outside strings (whitespace between
// objects ignored). Returns the complete texts and leaves the rest in `buf`.
std::vector<std::string> split_json_stream(std::string& buf);
// The error QEMU's JSON parser gives for a text that is not JSON: a bare
// word is "invalid keyword 'WORD'" (QEMU 7.2 measured: "not json" gets two
// such replies, one per word, as here), anything else "invalid JSON text".
std::string parse_error_desc(const std::string& text);

}  // namespace mvm::qmp
