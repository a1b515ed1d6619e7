"""The plot scripts draw what the reports say (issue 29, items 3 and 6).

Run by ctest (scripts.plots, label unit): python3 -m unittest on reports made
up here, so the checks need no KVM and no migration.
"""
import importlib.machinery
import importlib.util
import os
import tempfile
import unittest

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts")


def load(name):
    path = os.path.join(SCRIPTS, name)
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def postcopy_report():
    # As `migrate --to inproc --mem 64M --bandwidth 64M --postcopy --json` writes it:
    # parked at 1000 ms, 11.7 ms of downtime, then ~1 s of postcopy at
    # 70-128 K pages/s while pre-copy ran at ~400 M pages/s.
    src = [[t, 4e8] for t in range(25, 1000, 25)]
    dst = [[1011.7 + t, 7e4 + 1e3 * (t % 50)] for t in range(25, 1000, 25)]
    return {
        "status": "completed", "converged": False, "forced_by": "postcopy", "setup_ms": 3.0,
        "stop_ms": 1000.0, "downtime_ms": 11.7, "total_ms": 2100.0, "max_downtime_ms": 300,
        "postcopy": {"enabled": True, "started": True, "resumed_ms": 1011.7, "duration_ms": 1000.0},
        "guest_progress": {"columns": ["t_ms", "pages_per_s"], "sampled_every_ms": 10, "min_bin_ms": 25,
                           "points": src, "destination_points": dst},
        "rounds": [{"round": 0, "kind": "bulk", "start_ms": 3, "duration_ms": 500, "pages": 16384},
                   {"round": 1, "kind": "precopy", "start_ms": 503, "duration_ms": 497, "pages": 16000}],
    }


class PlotMigration(unittest.TestCase):
    def setUp(self):
        self.m = load("plot-migration")

    def test_downtime_is_the_reports_downtime_and_postcopy_has_its_own_span(self):
        spans = {s[0]: s[1:3] for s in self.m.spans(postcopy_report())}
        self.assertAlmostEqual(spans["downtime"][1] - spans["downtime"][0], 11.7)
        self.assertEqual(spans["postcopy"], (1011.7, 2011.7))

    def test_precopy_downtime_leaves_verification_out(self):
        j = postcopy_report()
        j["postcopy"] = {"enabled": False, "started": False}
        spans = {s[0]: s[1:3] for s in self.m.spans(j)}
        self.assertNotIn("postcopy", spans)
        self.assertEqual(spans["downtime"], (1000.0, 1011.7))  # not up to total_ms

    def test_guest_progress_goes_on_at_the_destination_on_a_log_axis(self):
        j = postcopy_report()
        src, dst = self.m.progress(j)
        self.assertGreater(len(dst), 0)
        self.assertGreater(dst[0][0], src[-1][0])
        with tempfile.TemporaryDirectory() as d:
            fig = self.m.plot(j, os.path.join(d, "pc.png"))
            self.assertTrue(os.path.getsize(os.path.join(d, "pc.png")) > 0)
        ax = fig.axes[0]
        self.assertEqual(ax.get_yscale(), "log")
        lo, hi = ax.get_ylim()
        self.assertLess(lo, 7e4, "the slow postcopy stretch must be inside the axis, not drawn as zero")
        self.assertEqual(len(ax.get_lines()), 2, "source and destination lines")


class PlotTimeline(unittest.TestCase):
    def test_variant_bars_compare_the_logging_window_with_steady(self):
        t = load("plot-timeline")
        v = {"name": "hugetlb2m", "stalls": [{"phase": "steady", "len_ms": x} for x in (21, 25, 50)]
             + [{"phase": "enable-logging", "len_ms": 30}, {"phase": "harvest", "len_ms": 22},
                {"phase": "after-logging", "len_ms": 45}]}
        bars = t.variant_bars(v)
        self.assertEqual(bars["steady"], (25, 50, 50, 3))
        self.assertEqual(bars["logging"], (22, 30, 30, 2), "logging's own stalls, not every stall")


if __name__ == "__main__":
    unittest.main()
