"""The tracking benchmark's orchestration: TAP-Vid scores of one video's tracks at the benchmark's size, benchmark
tables read back (``results/tracking_benchmark.csv`` / ``.json``) and the typed record of
``results/tracking_benchmark.json`` (``scripts/run_tracking_benchmark.py``).

The trackers are :mod:`difftrack.tracking` and :mod:`difftrack.baselines`, the metrics :mod:`difftrack.tapvid`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ResultRecord


def score_tracks(queries: np.ndarray, tracks: np.ndarray, visible: np.ndarray, gt_tracks: np.ndarray,
                 gt_visible: np.ndarray, size: tuple[int, int], eval_size: tuple[int, int] = (256, 256),
                 query_mode: str = "first") -> dict:
    """TAP-Vid metrics of one video's pixel tracks, rescaled to ``eval_size`` (the benchmark's 256x256) first.

    Args:
        queries: ``[N, 3]`` ``(t, x, y)`` pixels at ``size``; tracks / gt_tracks ``[N, T, 2]`` pixels at ``size``;
        visible / gt_visible ``[N, T]`` bool; size: ``(H, W)`` of the video tracked.

    Returns:
        :func:`difftrack.tapvid.compute_tapvid_metrics` output (``key -> [1]`` arrays).
    """
    from ..tapvid import compute_tapvid_metrics, rescale_tracks

    q = np.asarray(queries, np.float32)
    qp = np.stack([q[:, 0], q[:, 2] * eval_size[0] / size[0], q[:, 1] * eval_size[1] / size[1]], -1)  # (t, y, x)
    return compute_tapvid_metrics(
        qp[None], ~np.asarray(gt_visible, bool)[None], rescale_tracks(gt_tracks, size, eval_size)[None],
        ~np.asarray(visible, bool)[None], rescale_tracks(tracks, size, eval_size)[None], query_mode=query_mode)


#: Version of a cached TAP-Vid prediction's layout (part of its cache key).
TAPVID_SCHEMA = "tapvid-prediction/1"


def prepare_tapvid_video(example: dict, size: tuple[int, int], max_frames: int | None = None,
                         max_points: int | None = None) -> dict:
    """One TAP-Vid example (:func:`difftrack.tapvid.load_tapvid`) as the trackers take it: its first ``max_frames``
    frames resized to ``size`` ``(H, W)``, queries in the "first" mode (at most ``max_points``, evenly subsampled)
    and the ground truth, in pixels of ``size``.

    Returns ``{"video": uint8 [T, H, W, 3], "queries": float32 [N, 3] (t, x, y), "gt": float32 [N, T, 2] (x, y),
    "gt_visible": bool [N, T]}``."""
    from ..tapvid import resize_video, sample_queries_first

    H, W = size
    frames = slice(None, max_frames)
    video = resize_video(example["video"][frames], size)
    q = sample_queries_first(example["occluded"][:, frames], example["points"][:, frames])
    n = q["query_points"].shape[1]
    keep = np.unique(np.linspace(0, n - 1, min(max_points or n, n)).round().astype(int))
    qp = q["query_points"][0, keep]  # (t, y, x) in [0, 1]
    queries = np.stack([qp[:, 0], np.clip(qp[:, 2] * W, 0, W), np.clip(qp[:, 1] * H, 0, H)], -1).astype(np.float32)
    return dict(video=video, queries=queries, gt=(q["target_points"][0, keep] * np.float32([W, H])).astype(np.float32),
                gt_visible=~q["occluded"][0, keep])


def evaluate_tapvid(trackers: dict, path: str | Path, cache_dir: str | Path, size: tuple[int, int],
                    max_videos: int | None = None, max_frames: int | None = None, max_points: int | None = None,
                    settings: dict | None = None, processes=None, progress: bool = True) -> dict | None:
    """TAP-Vid evaluation of a user's dataset (a ``tapvid_davis.pkl``-style pickle or a Kinetics shard folder) with
    a per-(tracker, video) cache, on one process or several.

    Each process takes its share of the videos by index in name order
    (:class:`difftrack.experiments.distributed.Processes`), prepares them (:func:`prepare_tapvid_video`), runs every
    tracker on them and caches tracks, visibility, queries and ground truth per video (atomically); a killed run
    resumes from those entries. After every process is done, rank 0 scores every cached video in video order
    (:func:`score_tracks` at 256x256, query mode "first").

    Args:
        trackers: name -> zero-argument factory of a tracker, a callable ``(video uint8 [T, H, W, 3], queries
            [N, 3] (t, x, y)) -> (tracks [N, T, 2], visible [N, T])`` (built only on a process with videos to track).
        path: the dataset; cache_dir: the per-video cache; size: ``(H, W)`` the trackers work at.
        max_videos / max_frames / max_points: the first videos, frames, evenly subsampled queries (``None``: all).
        settings: ``name -> JSON-able`` description of each tracker (model, layer, step, ...) that its cached
            predictions depend on (part of the cache key, with the dataset's file name, size and limits).

    Returns (rank 0): ``{"videos": [names], "methods": {name: {"metrics": {metric: mean over videos},
    "per_video": {metric: [values]}, "seconds_per_video": float}}}``; other ranks ``None``.
    """
    import os
    import time

    from . import cache_key
    from .distributed import Processes
    from ..tapvid import load_tapvid

    procs = processes or Processes()
    for name in ("max_videos", "max_frames", "max_points"):
        v = locals()[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}={v!r}; allowed: None or an integer >= 1")
    if not trackers:
        raise ValueError("trackers is empty; allowed: a dict name -> tracker (or factory)")
    settings = settings or {}
    base = dict(dataset=Path(path).name, size=[int(v) for v in size], max_frames=max_frames, max_points=max_points)
    keys = {name: cache_key("tapvid", TAPVID_SCHEMA, dict(base, method=name, tracker=settings.get(name)))
            for name in trackers}
    dirs = {name: Path(cache_dir) / f"{name}-{key}" for name, key in keys.items()}
    built: dict = {}
    names: list[str] = []
    for i, (vname, example) in enumerate(load_tapvid(path)):
        if max_videos is not None and i >= max_videos:
            break
        names.append(vname)
        if i % procs.world_size != procs.rank:
            continue
        files = {m: d / f"{i:05d}.npz" for m, d in dirs.items()}
        if all(f.exists() for f in files.values()):
            continue
        v = prepare_tapvid_video(example, size, max_frames, max_points)
        for m, f in files.items():
            if f.exists():
                continue
            if m not in built:
                built[m] = trackers[m]()
            t0 = time.perf_counter()
            tracks, visible = built[m](v["video"], v["queries"])
            sec = time.perf_counter() - t0
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f.name + ".tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, tracks=np.asarray(tracks, np.float32), visible=np.asarray(visible, bool),
                         queries=v["queries"], gt=v["gt"], gt_visible=v["gt_visible"], seconds=sec, name=vname)
            os.replace(tmp, f)
        if progress and procs.is_main:
            print(f"[tapvid] {vname}: {len(v['queries'])} queries, {len(v['video'])} frames", flush=True)
    if not names:
        raise ValueError(f"{str(path)!r} holds no TAP-Vid video")
    procs.barrier()
    if not procs.is_main:
        return None
    out = dict(videos=names, methods={})
    for m, d in dirs.items():
        per: dict = {}
        secs = []
        for i in range(len(names)):
            with np.load(d / f"{i:05d}.npz") as z:
                scores = score_tracks(z["queries"], z["tracks"], z["visible"], z["gt"], z["gt_visible"], size)
                secs.append(float(z["seconds"]))
            for k, val in scores.items():
                per.setdefault(k, []).append(float(np.asarray(val).reshape(-1)[0]))
        out["methods"][m] = dict(metrics={k: float(np.mean(v)) for k, v in per.items()}, per_video=per,
                                 seconds_per_video=float(np.mean(secs)), cache=str(d))
    return out


def load_benchmark_table(path: str | Path):
    """A results table (``results/tracking_benchmark.csv`` or ``.json``) as a pandas DataFrame indexed by method.

    CSV: a ``method`` column becomes the index if present. JSON: a list of row dicts, a ``{method: {metric: value}}``
    mapping, or a dict holding one of those under ``"table"``, ``"summary"``, ``"rows"``, ``"methods"`` or
    ``"results"`` (other keys, e.g. the run's configuration, are returned in ``df.attrs["meta"]``).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark table not found: {str(path)!r}")
    if path.suffix == ".csv":
        df = pd.read_csv(path)
        if "method" in df.columns:
            df = df.set_index("method")
        return df
    from ..fileio import read_json

    data = read_json(path, "benchmark table")
    meta = {}
    if isinstance(data, dict):
        for key in ("table", "summary", "rows", "methods", "results"):
            if key in data and isinstance(data[key], (list, dict)):
                meta = {k: v for k, v in data.items() if k != key}
                data = data[key]
                break
    if isinstance(data, list):
        df = pd.DataFrame(data)
        if "method" in df.columns:
            df = df.set_index("method")
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        df = pd.DataFrame.from_dict(data, orient="index")
        df.index.name = "method"
    else:
        raise ValueError(f"{str(path)!r}: unrecognised layout; expected rows or a {{method: {{metric: value}}}} map")
    df = df[[c for c in df.columns if not isinstance(df[c].iloc[0], (dict, list))]] if len(df) else df
    df.attrs["meta"] = meta
    return df


@dataclass(kw_only=True)
class TrackingBenchmark(ResultRecord):
    """``results/tracking_benchmark.json``: the benchmark's ``settings`` (videos, size, queries, thresholds, seeds),
    ``methods``: name -> TAP-Vid metrics and timing, ``ranking`` per headline metric, ``timing_conditions`` and the
    ``environment`` it ran in."""

    SCHEMA = "tracking_benchmark/1"
    WHAT = "tracking benchmark"
    ENTRIES = {"methods": ()}  # name -> {metric: value}

    settings: dict
    methods: dict
    task: str | None = None
    ranking: dict | None = None
    timing_conditions: dict | None = None
    environment: dict | None = None
