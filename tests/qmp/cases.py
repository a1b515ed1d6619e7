"""The cases, named by the test path QEMU's own suite registers (tests/qtest/migration/ in QEMU
10.0, without the /x86_64 prefix), each checking what QEMU's case checks, with its harness's
method: force non-convergence (a small max-bandwidth, a 1 ms downtime limit), wait until a
dirty sync after the bulk pass (QEMU waits for a marker page written after the start to reach
the destination; a second sync means every page written before it was sent again), then let it
converge (1 GB/s, 30 s) and check the destination's memory. One deviation: QEMU's 3 MB/s would
take 20 s per bulk pass of our 64 MiB guest under emulation, so non-convergence is 32 MiB/s."""
import os
import shutil
import socket

from qmp import QmpError, wait_for
from vmms import Skip

NON_CONVERGE = {"max-bandwidth": 32 << 20, "downtime-limit": 1}
CONVERGE = {"max-bandwidth": 1000000000, "downtime-limit": 30000}
FINAL = ("completed", "failed", "cancelled")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uri(env, kind):
    if kind == "tcp":
        return f"tcp:127.0.0.1:{free_port()}"
    return f"unix:{os.path.join(env.tmp, f'migsocket-{free_port()}')}"


def set_caps(q, caps):
    q.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in ("events",) + tuple(caps)])


def start_pair(env, kind="tcp", caps=(), dst_caps=None, params=None, dst_params=None, incoming_args=None,
               dirty_ring=False, hook=None, oob=False):
    """A running source and a destination listening on a fresh URI (incoming defer, then the
    capabilities and parameters QEMU's case sets on each side, then migrate-incoming)."""
    src = env.vmm.start("src", dirty_ring=dirty_ring, oob=oob)
    dst = env.vmm.start("dst", incoming="defer", dirty_ring=dirty_ring, oob=oob)
    u = uri(env, kind)
    set_caps(src, caps)
    set_caps(dst, caps if dst_caps is None else dst_caps)
    if params:
        src.cmd("migrate-set-parameters", **params)
    if dst_params:
        dst.cmd("migrate-set-parameters", **dst_params)
    if hook:  # QEMU's start hooks: objects and parameters on both sides before migrate-incoming
        hook(src, dst)
    dst.cmd("migrate-incoming", uri=u, **(incoming_args or {}))
    return src, dst, u


def wait_pass(src, passes=2):
    """Until query-migrate's dirty-sync-count reaches `passes` (QEMU's wait_for_migration_pass)."""
    return wait_for(lambda: src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) >= passes, 240,
                    f"dirty sync {passes}", 0.05)


def statuses(q):
    return [e["data"]["status"] for e in q.poll_events() if e["event"] == "MIGRATION"]


def source_state(src):
    """The source's run state once it left finish-migrate: QEMU says completed a moment before its
    run state becomes postmigrate (its migration thread's cleanup), which a loaded host can see."""
    return wait_for(lambda: (lambda st: st if st != "finish-migrate" else None)(src.cmd("query-status")["status"]),
                    10, "the source's run state to leave finish-migrate", 0.02)


def finish(env, src, dst, stopped_source=False, name="dst"):
    """Completed, the source postmigrate (or still paused), every page at the destination, which
    then runs (a stopped source's guest only once cont says so)."""
    info = src.wait_status(FINAL, 300)
    assert info["status"] == "completed", f"migration {info['status']}: {info.get('error-desc', '')}"
    if stopped_source:
        d = env.vmm.destination_status(dst, name, ("completed",))
        assert d == "completed", f"the destination's migration is {d}"
        st = dst.cmd("query-status")["status"]
        assert st == "paused", f"the stopped guest is {st} at the destination before cont, not paused"
    pages, differing = env.vmm.check_destination(src, dst)
    assert differing == 0, f"{differing} of {pages} pages differ at the destination"
    st = source_state(src)
    assert st == "postmigrate" or (stopped_source and st == "paused"), f"the source is {st}, not postmigrate"
    env.vmm.run_destination(dst, name)
    return f"{pages} pages, 0 differ" + ("; paused there until cont, then ran" if stopped_source else "")


def live(env, src, dst, u, passes=2, name="dst"):
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    wait_pass(src, passes)
    src.cmd("migrate-set-parameters", **CONVERGE)
    return finish(env, src, dst, name=name)


# ---- precopy-tests.c ---------------------------------------------------------------------

def case_precopy_unix_plain(env):
    return live(env, *start_pair(env, "unix"))


def case_precopy_tcp_plain(env):
    # Not live: the source is stopped before the migration, the destination continued after.
    src, dst, u = start_pair(env, "tcp")
    src.cmd("stop")
    src.cmd("migrate-set-parameters", **CONVERGE)
    src.cmd("migrate", uri=u)
    return finish(env, src, dst, stopped_source=True)


MULTIFD = {"multifd-channels": 16, "multifd-compression": "none"}


def case_multifd_uri_none(env):
    return live(env, *start_pair(env, "tcp", ("multifd",), params=MULTIFD, dst_params=MULTIFD))


def case_multifd_channels(env):
    # migrate's address as a `channels` list (one main channel, a socket) instead of a uri.
    src, dst, u = start_pair(env, "tcp", ("multifd",), params=MULTIFD, dst_params=MULTIFD)
    _, host, port = u.split(":")
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", channels=[{"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                                                    "host": host, "port": port}}])
    wait_pass(src)
    src.cmd("migrate-set-parameters", **CONVERGE)
    return finish(env, src, dst)


def case_dirty_ring(env):
    # Live, with KVM's dirty ring (4096 entries per vCPU) instead of the dirty bitmap.
    return live(env, *start_pair(env, "unix", dirty_ring=True))


def ring_dirty_rate(q):
    """One calc-dirty-rate in dirty-ring mode over 1 s: vCPU 0's dirty rate, MB/s."""
    q.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
    r = wait_for(lambda: (lambda d: d if d.get("status") == "measured" else None)(q.cmd("query-dirty-rate")), 60,
                 "query-dirty-rate to say measured", 0.1)
    return r["vcpu-dirty-rate"][0]["dirty-rate"]


def case_dirty_limit(env):
    """/dirty_limit (misc-tests.c): the dirty-limit capability at 50 MB/s per vCPU with the dirty
    ring, not converging: the throttle time per round becomes non-zero; cancelled, the
    destination fails and exits, the throttle time drops to 0; migrated again to a fresh
    destination: throttling again, every vCPU's limit 50; at pre-switchover (1 GB/s... here
    400 MB/s, 250 ms) what remains is under bandwidth x downtime; continue, every page there.
    QEMU's 50 MB/s is far under a KVM guest's rate; one deviation: a guest slower than 200 MB/s
    (minivmm's in the emulated host) gets a quarter of its measured rate, so the cap bites."""
    src = env.vmm.start("src", dirty_ring=True)
    limit = max(1, min(50, ring_dirty_rate(src) // 4))
    set_caps(src, ("dirty-limit", "pause-before-switchover"))
    src.cmd("migrate-set-parameters", **{"x-vcpu-dirty-limit-period": 1000, "vcpu-dirty-limit": limit},
            **NON_CONVERGE)
    if env.vmm.name == "minivmm":  # QEMU's pre-copy has no round limit: it runs on until told
        src.cmd("migrate-set-parameters", **{"x-minivmm-max-iterations": 100000})

    def destination(name):
        dst = env.vmm.start(name, incoming="defer", dirty_ring=True)
        set_caps(dst, ())
        u = uri(env, "unix")
        dst.cmd("migrate-incoming", uri=u)
        return dst, u

    def throttle():  # a MigrationInfo member (not ram's), as QEMU's test reads it
        return src.cmd("query-migrate").get("dirty-limit-throttle-time-per-round", 0)

    dst, u = destination("dst")
    src.cmd("migrate", uri=u)
    wait_for(lambda: throttle() != 0, 120, "dirty-limit-throttle-time-per-round above 0", 0.1)
    src.cmd("migrate_cancel")
    src.wait_status(("cancelled",), 60)
    p = env.vmm.process("dst")
    rc = wait_for(lambda: p.poll() is not None and (p.returncode,), 60, "the cancelled destination to exit")[0]
    assert rc != 0, "the cancelled destination exited 0"
    wait_for(lambda: throttle() == 0, 10, "the throttle time back to 0 after the cancel", 1)
    dst2, u2 = destination("dst2")
    src.cmd("migrate", uri=u2)
    first = wait_for(lambda: throttle() or None, 120, "throttling in the second migration", 0.1)
    lim = src.cmd("query-vcpu-dirty-limit")
    assert lim and all(v["limit-rate"] == limit for v in lim), f"query-vcpu-dirty-limit: {lim}"
    src.cmd("migrate-set-parameters", **{"downtime-limit": 250, "max-bandwidth": 400000000})
    info = src.wait_status(("pre-switchover",), 240)
    remaining = info["ram"]["remaining"]
    assert remaining < 100000000 * 1.01, f"{remaining} bytes remain at pre-switchover"
    src.cmd("migrate-continue", state="pre-switchover")
    return (finish(env, src, dst2, name="dst2") + f"; throttle {first} us per round, limit {limit} MB/s, "
            f"{remaining} bytes at pre-switchover")


def case_vcpu_dirty_limit(env):
    """/migration/vcpu_dirty_limit (not a migration): the dirty ring measures vCPU 0's rate;
    set-vcpu-dirty-limit at half of it must bring it below limit + 25 MB/s within 20
    measurements, query-vcpu-dirty-limit says the limit; after cancel-vcpu-dirty-limit it must
    rise above limit + 25 again within 20."""
    vm = env.vmm.start("src", dirty_ring=True)
    rate = ring_dirty_rate(vm)
    assert rate > 0, "the dirty ring measured no dirty pages"
    quota = rate // 2
    vm.cmd("set-vcpu-dirty-limit", **{"dirty-rate": quota})
    lim = vm.cmd("query-vcpu-dirty-limit")
    assert lim and lim[0]["limit-rate"] == quota, f"query-vcpu-dirty-limit says {lim}, not limit-rate {quota}"
    limited = None
    for _ in range(20):
        r = ring_dirty_rate(vm)
        if r < quota + 25:
            limited = r
            break
    assert limited is not None, f"the rate stayed at or above {quota + 25} MB/s with the limit {quota}"
    vm.cmd("cancel-vcpu-dirty-limit")
    assert vm.cmd("query-vcpu-dirty-limit") == [], "a limit is still listed after cancel-vcpu-dirty-limit"
    back = None
    for _ in range(20):
        r = ring_dirty_rate(vm)
        if r > quota + 25:
            back = r
            break
    assert back is not None, f"the rate stayed at or below {quota + 25} MB/s after the cancel"
    return f"{rate} MB/s, limit {quota}: {limited}, cancelled: {back}"


def case_switchover_ack(env):
    # switchover-ack with a return path: the switchover must not wait for an ACK nothing sends.
    caps = ("return-path", "switchover-ack")
    return live(env, *start_pair(env, "tcp", caps))


def case_multifd_zero_page(mode):
    def case(env):
        src, dst, u = start_pair(env, "tcp", ("multifd",), params=dict(MULTIFD, **{"zero-page-detection": mode}),
                                 dst_params=MULTIFD)
        got = src.cmd("query-migrate-parameters").get("zero-page-detection")
        assert got == mode, f"query-migrate-parameters says zero-page-detection {got}"
        return live(env, src, dst, u)
    return case


def case_multifd_cancel(env):
    src, dst, u = start_pair(env, "tcp", ("multifd",), params={"multifd-channels": 16},
                             dst_params={"multifd-channels": 16})
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    wait_pass(src, 1)
    src.cmd("migrate_cancel")
    info = src.wait_status(FINAL, 60)
    assert info["status"] == "cancelled", f"status {info['status']}, not cancelled"
    p = env.vmm.process("dst")
    rc = wait_for(lambda: p.poll() is not None and (p.returncode,), 60, "the first destination to exit")[0]
    assert rc != 0, "the first destination exited 0 after the cancel"
    assert src.cmd("query-status")["status"] == "running", "the source does not run on after the cancel"
    dst2 = env.vmm.start("dst2", incoming="defer")
    set_caps(dst2, ("multifd",))
    dst2.cmd("migrate-set-parameters", **{"multifd-channels": 16})
    u2 = uri(env, "tcp")
    dst2.cmd("migrate-incoming", uri=u2)
    return f"cancelled (first destination exit {rc}), then " + live(env, src, dst2, u2, passes=1, name="dst2")


def case_auto_converge(env):
    init, inc, top = 5, 25, 95
    src, dst, u = start_pair(env, "unix", ("auto-converge", "pause-before-switchover"), dst_caps=())
    src.cmd("migrate-set-parameters", **{"cpu-throttle-initial": init, "cpu-throttle-increment": inc,
                                         "max-cpu-throttle": top}, **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    pct = wait_for(lambda: src.cmd("query-migrate").get("cpu-throttle-percentage", 0), 240,
                   "cpu-throttle-percentage", 0.05)
    assert pct >= init, f"first throttle {pct} % below cpu-throttle-initial {init}"
    assert src.cmd("query-status")["status"] == "running", "the source stopped while throttled"
    src.cmd("migrate-set-parameters", **CONVERGE)
    src.wait_status(("pre-switchover",), 240)
    last = src.cmd("query-migrate").get("cpu-throttle-percentage", 0)
    assert last <= top, f"throttle {last} % above max-cpu-throttle {top}"
    src.cmd("migrate-continue", state="pre-switchover")
    return f"throttle {pct}..{last} %; " + finish(env, src, dst)


def cancel_after(state):
    """/migration/cancel/src/after/STATE: migrate_cancel once the source reached STATE (QEMU's
    suffix variants): the source ends cancelled, or keeps its final state, and runs on."""
    def case(env):
        if state == "none":
            src = env.vmm.start("src")
            dst = env.vmm.start("dst", incoming="defer")
            dst.cmd("migrate_cancel")   # no migration on either side: nothing happens
            src.cmd("migrate_cancel")
            set_caps(src, ())
            set_caps(dst, ())
            u = uri(env, "unix")
            dst.cmd("migrate-incoming", uri=u, **{"exit-on-error": False})
            src.cmd("migrate-set-parameters", **CONVERGE)
            src.cmd("migrate", uri=u)
            return "cancels with no migration changed nothing; then " + finish(env, src, dst)
        caps = ("pause-before-switchover", "multifd") if state in ("setup", "active", "pre-switchover") else ()
        src = env.vmm.start("src")
        dst = env.vmm.start("dst", incoming="defer")
        set_caps(src, caps)
        set_caps(dst, caps)
        u = uri(env, "unix")
        if state != "failed":   # failed: nobody listens, so the connection fails
            dst.cmd("migrate-incoming", uri=u, **{"exit-on-error": False})
        src.cmd("migrate-set-parameters", **(NON_CONVERGE if state == "active" else CONVERGE))
        src.cmd("migrate", uri=u)
        if state in ("setup", "active", "pre-switchover", "completed", "failed"):
            src.wait_event("MIGRATION", 240, lambda d: d.get("status") == state)
            src.cmd("migrate_cancel")
        else:  # cancelling, cancelled: cancel, wait for that state, cancel again
            src.cmd("migrate_cancel")
            src.wait_event("MIGRATION", 240, lambda d: d.get("status") == state)
            src.cmd("migrate_cancel")
        info = src.wait_status(FINAL, 120)
        want = state if state in ("completed", "failed") else "cancelled"
        assert info["status"] == want, f"status {info['status']}, not {want}"
        assert "completed" not in statuses(src) or want == "completed", statuses(src)
        if want != "completed":
            st = src.cmd("query-status")["status"]
            assert st == "running", f"the source is {st} after the cancel, not running"
        if state == "failed":
            return f"source {info['status']}"
        d = env.vmm.destination_status(dst, "dst")
        assert d == ("completed" if want == "completed" else "failed"), f"destination {d}"
        return f"source {info['status']}, destination {d}"
    return case


def validate_uuid(src_uuid, dst_uuid, fails):
    """/migration/validate_uuid*: the source with the validate-uuid capability sends its -uuid;
    a destination with another one refuses the migration and exits non-zero, the source fails and
    runs on; a side without a UUID has nothing to compare. (QEMU's case does not check memory.)"""
    def case(env):
        src = env.vmm.start("src", uuid=src_uuid)
        u = uri(env, "unix")
        dst = env.vmm.start("dst", incoming=u, uuid=dst_uuid)
        set_caps(src, ("validate-uuid",))
        src.cmd("migrate-set-parameters", **{"downtime-limit": 1000000})
        if src_uuid:
            got = src.cmd("query-uuid")["UUID"]
            assert got == src_uuid, f"query-uuid says {got}, not {src_uuid}"
        src.cmd("migrate", uri=u)
        info = src.wait_status(FINAL, 240)
        if not fails:
            assert info["status"] == "completed", f"migration {info['status']}: {info.get('error-desc', '')}"
            return "completed"
        assert info["status"] == "failed", f"migration {info['status']}, not failed"
        p = env.vmm.process("dst")
        rc = wait_for(lambda: p.poll() is not None and (p.returncode,), 60, "the destination to exit")[0]
        assert rc != 0, "the destination exited 0 with another UUID"
        assert src.cmd("query-status")["status"] == "running", "the source does not run on after the failure"
        return f"failed ({info.get('error-desc', '')[:80]}); destination exit {rc}; the source runs on"
    return case


UUID_SRC, UUID_DST = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def case_precopy_fd_tcp(env):
    """/migration/precopy/fd/tcp: the two ends of a socketpair passed with getfd (SCM_RIGHTS) as
    'fd-mig' to each side, migrate-incoming and migrate with fd:fd-mig; not live (QEMU's case
    stops the source, the destination runs on cont)."""
    src = env.vmm.start("src")
    dst = env.vmm.start("dst", incoming="defer")
    set_caps(src, ())
    set_caps(dst, ())
    a, b = socket.socketpair()
    try:
        dst.cmd("getfd", _fd=a.fileno(), fdname="fd-mig")
        dst.cmd("migrate-incoming", uri="fd:fd-mig")
        src.cmd("getfd", _fd=b.fileno(), fdname="fd-mig")
    finally:  # each VMM holds its own copy now
        a.close()
        b.close()
    src.cmd("stop")
    src.cmd("migrate-set-parameters", **CONVERGE)
    src.cmd("migrate", uri="fd:fd-mig")
    return finish(env, src, dst, stopped_source=True)


def case_getfd_errors(env):
    """Not a QEMU path: getfd without a descriptor, closefd of an unknown name, migrate to an fd
    name never given, add-fd without a descriptor, remove-fd of no set: QMP errors, the guest
    untouched."""
    src = env.vmm.start("src")
    e1 = src.error("getfd", fdname="x")
    e2 = src.error("closefd", fdname="nope")
    e3 = src.error("migrate", uri="fd:nope")
    a, b = socket.socketpair()
    try:
        src.cmd("getfd", _fd=a.fileno(), fdname="spare")
        src.cmd("closefd", fdname="spare")
        e4 = src.error("closefd", fdname="spare")
    finally:
        a.close()
        b.close()
    # fd sets: add-fd without a descriptor, remove-fd of a set never made, a migration to one.
    e5 = src.error("add-fd", **{"fdset-id": 3})
    e6 = src.error("remove-fd", **{"fdset-id": 3})
    assert src.cmd("query-fdsets") == [], "query-fdsets lists a set after failed add-fds"
    assert src.cmd("query-status")["status"] == "running", "the guest does not run after the errors"
    return " | ".join(e.desc for e in (e1, e2, e3, e4, e5, e6))


# ---- tls-tests.c ---------------------------------------------------------------------------

def psk_dir(env, name, key=None):
    """A tls-creds-psk directory: keys.psk with QEMU's default username, 'qemu:HEXKEY'."""
    d = os.path.join(env.tmp, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "keys.psk"), "w") as f:
        f.write(f"qemu:{key or os.urandom(32).hex()}\n")
    return d


def psk_hook(env, mismatch=False):
    """QEMU's PSK start hook: a client object on the source, a server object on the destination
    (mismatch: another key), tls-creds on both."""
    key = os.urandom(32).hex()
    src_dir = psk_dir(env, "tlscredspsk0", key)
    dst_dir = psk_dir(env, "tlscredspsk1") if mismatch else src_dir

    def hook(src, dst):
        src.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "tlscredspsk0", "endpoint": "client",
                                 "dir": src_dir})
        src.cmd("migrate-set-parameters", **{"tls-creds": "tlscredspsk0"})
        dst.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "tlscredspsk0", "endpoint": "server",
                                 "dir": dst_dir})
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tlscredspsk0"})
    return hook


def not_live(env, src, dst, u, name="dst"):
    """QEMU's non-live flow: stop the source, migrate at full speed, cont the destination."""
    src.cmd("stop")
    src.wait_event("STOP", 60)
    src.cmd("migrate-set-parameters", **CONVERGE)
    src.cmd("migrate", uri=u)
    return finish(env, src, dst, stopped_source=True, name=name)


def expect_fail(env, src, dst, u, name="dst"):
    """QEMU's MIG_TEST_FAIL: the source fails (setup/active/failed only) and runs on; the
    destination stays alive."""
    src.cmd("migrate", uri=u)
    info = src.wait_status(FINAL, 120)
    assert info["status"] == "failed", f"migration {info['status']}, not failed"
    seen = set(statuses(src))
    assert seen <= {"setup", "active", "failed"}, f"states other than setup/active/failed: {seen}"
    assert src.cmd("query-status")["status"] == "running", "the source does not run on after the failure"
    assert env.vmm.process(name).poll() is None, "the destination did not stay alive"
    return f"failed ({info.get('error-desc', '')[:90]}); the source runs on, the destination is alive"


def tls_psk(kind, multifd=False, mismatch=False):
    def case(env):
        caps, params = (("multifd",), MULTIFD) if multifd else ((), None)
        src, dst, u = start_pair(env, kind, caps, params=params, dst_params=params, hook=psk_hook(env, mismatch))
        return (expect_fail if mismatch else not_live)(env, src, dst, u)
    return case


def x509_hook(env, server_set, client_set=None, hostname=None, authz=None, anon=None):
    """QEMU's x509 start hook: tls-creds-x509 objects (verify-peer on), tls-hostname on the
    source when given, authz-simple + tls-authz on the destination when given. anon: the client
    has no certificate (its directory only the CA's), the server's verify-peer is `anon`
    ("allow": false, "reject": true)."""
    if not env.x509:
        raise Skip("no x509 credentials: openssl is missing here and no --x509 sets were given")
    sdir = os.path.join(env.x509, server_set)
    cdir = os.path.join(env.x509, client_set or server_set)
    if anon:
        cdir = os.path.join(env.tmp, "anon-client")
        os.makedirs(cdir, exist_ok=True)
        shutil.copy(os.path.join(sdir, "ca-cert.pem"), cdir)

    def hook(src, dst):
        src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tlscredsx509client0", "endpoint": "client",
                                 "dir": cdir, "sanity-check": True, "verify-peer": True})
        src.cmd("migrate-set-parameters", **{"tls-creds": "tlscredsx509client0"})
        if hostname:
            src.cmd("migrate-set-parameters", **{"tls-hostname": hostname})
        dst.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tlscredsx509server0", "endpoint": "server",
                                 "dir": sdir, "sanity-check": True, "verify-peer": anon != "allow"})
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tlscredsx509server0"})
        if authz:
            dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "tlsauthz0", "identity": authz})
            dst.cmd("migrate-set-parameters", **{"tls-authz": "tlsauthz0"})
    return hook


def tls_x509(kind, server_set, client_set=None, hostname=None, authz=None, multifd=False, fails=None, anon=None):
    """fails: None (success, not live), "alive" (QEMU's MIG_TEST_FAIL) or "quit"
    (MIG_TEST_FAIL_DEST_QUIT_ERR: the source fails in setup, the destination exits non-zero)."""
    def case(env):
        caps, params = (("multifd",), MULTIFD) if multifd else ((), None)
        hook = x509_hook(env, server_set, client_set, hostname, authz, anon)
        src, dst, u = start_pair(env, kind, caps, params=params, dst_params=params, hook=hook)
        if fails == "alive":
            return expect_fail(env, src, dst, u)
        if fails == "quit":
            src.cmd("migrate", uri=u)
            info = src.wait_status(FINAL, 120)
            assert info["status"] == "failed", f"migration {info['status']}, not failed"
            seen = set(statuses(src))
            assert seen <= {"setup", "failed"}, f"states other than setup/failed: {seen}"
            p = env.vmm.process("dst")
            rc = wait_for(lambda: p.poll() is not None and (p.returncode,), 20, "the destination to exit")[0]
            assert rc != 0, "the destination exited 0"
            return f"failed ({info.get('error-desc', '')[:90]}); destination exit {rc}"
        return not_live(env, src, dst, u)
    return case


def case_postcopy_tls_psk(env):
    src, dst, u = start_pair(env, "tcp", ("postcopy-ram",), dst_caps=("postcopy-ram", "postcopy-blocktime"),
                             hook=psk_hook(env))
    return postcopy_flow(env, src, dst, u)


# ---- postcopy-tests.c ----------------------------------------------------------------------

def case_postcopy_plain(env):
    src, dst, u = start_pair(env, "tcp", ("postcopy-ram",), dst_caps=("postcopy-ram", "postcopy-blocktime"))
    return postcopy_flow(env, src, dst, u)


def postcopy_with(params):
    """Not a QEMU 10.0 path (its postcopy refuses multifd; 10.1 added it): postcopy with the
    multifd channels (and their compression) carrying the pushed and requested pages."""
    def case(env):
        try:
            src, dst, u = start_pair(env, "tcp", ("postcopy-ram", "multifd"),
                                     dst_caps=("postcopy-ram", "postcopy-blocktime", "multifd"),
                                     params=params, dst_params=params)
        except QmpError as e:
            raise Skip(f"{env.vmm.name} refuses it: {e.desc}")
        return postcopy_flow(env, src, dst, u)
    return case


def postcopy_flow(env, src, dst, u):
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    wait_pass(src)
    src.cmd("migrate-start-postcopy")
    src.wait_event("STOP", 120)
    src.cmd("migrate-set-parameters", **CONVERGE)
    # The destination's figures, once every page is there (minivmm's receive ends soon after).
    d = wait_for(lambda: (lambda i: i if "postcopy-blocktime" in i else None)(dst.cmd("query-migrate")), 240,
                 "postcopy-blocktime in the destination's query-migrate", 0.05)
    return finish(env, src, dst) + f"; blocktime {d['postcopy-blocktime']} ms"


def postcopy_preempt(tls=False):
    """/migration/postcopy/preempt/plain (and tls/psk): as /migration/postcopy/plain with the
    postcopy-preempt capability on both sides (requested pages on a channel of their own)."""
    def case(env):
        caps = ("postcopy-ram", "postcopy-preempt")
        src, dst, u = start_pair(env, "tcp", caps, dst_caps=caps + ("postcopy-blocktime",),
                                 hook=psk_hook(env) if tls else None)
        return postcopy_flow(env, src, dst, u)
    return case


def postcopy_recovery(fail=None, tls=False, preempt=False):
    """QEMU's test_postcopy_recovery_common: postcopy at 4 KiB/s (max-postcopy-bandwidth) so it
    cannot end by itself, migrate-pause on the source cuts it: both sides postcopy-paused (the
    destination's guest runs on). fail="handshake": each side gets an end of two unrelated
    socket pairs (getfd fd-mig), migrate-recover (out-of-band) and migrate resume:true on them
    reach postcopy-recover and hang; migrate-pause on each side brings it back to paused.
    fail="reconnect": the source's peer is closed, so its resume fails and it pauses again by
    itself (QEMU's case waits for postcopy-recover-setup, then postcopy-paused). Then migrate-recover on a fresh unix
    socket, migrate resume:true on it, max-postcopy-bandwidth unlimited: completed, every page
    at the destination."""
    def case(env):
        caps = ("postcopy-ram",) + (("postcopy-preempt",) if preempt else ())
        src, dst, u = start_pair(env, "tcp", caps, dst_caps=caps + ("postcopy-blocktime",),
                                 hook=psk_hook(env) if tls else None, oob=True)
        src.cmd("migrate-set-parameters", **NON_CONVERGE)
        src.cmd("migrate", uri=u)
        wait_pass(src)
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 4096})
        src.cmd("migrate-start-postcopy")
        src.wait_event("STOP", 120)  # QEMU's migrate_postcopy_start (its destination, started with -S here, stays paused)
        src.wait_status(("postcopy-active",), 120)
        src.cmd("migrate-pause")
        dst.wait_status(("postcopy-paused",), 60)
        src.wait_status(("postcopy-paused",), 60)
        note = ""
        if fail:
            note = recover_fail(src, dst, fail)
        src.events.clear()
        ru = uri(env, "unix")
        dst.cmd_oob("migrate-recover", uri=ru)
        src.cmd("migrate", uri=ru, resume=True)
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
        src.cmd("migrate-set-parameters", **CONVERGE)
        d = wait_for(lambda: (lambda i: i if "postcopy-blocktime" in i else None)(dst.cmd("query-migrate")), 240,
                     "postcopy-blocktime in the destination's query-migrate", 0.05)
        done = finish(env, src, dst)
        seen = statuses(src)
        for st in ("postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed"):
            assert st in seen, f"the source's MIGRATION events after the resume lack {st}: {seen}"
        return (f"{done}; paused on both sides by migrate-pause{note}, recovered over a new unix socket; "
                f"blocktime {d['postcopy-blocktime']} ms")
    return case


def recover_fail(src, dst, stage):
    """QEMU's postcopy_recover_fail: a recovery that cannot work, then both sides paused again."""
    a0, a1 = socket.socketpair()
    b0, b1 = socket.socketpair()
    try:
        src.cmd("getfd", _fd=a0.fileno(), fdname="fd-mig")
        dst.cmd("getfd", _fd=b0.fileno(), fdname="fd-mig")
        b1.send(b"\x08")  # QEMU_VM_COMMAND: the first byte of a recovery, then nothing
        if stage == "reconnect":
            a1.close()  # the source fails while connecting: postcopy-recover is never reached
        src.events.clear()
        dst.cmd_oob("migrate-recover", uri="fd:fd-mig")
        src.cmd("migrate", uri="fd:fd-mig", resume=True)
        src.wait_event("MIGRATION", 60, lambda e: e["status"] == "postcopy-recover-setup")
        if stage == "reconnect":
            src.wait_event("MIGRATION", 60, lambda e: e["status"] == "postcopy-paused")
        else:
            src.wait_event("MIGRATION", 60, lambda e: e["status"] == "postcopy-recover")
            src.wait_status(("postcopy-recover",), 60)
            src.cmd("migrate-pause")
        src.wait_status(("postcopy-paused",), 60)
        dst.wait_status(("postcopy-recover",), 60)
        dst.cmd_oob("migrate-pause")
        dst.wait_status(("postcopy-paused",), 60)
    finally:
        for s in (a0, a1, b0, b1):
            s.close()
    return f", a recovery on unpaired sockets failed ({stage}) and was paused on both sides"


# ---- compression-tests.c -------------------------------------------------------------------

def case_multifd_zstd(env):
    p = {"multifd-channels": 16, "multifd-compression": "zstd", "multifd-zstd-level": 2}
    return live(env, *start_pair(env, "tcp", ("multifd",), params=p, dst_params=p))


# ---- file-tests.c --------------------------------------------------------------------------

FILE_OFFSET, FILE_MARKER = 0x1000, b"X"
MAPPED_RAM_MULTIFD = {"multifd-channels": 4}


def add_fdset(path, q, mode, count, dio):
    """QEMU's fdset hooks: `count` descriptors of the file opened `mode` added to fdset 1 of
    `q` (with dio, the ones after the first opened O_DIRECT)."""
    for i in range(count):
        fd = os.open(path, os.O_CREAT | mode | (os.O_DIRECT if dio and i else 0), 0o660)
        try:
            q.cmd("add-fd", _fd=fd, **{"fdset-id": 1})
        finally:
            os.close(fd)


def file_flow(env, stop_src, caps=(), params=None, offset=False, fd=False, fdset=0, dio=False):
    """QEMU's test_file_common: the source migrates into a file (stopped first, or live until it
    stops at the end) and completes; only then does the destination read it (migrate-incoming),
    complete and run (on cont when the source was stopped); its memory is checked. fdset: the
    file reached through /dev/fdset/1, that many descriptors added to each side (add-fd)."""
    path = os.path.join(env.tmp, "migfile")
    if offset:
        with open(path, "wb") as f:
            f.write(FILE_MARKER * FILE_OFFSET)
    u = (f"file:/dev/fdset/1" if fdset else f"file:{path}") + (f",offset={FILE_OFFSET}" if offset else "")
    src = env.vmm.start("src")
    dst = env.vmm.start("dst", incoming="defer")
    for q in (src, dst):
        set_caps(q, caps)
        if params:
            q.cmd("migrate-set-parameters", **params)
    src.cmd("migrate-set-parameters", **CONVERGE)
    if fdset:
        add_fdset(path, src, os.O_WRONLY, fdset, dio)
        add_fdset(path, dst, os.O_RDONLY, fdset, dio)
    if fd:  # the file opened twice, one descriptor passed to each side (getfd 'fd-mig')
        fds = [os.open(path, os.O_CREAT | os.O_RDWR, 0o660) for _ in range(2)]
        try:
            dst.cmd("getfd", _fd=fds[0], fdname="fd-mig")
            src.cmd("getfd", _fd=fds[1], fdname="fd-mig")
        finally:
            for x in fds:
                os.close(x)
        u = "fd:fd-mig"
    if stop_src:
        src.cmd("stop")
    src.cmd("migrate", uri=u)
    info = src.wait_status(FINAL, 300)
    assert info["status"] == "completed", f"migration {info['status']}: {info.get('error-desc', '')}"
    st = source_state(src)
    assert st == "postmigrate" or (stop_src and st == "paused"), f"the source is {st}, not postmigrate"
    dst.cmd("migrate-incoming", uri=u)
    out = []
    if fd:  # the migrations took the descriptors: closefd finds none (QEMU's check)
        out.append("closefd after: " + " / ".join(q.error("closefd", fdname="fd-mig").desc for q in (src, dst)))
    d = env.vmm.destination_status(dst, "dst", ("completed",))
    assert d == "completed", f"the destination's migration is {d}"
    pages, differing = env.vmm.check_restored(src, dst, "dst")
    assert differing == 0, f"{differing} of {pages} pages differ at the destination"
    out.insert(0, f"{pages} pages, 0 differ")
    if offset:
        magic = env.vmm.stream_magic("mapped-ram" in caps)
        with open(path, "rb") as f:
            head = f.read(FILE_OFFSET + len(magic))
        assert head[:FILE_OFFSET] == FILE_MARKER * FILE_OFFSET, "the bytes before the offset changed"
        assert head[FILE_OFFSET:] == magic, f"the stream does not start at the offset: {head[FILE_OFFSET:]!r}"
        out.append("the 4 KiB before the offset untouched, the stream starts there")
    if fdset:  # QEMU's end hook: remove-fd empties the source's sets
        src.cmd("remove-fd", **{"fdset-id": 1})
        left = src.cmd("query-fdsets")
        assert left == [], f"query-fdsets after remove-fd: {left}"
        out.append("remove-fd, then query-fdsets []")
    return "; ".join(out)


def file_case(stop_src, caps=(), params=None, offset=False, fd=False, dio=False, fdset=0):
    def case(env):
        if dio:
            probe = os.path.join(env.tmp, "dio-probe")
            try:
                os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
            except OSError as e:
                raise Skip(f"O_DIRECT is not supported in {env.tmp}: {e.strerror}")
            os.unlink(probe)
        return file_flow(env, stop_src, caps, params, offset, fd, fdset, dio)
    return case


def case_file_offset_bad(env):
    src = env.vmm.start("src")
    set_caps(src, ())
    e = src.error("migrate", uri=f"file:{os.path.join(env.tmp, 'migfile')},offset=0x20M")
    assert src.cmd("query-status")["status"] == "running", "the guest does not run after the error"
    return f"error: {e.desc}"


# ---- misc-tests.c --------------------------------------------------------------------------

def case_bad_dest(env):
    src = env.vmm.start("src")
    set_caps(src, ())
    src.cmd("migrate", uri="tcp:127.0.0.1:0")
    info = src.wait_status(FINAL, 60)
    assert info["status"] == "failed", f"status {info['status']}, not failed"
    seen = set(statuses(src))
    assert seen <= {"setup", "failed"}, f"states other than setup/failed: {seen}"
    assert src.cmd("query-status")["running"], "the source does not run on after the failure"
    return "failed; the source runs on"


def case_validate_uri_both(env):
    src = env.vmm.start("src")
    e = src.error("migrate", uri="tcp:127.0.0.1:0", channels=[
        {"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "0"}}])
    return f"error: {e.desc}"


def case_validate_uri_none(env):
    src = env.vmm.start("src")
    e = src.error("migrate")
    return f"error: {e.desc}"


# Cases minivmm does not pass yet, each with what it lacks: reported as "gap" (the stage
# passes) while it fails; one that passes is reported so the entry can go.
DROPS_AND_LISTENS = ("by design: minivmm's receiver drops a sender whose TLS handshake fails and keeps listening "
                     "for a good one (docs/tls.md), where QEMU's destination exits; the source fails in setup as "
                     "QEMU's does")
MINIVMM_GAPS = {
    "/migration/precopy/unix/tls/x509/default-host": DROPS_AND_LISTENS,
    "/migration/precopy/tcp/tls/x509/mismatch-host": DROPS_AND_LISTENS,
}

# (QEMU's test path, what it checks, the function), in the order of QEMU's files.
CASES = [
    ("/migration/precopy/unix/plain", "pre-copy over a unix socket, live: non-converging, then converging",
     case_precopy_unix_plain),
    ("/migration/precopy/tcp/plain", "pre-copy over TCP, not live: the source stopped first", case_precopy_tcp_plain),
    ("/migration/multifd/tcp/uri/plain/none", "multifd, 16 channels, no compression, live", case_multifd_uri_none),
    ("/migration/multifd/tcp/plain/cancel",
     "multifd cancelled mid-way: cancelled, the first destination exits non-zero, the source runs on and migrates "
     "to a second destination", case_multifd_cancel),
    ("/migration/auto_converge",
     "auto-converge 5/25/95 with pause-before-switchover: first throttle >= 5 %, <= 95 % at pre-switchover",
     case_auto_converge),
    ("/migration/precopy/tcp/plain/switchover-ack",
     "return-path + switchover-ack, live: the switchover does not wait for an ACK no device sends",
     case_switchover_ack),
    ("/migration/multifd/tcp/channels/plain/none",
     "multifd, the address as migrate's 'channels' list (main, socket inet), live", case_multifd_channels),
    ("/migration/dirty_ring", "pre-copy over unix, live, dirty pages from KVM's dirty ring (4096 entries)",
     case_dirty_ring),
    ("/migration/precopy/fd/tcp",
     "getfd passes each end of a socketpair; migrate-incoming and migrate with fd:NAME; not live: paused there "
     "until cont", case_precopy_fd_tcp),
    ("(minivmm) getfd/closefd errors", "getfd with no descriptor, closefd of an unknown name, migrate to an unknown "
     "fd name, add-fd with no descriptor, remove-fd of no set: QMP errors, the guest runs on", case_getfd_errors),
    ("/dirty_limit", "dirty-limit 50 MB/s (or a quarter of a slower guest's rate), dirty ring: throttling while it runs, cancel (the destination exits, "
     "the throttle time back to 0), again to a new destination, at pre-switchover under bandwidth x downtime",
     case_dirty_limit),
    ("/migration/vcpu_dirty_limit",
     "not a migration: set-vcpu-dirty-limit at half the dirty-ring rate brings it under limit + 25 MB/s; "
     "cancel-vcpu-dirty-limit lets it rise again", case_vcpu_dirty_limit),
    ("/migration/multifd/tcp/plain/zero-page/legacy", "multifd with zero-page-detection legacy, live",
     case_multifd_zero_page("legacy")),
    ("/migration/multifd/tcp/plain/zero-page/none", "multifd with zero-page-detection none, live",
     case_multifd_zero_page("none")),
] + [(f"/migration/cancel/src/after/{s}", f"migrate_cancel after '{s}': " + {
    "none": "no migration on either side, changes nothing",
    "completed": "nothing to cancel: both completed",
    "failed": "nothing to cancel: stays failed, the source runs on",
}.get(s, "source cancelled and running, destination failed"), cancel_after(s))
    for s in ("none", "setup", "cancelling", "cancelled", "active", "completed", "failed", "pre-switchover")] + [
    ("/migration/precopy/tcp/tls/psk/match", "TLS with a pre-shared key (tls-creds-psk objects), TCP, not live",
     tls_psk("tcp")),
    ("/migration/precopy/unix/tls/psk", "TLS-PSK over a unix socket, not live", tls_psk("unix")),
    ("/migration/precopy/tcp/tls/psk/mismatch",
     "TLS-PSK, the destination has another key: the source fails and runs on, the destination stays alive",
     tls_psk("tcp", mismatch=True)),
    ("/migration/multifd/tcp/tls/psk/match", "multifd (16 channels) over TLS-PSK, not live",
     tls_psk("tcp", multifd=True)),
    ("/migration/multifd/tcp/tls/psk/mismatch", "multifd over TLS-PSK with another key: fails, both alive",
     tls_psk("tcp", multifd=True, mismatch=True)),
    ("/migration/postcopy/tls/psk", "postcopy over TLS-PSK: as /migration/postcopy/plain", case_postcopy_tls_psk),
    ("/migration/precopy/unix/tls/x509/default-host",
     "x509 over a unix socket without tls-hostname: no host to check, the source fails in setup, the destination "
     "exits non-zero", tls_x509("unix", "default", fails="quit")),
    ("/migration/precopy/unix/tls/x509/override-host", "x509 over a unix socket, tls-hostname qemu.org: not live",
     tls_x509("unix", "override", hostname="qemu.org")),
    ("/migration/precopy/tcp/tls/x509/default-host", "x509, the server certificate for 127.0.0.1: not live",
     tls_x509("tcp", "default")),
    ("/migration/precopy/tcp/tls/x509/override-host", "x509, tls-hostname qemu.org (the certificate's name)",
     tls_x509("tcp", "override", hostname="qemu.org")),
    ("/migration/precopy/tcp/tls/x509/mismatch-host",
     "x509, the server certificate for 10.0.0.1: the source fails in setup, the destination exits non-zero",
     tls_x509("tcp", "mismatch", fails="quit")),
    ("/migration/precopy/tcp/tls/x509/friendly-client", "x509 + tls-authz naming the client's CN: not live",
     tls_x509("tcp", "default", authz="CN=ACME QEMU Client")),
    ("/migration/precopy/tcp/tls/x509/hostile-client",
     "x509 + tls-authz, the client's CN another: fails, the destination stays alive",
     tls_x509("tcp", "default", client_set="hostile", authz="CN=ACME QEMU Client", fails="alive")),
    ("/migration/precopy/tcp/tls/x509/allow-anon-client",
     "x509, the client without a certificate, the server's verify-peer false: not live",
     tls_x509("tcp", "default", anon="allow")),
    ("/migration/precopy/tcp/tls/x509/reject-anon-client",
     "x509, the client without a certificate, the server's verify-peer true: fails, the destination stays alive",
     tls_x509("tcp", "default", anon="reject", fails="alive")),
    ("/migration/multifd/tcp/tls/x509/default-host", "multifd over x509: not live",
     tls_x509("tcp", "default", multifd=True)),
    ("/migration/multifd/tcp/tls/x509/override-host", "multifd over x509, tls-hostname qemu.org",
     tls_x509("tcp", "override", hostname="qemu.org", multifd=True)),
    ("/migration/multifd/tcp/tls/x509/mismatch-host",
     "multifd over x509, the server certificate for 10.0.0.1: fails, the destination stays alive",
     tls_x509("tcp", "mismatch", multifd=True, fails="alive")),
    ("/migration/multifd/tcp/tls/x509/allow-anon-client", "multifd over x509, an anonymous client allowed: not live",
     tls_x509("tcp", "default", multifd=True, anon="allow")),
    ("/migration/multifd/tcp/tls/x509/reject-anon-client",
     "multifd over x509, an anonymous client refused: fails, the destination stays alive",
     tls_x509("tcp", "default", multifd=True, anon="reject", fails="alive")),
    ("/migration/postcopy/plain", "postcopy after a dirty sync: STOP on the source, every page at the destination, "
     "postcopy-blocktime there", case_postcopy_plain),
    ("/migration/postcopy/recovery/plain", "postcopy at 4 KiB/s cut by migrate-pause: both sides postcopy-paused; "
     "migrate-recover (out-of-band) on a new socket and migrate resume:true: completed, every page there",
     postcopy_recovery()),
    ("/migration/postcopy/recovery/tls/psk", "as /migration/postcopy/recovery/plain over TLS-PSK (the recovery's "
     "connection too)", postcopy_recovery(tls=True)),
    ("/migration/postcopy/preempt/plain", "as /migration/postcopy/plain with postcopy-preempt (requested pages on "
     "a channel of their own)", postcopy_preempt()),
    ("/migration/postcopy/preempt/tls/psk", "as /migration/postcopy/preempt/plain over TLS-PSK",
     postcopy_preempt(tls=True)),
    ("/migration/postcopy/preempt/recovery/plain", "as /migration/postcopy/recovery/plain with postcopy-preempt "
     "(both channels recovered)", postcopy_recovery(preempt=True)),
    ("/migration/postcopy/preempt/recovery/tls/psk", "as /migration/postcopy/preempt/recovery/plain over TLS-PSK",
     postcopy_recovery(tls=True, preempt=True)),
    ("/migration/postcopy/recovery/double-failures/handshake", "a recovery on unpaired sockets reaches "
     "postcopy-recover on both sides and hangs; migrate-pause on each brings it back to paused; then a good one",
     postcopy_recovery(fail="handshake")),
    ("/migration/postcopy/recovery/double-failures/reconnect", "the source's recovery socket is closed: after postcopy-recover-setup "
     "its resume fails and it pauses again by itself; then a good one", postcopy_recovery(fail="reconnect")),
    ("(minivmm) postcopy with multifd", "postcopy, 4 multifd channels pushing and answering requests: every page "
     "at the destination", postcopy_with({"multifd-channels": 4})),
    ("(minivmm) postcopy with multifd zstd", "as above, the pages zstd-compressed (level 2)",
     postcopy_with({"multifd-channels": 4, "multifd-compression": "zstd", "multifd-zstd-level": 2})),
    ("/migration/multifd/tcp/plain/zstd", "multifd, zstd level 2", case_multifd_zstd),
    ("/migration/precopy/file", "into a file, the source stopped first; then the destination reads it "
     "(migrate-incoming file:) and runs on cont", file_case(True)),
    ("/migration/multifd/file/mapped-ram/dio", "mapped-ram, multifd 4 channels, direct-io (O_DIRECT), not live",
     file_case(True, ("mapped-ram", "multifd"), dict(MAPPED_RAM_MULTIFD, **{"direct-io": True}), dio=True)),
    ("/migration/precopy/file/offset", "into a file at offset 4096, live: the bytes before it untouched, the stream "
     "starting there", file_case(False, offset=True)),
    ("/migration/precopy/file/offset/fdset", "as /offset, the file reached through an fdset (add-fd, "
     "file:/dev/fdset/1,offset=4096)", file_case(False, offset=True, fdset=1)),
    ("/migration/precopy/file/offset/bad", "file:PATH,offset=0x20M: a QMP error, the guest runs on",
     case_file_offset_bad),
    ("/migration/precopy/file/mapped-ram", "mapped-ram (every page at a fixed place in the file), not live",
     file_case(True, ("mapped-ram",))),
    ("/migration/precopy/file/mapped-ram/live", "mapped-ram, live: dirty pages rewritten in place",
     file_case(False, ("mapped-ram",))),
    ("/migration/multifd/file/mapped-ram", "mapped-ram with multifd: 4 channels writing their pages, not live",
     file_case(True, ("mapped-ram", "multifd"), MAPPED_RAM_MULTIFD)),
    ("/migration/multifd/file/mapped-ram/live", "mapped-ram with multifd 4 channels, live",
     file_case(False, ("mapped-ram", "multifd"), MAPPED_RAM_MULTIFD)),
    ("/migration/multifd/file/mapped-ram/fdset", "mapped-ram, multifd 4, through an fdset of 2 descriptors per "
     "side at offset 4096, not live; remove-fd empties the sets",
     file_case(True, ("mapped-ram", "multifd"), MAPPED_RAM_MULTIFD, offset=True, fdset=2)),
    ("/migration/multifd/file/mapped-ram/fdset/dio", "as /fdset, the second descriptors O_DIRECT, direct-io on",
     file_case(True, ("mapped-ram", "multifd"), dict(MAPPED_RAM_MULTIFD, **{"direct-io": True}), offset=True,
               fdset=2, dio=True)),
    ("/migration/precopy/fd/file", "the file opened twice, each side given one (getfd): migrate and "
     "migrate-incoming fd:fd-mig, not live; closefd then finds none", file_case(True, fd=True)),
    ("/migration/bad_dest", "migrate to port 0: only setup/failed, then failed; the source runs on", case_bad_dest),
    ("/migration/validate_uuid", "validate-uuid, both -uuid equal: completed", validate_uuid(UUID_SRC, UUID_SRC, False)),
    ("/migration/validate_uuid_error",
     "validate-uuid, -uuid differs: the destination exits non-zero, the source fails and runs on",
     validate_uuid(UUID_SRC, UUID_DST, True)),
    ("/migration/validate_uuid_src_not_set", "validate-uuid, only the destination has a -uuid: completed",
     validate_uuid(None, UUID_DST, False)),
    ("/migration/validate_uuid_dst_not_set", "validate-uuid, only the source has a -uuid: completed",
     validate_uuid(UUID_SRC, None, False)),
    ("/migration/validate_uri/channels/both_set", "migrate with both uri and channels: a QMP error",
     case_validate_uri_both),
    ("/migration/validate_uri/channels/none_set", "migrate with neither uri nor channels: a QMP error",
     case_validate_uri_none),
]
