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
