"""TAP-Vid data, query samplers and metrics (pure numpy).

Conventions (see ``docs/conventions.md``):

* A TAP-Vid dictionary is ``{"video": uint8 [T, H, W, 3] RGB, "points": float32
  [N, T, 2] in [0, 1] (x, y), "occluded": bool [N, T]}``; True means hidden.
* Pixel coordinates use the *edge* convention: the image spans ``[0, W] x [0, H]``
  and normalised TAP-Vid coordinates become pixels by a plain multiply.
* :func:`compute_tapvid_metrics` keeps tapnet's contract: ``query_points`` are
  ``(t, y, x)`` while tracks are ``(x, y)``, everything in the 256x256 pixel frame.
  The rest of the library uses CoTracker-order queries ``(t, x, y)``; convert with
  :func:`queries_txy_to_tyx` / :func:`queries_tyx_to_txy`.
"""

from __future__ import annotations

import glob
import os
import pickle
from typing import Any, Dict, Iterator, Mapping, Sequence, Tuple

import cv2
import numpy as np

from .checks import check_hw

__all__ = [
    "DEFAULT_THRESHOLDS",
    "compute_tapvid_metrics",
    "summary_table",
    "queries_txy_to_tyx",
    "queries_tyx_to_txy",
    "tracks_nt2_to_bnt2",
    "tracks_bnt2_to_nt2",
    "tracks_btn2_to_bnt2",
    "tracks_bnt2_to_btn2",
    "visible_to_occluded",
    "occluded_to_visible",
    "tapvid_to_pixels",
    "pixels_to_tapvid",
    "rescale_tracks",
    "rescale_queries",
    "sample_queries_first",
    "sample_queries_strided",
    "resize_video",
    "load_tapvid",
    "save_tapvid_pickle",
]

#: Pixel thresholds (in the 256x256 frame) of the TAP-Vid position metrics.
DEFAULT_THRESHOLDS: Tuple[int, ...] = (1, 2, 4, 8, 16)

#: Glob pattern of the published Kinetics shard pickles.
KINETICS_SHARD_PATTERN = "*_of_0010.pkl"


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_array(name: str, value: Any, ndim: int, expected: str, last: int | None = None) -> np.ndarray:
    """Return ``value`` as an ndarray, raising ``ValueError`` when its rank or last dim is wrong."""
    arr = np.asarray(value)
    if arr.ndim != ndim or arr.ndim == 0 or (last is not None and arr.shape[-1] != last):
        raise ValueError(f"{name} has shape {arr.shape}; expected {expected}")
    return arr


def _check_bool(name: str, arr: np.ndarray, expected: str) -> None:
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} has dtype {arr.dtype}; expected bool {expected}")


def _check_float(name: str, arr: np.ndarray, expected: str) -> None:
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} has dtype {arr.dtype}; expected a real dtype {expected}")


def _check_video(video: Any, name: str = "video") -> np.ndarray:
    video = _check_array(name, video, 4, "uint8 [T, H, W, 3]", last=3)
    if video.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {video.dtype}; expected uint8 [T, H, W, 3]")
    return video


def _check_tapvid_tracks(occluded: Any, points: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Validate a single video's ``occluded [N, T]`` and ``points [N, T, 2]``."""
    occluded = _check_array("occluded", occluded, 2, "bool [N, T]")
    _check_bool("occluded", occluded, "[N, T]")
    points = _check_array("points", points, 3, "float [N, T, 2]", last=2)
    _check_float("points", points, "[N, T, 2]")
    if points.shape[:2] != occluded.shape:
        raise ValueError(
            f"points has shape {points.shape}; expected [N, T, 2] = {occluded.shape + (2,)} "
            f"to match occluded {occluded.shape}"
        )
    return occluded, points


def _check_size(name: str, size: Any) -> Tuple[int, int]:
    return check_hw(name, size)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def compute_tapvid_metrics(
    query_points: np.ndarray,
    gt_occluded: np.ndarray,
    gt_tracks: np.ndarray,
    pred_occluded: np.ndarray,
    pred_tracks: np.ndarray,
    query_mode: str,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> Dict[str, np.ndarray]:
    """TAP-Vid metrics, per video (tapnet's contract).

    Args:
        query_points: `[B, N, 3]`, float, ``(t, y, x)``; only ``t`` (a frame index,
            rounded to the nearest integer) is used.
        gt_occluded: `[B, N, T]`, bool, True = hidden.
        gt_tracks: `[B, N, T, 2]`, float, pixels ``(x, y)`` in the 256x256 frame.
        pred_occluded: `[B, N, T]`, bool, True = hidden.
        pred_tracks: `[B, N, T, 2]`, float, pixels ``(x, y)`` in the 256x256 frame.
        query_mode: ``'first'`` evaluates the frames strictly after each query frame;
            ``'strided'`` evaluates every frame except the query frame.
        thresholds: pixel distances ``d``; a prediction is within ``d`` when its
            Euclidean distance to the ground truth is strictly less than ``d``.

    Returns:
        dict of `[B]` float64 arrays, each in ``[0, 1]`` (``nan`` when a video has an
        empty denominator):

        * ``occlusion_accuracy``: fraction of evaluated points whose predicted
          occlusion flag equals the ground truth.
        * ``pts_within_{d}``: among evaluated points visible in the ground truth, the
          fraction predicted within ``d`` (the predicted occlusion is ignored).
        * ``jaccard_{d}``: ``TP / (GT-visible + FP)`` where TP = gt visible, predicted
          visible and within ``d``; FP = predicted visible and (gt occluded or not
          within ``d``).
        * ``average_jaccard``, ``average_pts_within_thresh``: means over ``thresholds``.

    Keys use ``str(d)``, e.g. ``pts_within_1``. Unlike tapnet, ``occlusion_accuracy``
    is normalised per video (tapnet divides by the evaluated count of the whole batch,
    which only matters for ``B > 1``).
    """
    if query_mode == "first":
        strictly_after = True
    elif query_mode == "strided":
        strictly_after = False
    else:
        raise ValueError(f"query_mode={query_mode!r}; expected 'first' or 'strided'")

    query_points = _check_array("query_points", query_points, 3, "[B, N, 3] (t, y, x)", last=3)
    gt_occluded = _check_array("gt_occluded", gt_occluded, 3, "bool [B, N, T]")
    pred_occluded = _check_array("pred_occluded", pred_occluded, 3, "bool [B, N, T]")
    gt_tracks = _check_array("gt_tracks", gt_tracks, 4, "[B, N, T, 2] (x, y)", last=2)
    pred_tracks = _check_array("pred_tracks", pred_tracks, 4, "[B, N, T, 2] (x, y)", last=2)
    _check_bool("gt_occluded", gt_occluded, "[B, N, T]")
    _check_bool("pred_occluded", pred_occluded, "[B, N, T]")
    b, n, t = gt_occluded.shape
    for name, arr, want in (
        ("query_points", query_points, (b, n, 3)),
        ("pred_occluded", pred_occluded, (b, n, t)),
        ("gt_tracks", gt_tracks, (b, n, t, 2)),
        ("pred_tracks", pred_tracks, (b, n, t, 2)),
    ):
        if arr.shape != want:
            raise ValueError(
                f"{name} has shape {arr.shape}; expected {list(want)} to match gt_occluded {list(gt_occluded.shape)}"
            )
    if len(thresholds) == 0:
        raise ValueError("thresholds is empty; expected at least one pixel threshold")

    query_frame = np.round(query_points[..., 0]).astype(np.int64)  # (B, N)
    if query_frame.size and (query_frame.min() < 0 or query_frame.max() >= t):
        raise ValueError(
            f"query frame indices span [{query_frame.min()}, {query_frame.max()}]; expected within [0, {t - 1}]"
        )
    frames = np.arange(t)[None, None, :]  # (1, 1, T)
    qf = query_frame[..., None]  # (B, N, 1)
    evaluated = frames > qf if strictly_after else frames != qf  # (B, N, T)

    gt_visible = ~gt_occluded
    pred_visible = ~pred_occluded
    n_evaluated = evaluated.sum(axis=(1, 2))
    n_gt_visible = (gt_visible & evaluated).sum(axis=(1, 2))
    sq_dist = np.sum(np.square(pred_tracks.astype(np.float64) - gt_tracks.astype(np.float64)), axis=-1)

    metrics: Dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        agree = (pred_occluded == gt_occluded) & evaluated
        metrics["occlusion_accuracy"] = agree.sum(axis=(1, 2)) / n_evaluated
        within_all, jaccard_all = [], []
        for thr in thresholds:
            within = sq_dist < float(thr) ** 2  # (B, N, T)
            correct = within & gt_visible & evaluated
            frac_within = correct.sum(axis=(1, 2)) / n_gt_visible
            true_pos = (correct & pred_visible).sum(axis=(1, 2))
            false_pos = (pred_visible & (gt_occluded | ~within) & evaluated).sum(axis=(1, 2))
            jaccard = true_pos / (n_gt_visible + false_pos)
            metrics[f"pts_within_{thr}"] = frac_within
            metrics[f"jaccard_{thr}"] = jaccard
            within_all.append(frac_within)
            jaccard_all.append(jaccard)
    metrics["average_jaccard"] = np.mean(np.stack(jaccard_all), axis=0)
    metrics["average_pts_within_thresh"] = np.mean(np.stack(within_all), axis=0)
    return metrics


def summary_table(metrics: Mapping[str, Any], name: str = "method"):
    """Mean over videos, in percent, as a pandas DataFrame (in the spirit of tapnet's ``latex_table``).

    Args:
        metrics: either one output of :func:`compute_tapvid_metrics` (``key -> [B]``,
            possibly concatenated over several calls), or a mapping
            ``method name -> such dict`` to compare several methods row by row.
        name: row label when ``metrics`` is a single metrics dict.

    Returns:
        DataFrame with one row per method and columns ``average_jaccard``,
        ``average_pts_within_thresh``, ``occlusion_accuracy``, ``jaccard_{d}``,
        ``pts_within_{d}`` (percent, plain mean over videos, so a ``nan`` video
        gives ``nan``) and ``n_videos``.
    """
    import pandas as pd

    if not metrics:
        raise ValueError("metrics is empty; expected the dict returned by compute_tapvid_metrics")
    if all(isinstance(v, Mapping) for v in metrics.values()):
        per_method = dict(metrics)
    else:
        per_method = {name: metrics}

    def order(key: str) -> Tuple[int, float]:
        head = ["average_jaccard", "average_pts_within_thresh", "occlusion_accuracy"]
        if key in head:
            return head.index(key), 0.0
        prefix, _, thr = key.rpartition("_")
        try:
            value = float(thr)
        except ValueError:
            value = 0.0
        return (3 if prefix == "jaccard" else 4 if prefix == "pts_within" else 5), value

    rows = {}
    for method, m in per_method.items():
        row = {}
        n_videos = None
        for key in sorted(m, key=order):
            values = np.asarray(m[key], dtype=np.float64).reshape(-1)
            row[key] = 100.0 * float(np.mean(values)) if values.size else float("nan")
            n_videos = values.size if n_videos is None else n_videos
        row["n_videos"] = n_videos
        rows[method] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


# --------------------------------------------------------------------------------------
# Layout and coordinate conversions
# --------------------------------------------------------------------------------------


def _swap_xy(queries: np.ndarray, layout: str) -> np.ndarray:
    queries = _check_array("queries", queries, np.ndim(queries), f"[..., 3] {layout}", last=3)
    return queries[..., [0, 2, 1]]


def queries_txy_to_tyx(queries: np.ndarray) -> np.ndarray:
    """CoTracker-order queries ``(t, x, y)`` to tapnet order ``(t, y, x)``.

    Args:
        queries: `[..., 3]`, float, ``(t, x, y)``.

    Returns:
        `[..., 3]`, same dtype, ``(t, y, x)`` (a new array).
    """
    return _swap_xy(queries, "(t, x, y)")


def queries_tyx_to_txy(queries: np.ndarray) -> np.ndarray:
    """tapnet-order queries `[..., 3]` ``(t, y, x)`` to CoTracker order ``(t, x, y)``, a new array of the same dtype
    (the inverse of :func:`queries_txy_to_tyx`)."""
    return _swap_xy(queries, "(t, y, x)")


def tracks_nt2_to_bnt2(tracks: np.ndarray) -> np.ndarray:
    """Single-video tracks `[N, T, 2]` (or visibility `[N, T]`) to a batch of one, `[1, N, T, 2]` (`[1, N, T]`)."""
    tracks = np.asarray(tracks)
    if tracks.ndim not in (2, 3) or (tracks.ndim == 3 and tracks.shape[-1] != 2):
        raise ValueError(f"tracks has shape {tracks.shape}; expected [N, T, 2] (or [N, T] flags)")
    return tracks[None]


def tracks_bnt2_to_nt2(tracks: np.ndarray) -> np.ndarray:
    """Batch-of-one tracks `[1, N, T, 2]` (or flags `[1, N, T]`) back to `[N, T, 2]` (`[N, T]`)."""
    tracks = np.asarray(tracks)
    if tracks.ndim not in (3, 4) or tracks.shape[0] != 1 or (tracks.ndim == 4 and tracks.shape[-1] != 2):
        raise ValueError(f"tracks has shape {tracks.shape}; expected [1, N, T, 2] (or [1, N, T] flags)")
    return tracks[0]


def tracks_btn2_to_bnt2(tracks: np.ndarray) -> np.ndarray:
    """CoTracker layout `[B, T, N, 2]` (or flags `[B, T, N]`) to TAP-Vid layout `[B, N, T, 2]` (`[B, N, T]`)."""
    tracks = np.asarray(tracks)
    if tracks.ndim not in (3, 4) or (tracks.ndim == 4 and tracks.shape[-1] != 2):
        raise ValueError(f"tracks has shape {tracks.shape}; expected [B, T, N, 2] (or [B, T, N] flags)")
    return np.swapaxes(tracks, 1, 2)


def tracks_bnt2_to_btn2(tracks: np.ndarray) -> np.ndarray:
    """TAP-Vid layout `[B, N, T, 2]` (or flags `[B, N, T]`) to CoTracker layout `[B, T, N, 2]` (`[B, T, N]`)."""
    tracks = np.asarray(tracks)
    if tracks.ndim not in (3, 4) or (tracks.ndim == 4 and tracks.shape[-1] != 2):
        raise ValueError(f"tracks has shape {tracks.shape}; expected [B, N, T, 2] (or [B, N, T] flags)")
    return np.swapaxes(tracks, 1, 2)


def visible_to_occluded(visible: np.ndarray) -> np.ndarray:
    """Visibility flags (bool, True = visible) to TAP-Vid occlusion flags (bool, True = hidden); any shape."""
    visible = np.asarray(visible)
    _check_bool("visible", visible, "flags")
    return ~visible


def occluded_to_visible(occluded: np.ndarray) -> np.ndarray:
    """TAP-Vid occlusion flags (bool, True = hidden) to visibility flags (bool, True = visible); any shape."""
    occluded = np.asarray(occluded)
    _check_bool("occluded", occluded, "flags")
    return ~occluded


def tapvid_to_pixels(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalised TAP-Vid ``(x, y)`` in ``[0, 1]`` to edge-convention pixels (plain multiply).

    Args:
        points: `[..., 2]`, float, ``(x, y)`` in ``[0, 1]``.
        height, width: image size in pixels.

    Returns:
        `[..., 2]`, float32, pixels ``(x, y)`` in ``[0, W] x [0, H]``.
    """
    points = _check_array("points", points, np.ndim(points), "[..., 2] (x, y)", last=2)
    height, width = _check_size("(height, width)", (height, width))
    return (points * np.array([width, height], dtype=np.float64)).astype(np.float32)


def pixels_to_tapvid(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Edge-convention pixels ``(x, y)`` to normalised TAP-Vid ``[0, 1]`` (plain divide).

    Args:
        points: `[..., 2]`, float, pixels ``(x, y)`` in ``[0, W] x [0, H]``.
        height, width: image size in pixels.

    Returns:
        `[..., 2]`, float32, ``(x, y)`` in ``[0, 1]``.
    """
    points = _check_array("points", points, np.ndim(points), "[..., 2] (x, y)", last=2)
    height, width = _check_size("(height, width)", (height, width))
    return (points / np.array([width, height], dtype=np.float64)).astype(np.float32)


def rescale_tracks(tracks: np.ndarray, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> np.ndarray:
    """Edge-convention pixel tracks from an ``(H0, W0)`` image to an ``(H1, W1)`` image.

    Args:
        tracks: `[..., 2]`, float, pixels ``(x, y)`` at ``from_size``.
        from_size: ``(H0, W0)``.
        to_size: ``(H1, W1)``.

    Returns:
        `[..., 2]`, float32, pixels ``(x, y)`` at ``to_size``: ``x * W1 / W0``, ``y * H1 / H0``.
    """
    tracks = _check_array("tracks", tracks, np.ndim(tracks), "[..., 2] (x, y)", last=2)
    h0, w0 = _check_size("from_size", from_size)
    h1, w1 = _check_size("to_size", to_size)
    scale = np.array([w1 / w0, h1 / h0], dtype=np.float64)
    return (tracks * scale).astype(np.float32)


def rescale_queries(queries: np.ndarray, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> np.ndarray:
    """CoTracker-order queries ``(t, x, y)`` from an ``(H0, W0)`` image to an ``(H1, W1)`` image.

    Args:
        queries: `[..., 3]`, float, ``(t, x, y)`` with ``x, y`` pixels at ``from_size``.

    Returns:
        `[..., 3]`, float32, ``t`` unchanged, ``x, y`` pixels at ``to_size``.
    """
    queries = _check_array("queries", queries, np.ndim(queries), "[..., 3] (t, x, y)", last=3)
    out = queries.astype(np.float32, copy=True)
    out[..., 1:] = rescale_tracks(queries[..., 1:], from_size, to_size)
    return out


# --------------------------------------------------------------------------------------
# Query samplers and video resizing
# --------------------------------------------------------------------------------------


def sample_queries_first(
    occluded: np.ndarray, points: np.ndarray, video: np.ndarray | None = None
) -> Dict[str, np.ndarray]:
    """TAP-Vid "first" protocol: one query per track, at its first visible frame.

    Tracks never visible are dropped.

    Args:
        occluded: `[N, T]`, bool, True = hidden.
        points: `[N, T, 2]`, float, ``(x, y)`` in any unit (``[0, 1]`` as stored, or
            pixels); the outputs keep that unit.
        video: optional `[T, H, W, 3]`, uint8; copied to the output with a batch axis.

    Returns:
        tapnet-style dict with a batch axis of one (``M`` = tracks kept):

        * ``query_points``: `[1, M, 3]`, float32, ``(t, y, x)``;
        * ``target_points``: `[1, M, T, 2]`, float32, ``(x, y)``;
        * ``occluded``: `[1, M, T]`, bool;
        * ``video``: `[1, T, H, W, 3]`, uint8 (only when ``video`` is given).
    """
    occluded, points = _check_tapvid_tracks(occluded, points)
    keep = (~occluded).any(axis=1)
    occluded = occluded[keep]
    points = points[keep].astype(np.float32)
    first = np.argmax(~occluded, axis=1)  # (M,) first visible frame
    rows = np.arange(points.shape[0])
    xy = points[rows, first]  # (M, 2)
    query_points = np.stack([first.astype(np.float32), xy[:, 1], xy[:, 0]], axis=-1).reshape(-1, 3)
    out = {
        "query_points": query_points[None],
        "target_points": points[None],
        "occluded": occluded[None],
    }
    if video is not None:
        out["video"] = _check_video(video)[None]
    return out


def sample_queries_strided(
    occluded: np.ndarray, points: np.ndarray, video: np.ndarray | None = None, stride: int = 5
) -> Dict[str, np.ndarray]:
    """TAP-Vid "strided" protocol: a query at every ``stride``-th frame where the track is visible.

    For ``t = 0, stride, 2*stride, ...`` every track visible at ``t`` yields one query
    (a copy of the whole track). Queries are ordered by query frame, then by track.

    Args:
        occluded: `[N, T]`, bool, True = hidden.
        points: `[N, T, 2]`, float, ``(x, y)`` in any unit; the outputs keep it.
        video: optional `[T, H, W, 3]`, uint8; copied to the output with a batch axis.
        stride: positive int, frames between query frames.

    Returns:
        tapnet-style dict with a batch axis of one (``M`` = queries):

        * ``query_points``: `[1, M, 3]`, float32, ``(t, y, x)``;
        * ``target_points``: `[1, M, T, 2]`, float32, ``(x, y)``;
        * ``occluded``: `[1, M, T]`, bool;
        * ``trackgroup``: `[1, M]`, int64, index of the source track in ``[0, N)``;
        * ``video``: `[1, T, H, W, 3]`, uint8 (only when ``video`` is given).
    """
    occluded, points = _check_tapvid_tracks(occluded, points)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride <= 0:
        raise ValueError(f"stride={stride!r}; expected a positive int")
    points = points.astype(np.float32)
    n, t = occluded.shape
    queries, groups = [], []
    for frame in range(0, t, stride):
        idx = np.flatnonzero(~occluded[:, frame])
        xy = points[idx, frame]
        queries.append(np.stack([np.full(idx.shape, frame, np.float32), xy[:, 1], xy[:, 0]], axis=-1))
        groups.append(idx)
    group = np.concatenate(groups).astype(np.int64) if groups else np.zeros((0,), np.int64)
    query_points = np.concatenate(queries).reshape(-1, 3) if queries else np.zeros((0, 3), np.float32)
    out = {
        "query_points": query_points[None],
        "target_points": points[group][None],
        "occluded": occluded[group][None],
        "trackgroup": group[None],
    }
    if video is not None:
        out["video"] = _check_video(video)[None]
    return out


def resize_video(video: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize every frame with OpenCV.

    ``cv2.INTER_AREA`` when shrinking (new height and width both no larger than the
    old ones), ``cv2.INTER_LINEAR`` otherwise (enlarging or mixed).

    Args:
        video: `[T, H, W, 3]`, uint8, RGB.
        size: ``(h, w)`` target size in pixels.

    Returns:
        `[T, h, w, 3]`, uint8, RGB (a new array; a copy when the size is unchanged).
    """
    video = _check_video(video)
    h, w = _check_size("size", size)
    t, h0, w0, _ = video.shape
    if (h, w) == (h0, w0):
        return video.copy()
    interp = cv2.INTER_AREA if (h <= h0 and w <= w0) else cv2.INTER_LINEAR
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        out[i] = cv2.resize(video[i], (w, h), interpolation=interp)
    return out


# --------------------------------------------------------------------------------------
# Loading and saving the published pickles
# --------------------------------------------------------------------------------------


def _decode_frames(frames: Any, name: str) -> np.ndarray:
    """Stored frames (uint8 array, or a sequence of JPEG/PNG bytes) to uint8 `[T, H, W, 3]` RGB."""
    if isinstance(frames, np.ndarray) and frames.dtype != object:
        return _check_video(frames, f"{name}: video")
    decoded = []
    for i, buf in enumerate(frames):
        if isinstance(buf, np.ndarray) and buf.dtype != object and buf.ndim == 3:
            decoded.append(buf)  # already decoded frame
            continue
        img = cv2.imdecode(np.frombuffer(bytes(buf), dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{name}: frame {i} could not be decoded as an image")
        decoded.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    if not decoded:
        raise ValueError(f"{name}: video has no frames")
    return _check_video(np.stack(decoded), f"{name}: video")


def _to_tapvid_dict(item: Any, name: str) -> Dict[str, np.ndarray]:
    """Validate one stored example and return it in the library's TAP-Vid dict form."""
    if not isinstance(item, Mapping) or not {"video", "points", "occluded"} <= set(item):
        keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise ValueError(f"{name}: entry has keys {keys}; expected a dict with 'video', 'points', 'occluded'")
    video = _decode_frames(item["video"], name)
    occluded = np.asarray(item["occluded"]).astype(bool)
    points = np.asarray(item["points"])
    try:
        occluded, points = _check_tapvid_tracks(occluded, points)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if points.shape[1] != video.shape[0]:
        raise ValueError(
            f"{name}: points has shape {points.shape}; expected [N, T={video.shape[0]}, 2] to match the video"
        )
    _check_normalised_points(points, occluded, name)
    return {"video": video, "points": points.astype(np.float32), "occluded": occluded}


#: Slack allowed around [0, 1] for normalised points (float rounding of points on the border).
POINT_TOLERANCE = 1e-4


def _check_normalised_points(points: np.ndarray, occluded: np.ndarray, name: str) -> None:
    """Visible points must be finite and in ``[0, 1]`` (normalised (x, y), ``docs/conventions.md``); points of
    occluded frames are not scored and may hold anything. Raises ``ValueError`` naming the first bad entry."""
    p = points.astype(np.float64)
    vis = ~occluded
    bad_finite = vis & ~np.isfinite(p).all(-1)
    lo, hi = -POINT_TOLERANCE, 1.0 + POINT_TOLERANCE
    with np.errstate(invalid="ignore"):
        bad_range = vis & np.isfinite(p).all(-1) & ((p < lo) | (p > hi)).any(-1)
    for bad, what in ((bad_finite, "is not finite"), (bad_range, "lies outside [0, 1]")):
        if bad.any():
            n, t = (int(i) for i in np.argwhere(bad)[0])
            vals = p[vis]
            span = f"visible points span [{np.nanmin(vals):g}, {np.nanmax(vals):g}]" if np.isfinite(vals).any() else ""
            hint = " (pixel coordinates? divide by (width, height))" if np.nanmax(vals) > 1.5 else ""
            raise ValueError(f"{name}: points[{n}, {t}] = ({p[n, t, 0]:g}, {p[n, t, 1]:g}) of a visible point {what};"
                             f" {int(bad.sum())} such; {span}{hint}; allowed: finite normalised (x, y) in [0, 1]")


def _load_pickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError,
            MemoryError) as err:
        raise ValueError(f"cannot read TAP-Vid pickle {path!r} (truncated or corrupted?): "
                         f"{type(err).__name__}: {err}") from err


def load_tapvid(path: str | os.PathLike) -> Iterator[Tuple[str, Dict[str, np.ndarray]]]:
    """Iterate over a TAP-Vid split stored in the published pickle formats.

    Layouts:

    * a **file** holding a dict ``name -> example`` (DAVIS, ``tapvid_davis.pkl``):
      yields ``(name, example)`` sorted by name;
    * a **file** holding a list of examples (e.g. RGB-Stacking): names are
      ``"{index:05d}"`` in stored order;
    * a **directory** of shards ``*_of_0010.pkl`` (Kinetics), each a list of examples:
      shards are read one at a time in sorted file-name order (deterministic, unlike
      the published unsorted ``glob`` [B17]); names are ``"{shard stem}/{index:04d}"``.

    Each example is ``{'video': uint8 [T, H, W, 3] or a list of JPEG bytes, 'points':
    [N, T, 2] in [0, 1] (x, y), 'occluded': [N, T]}``. JPEG frames are decoded with
    ``cv2.imdecode`` and converted BGR -> RGB.

    Args:
        path: the pickle file or the shard directory.

    Yields:
        ``(name, {"video": uint8 [T, H, W, 3], "points": float32 [N, T, 2] in [0, 1],
        "occluded": bool [N, T]})``, lazily (one shard in memory at a time).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unreadable (truncated, corrupted) pickle, naming the file; a layout that is not recognised;
            a malformed example, or one whose visible points are not finite normalised coordinates in ``[0, 1]``
            (e.g. pixels), naming the file and the example key.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"TAP-Vid path {path!r} does not exist")
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, KINETICS_SHARD_PATTERN)))
        if not shards:
            raise ValueError(
                f"directory {path!r} holds no shard matching {KINETICS_SHARD_PATTERN!r}; "
                "expected the TAP-Vid Kinetics layout (or pass the DAVIS .pkl file itself)"
            )
        return _iter_shards(shards)
    data = _load_pickle(path)
    return _iter_pickle(data, path)


def _iter_shards(shards: Sequence[str]) -> Iterator[Tuple[str, Dict[str, np.ndarray]]]:
    for shard in shards:
        data = _load_pickle(shard)
        stem = os.path.basename(shard)[: -len(".pkl")]
        if not isinstance(data, (list, tuple)):
            raise ValueError(
                f"shard {shard!r} holds an object of type {type(data).__name__!r}; expected a list of examples"
            )
        for i, item in enumerate(data):
            name = f"{stem}/{i:04d}"
            yield name, _to_tapvid_dict(item, f"{shard}: {name}")


def _iter_pickle(data: Any, path: str) -> Iterator[Tuple[str, Dict[str, np.ndarray]]]:
    """Check the layout of one loaded pickle now; decode and validate its examples lazily."""
    if isinstance(data, Mapping):
        if {"video", "points", "occluded"} <= set(data):
            raise ValueError(f"{path!r} holds a single example; expected a dict name -> example (DAVIS layout)")
        items = [(str(k), data[k]) for k in sorted(data, key=str)]
    elif isinstance(data, (list, tuple)):
        items = [(f"{i:05d}", item) for i, item in enumerate(data)]
    else:
        raise ValueError(
            f"{path!r} holds an object of type {type(data).__name__!r}; expected a dict name -> example (DAVIS) "
            "or a list of examples"
        )
    return ((name, _to_tapvid_dict(item, f"{path}: {name}")) for name, item in items)


def save_tapvid_pickle(videos: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike) -> None:
    """Write ``name -> TAP-Vid dict`` as one pickle in the DAVIS layout (readable by :func:`load_tapvid`).

    Args:
        videos: ``name -> {"video": uint8 [T, H, W, 3], "points": float [N, T, 2] in
            [0, 1] (x, y), "occluded": bool [N, T]}``. Points are stored as float32.
        path: output ``.pkl`` file; its parent directory must exist.
    """
    if not isinstance(videos, Mapping) or not videos:
        raise ValueError("videos must be a non-empty dict name -> {'video', 'points', 'occluded'}")
    out = {}
    for name, item in videos.items():
        if not isinstance(item, Mapping) or not {"video", "points", "occluded"} <= set(item):
            raise ValueError(f"{name}: expected a dict with 'video', 'points', 'occluded'")
        video = _check_video(item["video"], f"{name}: video")
        try:
            occluded, points = _check_tapvid_tracks(item["occluded"], item["points"])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if points.shape[1] != video.shape[0]:
            raise ValueError(
                f"{name}: points has shape {points.shape}; expected [N, T={video.shape[0]}, 2] to match the video"
            )
        _check_normalised_points(points, occluded, str(name))
        out[str(name)] = {"video": video, "points": points.astype(np.float32), "occluded": occluded}
    with open(os.fspath(path), "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
