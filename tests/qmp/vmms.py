"""One adapter per VMM: how to start a source and a destination (a command line), how to tell
that the guest runs, and how to check the destination's memory. Everything else a case does
goes over QMP, the same for both."""
import json
import os
import re
import subprocess

from qmp import Qmp, wait_for

MEM_MIB = 64
QD_STATUS_GPA = 0x100100  # guest/qemu-dirtier/status.h
QD_MAGIC = 0x5249545249445751


class Skip(Exception):
    """The case cannot run here; the message says why."""


class Vmm:
    name = "?"

    def __init__(self, root, tmp):
        self.root, self.tmp = root, tmp
        self.procs = []

    def _spawn(self, name, cmd, oob=False):
        sock = os.path.join(self.tmp, f"{name}.qmp")
        if os.path.exists(sock):
            os.unlink(sock)
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        p = subprocess.Popen(cmd(sock), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append((name, p))
        try:
            return Qmp(sock, oob=oob)
        except Exception:
            raise RuntimeError(f"{name} did not serve QMP: {self.log(name)}")

    def log(self, name):
        path = os.path.join(self.tmp, f"{name}.log")
        return open(path, errors="replace").read()[-600:].strip() if os.path.exists(path) else ""

    def process(self, name):
        return next(p for n, p in self.procs if n == name)

    def destination_status(self, q, name, states=("completed", "failed"), timeout_s=120):
        """The destination's migration status once it is one of `states`. A destination that
        ended (minivmm's receive exits once its migration is over, unless exit-on-error is
        false) answers through its exit status: 0 completed, else failed."""
        p = self.process(name)

        def now():
            if p.poll() is not None:
                return "completed" if p.returncode == 0 else "failed"
            try:
                s = q.cmd("query-migrate").get("status")
            except (ConnectionError, OSError):
                p.wait(10)
                return "completed" if p.returncode == 0 else "failed"
            return s if s in states else None
        return wait_for(now, timeout_s, f"{name}: migration status {'/'.join(states)}", 0.05)

    def stop_all(self):
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs = []


class Qemu(Vmm):
    """QEMU running the project's tiny guest, guest/qemu-dirtier (a vCPU rewriting one qword of
    every page, pass after pass); memory is checked by comparing the stopped source with the
    paused destination (-S), page by page (pmemsave), then the destination is let run."""

    def __init__(self, root, tmp, binary, image):
        super().__init__(root, tmp)
        self.binary, self.image = binary, image
        self.kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
        v = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\S+)", v)
        self.version = m.group(1) if m else "?"
        self.name = f"QEMU {self.version}"

    def start(self, name, incoming=None, extra=(), uuid=None, dirty_ring=False, oob=False):
        if dirty_ring and not self.kvm:
            raise Skip("QEMU's dirty ring is KVM's: no /dev/kvm here (QEMU runs under TCG)")
        kvm = "kvm,dirty-ring-size=4096" if dirty_ring else "kvm"
        accel = ["-accel", kvm, "-cpu", "host,-arch-capabilities"] if self.kvm else ["-accel", "tcg"]
        extra = list(extra) + (["-uuid", uuid] if uuid else [])
        args = ["-M", "pc", "-nodefaults", "-no-user-config", "-display", "none", "-m", f"{MEM_MIB}M",
                "-smp", "1", "-kernel", self.image, "-append", "rate=0 touch=qword cpl=3",
                "-serial", f"file:{os.path.join(self.tmp, name + '.serial')}"]
        if incoming is not None:
            args += ["-incoming", incoming, "-S"]
        q = self._spawn(name, lambda sock: [self.binary] + accel + args + list(extra) +
                        ["-qmp", f"unix:{sock},server=on,wait=off"], oob)
        if incoming is None:
            wait_for(lambda: self.status(q)["passes"] >= 1, 120, f"{name}: the guest's first pass", 0.1)
        return q

    def status(self, q):
        out = q.cmd("human-monitor-command", **{"command-line": f"xp /8gx {QD_STATUS_GPA:#x}"})
        w = [int(x, 16) for x in re.findall(r"0x([0-9a-f]{16})", out)]
        if len(w) < 8 or w[0] != QD_MAGIC:
            return {"passes": 0, "pages_written": 0}
        return {"pages_written": w[2], "passes": w[3], "first_gpa": w[6], "end_gpa": w[7]}

    def check_destination(self, src, dst):
        """(pages compared, pages differing) between the stopped source and the paused destination."""
        wait_for(lambda: dst.cmd("query-status")["status"] in ("paused", "postmigrate"), 60,
                 "the destination to be paused after the incoming migration")
        st = self.status(src)
        first, end = st["first_gpa"], st["end_gpa"]
        dumps = []
        for side, q in (("src", src), ("dst", dst)):
            path = os.path.join(self.tmp, f"{side}.mem")
            q.cmd("pmemsave", val=first, size=end - first, filename=path)
            with open(path, "rb") as f:
                dumps.append(f.read())
            os.unlink(path)
        s, d = dumps
        differing = sum(1 for off in range(0, len(s), 4096) if s[off:off + 4096] != d[off:off + 4096])
        return len(s) // 4096, differing

    @staticmethod
    def stream_magic(mapped_ram):
        """The first bytes of QEMU's migration stream (QEMU_VM_FILE_MAGIC), mapped-ram or not."""
        return b"QEVM"

    def check_restored(self, src, dst, name):
        """A migration through a file: the destination's memory against the stopped source's,
        then the destination runs."""
        result = self.check_destination(src, dst)
        self.run_destination(dst, name)
        return result

    def run_destination(self, dst, name):
        """cont the paused destination (-S); its guest must make progress."""
        before = self.status(dst)["pages_written"]
        dst.cmd("cont")
        dst.wait_event("RESUME", 60)
        wait_for(lambda: self.status(dst)["pages_written"] > before, 60, "the guest to run at the destination", 0.1)


class Minivmm(Vmm):
    """minivmm: `run --qmp` is the source, `receive --listen defer|URI --qmp` the destination;
    memory is checked by minivmm's own verification (every page compared at the switchover,
    every stamp checked at the destination), which the source's query-migrate reports."""

    def __init__(self, root, tmp, binary):
        super().__init__(root, tmp)
        self.binary = binary
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise Skip("no /dev/kvm on this machine: minivmm cannot run a guest here")
        self.name = "minivmm"
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()

    def start(self, name, incoming=None, extra=(), uuid=None, dirty_ring=False, oob=False):
        vm = ["--vcpus", "1", "--mem", f"{MEM_MIB}M"] + (["--uuid", uuid] if uuid else [])
        if dirty_ring and incoming is None:  # 4096 entries of 16 bytes, as QEMU's dirty-ring-size=4096
            vm += ["--ring", "64K"]
        if incoming is None:
            cmd = lambda sock: [self.binary, "run", "--qmp", f"unix:{sock}"] + vm + list(extra)
        else:  # its report as JSON too: a restore's check is the destination's own
            cmd = lambda sock: [self.binary, "receive", "--listen", incoming, "--qmp", f"unix:{sock}",
                                "--json", os.path.join(self.tmp, f"{name}.json")] + vm + list(extra)
        q = self._spawn(name, cmd, oob)
        if incoming is None:
            wait_for(lambda: q.cmd("query-status")["status"] == "running", 30, f"{name}: the guest to run")
        return q

    def check_destination(self, src, dst):
        info = src.wait_status(("completed",), 60)
        v = info.get("x-minivmm-verification", {})
        if not v.get("verified"):
            raise AssertionError(f"minivmm did not verify the migration: {v}")
        return v.get("switchover_pages_checked", 0), v.get("switchover_mismatches", 0) + v.get("stamp_mismatches", 0)

    @staticmethod
    def stream_magic(mapped_ram):
        """A minivmm stream's first record is a HELLO (type 8, little-endian: migration/stream.hpp);
        a mapped-ram file starts with its head's magic (migration/file.hpp)."""
        return b"MVMMRAM1" if mapped_ram else b"\x08\x00\x00\x00"

    def check_restored(self, src, dst, name):
        """A migration through a file: the source wrote it (its digests of the frozen memory in
        it); the destination checked every page it restored against them, ran its post-run and
        checked every stamp: its report (receive --json) says so once it exited."""
        self.run_destination(dst, name)
        p = self.process(name)
        rc = wait_for(lambda: p.poll() is not None and (p.returncode,), 120, f"{name}: the restore's end")[0]
        assert rc == 0, f"the restore failed (exit {rc}): {self.log(name)[-300:]}"
        with open(os.path.join(self.tmp, f"{name}.json")) as f:
            r = json.load(f)
        v = r["verify"]
        if not v["enabled"] or not v["switchover_pages_checked"] or not v["pages_checked"]:
            raise AssertionError(f"the restore did not check the pages and the stamps: {v}")
        return v["switchover_pages_checked"], v["switchover_mismatches"] + v["mismatches"]

    def run_destination(self, dst, name):
        """A destination holding a stopped guest paused gets cont, then runs its post-run check
        (receive exits 0 when its guest progressed and every stamp checked); one that resumed
        by itself runs already."""
        p = self.process(name)
        try:
            paused = p.poll() is None and dst.cmd("query-status")["status"] == "paused"
        except (ConnectionError, OSError):  # it ended meanwhile: it was running, its check is done
            paused = False
        if paused:
            dst.cmd("cont")
            dst.wait_event("RESUME", 60)
            rc = wait_for(lambda: p.poll() is not None and (p.returncode,), 120,
                          f"{name}: its post-run check after cont")[0]
            assert rc == 0, f"the destination's post-run check after cont failed (exit {rc}): {self.log(name)[-300:]}"


def find_image(root, build):
    image = os.path.join(build, "guest", "qemu-dirtier", "qemu-dirtier.bin")
    if not os.path.exists(image):
        raise Skip(f"{image} is not built (scripts/build builds it)")
    return image


def qemu_binary(root, want):
    if os.path.sep in want:
        return want
    r = subprocess.run([os.path.join(root, "scripts", "qemu-fetch"), want], capture_output=True, text=True)
    if r.returncode:
        raise Skip(r.stderr.strip() or f"scripts/qemu-fetch {want} failed")
    return r.stdout.strip()
