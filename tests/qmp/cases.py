"""The cases, named by the test path QEMU's own suite registers (tests/qtest/migration/), with
its harness's method: force non-convergence (a small max-bandwidth, a 1 ms downtime limit),
wait until a dirty sync after the bulk pass (so pages written after the start have been
sent again), then let it converge and check the destination's memory."""
import os
import socket

from qmp import wait_for

NON_CONVERGE = {"max-bandwidth": 32 << 20, "downtime-limit": 1}
CONVERGE = {"max-bandwidth": 1 << 30, "downtime-limit": 30000}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uri(env, kind):
    if kind == "tcp":
        return f"tcp:127.0.0.1:{free_port()}"
    if kind == "unix":
        return f"unix:{os.path.join(env.tmp, f'mig-{free_port()}.sock')}"
    raise ValueError(kind)


def set_caps(q, caps):
    if caps:
        q.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])


def start_pair(env, kind="tcp", caps=(), dst_caps=None, params=None, name="dst"):
    """A running source and a destination listening on a fresh URI (incoming defer, then the
    capabilities and parameters both sides need, then migrate-incoming)."""
    src = env.vmm.start("src")
    dst = env.vmm.start(name, incoming="defer")
    u = uri(env, kind)
    set_caps(src, ("events",) + tuple(caps))
    set_caps(dst, ("events",) + tuple(caps if dst_caps is None else dst_caps))
    if params:
        src.cmd("migrate-set-parameters", **params)
        dst.cmd("migrate-set-parameters", **{k: v for k, v in params.items() if k.startswith("multifd")})
    dst.cmd("migrate-incoming", uri=u)
    return src, dst, u


def wait_pass(src, passes=2):
    """Until query-migrate's dirty-sync-count reaches `passes` (QEMU's wait_for_migration_pass)."""
    src.wait_status(("active", "completed"), 120)
    return wait_for(
        lambda: src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) >= passes, 240,
        f"dirty sync {passes}", 0.05)


def finish(env, src, dst):
    info = src.wait_status(("completed", "failed", "cancelled"), 300)
    assert info["status"] == "completed", f"migration {info['status']}: {info.get('error-desc', '')}"
    pages, differing = env.vmm.check_destination(src, dst)
    assert differing == 0, f"{differing} of {pages} pages differ at the destination"
    assert src.cmd("query-status")["status"] == "postmigrate", "the source is not postmigrate"
    return f"{pages} pages, 0 differ"


def precopy(env, kind="tcp", caps=(), params=None, live=True):
    src, dst, u = start_pair(env, kind, caps, params=params)
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    if live:
        wait_pass(src)
    src.cmd("migrate-set-parameters", **CONVERGE)
    return finish(env, src, dst)


def case_precopy_tcp(env):
    return precopy(env, "tcp")


def case_precopy_unix(env):
    return precopy(env, "unix")


def case_multifd_none(env):
    return precopy(env, "tcp", caps=("multifd",), params={"multifd-channels": 2, "multifd-compression": "none"})


def case_multifd_zstd(env):
    return precopy(env, "tcp", caps=("multifd",), params={"multifd-channels": 2, "multifd-compression": "zstd"})


def case_bad_dest(env):
    src = env.vmm.start("src")
    set_caps(src, ("events",))
    src.cmd("migrate", uri="tcp:127.0.0.1:0")
    info = src.wait_status(("failed", "completed", "cancelled"), 60)
    assert info["status"] == "failed", f"status {info['status']}, not failed"
    assert src.cmd("query-status")["status"] == "running", "the source does not run on after the failure"
    return "failed; the source runs on"


def case_multifd_cancel(env):
    src, dst, u = start_pair(env, "tcp", ("multifd",), params={"multifd-channels": 2})
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    wait_pass(src, 1)
    src.cmd("migrate_cancel")
    info = src.wait_status(("cancelled", "failed", "completed"), 60)
    assert info["status"] == "cancelled", f"status {info['status']}, not cancelled"
    assert src.cmd("query-status")["status"] == "running", "the source does not run on after cancel"
    # QEMU's test: the first destination fails; a second one takes the migration.
    dst2 = env.vmm.start("dst2", incoming="defer")
    set_caps(dst2, ("events", "multifd"))
    dst2.cmd("migrate-set-parameters", **{"multifd-channels": 2})
    u2 = uri(env, "tcp")
    dst2.cmd("migrate-incoming", uri=u2)
    src.cmd("migrate-set-parameters", **CONVERGE)
    src.cmd("migrate", uri=u2)
    return "cancelled, then " + finish(env, src, dst2)


def case_auto_converge(env):
    init, inc, top = 20, 10, 80
    src, dst, u = start_pair(env, "tcp", ("auto-converge",))
    src.cmd("migrate-set-parameters", **{"cpu-throttle-initial": init, "cpu-throttle-increment": inc,
                                         "max-cpu-throttle": top}, **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    pct = wait_for(lambda: src.cmd("query-migrate").get("cpu-throttle-percentage", 0), 240,
                       "cpu-throttle-percentage", 0.05)
    assert init <= pct <= top, f"throttle {pct} % outside {init}..{top}"
    src.cmd("migrate-set-parameters", **CONVERGE)
    return f"throttle {pct} %; " + finish(env, src, dst)


def case_postcopy(env):
    src, dst, u = start_pair(env, "tcp", ("postcopy-ram",))
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    wait_pass(src)
    src.cmd("migrate-start-postcopy")
    src.wait_status(("postcopy-active", "completed", "failed"), 120)
    src.cmd("migrate-set-parameters", **CONVERGE)
    return finish(env, src, dst)


def migration_statuses(q):
    return [e["data"]["status"] for e in q.poll_events() if e["event"] == "MIGRATION"]


def paused_before_switchover(env):
    """A live pre-copy with pause-before-switchover, left waiting in pre-switchover."""
    src, dst, u = start_pair(env, "tcp", ("pause-before-switchover",), dst_caps=())
    src.cmd("migrate-set-parameters", **NON_CONVERGE)
    src.cmd("migrate", uri=u)
    wait_pass(src)
    src.cmd("migrate-set-parameters", **CONVERGE)
    src.wait_status(("pre-switchover",), 120)
    assert src.cmd("query-status")["status"] == "finish-migrate", "the source runs in pre-switchover"
    return src, dst


def case_pause_before_switchover(env):
    src, dst = paused_before_switchover(env)
    e = src.error("migrate-continue", state="active")
    assert "pre-switchover" in e.desc, f"migrate-continue in the wrong state: {e.desc}"
    src.cmd("migrate-continue", state="pre-switchover")
    done = finish(env, src, dst)
    st = migration_statuses(src)
    assert "pre-switchover" in st and "device" in st and st.index("pre-switchover") < st.index("device"), st
    return "pre-switchover, migrate-continue, " + done


def case_cancel_pre_switchover(env):
    src, dst = paused_before_switchover(env)
    src.cmd("migrate_cancel")
    info = src.wait_status(("cancelled", "failed", "completed"), 60)
    assert info["status"] == "cancelled", f"status {info['status']}, not cancelled"
    assert src.cmd("query-status")["status"] == "running", "the source does not run on after the cancel"
    return "cancelled in pre-switchover; the source runs on"


def case_precopy_not_live(env):
    return precopy(env, "tcp", live=False)


# (QEMU's test path, what it checks, the function). Order: QEMU's files.
CASES = [
    ("/migration/bad_dest", "migrate to an address nobody listens on: failed, the source runs on",
     case_bad_dest),
    ("/migration/precopy/unix/plain", "pre-copy over a unix socket, live (non-converging, then converging)",
     case_precopy_unix),
    ("/migration/precopy/tcp/plain", "pre-copy over TCP, live", case_precopy_tcp),
    ("/migration/precopy/tcp/plain/not-live", "pre-copy over TCP converging at once (no dirty sync awaited)",
     case_precopy_not_live),
    ("/migration/auto_converge", "auto-converge: the throttle appears within initial..max, then completes",
     case_auto_converge),
    ("/migration/multifd/tcp/plain/none", "multifd, 2 channels, no compression", case_multifd_none),
    ("/migration/multifd/tcp/plain/zstd", "multifd, 2 channels, zstd", case_multifd_zstd),
    ("/migration/multifd/tcp/plain/cancel", "multifd cancelled mid-way (source runs on), then to a fresh destination",
     case_multifd_cancel),
    ("/migration/postcopy/plain", "postcopy after a dirty sync: every page reaches the destination",
     case_postcopy),
    ("/migration/precopy/tcp/plain/pause-before-switchover",
     "pause-before-switchover: the source waits parked in pre-switchover; migrate-continue refuses another state, "
     "then completes", case_pause_before_switchover),
    ("/migration/cancel/src/after/pre-switchover", "migrate_cancel in pre-switchover: cancelled, the source runs on",
     case_cancel_pre_switchover),
]
