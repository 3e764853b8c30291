"""Regression test for issue 14: slider cells never stall a headless (papermill) run.

A minimal notebook with several slider cells shaped like the notebooks' (two sliders, a callback that prints a line
and draws a pyplot figure of four panels, ``plt.show()``), written by scripts/headless_stress.py, runs through
papermill RUNS times in a row (one kernel per run, as ``bash scripts/lab.sh run``) with a short execution timeout,
while LOAD busy-loop processes keep the CPU contended (as on a busy CI machine: the stall needs the client to be
descheduled at the wrong moment; on an idle machine the old pattern stalled in 0 of 20 runs, with this load in most
runs).
Any cell that reaches the timeout -- the nbclient stall (jupyter/nbclient#312) shows up as a cell that the kernel
finished quickly but that the client only saw at the timeout -- fails the test, and so does a run in which the
panels did not draw (PNG images in the Output widgets of the stored widget state).

The old pattern (``widgets.interactive_output`` + ``display(HBox, out)``) can be run through the same test to see
that it catches the stall:  DIFFTRACK_SLIDER_PATTERN=interactive_output pytest tests/test_headless_sliders.py
(measured: see results/headless_stress.json, "regression_test").
About a minute on the 2-core CPU. DIFFTRACK_STRESS_RUNS / _CELLS / _TIMEOUT / _LOAD change RUNS, CELLS, the timeout
and LOAD.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PATTERN = os.environ.get("DIFFTRACK_SLIDER_PATTERN", "slider_panel")
RUNS = int(os.environ.get("DIFFTRACK_STRESS_RUNS", "8"))
CELLS = int(os.environ.get("DIFFTRACK_STRESS_CELLS", "10"))
TIMEOUT = float(os.environ.get("DIFFTRACK_STRESS_TIMEOUT", "15"))  # a widget cell takes < 1 s, the set-up cell ~1 s
LOAD = int(os.environ.get("DIFFTRACK_STRESS_LOAD", str(min(2, os.cpu_count() or 1))))


def test_slider_cells_never_stall_under_papermill(tmp_path):
    out = tmp_path / "stress.json"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0")
    cmd = [sys.executable, str(ROOT / "scripts" / "headless_stress.py"), "--minimal", PATTERN, "--runs", str(RUNS),
           "--cells", str(CELLS), "--timeout", str(TIMEOUT), "--cpu-load", str(LOAD), "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUNS * (60 + 2 * TIMEOUT))
    assert out.exists(), f"headless_stress.py wrote no result (exit {r.returncode}):\n{r.stderr[-4000:]}"
    res = json.loads(out.read_text())
    print("\n".join(ln for ln in r.stdout.splitlines() if ln.startswith("[stress]")))
    name = f"minimal_{PATTERN}"
    assert res["runs_per_notebook"] == {name: RUNS}, res["runs_per_notebook"]
    stalled = [c for c in res["slowest_cell_per_run"] if c["stalled"]]
    assert res["stalls"] == 0, (
        f"{res['stalls']} of {RUNS} headless runs of the {PATTERN} slider notebook stalled "
        f"(a cell reached the {TIMEOUT:g} s execution timeout although the kernel had finished it): "
        + "; ".join(f"cell {c['cell']} ({c['first_line']}) kernel {c['kernel_s']:.2f} s" for c in stalled))
    assert res["timeouts"] == 0 and res["failures"] == 0, (
        f"{res['timeouts']} runs timed out, {res['failures']} failed:\n"
        + "\n".join(ln for ln in r.stdout.splitlines() + r.stderr.splitlines() if "[stress]" in ln))
    # every slider cell drew its figure into its Output widget (stored widget state of the executed notebook)
    assert res["widget_pngs_per_run"][name] == [CELLS] * RUNS, res["widget_pngs_per_run"]
    assert r.returncode == 0, r.stderr[-4000:]
