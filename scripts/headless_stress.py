"""Run notebooks headless (papermill, as `bash scripts/lab.sh run` does) many times and count stalls.

    # the five notebooks at their stored defaults, 10 runs each -> results/headless_stress.json
    .venv/bin/python scripts/headless_stress.py --runs 10 --out results/headless_stress.json
    # a minimal slider notebook (the regression test, tests/test_headless_sliders.py), with the project's helper
    # or with the old widgets.interactive_output pattern, on a CPU kept busy by 2 busy-loop processes; the summary
    # also goes to results/headless_stress.json under "regression_test"
    .venv/bin/python scripts/headless_stress.py --minimal slider_panel --runs 20 --cells 10 --timeout 15 \
        --cpu-load 2 --out /tmp/new.json --record-in results/headless_stress.json
    .venv/bin/python scripts/headless_stress.py --minimal interactive_output --runs 10 --cells 10 --timeout 15 \
        --cpu-load 2 --out /tmp/old.json --record-in results/headless_stress.json
    # the main job on a fresh clone of HEAD, set-up included -> main_job_fresh_clone_s
    .venv/bin/python scripts/headless_stress.py --fresh-clone --out results/headless_stress.json
    # the same for an older commit, on the same machine the same day (is a change the code or the machine?) ->
    # main_job_fresh_clone_baselines[<commit>]
    .venv/bin/python scripts/headless_stress.py --fresh-clone --rev 38b9e68 --out results/headless_stress.json

A run "stalls" when a cell reaches the execution timeout although the kernel finished it earlier (nbclient missed
the execute_reply: jupyter/nbclient#312); a cell that really ran that long is counted under "timeouts". Both are
detected by scripts/run_notebooks.py. The notebooks write figures/ and results/ of the checkout they run in (the
minimal one writes nothing).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebooks import CellTimeout, run_notebook, timed_out_cells  # noqa: E402

NOTEBOOKS = ["01_dataset", "02_layer_analysis", "03_timestep", "04_tracking", "05_cag"]
PATTERNS = ("slider_panel", "interactive_output")

MINIMAL_SETUP = '''\
%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt
import ipywidgets as widgets
from IPython.display import display
from difftrack.sliders import slider_panel

rng = np.random.default_rng(0)
data = rng.random((4, 6, 24, 24))


def show(layer, step):
    """Like the notebooks' slider callbacks: a line of text and a pyplot figure of several panels."""
    print(f"layer {layer}, step {step}")
    fig, axes = plt.subplots(1, 4, figsize=(6, 1.8))
    for i, ax in enumerate(axes):
        ax.imshow(data[layer, (step + i) % 6], cmap="viridis")
        ax.set_title(f"frame {i}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"layer {layer}, step {step}")
    plt.show()
    return fig
'''

MINIMAL_CELL = {
    "slider_panel": '''\
# NBVAL_IGNORE_OUTPUT
layer_s = widgets.IntSlider(value={k} % 4, min=0, max=3, description="layer", continuous_update=False)
step_s = widgets.IntSlider(value={k} % 6, min=0, max=5, description="step", continuous_update=False)
display(slider_panel(show, {{"layer": layer_s, "step": step_s}}))''',
    "interactive_output": '''\
# NBVAL_IGNORE_OUTPUT
layer_s = widgets.IntSlider(value={k} % 4, min=0, max=3, description="layer", continuous_update=False)
step_s = widgets.IntSlider(value={k} % 6, min=0, max=5, description="step", continuous_update=False)
out = widgets.interactive_output(show, {{"layer": layer_s, "step": step_s}})
display(widgets.HBox([layer_s, step_s]), out)''',
}


def minimal_notebook(pattern: str, cells: int):
    """A notebook with ``cells`` slider cells drawing a pyplot figure each (plus a line of text), in ``pattern``."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(MINIMAL_SETUP)]
                      + [new_code_cell(MINIMAL_CELL[pattern].format(k=k)) for k in range(cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.validate(nb)
    return nb


def widget_pngs(nb) -> int:
    """Number of PNG images inside Output widgets in the executed notebook's stored widget state."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    n = 0
    for model in state.values():
        if model.get("model_name") == "OutputModel":
            n += sum("image/png" in o.get("data", {}) for o in model.get("state", {}).get("outputs", []))
    return n


def cpu_description() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores (CPU only)"


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "difftrack", "notebooks", "scripts"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stress(notebooks: list[tuple[str, Path]], runs: int, timeout: float, out_dir: Path, cwd: Path,
           params: dict | None = None, log=print) -> dict:
    """Run each notebook ``runs`` times; returns per-notebook counts and the slowest cell of every run."""
    per_nb: dict[str, dict] = {}
    for name, path in notebooks:
        rec = per_nb.setdefault(name, {"runs": 0, "stalls": 0, "timeouts": 0, "failures": 0, "slowest_cells": [],
                                       "run_seconds": [], "widget_pngs": []})
        for r in range(runs):
            dest = out_dir / f"{name}.run{r}.ipynb"
            try:
                run = run_notebook(path, dest, params, timeout, cwd)
            except CellTimeout as exc:
                import nbformat

                nb = nbformat.read(str(dest), as_version=4)
                late = timed_out_cells(nb, timeout)
                stalled = any(c["kernel_s"] is not None and c["kernel_s"] < timeout - 1 for c in late)
                rec["stalls" if stalled else "timeouts"] += 1
                rec["runs"] += 1
                rec["slowest_cells"].append({"notebook": name, "cell": late[0]["index"] if late else None,
                                             "seconds": late[0]["seconds"] if late else None,
                                             "kernel_s": late[0]["kernel_s"] if late else None,
                                             "first_line": late[0]["first_line"] if late else None,
                                             "stalled": stalled})
                log(f"[stress] {name} run {r}: {'STALL' if stalled else 'TIMEOUT'}: {exc}")
                continue
            except Exception as exc:  # a failing cell: counted, not a stall
                rec["failures"] += 1
                rec["runs"] += 1
                log(f"[stress] {name} run {r}: FAILED: {type(exc).__name__}: {str(exc)[:500]}")
                continue
            import nbformat

            rec["runs"] += 1
            s = run.slowest
            rec["slowest_cells"].append({"notebook": name, "cell": s["index"], "seconds": round(s["seconds"], 3),
                                         "kernel_s": None if s.get("kernel_s") is None else round(s["kernel_s"], 3),
                                         "first_line": s.get("first_line"), "stalled": False})
            rec["run_seconds"].append(round(run.seconds, 2))
            rec["widget_pngs"].append(widget_pngs(nbformat.read(str(dest), as_version=4)))
            log(f"[stress] {name} run {r}: {run.seconds:.1f} s, slowest cell {s['index']} {s['seconds']:.2f} s")
    return per_nb


def _stress_main(args):
    with tempfile.TemporaryDirectory(prefix="difftrack-stress-") as tmp:
        out_dir = args.keep or Path(tmp)
        if args.minimal:
            import nbformat

            src = Path(tmp) / f"minimal_{args.minimal}.ipynb"
            nbformat.write(minimal_notebook(args.minimal, args.cells), str(src))
            notebooks, cwd = [(f"minimal_{args.minimal}", src)], Path(tmp)
        else:
            notebooks = [(n, ROOT / "notebooks" / f"{n}.ipynb") for n in args.notebooks]
            cwd = ROOT / "notebooks"
        per_nb = stress(notebooks, args.runs, args.timeout, out_dir, cwd)
    desc = (f"a minimal notebook with {args.cells} slider cells ({args.minimal} pattern)" if args.minimal
            else "the notebooks at their stored defaults")
    return per_nb, desc


def runs_of(result: dict) -> int:
    return sum(result["runs_per_notebook"].values())


def fresh_clone(out: Path, rev: str | None = None) -> int:
    """Clone this checkout's HEAD (or commit ``rev``) into a temporary folder and time ``bash scripts/lab.sh run``
    there (virtual environment, pinned dependencies, all five notebooks with empty caches); merge the result into
    ``out``: HEAD's as ``main_job_fresh_clone_*``, another commit's under ``main_job_fresh_clone_baselines``."""
    import re
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="difftrack-fresh-"))
    try:
        repo = tmp / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        if rev is not None:
            r = subprocess.run(["git", "checkout", "-q", rev], cwd=repo, capture_output=True, text=True)
            if r.returncode:
                print(f"--rev {rev!r}: not a commit of this checkout ({r.stderr.strip()})", file=sys.stderr)
                return 2
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "DIFFTRACK_ROOT")}
        load_before = os.getloadavg()
        loads: list[float] = []  # 1-minute load average every 10 s during the run (other jobs on the machine show)
        done = threading.Event()

        def sample():
            while not done.wait(10):
                loads.append(os.getloadavg()[0])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            r = subprocess.run(["bash", "scripts/lab.sh", "run"], cwd=repo, env=env, capture_output=True, text=True)
        finally:
            wall = time.monotonic() - t0
            done.set()
            sampler.join()
        log = r.stdout + r.stderr
        (tmp.parent / "difftrack-fresh-clone.log").write_text(log)
        if r.returncode != 0:
            print(log[-4000:], file=sys.stderr)
            print(f"[fresh] bash scripts/lab.sh run failed with exit {r.returncode} after {wall:.0f} s", file=sys.stderr)
            return 1
        m = re.search(r"main job took (\d+) s", log)
        per_nb = {n: float(v) for n, v in re.findall(r"^\[lab\] (\S+)\.ipynb: ([0-9.]+) s", log, re.MULTILINE)}
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = json.loads(out.read_text()) if out.exists() else {}
    run = {
        "main_job_fresh_clone_s": round(wall, 1),
        "main_job_fresh_clone_commit": head,
        "main_job_fresh_clone_notebooks_s": int(m.group(1)) if m else None,
        "main_job_fresh_clone_note": (
            "wall time of `bash scripts/lab.sh run` in a fresh `git clone` of commit " + head + " on " + cpu_description()
            + ": creating .venv, installing the pinned dependencies (uv, from this machine's package indexes and "
            "local torch wheel; uv's download cache as left by earlier installs on this machine), then papermill over "
            "the five notebooks at their stored defaults with empty per-video caches; "
            "main_job_fresh_clone_notebooks_s is the notebooks part alone"),
        "main_job_fresh_clone_per_notebook_s": per_nb,
        "main_job_fresh_clone_load_average": {"before_1min": round(load_before[0], 2),
                                              "during_1min_mean": round(sum(loads) / len(loads), 2) if loads else None,
                                              "during_1min_max": round(max(loads), 2) if loads else None,
                                              "after_1_5_15min": [round(x, 2) for x in os.getloadavg()]},
        "main_job_fresh_clone_date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if rev is None:
        if record.get("main_job_fresh_clone_s"):  # the figure this run replaces stays in the history
            record.setdefault("main_job_fresh_clone_history", []).append({
                "commit": record["main_job_fresh_clone_commit"][:7],
                "wall_s": record["main_job_fresh_clone_s"], "date": record.get("main_job_fresh_clone_date")})
        record.update(run)
    else:  # a baseline: kept apart, so it never stands in for HEAD's figure
        record.setdefault("main_job_fresh_clone_baselines", {})[head[:7]] = {
            ("wall_s" if k == "main_job_fresh_clone_s" else k.replace("main_job_fresh_clone_", "")): v
            for k, v in run.items()}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[fresh] bash scripts/lab.sh run on a fresh clone: {wall:.1f} s (notebooks {m.group(1) if m else '?'} s: "
          f"{per_nb}; 1-min load during the run: mean "
          f"{run['main_job_fresh_clone_load_average']['during_1min_mean']}, max "
          f"{run['main_job_fresh_clone_load_average']['during_1min_max']})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per notebook")
    ap.add_argument("--timeout", type=float, default=600, help="execution timeout per cell, seconds")
    ap.add_argument("--notebooks", nargs="*", default=NOTEBOOKS, help="names under notebooks/ (default: all five)")
    ap.add_argument("--minimal", choices=PATTERNS, help="run the minimal slider notebook in this pattern instead")
    ap.add_argument("--cells", type=int, default=6, help="slider cells of the minimal notebook")
    ap.add_argument("--out", type=Path, required=True, help="JSON written here")
    ap.add_argument("--cpu-load", type=int, default=0,
                    help="busy-loop processes kept running during the runs (CPU contention as on a busy CI machine: "
                         "it makes the old pattern's stall much more frequent)")
    ap.add_argument("--record-in", type=Path,
                    help="with --minimal: also store a summary under 'regression_test' in this JSON (e.g. "
                         "results/headless_stress.json), keyed by pattern and CPU load")
    ap.add_argument("--fresh-clone", action="store_true",
                    help="instead of stress runs: time `bash scripts/lab.sh run` (set-up included) on a fresh clone "
                         "of this checkout's HEAD and store main_job_fresh_clone_s in --out")
    ap.add_argument("--rev", help="with --fresh-clone: time this commit instead of HEAD (a same-day baseline, stored "
                    "under main_job_fresh_clone_baselines)")
    ap.add_argument("--keep", type=Path, help="keep the executed notebooks here (default: a temporary folder)")
    args = ap.parse_args(argv)

    if args.rev is not None and not args.fresh_clone:
        ap.error(f"--rev {args.rev!r} needs --fresh-clone (it names the commit the fresh clone times)")
    if args.fresh_clone:
        return fresh_clone(args.out, args.rev)
    t0 = time.monotonic()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.cpu_load)]
    try:
        per_nb, notebooks_desc = _stress_main(args)
    finally:
        for p in burners:  # only the processes started here
            p.kill()
            p.wait()
    result = {
        "what": ("headless papermill runs of " + notebooks_desc
                 + "; a stall = a cell that reached the execution timeout although the kernel had finished it"),
        "script": "scripts/headless_stress.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "execution_timeout_s": args.timeout,
        "cpu_load_processes": args.cpu_load,
        "runs_per_notebook": {n: r["runs"] for n, r in per_nb.items()},
        "stalls": sum(r["stalls"] for r in per_nb.values()),
        "timeouts": sum(r["timeouts"] for r in per_nb.values()),
        "failures": sum(r["failures"] for r in per_nb.values()),
        "stalls_per_notebook": {n: r["stalls"] for n, r in per_nb.items()},
        "slowest_cell_per_run": [c for r in per_nb.values() for c in r["slowest_cells"]],
        "run_seconds": {n: r["run_seconds"] for n, r in per_nb.items()},
        "widget_pngs_per_run": {n: r["widget_pngs"] for n, r in per_nb.items()},
        "wall_s": round(time.monotonic() - t0, 1),
        "device": cpu_description(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("papermill", "nbclient", "jupyter_client", "ipykernel", "ipywidgets",
                                             "pyzmq")},
        "commit": commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.out.exists() and not args.minimal:  # keep what --fresh-clone and --record-in added
        old = json.loads(args.out.read_text())
        result = {**result, **{k: v for k, v in old.items() if k.startswith(("main_job", "regression_test"))}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.minimal and args.record_in:
        record = json.loads(args.record_in.read_text()) if args.record_in.exists() else {}
        key = f"{args.minimal}, cpu_load={args.cpu_load}"
        record.setdefault("regression_test", {})[key] = {
            k: result[k] for k in ("what", "script", "execution_timeout_s", "cpu_load_processes", "stalls", "timeouts",
                                   "failures", "wall_s", "date", "commit")}
        record["regression_test"][key].update(runs=runs_of(result), slider_cells_per_run=args.cells,
                                              stalled_runs=[i for i, c in enumerate(result["slowest_cell_per_run"])
                                                            if c["stalled"]])
        args.record_in.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[stress] {result['runs_per_notebook']} runs: {result['stalls']} stalls, {result['timeouts']} timeouts, "
          f"{result['failures']} failures in {result['wall_s']} s -> {args.out}")
    return 0 if result["stalls"] == result["timeouts"] == result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
