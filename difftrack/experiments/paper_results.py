"""The committed paper-scale results (``scripts/paper_scale.py``), read back for the notebooks' paper figures.

Notebooks draw each paper figure from these files when they exist and say so under the figure; their own live run at
the CPU defaults stays small and is labelled as such. Nothing here runs a model.

* :func:`load_analysis`: ``results/analysis_summary.json`` -> the per-(step, layer) mean tables per subset, in the
  layout of :func:`difftrack.experiments.analysis.group_tables` (``"generated"``, ``"exact"``, ``"all"``), or ``None``.
* :func:`load_videos`: the 50-step videos the figures show (``results/paper_videos.npz`` + ``.json``).
* :func:`load_heads`: the single-head study (``results/heads.json``, ``scripts/head_study.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_STEPS = 50  # a result with fewer denoising steps is not a paper-scale one


@dataclass
class PaperAnalysis:
    """Mean tables ``[S, L]`` per subset (``tables["all"]["qk_acc"]`` ...), the scheduler timesteps ``[S]``, the
    headline summaries per subset and a caption naming device, videos, steps and commit -- of the project's scoring
    protocol (``protocol``); ``published_tables`` / ``published_summary``: the same under the published protocol
    (``None`` when the run did not record it)."""

    tables: dict[str, dict[str, np.ndarray]]
    timesteps: list[int]
    summary: dict[str, dict]
    caption: str
    path: Path
    protocol: str = "difftrack"
    published_tables: dict | None = None
    published_summary: dict | None = None


def _results_dir(results_dir) -> Path:
    if results_dir is not None:
        return Path(results_dir)
    from ..paths import results_dir as default

    return default()


def load_analysis(results_dir=None) -> PaperAnalysis | None:
    """The paper-scale analysis, or ``None`` when ``analysis_summary.json`` is missing, has no tables (an older
    summary) or was run with fewer than 50 steps. Raises ``ValueError`` naming the file when it is unreadable."""
    path = _results_dir(results_dir) / "analysis_summary.json"
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); regenerate it with scripts/paper_scale.py") from e
    if "tables" not in d or d.get("num_steps", 0) < MIN_STEPS:
        return None
    names = {"generated": "generated", "exact": "exact", "combined": "all"}

    def read(block):
        return ({names[k]: {t: np.asarray(v, np.float64) for t, v in tabs.items()} for k, tabs in block["tables"].items()},
                {names[k]: block[k] for k in names if k in block})

    tables, summary = read(d)
    pub = d.get("published")
    pub_tables, pub_summary = read(pub) if isinstance(pub, dict) and "tables" in pub else (None, None)
    c = d.get("counts", {})
    caption = (f"paper-scale run: {c.get('generated', '?')} generated + {c.get('exact', '?')} exact-GT videos, "
               f"{d['num_steps']} steps, {d['settings']['grid']}x{d['settings']['grid']} grid, on {d.get('device')} "
               f"(commit {d.get('commit')}; {path.parent.name}/{path.name})")
    return PaperAnalysis(tables=tables, timesteps=[int(t) for t in d["timesteps"]], summary=summary, caption=caption,
                         path=path, protocol=d.get("protocol", "difftrack"), published_tables=pub_tables,
                         published_summary=pub_summary)


def load_videos(prefix: str, results_dir=None) -> dict[str, tuple[np.ndarray, dict]]:
    """The committed 50-step videos whose key starts with ``prefix`` (``"analysis/"``, ``"cag/"``,
    ``"agreement/"``): ``{key: (video uint8 [T, H, W, 3], meta)}`` in the file's order; ``{}`` when there are none.
    Raises ``ValueError`` naming the file when the archive is unreadable."""
    d = _results_dir(results_dir)
    npz, meta_path = d / "paper_videos.npz", d / "paper_videos.json"
    if not npz.exists() or not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(npz) as z:
            keys = [k for k in z.files if k.startswith(prefix)]
            arrays = {k: z[k] for k in keys}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the committed paper videos {npz} / {meta_path}: {e}") from e
    if meta.get("steps", 0) < MIN_STEPS:
        return {}
    group = prefix.split("/")[0]
    return {k: (v, dict(meta.get(group, {}).get(k, {}), steps=meta["steps"], device=meta.get("device")))
            for k, v in arrays.items()}


@dataclass
class HeadStudy:
    """Held-out matching accuracy per layer and head set (``acc_half`` ``[L, K]``, half a token), the head sets and
    their names (``"0"``, ``"0+1"``, ``"all"`` = the head average), the train-chosen sets and a caption."""

    acc_half: np.ndarray
    head_sets: list[list[int]]
    names: list[str]
    choice: dict
    caption: str


def load_heads(results_dir=None) -> HeadStudy | None:
    """``results/heads.json`` or ``None`` when missing; ``ValueError`` naming the file when it is unreadable."""
    path = _results_dir(results_dir) / "heads.json"
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        acc = np.asarray(d["per_split"]["heldout"]["acc_half"], np.float64)
        pr = d["protocol"]
        caption = (f"{pr['videos_per_split']} held-out world videos, step {pr['step_index']} of {pr['num_steps']}, "
                   f"half a token; choice on {pr['videos_per_split']} train videos; {d['device']} (commit "
                   f"{d['commit'][:7]}; {path.parent.name}/{path.name})")
        return HeadStudy(acc_half=acc, head_sets=d["head_sets"], names=d["head_set_names"], choice=d["choice"],
                         caption=caption)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a head study ({type(e).__name__}: {e}); regenerate it with "
                         f"scripts/head_study.py") from e
