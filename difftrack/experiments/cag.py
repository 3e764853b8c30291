"""The CAG evaluation's orchestration: cached generation (one folder per setting, one ``.npy`` per video, resumable),
time per step, the layer sets read back from the analysis summary, the settings, result tables and the typed
records of ``results/cag.json`` (and the notebook's ``cag_notebook.json``) and ``results/mini_prompt_agreement.json``.

The measures and the generation itself are :mod:`difftrack.cag_eval` (no files); the plots are in
:mod:`difftrack.viz`.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import cag_eval as E
from . import ResultRecord, read_record


def metrics_table(settings: dict, measures: Sequence[str] = E.MEASURES):
    """``pandas.DataFrame`` with one row per setting (``settings``: name -> ``{"layer_set", "scale", "summary"}``) and
    ``mean ± sem`` strings per measure."""
    import pandas as pd

    rows = []
    for name, s in settings.items():
        row = {"setting": name, "layers": s.get("layer_set", ""), "scale": s.get("scale", 0.0)}
        for m in measures:
            d = s["summary"].get(m)
            if d is None:
                continue
            mean, sem, delta = E.nan_if_none(d.get("mean")), E.nan_if_none(d.get("sem")), E.nan_if_none(d.get("delta"))
            txt = f"{mean:.3f} ± {sem:.3f}" if not math.isnan(sem) else f"{mean:.3f}"
            if not math.isnan(delta):
                txt += f" ({delta:+.3f})"
            row[E.MEASURE_LABELS.get(m, m)] = txt
        rows.append(row)
    return pd.DataFrame(rows).set_index("setting")


# --------------------------------------------------------------------------------------------- settings
DEFAULT_TOP3 = [8, 11, 5]
DEFAULT_BOTTOM3 = [0, 6, 9]


def layer_sets(summary_path: str | Path | None = None) -> dict:
    """The dominant and least-dominant 3 layers of the embedded model.

    From the analysis summary (default ``results/analysis_summary.json``, written by ``scripts/run_analysis.py``),
    read through :class:`difftrack.experiments.analysis.AnalysisSummary` (:meth:`~AnalysisSummary.layer_sets`: its
    ``combined`` block, or the top level of a summary with one block; ``best_layers_top3`` and
    ``worst_layers_bottom3`` or the full ``layer_ranking``). Without the file: the colleague's analysis defaults
    ``[8, 11, 5]`` and ``[0, 6, 9]``, said so in ``source``.

    Returns ``{"top3": [...], "bottom3": [...], "source": str}``.
    """
    from .analysis import AnalysisSummary

    if summary_path is None:
        from ..paths import results_dir

        summary_path = results_dir() / "analysis_summary.json"
    p = Path(summary_path)
    if not p.exists():
        return dict(top3=list(DEFAULT_TOP3), bottom3=list(DEFAULT_BOTTOM3),
                    source=f"defaults ({p.name} not found): top [8, 11, 5], bottom [0, 6, 9]")
    return dict(read_record(AnalysisSummary, p).layer_sets(), source=p.name)


def cag_settings(layers: dict, scales: Sequence[float]) -> dict:
    """Setting name -> ``{"layer_set", "layers", "scale"}``: ``"none"`` (plain CFG) then, per scale, the top-3 and
    the bottom-3 layer sets."""
    out = {"none": dict(layer_set="none", layers=[], scale=0.0)}
    for s in scales:
        for key in ("top3", "bottom3"):
            out[f"{key}_s{float(s):g}"] = dict(layer_set=key, layers=list(layers[key]), scale=float(s))
    return out


# --------------------------------------------------------------------------------------------- cached runs
def setting_dir(run_dir: str | Path, name: str, setting: dict) -> Path:
    """Cache folder of one CAG setting (:func:`cag_settings`); its layers are part of the name, so a new layer
    ranking never reuses videos."""
    layers = setting["layers"]
    return Path(run_dir) / (name if not layers else f"{name}_L{'-'.join(str(l) for l in layers)}")


def video_path(directory: str | Path, index: int, seed: int) -> Path:
    """Cache file of one generated video: ``<directory>/<index:04d>_seed<seed>.npy`` (``uint8 [T, H, W, 3]``)."""
    return Path(directory) / f"{int(index):04d}_seed{int(seed)}.npy"


def claim_cache(pipe, directory: str | Path) -> None:
    """Make ``directory`` a cache of ``pipe``'s videos: its ``weights.json`` holds the fingerprint of the weights that
    made its videos (:func:`difftrack.experiments.weights_fingerprint`); when ``pipe`` holds other weights, the cached
    videos are deleted with a warning (they are generated again). A folder without the file (from before it existed,
    or unpacked from a pack) is taken to be of ``pipe``'s weights. With several processes only rank 0 calls this,
    before the others generate."""
    from ..fileio import read_json
    from . import weights_fingerprint, write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "weights.json"
    fp = weights_fingerprint(pipe)
    made_by = read_json(marker, "CAG cache weights record") if marker.exists() else fp
    if made_by != fp:
        stale = sorted(directory.glob("*_seed*.npy")) + sorted(directory.glob("step_seconds.json"))
        warnings.warn(f"cached videos in {str(directory)!r} were made by other weights ({made_by}, now {fp}); "
                      f"{len(stale)} files deleted and generated again", stacklevel=3)
        for f in stale:
            f.unlink()
    write_json(marker, fp, indent=None)


def batches(items: Sequence[dict], batch_size: int) -> list[list[dict]]:
    """The pipeline calls of a generation: ``items`` in consecutive chunks of ``batch_size``, fixed by item index
    (a video depends on the batch it is generated in, so every run, resumed or split over processes, generates each
    video in the same batch)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; allowed: an integer >= 1")
    return [list(items[k:k + batch_size]) for k in range(0, len(items), batch_size)]


def generate_cached(pipe, items: Sequence[dict], directory: str | Path, layers: Sequence[int] = (),
                    scale: float = 0.0, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                    variant: str = "renormalized", batch_size: int = 100, log: Callable[[str], None] | None = print,
                    autocast: str | None = None, only_batches: Sequence[int] | None = None,
                    claim: bool = True, first_frame: Callable[[dict], np.ndarray] | None = None) -> list[dict]:
    """Generate the videos of ``items`` (``{"index", "prompt", "noise_seed"}``) not cached yet under ``directory``.

    The pipeline calls are :func:`batches` of ``batch_size`` items, fixed by item index: a batch with any video
    missing is generated whole and its missing videos saved as soon as it ends (an interrupted run resumes, and
    every video comes from the same batch whatever was cached). ``only_batches``: generate only these batch indices
    (one process's share, :mod:`difftrack.experiments.distributed`); ``claim``: check the folder's weights first
    (:func:`claim_cache`; several processes: rank 0 claims, the others pass ``False``). A truncated or garbled
    cached video is named in a warning and generated again. ``first_frame``: an image-to-video model's first frame
    of an item (``uint8 [H, W, 3]``). Returns one timing record per pipeline call:
    ``{"batch", "steps", "step_seconds" (median over the steps after the first), "first_step_seconds",
    "total_seconds"}``."""
    from ..fileio import npy_intact

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if pipe is not None and claim:
        claim_cache(pipe, directory)
    chunks = batches(items, batch_size)
    wanted = range(len(chunks)) if only_batches is None else sorted(set(only_batches))
    bad = [b for b in wanted if not 0 <= b < len(chunks)]
    if bad:
        raise ValueError(f"only_batches holds {bad}; allowed: batch indices 0 .. {len(chunks) - 1}")
    records = []
    for b in wanted:
        chunk = chunks[b]
        missing = []
        for it in chunk:
            p = video_path(directory, it["index"], it["noise_seed"])
            if p.exists() and not npy_intact(p):  # truncated / garbled by a crash or a full disk: redo it
                warnings.warn(f"cached video {str(p)!r} is corrupt (truncated or garbled); it is recomputed",
                              stacklevel=2)
                p.unlink()
            if not p.exists():
                missing.append(it)
        if not missing:
            continue
        times: list[float] = []
        t0 = time.perf_counter()
        vids = E.generate_videos(pipe, [it["prompt"] for it in chunk], [it["noise_seed"] for it in chunk], layers,
                                 scale, num_inference_steps, guidance_scale, variant, step_times=times,
                                 autocast=autocast,
                                 images=None if first_frame is None else np.stack([first_frame(it) for it in chunk]))
        total = time.perf_counter() - t0
        keep = {id(it) for it in missing}
        for it, v in zip(chunk, vids):
            if id(it) in keep:
                p = video_path(directory, it["index"], it["noise_seed"])
                tmp = p.with_name(p.name + ".tmp")  # atomic: a killed run never leaves half a video
                with open(tmp, "wb") as f:
                    np.save(f, v)
                os.replace(tmp, p)
        rec = dict(batch=len(chunk), steps=num_inference_steps,
                   step_seconds=float(np.median(times[1:] if len(times) > 1 else times)),
                   first_step_seconds=float(times[0]), total_seconds=float(total))
        records.append(rec)
        if log:
            log(f"  {directory.name}: batch {b + 1}/{len(chunks)} ({len(missing)} new videos), "
                f"{rec['step_seconds']:.3f} s/step at batch {len(chunk)} ({total:.1f} s)")
    return records


def load_cached(directory: str | Path, items: Sequence[dict]) -> list[np.ndarray]:
    """The cached videos of ``items`` (``FileNotFoundError`` naming the first missing one,
    :class:`difftrack.fileio.CorruptFileError` naming a corrupt one: the generate phase recomputes those)."""
    from ..fileio import load_npy

    out = []
    for it in items:
        p = video_path(directory, it["index"], it["noise_seed"])
        if not p.exists():
            raise FileNotFoundError(f"{p} missing: run the generate phase first")
        out.append(load_npy(p, "cached CAG video", hint="run the generate phase again: it recomputes corrupt videos"))
    return out


def setting_videos(pipe, items: Sequence[dict], run_dir: str | Path, name: str, setting: dict,
                   num_inference_steps: int = 50, guidance_scale: float = 6.0, variant: str = "renormalized",
                   batch_size: int = 100, log: Callable[[str], None] | None = None
                   ) -> tuple[list[np.ndarray], float | None]:
    """One setting's videos (:func:`cag_settings`), generated where not cached yet (:func:`generate_cached` under
    :func:`setting_dir`), and the seconds per denoising step of the run that generated them (kept in the setting's
    ``step_seconds.json`` so that a re-run that only reads the cache still reports it; ``None`` when unknown).

    Returns ``(videos [uint8 [T, H, W, 3]] in the order of items, seconds per step or None)``."""
    from ..fileio import read_json
    from . import write_json

    d = setting_dir(run_dir, name, setting)
    recs = generate_cached(pipe, items, d, setting["layers"], setting["scale"], num_inference_steps, guidance_scale,
                           variant, batch_size=batch_size, log=log)
    t_file = d / "step_seconds.json"
    seconds = None
    if recs:
        seconds = recs[0]["step_seconds"]
        write_json(t_file, seconds, indent=None)
    elif t_file.exists():
        seconds = read_json(t_file, "CAG step timing")
    return load_cached(d, items), seconds


def time_steps(pipe, layers: Sequence[int], batch_size: int = 1, num_inference_steps: int = 3, scale: float = 1.0,
               variant: str = "renormalized", prompt: str = "a red circle moving left on a still background",
               autocast: str | None = None) -> dict:
    """Seconds per denoising step of the plain CFG pipeline and of CAG (3-slot batch) for ``batch_size`` videos:
    median over the steps after the first of one ``num_inference_steps`` run each (``num_inference_steps >= 2``)."""
    import platform

    import torch

    device = pipe._execution_device
    out = {}
    for name, (ls, s) in {"plain_cfg": ((), 0.0), "cag": (tuple(layers), scale)}.items():
        times: list[float] = []
        E.generate_videos(pipe, [prompt] * batch_size, list(range(batch_size)), ls, s, num_inference_steps,
                        variant=variant, step_times=times, autocast=autocast)
        out[name] = float(np.median(times[1:] if len(times) > 1 else times))
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return dict(device=str(dev), device_name=name, autocast=autocast, batch=batch_size,
                steps_timed=max(1, num_inference_steps - 1),
                plain_cfg_s_per_step=out["plain_cfg"], cag_s_per_step=out["cag"],
                cag_over_plain=out["cag"] / out["plain_cfg"], torch_threads=torch.get_num_threads())


# --------------------------------------------------------------------------------------------- records
@dataclass(kw_only=True)
class CagResult(ResultRecord):
    """``results/cag.json`` (``scripts/run_cag_eval.py``; the notebook's CI-sized run writes the same layout to
    ``cag_notebook.json``, with ``source`` ``"notebook"``).

    ``protocol``: prompts, steps, CFG, variant, layers, scales; ``settings``: name -> ``{"layer_set", "layers",
    "scale", "summary": {measure: {"mean", "sem", "n", ...}}}``; ``world_reference``: the measures on the world
    renders of the same prompts; ``timing``: seconds per step."""

    SCHEMA = "cag/1"
    WHAT = "CAG result"
    ENTRIES = {"settings": ("layer_set", "scale", "summary")}

    protocol: dict
    settings: dict
    source: str | None = None
    world_reference: dict | None = None
    timing: dict | None = None


@dataclass(kw_only=True)
class PromptAgreement(ResultRecord):
    """``results/mini_prompt_agreement.json`` (``scripts/run_prompt_agreement.py``): the share of generated videos
    that show what their prompt asks for (``agreement`` over ``n_videos``), per family in ``generated``, the same
    measure on world renders (``world_validation``) and the per-video rows."""

    SCHEMA = "prompt_agreement/1"
    WHAT = "prompt agreement result"

    n_videos: int
    agreement: float
    generated: dict
    protocol: dict
    world_validation: dict | None = None
    per_video: list | None = None
