"""Execute notebooks headless with papermill and fail loudly when a cell reaches the execution timeout.

    python scripts/run_notebooks.py [NOTEBOOK ...] [--execution-timeout S] [--out-dir DIR] [--cwd DIR]
                                    [-f PARAMS.yaml] [-p NAME VALUE] [-y YAML] [-r NAME VALUE] [--log-output]

(`bash scripts/lab.sh run` calls it for notebooks/0*.ipynb; the papermill parameter options keep their meaning.)

papermill does not always fail on a timeout: when nbclient misses the wake-up of a cell's execute_reply
(jupyter/nbclient#312, the stall of widget cells that capture output), it sleeps until the timeout, then finds the
reply and records the cell as completed with a duration of exactly the timeout, and the run goes on as if nothing
happened. So every executed notebook is checked here: a cell whose papermill duration reached the timeout, or a
CellTimeoutError, stops the run with

    notebook 05_cag.ipynb cell 24 ("# NBVAL_IGNORE_OUTPUT ...") reached the execution timeout of 600 s ...

and exit status 3. Other papermill failures (an exception in a cell) exit with status 1 and papermill's message.
A parameter name the notebook does not define (``-p grid_szie 4``) exits with status 2 before any kernel starts,
naming it and the allowed names.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class CellTimeout(RuntimeError):
    """A cell reached the execution timeout (a stall or a genuinely slow cell)."""


@dataclass
class NotebookRun:
    notebook: str
    seconds: float
    cells: list[dict] = field(default_factory=list)  # code cells: index, seconds (papermill), kernel_s, first_line

    @property
    def slowest(self) -> dict:
        return max(self.cells, key=lambda c: c["seconds"], default={"index": None, "seconds": 0.0})


def _first_line(source: str) -> str:
    lines = [ln.strip() for ln in source.splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if text.startswith("# NBVAL") and len(lines) > 1:  # the marker says little: show the next line too
        text += " / " + lines[1]
    return text if len(text) <= 80 else text[:77] + "..."


def _kernel_seconds(cell) -> float | None:
    """How long the kernel took (its own timestamps: execute_input -> execute_reply), if nbclient recorded it."""
    import dateutil.parser

    ex = cell.get("metadata", {}).get("execution", {})
    try:
        return (dateutil.parser.isoparse(ex["shell.execute_reply"])
                - dateutil.parser.isoparse(ex["iopub.execute_input"])).total_seconds()
    except (KeyError, ValueError, TypeError):
        return None


def cell_records(nb) -> list[dict]:
    out = []
    for i, cell in enumerate(nb.cells):
        pm = cell.get("metadata", {}).get("papermill", {})
        if cell.cell_type != "code" or pm.get("duration") is None:
            continue
        out.append({"index": i, "seconds": float(pm["duration"]), "kernel_s": _kernel_seconds(cell),
                    "first_line": _first_line(cell.source)})
    return out


def timed_out_cells(nb, timeout: float) -> list[dict]:
    """Code cells whose papermill duration reached ``timeout`` (1 ms of clock slack); none when timeout <= 0."""
    if not timeout or timeout <= 0:
        return []
    return [c for c in cell_records(nb) if c["seconds"] >= timeout - 1e-3]


def _timeout_message(name: str, cell: dict, timeout: float) -> str:
    msg = (f"notebook {name} cell {cell['index']} ({cell['first_line']!r}) reached the execution timeout of "
           f"{timeout:g} s")
    k = cell.get("kernel_s")
    if k is not None and k < timeout - 1:
        msg += (f"; the kernel had finished it after {k:.1f} s, so the client missed the reply (the nbclient stall, "
                "jupyter/nbclient#312: does the cell capture output into a widget?)")
    return msg


def run_notebook(src: Path, dest: Path, parameters: dict | None = None, timeout: float = 600, cwd: Path | None = None,
                 log_output: bool = False, kernel: str = "python3") -> NotebookRun:
    """papermill ``src`` -> ``dest``; raises :class:`CellTimeout` when a cell reached ``timeout`` seconds (stall or
    slow cell), papermill's own exception when a cell failed. Returns the per-cell timings."""
    import nbformat
    import papermill
    from nbclient.exceptions import CellTimeoutError

    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    error = None
    try:
        papermill.execute_notebook(str(src), str(dest), parameters=parameters or {}, kernel_name=kernel,
                                   cwd=str(cwd) if cwd else None, log_output=log_output, progress_bar=False,
                                   execution_timeout=int(timeout) if timeout and timeout > 0 else None)
    except CellTimeoutError as exc:
        error = exc
    seconds = time.monotonic() - t0
    nb = nbformat.read(str(dest), as_version=4)
    run = NotebookRun(src.name, seconds, cell_records(nb))
    late = timed_out_cells(nb, timeout)
    if late or error is not None:
        if not late:  # no duration recorded for the cell that timed out: name the one papermill left running
            late = [{"index": i, "first_line": _first_line(c.source), "kernel_s": None} for i, c in enumerate(nb.cells)
                    if c.get("metadata", {}).get("papermill", {}).get("status") == "running"][:1] or \
                   [{"index": "?", "first_line": str(error).splitlines()[0] if str(error) else "", "kernel_s": None}]
        raise CellTimeout("; ".join(_timeout_message(src.name, c, timeout) for c in late)
                          + f" (executed copy: {dest})") from error
    return run


def check_parameter_names(notebook: Path, params: dict) -> None:
    """``ValueError`` naming every parameter in ``params`` that ``notebook``'s ``parameters`` cell does not define,
    and the names it does (papermill only warns "Passed unknown parameter" and runs on the defaults)."""
    from difftrack import params as P

    if Path(notebook).stem in P.SPECS:
        P.check_names(Path(notebook).stem, params)
        return
    import papermill

    allowed = list(papermill.inspect_notebook(str(notebook)))
    unknown = [n for n in params if n not in allowed]
    if unknown:
        raise ValueError(f"notebook {Path(notebook).name}: unknown parameter name(s) {unknown}; allowed names: "
                         f"{allowed}")


def parse_parameters(args) -> dict:
    import yaml
    from papermill.cli import _resolve_type

    params: dict = {}
    for f in args.parameters_file or []:
        params.update(yaml.safe_load(Path(f).read_text()) or {})
    for y in args.parameters_yaml or []:
        params.update(yaml.safe_load(y) or {})
    for name, value in args.parameters_raw or []:
        params[name] = value
    for name, value in args.parameters or []:
        params[name] = _resolve_type(value)
    return params


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/0*.ipynb")
    ap.add_argument("--execution-timeout", type=float, default=600,
                    help="seconds per cell (default 600; 0: no timeout)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "build" / "notebooks")
    ap.add_argument("--cwd", type=Path, default=ROOT / "notebooks")
    ap.add_argument("-k", "--kernel", default="python3")
    ap.add_argument("-f", "--parameters_file", action="append")
    ap.add_argument("-y", "--parameters_yaml", action="append")
    ap.add_argument("-p", "--parameters", nargs=2, action="append", metavar=("NAME", "VALUE"))
    ap.add_argument("-r", "--parameters_raw", nargs=2, action="append", metavar=("NAME", "VALUE"))
    ap.add_argument("--log-output", action="store_true")
    ap.add_argument("--no-progress-bar", action="store_true", help="accepted for papermill compatibility (no bar)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("traitlets", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)
    params = parse_parameters(args)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("0*.ipynb"))
    try:  # before any kernel starts: a misspelt -p name fails here (the notebook's check cell also catches it)
        for nb in notebooks:
            check_parameter_names(nb, params)
    except ValueError as exc:
        print(f"[lab] FAILED: {exc}", file=sys.stderr, flush=True)
        return 2
    for nb in notebooks:
        print(f"[lab] papermill {nb.name}", flush=True)
        try:
            run = run_notebook(nb, args.out_dir / nb.name, params, args.execution_timeout, args.cwd,
                               args.log_output, args.kernel)
        except CellTimeout as exc:
            print(f"[lab] FAILED: {exc}", file=sys.stderr, flush=True)
            return 3
        except Exception as exc:  # papermill's PapermillExecutionError names the cell and the exception
            print(f"[lab] FAILED: notebook {nb.name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return 1
        s = run.slowest
        print(f"[lab] {nb.name}: {run.seconds:.1f} s (slowest cell {s['index']}: {s['seconds']:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
