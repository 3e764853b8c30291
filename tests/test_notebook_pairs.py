"""Each notebook is a pair: ``notebooks/NN_name.py`` (jupytext percent format, the file to review and edit) and
``notebooks/NN_name.ipynb`` (stripped, what papermill, nbval and JupyterLab run). The pair must hold the same cells --
type, source and tags (the papermill ``parameters`` tag) -- or this test fails, naming the notebook, the first
differing cell and the command that brings the pair back in line. ``notebooks/jupytext.toml`` declares the pairing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_dataset", "02_layer_analysis", "03_timestep", "04_tracking", "05_cag"]
FIX = ("bash scripts/lab.sh sync-notebooks  (= jupytext --sync notebooks/{name}.py, then nbstripout; "
       "the newer file wins)")


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def _excerpt(source: str, width: int = 60) -> str:
    first = source.splitlines()[0] if source.strip() else "(empty)"
    return first if len(first) <= width else first[:width - 3] + "..."


def pair_problem(py: Path, ipynb: Path) -> str | None:
    """None when ``py`` and ``ipynb`` hold the same cells (type, source, tags), else what differs first and how to
    fix it."""
    name = py.stem
    if not py.exists() or not ipynb.exists():
        missing = py if not py.exists() else ipynb
        return (f"notebook {name}: {missing.name} is missing (each notebook is a .py/.ipynb pair); "
                f"fix: {FIX.format(name=name)}")
    text_cells = _cells(jupytext.read(py))
    nb_cells = _cells(nbformat.read(str(ipynb), as_version=4))
    for i, (a, b) in enumerate(zip(text_cells, nb_cells)):
        if a == b:
            continue
        what = [w for w, x, y in zip(("type", "source", "tags"), a, b) if x != y]
        detail = []
        if "source" in what:
            la, lb = a[1].splitlines(), b[1].splitlines()
            k = next((j for j, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
            detail.append(f"first differing line {k + 1}: .py {la[k] if k < len(la) else '(none)'!r} vs "
                          f".ipynb {lb[k] if k < len(lb) else '(none)'!r}")
        if "type" in what:
            detail.append(f".py {a[0]} vs .ipynb {b[0]}")
        if "tags" in what:
            detail.append(f"tags .py {list(a[2])} vs .ipynb {list(b[2])}")
        return (f"notebook {name}: cell {i} ({b[0]} cell '{_excerpt(b[1])}') differs in {', '.join(what)} "
                f"between {py.name} and {ipynb.name}: {'; '.join(detail)}; fix: {FIX.format(name=name)}")
    if len(text_cells) != len(nb_cells):
        n = min(len(text_cells), len(nb_cells))
        longer, cell = (py, text_cells[n]) if len(text_cells) > n else (ipynb, nb_cells[n])
        return (f"notebook {name}: {py.name} has {len(text_cells)} cells, {ipynb.name} {len(nb_cells)}; cell {n} "
                f"('{_excerpt(cell[1])}') is only in {longer.name}; fix: {FIX.format(name=name)}")
    return None


def test_every_notebook_is_a_pair():
    stems = {p.stem for p in NB_DIR.glob("[0-9]*.ipynb")} | {p.stem for p in NB_DIR.glob("[0-9]*.py")}
    assert sorted(stems) == NOTEBOOKS, f"notebooks/ holds {sorted(stems)}; expected the pairs of {NOTEBOOKS}"
    assert (NB_DIR / "jupytext.toml").is_file()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_in_sync(name):
    problem = pair_problem(NB_DIR / f"{name}.py", NB_DIR / f"{name}.ipynb")
    assert problem is None, problem


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_text_file_is_percent_format_with_the_parameters_tag(name):
    text = (NB_DIR / f"{name}.py").read_text()
    assert text.count('# %% tags=["parameters"]') == 1, f"{name}.py: expected one '# %% tags=[\"parameters\"]' cell"
    nb = jupytext.read(NB_DIR / f"{name}.py")
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_notebooks_01_03_share_the_analysis_parameters():
    """01 fills the per-video analysis cache that 02 and 03 reuse: their shared parameters (difftrack.params.COMMON)
    must have the same defaults in all three."""
    from difftrack.params import COMMON

    def defaults(name):
        nb = jupytext.read(NB_DIR / f"{name}.py")
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", ()))
        g: dict = {}
        exec(cell.source, g)  # noqa: S102 -- the committed parameters cell: typed literal assignments
        return {k: g[k] for k in COMMON}

    first = defaults("01_dataset")
    for name in ("02_layer_analysis", "03_timestep"):
        assert defaults(name) == first, f"{name}: shared parameter defaults differ from 01_dataset's"


def _copy_pair(name: str, dest: Path) -> tuple[Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".py", ".ipynb"):
        shutil.copy(NB_DIR / f"{name}{suffix}", dest / f"{name}{suffix}")
    return dest / f"{name}.py", dest / f"{name}.ipynb"


def test_check_fails_on_an_edited_text_file(tmp_path):
    py, ipynb = _copy_pair("04_tracking", tmp_path)
    text = py.read_text()
    assert "trail: int = 5" in text
    py.write_text(text.replace("trail: int = 5", "trail: int = 7", 1))
    problem = pair_problem(py, ipynb)
    assert problem is not None
    assert problem.startswith("notebook 04_tracking: cell 1 (code cell")
    assert "differs in source" in problem and "'trail: int = 7" in problem and "'trail: int = 5" in problem
    assert "bash scripts/lab.sh sync-notebooks" in problem and "jupytext --sync notebooks/04_tracking.py" in problem


def test_check_fails_on_a_lost_tag_and_on_an_extra_cell(tmp_path):
    py, ipynb = _copy_pair("02_layer_analysis", tmp_path)
    py.write_text(py.read_text().replace('# %% tags=["parameters"]', "# %%", 1))
    problem = pair_problem(py, ipynb)
    assert problem is not None and "cell 1" in problem and "differs in tags" in problem
    assert "tags .py [] vs .ipynb ['parameters']" in problem

    py, ipynb = _copy_pair("05_cag", tmp_path / "b")
    nb = nbformat.read(str(ipynb), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("print('added in JupyterLab')"))
    nbformat.write(nb, str(ipynb))
    problem = pair_problem(py, ipynb)
    assert problem is not None and "is only in 05_cag.ipynb" in problem and "added in JupyterLab" in problem
    assert pair_problem(py, tmp_path / "b" / "missing.ipynb").startswith("notebook 05_cag: missing.ipynb is missing")


def test_sync_restores_the_pair(tmp_path):
    """What the fix command does (jupytext --sync from the edited .py, then nbstripout) gives back a pair in sync
    and a stripped notebook with the .py's new source."""
    import subprocess
    import sys

    py, ipynb = _copy_pair("03_timestep", tmp_path)
    shutil.copy(NB_DIR / "jupytext.toml", tmp_path / "jupytext.toml")
    py.write_text(py.read_text().replace("# %% [markdown]", "# %% [markdown]\n# An added line.\n#", 1))
    assert pair_problem(py, ipynb) is not None
    jt = Path(sys.executable).with_name("jupytext")
    cmd = [str(jt)] if jt.exists() else [sys.executable, "-m", "jupytext"]
    subprocess.run([*cmd, "-q", "--sync", str(py)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "nbstripout", "--extra-keys", "metadata.jupytext", str(ipynb)], check=True,
                   timeout=120)
    assert pair_problem(py, ipynb) is None
    nb = nbformat.read(str(ipynb), as_version=4)
    assert nb.cells[0].source.startswith("An added line.")
    assert "jupytext" not in nb.metadata and [c.id for c in nb.cells] == [str(i) for i in range(len(nb.cells))]
