"""scripts/run_notebooks.py: a cell that reaches the execution timeout fails the run with the notebook and cell named,
both when papermill raises (a slow cell) and when it does not (the nbclient stall: the cell is recorded as completed
with a duration of exactly the timeout)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import run_notebooks as rn  # noqa: E402


def _nb(*sources):
    nb = new_notebook(cells=[new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_slow_cell_fails_the_run_naming_notebook_and_cell(tmp_path):
    src = tmp_path / "slow.ipynb"
    nbformat.write(_nb("x = 1", "# a slow cell\nimport time\ntime.sleep(30)", "y = 2"), str(src))
    cmd = [sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), str(src), "--out-dir", str(tmp_path / "out"),
           "--cwd", str(tmp_path), "--execution-timeout", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "notebook slow.ipynb cell 1 ('# a slow cell') reached the execution timeout of 3 s" \
        in r.stderr, r.stderr[-3000:]


def test_stalled_cell_without_papermill_error_is_caught():
    """What a stall leaves behind: papermill marked the cell completed after exactly the timeout, while the kernel's
    own timestamps say it replied after 0.2 s."""
    nb = _nb("import ipywidgets", "# NBVAL_IGNORE_OUTPUT\nout = widgets.interactive_output(f, {})")
    for i, (dur, reply) in enumerate([(0.5, "00:00:00.400000"), (600.0, "00:00:00.200000")]):
        nb.cells[i].metadata["papermill"] = {"duration": dur, "status": "completed", "exception": False}
        nb.cells[i].metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00.000000Z",
                                             "shell.execute_reply": f"2026-01-01T{reply}Z"}
    late = rn.timed_out_cells(nb, 600)
    assert [c["index"] for c in late] == [1]
    msg = rn._timeout_message("05_cag.ipynb", late[0], 600)
    assert msg.startswith("notebook 05_cag.ipynb cell 1 ('# NBVAL_IGNORE_OUTPUT / out = widgets.interactive_output(f, "
                          "{})') reached the execution timeout of 600 s")
    assert "the kernel had finished it after 0.2 s" in msg and "nbclient#312" in msg
    assert rn.timed_out_cells(nb, 601) == [] and rn.timed_out_cells(nb, 0) == []  # 0: no timeout


@pytest.mark.parametrize("args, expected", [
    (["-p", "num_steps", "4", "-p", "model", "embedded", "-p", "flag", "False"],
     {"num_steps": 4, "model": "embedded", "flag": False}),
    (["-y", "scales: [0.5, 1.0]", "-r", "seed", "7"], {"scales": [0.5, 1.0], "seed": "7"}),
])
def test_papermill_parameter_options(args, expected):
    assert rn.parse_parameters(rn.build_parser().parse_args(args)) == expected
