"""A QMP client (QEMU's machine protocol, docs/interop/qmp-spec) on a unix socket, standard
library only: capabilities negotiated, events kept for the test to wait on."""
import json
import socket
import time


class QmpError(Exception):
    """An error answer: .cls is QEMU's error class, .desc its description."""

    def __init__(self, name, err):
        self.cls, self.desc = err.get("class", ""), err.get("desc", str(err))
        super().__init__(f"{name}: {self.cls}: {self.desc}")


def wait_for(cond, timeout_s, what, interval_s=0.02):
    """cond()'s first true value, or TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Qmp:
    def __init__(self, path, timeout_s=30, oob=False):
        self.sock = socket.socket(socket.AF_UNIX)
        wait_for(lambda: self.sock.connect_ex(path) == 0, timeout_s, f"the QMP socket {path}", 0.05)
        # Two file objects: a TextIOWrapper opened "rw" drops the lines it has read
        # ahead (events sent together with a reply) whenever it is written to.
        self.r, self.w = self.sock.makefile("r"), self.sock.makefile("w")
        self.greeting = json.loads(self.r.readline())
        self.events = []
        self.oob_id = 0
        # oob: out-of-band execution (exec-oob), as QEMU's recovery tests enable it
        self.cmd("qmp_capabilities", **({"enable": ["oob"]} if oob else {}))

    def _read(self):
        line = self.r.readline()
        if not line:
            raise ConnectionError("the VMM closed its QMP socket")
        msg = json.loads(line)
        if "event" in msg:
            self.events.append(msg)
        return msg

    def cmd(self, name, _fd=None, **args):
        """The command's return value; QmpError for an error answer. _fd: a file descriptor
        passed with the command (SCM_RIGHTS), as getfd and add-fd take one."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        data = json.dumps(msg) + "\n"
        if _fd is None:
            self.w.write(data)
            self.w.flush()
        else:
            socket.send_fds(self.sock, [data.encode()], [_fd])
        while True:
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise QmpError(name, r["error"])

    def cmd_oob(self, name, **args):
        """As cmd(), out-of-band (exec-oob, with an id): the monitor must have enabled oob."""
        self.oob_id += 1
        ident = f"oob-{self.oob_id}"
        msg = {"exec-oob": name, "id": ident}
        if args:
            msg["arguments"] = args
        self.w.write(json.dumps(msg) + "\n")
        self.w.flush()
        while True:
            r = self._read()
            if r.get("id") == ident and "return" in r:
                return r["return"]
            if r.get("id") == ident and "error" in r:
                raise QmpError(name, r["error"])

    def error(self, name, **args):
        """The QmpError a command must answer with (AssertionError if it succeeds)."""
        try:
            self.cmd(name, **args)
        except QmpError as e:
            return e
        raise AssertionError(f"{name} {args} succeeded; an error was expected")

    def poll_events(self):
        """Reads the events already sent (query-status is a harmless round trip)."""
        self.cmd("query-status")
        return self.events

    def wait_event(self, name, timeout_s=60, pred=lambda data: True):
        def seen():
            for e in self.events:
                if e["event"] == name and pred(e.get("data", {})):
                    return e
            self.poll_events()
            return None
        return wait_for(seen, timeout_s, f"event {name}", 0.05)

    def migration_status(self):
        return self.cmd("query-migrate").get("status", "none")

    def wait_status(self, states, timeout_s=120):
        """query-migrate once its status is one of `states`."""
        states = (states,) if isinstance(states, str) else tuple(states)
        return wait_for(lambda: (lambda i: i if i.get("status") in states else None)(self.cmd("query-migrate")),
                        timeout_s, f"migration status {'/'.join(states)}", 0.02)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
