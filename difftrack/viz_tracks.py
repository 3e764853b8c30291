"""Drawing point tracks over a video (notebook 04), kept apart from the tracker (a tracker is one call; drawing is
separate).

Colours follow CoTracker's ``Visualizer(mode="rainbow")``: each track gets the ``gist_rainbow`` colour of its query's
``y`` (normalised over the tracks drawn), so neighbouring rows share hues and a track keeps its colour in every frame.
Visible points are filled discs, occluded ones hollow rings; the trail joins the last ``trail`` positions.

Coordinates are edge-convention pixels (``docs/conventions.md``: the image spans ``[0, W] x [0, H]``)::

    frames = draw_tracks(video, tracks, visible, trail=5, scale=4)   # uint8 [T, 4H, 4W, 3]
    fig = track_strip(video, tracks, visible, gt_tracks=gt, gt_visible=gv)

No widget code here: notebooks wire sliders to these functions. Scoring tracks and reading benchmark tables back is
in :mod:`difftrack.experiments.tracking`.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = ["track_colors", "draw_tracks", "track_strip", "side_by_side", "mean_error_per_frame"]

_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT


def _check(video, tracks, visible):
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"video has shape {video.shape} dtype {video.dtype}; expected uint8 [T, H, W, 3]")
    tracks = np.asarray(tracks, dtype=np.float32)
    T = video.shape[0]
    if tracks.ndim != 3 or tracks.shape[1] != T or tracks.shape[2] != 2:
        raise ValueError(f"tracks has shape {tracks.shape}; expected float [N, {T}, 2] pixels (x, y)")
    if visible is None:
        visible = np.ones(tracks.shape[:2], bool)
    visible = np.asarray(visible).astype(bool)
    if visible.shape != tracks.shape[:2]:
        raise ValueError(f"visible has shape {visible.shape}; expected bool {tracks.shape[:2]} (N, T)")
    return video, tracks, visible


def _query_frames(visible: np.ndarray, query_frames) -> np.ndarray:
    if query_frames is None:  # first visible frame (TAP-Vid "first"), 0 for never-visible tracks
        return np.argmax(visible, axis=1).astype(np.int64)
    q = np.asarray(query_frames).astype(np.int64).reshape(-1)
    if q.shape[0] != visible.shape[0]:
        raise ValueError(f"query_frames has {q.shape[0]} entries; expected one per track ({visible.shape[0]})")
    return q


def track_colors(tracks: np.ndarray, query_frames=None, visible=None, cmap: str = "gist_rainbow") -> np.ndarray:
    """``uint8 [N, 3]`` RGB colour per track: :func:`difftrack.viz.track_colours` (the one colour rule: CoTracker's
    rainbow keyed on the query point's y, then x) of each track's point at its query frame."""
    from .viz import track_colours

    tracks = np.asarray(tracks, dtype=np.float32)
    vis = np.ones(tracks.shape[:2], bool) if visible is None else np.asarray(visible, bool)
    qf = _query_frames(vis, query_frames)
    rgba = track_colours(tracks[np.arange(len(tracks)), qf], cmap)
    return (np.asarray(rgba)[:, :3] * 255 + 0.5).astype(np.uint8)


def _pt(xy: np.ndarray, scale: int) -> tuple[int, int]:
    # edge-convention pixel x -> cv2 centre-convention coordinate in the enlarged image, fixed point
    return (int(round((xy[0] * scale - 0.5) * _ONE)), int(round((xy[1] * scale - 0.5) * _ONE)))


def draw_tracks(video: np.ndarray, tracks: np.ndarray, visible: np.ndarray | None = None, trail: int = 5,
                scale: int = 4, query_frames=None, colors: np.ndarray | None = None, radius: int | None = None,
                draw_occluded: bool = True) -> np.ndarray:
    """Tracks drawn over an enlarged copy of the video.

    Args:
        video: ``uint8 [T, H, W, 3]`` RGB.
        tracks: ``float [N, T, 2]`` pixels ``(x, y)``, edge convention, at the video's size.
        visible: ``bool [N, T]`` (``None``: all visible).
        trail: how many past positions are joined by the trail (0: points only).
        scale: integer enlargement of the frames (nearest neighbour, so pixels stay honest).
        query_frames: ``[N]`` frame of each query; a track is drawn from its query frame on (default: its first
            visible frame). Colours are keyed on the ``y`` there.
        colors: ``uint8 [N, 3]`` to override the rainbow.
        radius: point radius in output pixels (default ``max(2, scale)``).
        draw_occluded: occluded points as hollow rings (True) or not at all (False).

    Returns:
        ``uint8 [T, H * scale, W * scale, 3]`` (a new array; the input is untouched).
    """
    video, tracks, visible = _check(video, tracks, visible)
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale={scale!r}; expected a positive int")
    if isinstance(trail, bool) or int(trail) != trail or trail < 0:
        raise ValueError(f"trail={trail!r}; expected an int >= 0")
    scale, trail = int(scale), int(trail)
    T, H, W, _ = video.shape
    N = tracks.shape[0]
    qf = _query_frames(visible, query_frames)
    cols = track_colors(tracks, qf, visible) if colors is None else np.asarray(colors, np.uint8).reshape(N, 3)
    r = max(2, scale) if radius is None else int(radius)
    thick = max(1, scale // 2)
    big = np.repeat(np.repeat(video, scale, axis=1), scale, axis=2)
    out = np.ascontiguousarray(big)
    finite = np.isfinite(tracks).all(-1)
    for t in range(T):
        img = out[t]
        # trails first (underneath the points), older segments dimmer
        for k in range(max(0, t - trail), t):
            fade = 0.35 + 0.65 * (k - (t - trail) + 1) / max(trail, 1)
            for n in range(N):
                if k < qf[n] or not (finite[n, k] and finite[n, k + 1]) or not visible[n, k + 1]:
                    continue
                c = tuple(int(v * fade) for v in cols[n])
                cv2.line(img, _pt(tracks[n, k], scale), _pt(tracks[n, k + 1], scale), c, thick, cv2.LINE_AA,
                         _SHIFT)
        for n in range(N):
            if t < qf[n] or not finite[n, t]:
                continue
            c = tuple(int(v) for v in cols[n])
            if visible[n, t]:
                cv2.circle(img, _pt(tracks[n, t], scale), r * _ONE, c, -1, cv2.LINE_AA, _SHIFT)
            elif draw_occluded:
                cv2.circle(img, _pt(tracks[n, t], scale), r * _ONE, c, 1, cv2.LINE_AA, _SHIFT)
    return out


def side_by_side(*videos: np.ndarray, gap: int = 4, value: int = 255) -> np.ndarray:
    """``uint8 [T, H, sum(W) + gaps, 3]``: equally sized/long videos next to each other with a ``gap`` px band."""
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    T, H = videos[0].shape[:2]
    for v in videos:
        if v.shape[0] != T or v.shape[1] != H:
            raise ValueError(f"videos must share T and H; got {[x.shape for x in videos]}")
    band = np.full((T, H, gap, 3), value, np.uint8)
    parts = []
    for i, v in enumerate(videos):
        parts += ([band] if i else []) + [v]
    return np.concatenate(parts, axis=2)


def mean_error_per_frame(tracks: np.ndarray, gt_tracks: np.ndarray, gt_visible: np.ndarray) -> np.ndarray:
    """``float [T]``: mean Euclidean distance (pixels) over tracks visible in the ground truth (``nan`` if none)."""
    err = np.linalg.norm(np.asarray(tracks, np.float64) - np.asarray(gt_tracks, np.float64), axis=-1)  # [N, T]
    m = np.asarray(gt_visible, bool)
    with np.errstate(invalid="ignore"):
        return np.where(m.any(0), (err * m).sum(0) / np.maximum(m.sum(0), 1), np.nan)


def track_strip(video: np.ndarray, tracks: np.ndarray, visible: np.ndarray | None = None,
                frames: Sequence[int] | None = None, gt_tracks: np.ndarray | None = None,
                gt_visible: np.ndarray | None = None, trail: int = 5, scale: int = 4, query_frames=None,
                title: str | None = None, n_frames: int = 5, error_panel: bool = True, panel_size: float = 2.8):
    """A row of frames with the tracks drawn (:func:`draw_tracks`), optionally the ground truth as small white crosses and
    a last panel with the mean error per frame.

    Args:
        video, tracks, visible, trail, scale, query_frames: as :func:`draw_tracks`.
        frames: frame indices to show (default ``n_frames`` evenly spaced, first and last included).
        gt_tracks, gt_visible: ``[N, T, 2]`` / ``[N, T]`` ground truth at the video's size (optional).
        title: figure title.
        error_panel: with ground truth, add the per-frame mean error curve (pixels at the video's size).

    Returns:
        a matplotlib ``Figure`` (not shown; the caller saves or shows it).
    """
    import matplotlib.pyplot as plt

    video, tracks, visible = _check(video, tracks, visible)
    T, H, W, _ = video.shape
    if frames is None:
        frames = np.unique(np.linspace(0, T - 1, min(n_frames, T)).round().astype(int)).tolist()
    frames = [int(f) for f in frames]
    if any(not 0 <= f < T for f in frames):
        raise ValueError(f"frames={frames}; allowed: indices in 0..{T - 1}")
    drawn = draw_tracks(video, tracks, visible, trail=trail, scale=scale, query_frames=query_frames)
    has_gt = gt_tracks is not None
    if has_gt:
        gt_tracks = np.asarray(gt_tracks, np.float32)
        gt_visible = np.ones(gt_tracks.shape[:2], bool) if gt_visible is None else np.asarray(gt_visible, bool)
        if gt_tracks.shape != tracks.shape or gt_visible.shape != visible.shape:
            raise ValueError(f"gt_tracks {gt_tracks.shape} / gt_visible {gt_visible.shape} do not match tracks "
                             f"{tracks.shape}")
    extra = 1 if (has_gt and error_panel) else 0
    ncol = len(frames) + extra
    fig, axes = plt.subplots(1, ncol, figsize=(panel_size * ncol, panel_size + 0.5), squeeze=False)
    axes = axes[0]
    for ax, f in zip(axes, frames):
        ax.imshow(drawn[f], interpolation="nearest")
        if has_gt:
            m = gt_visible[:, f]
            ax.scatter(gt_tracks[m, f, 0] * scale - 0.5, gt_tracks[m, f, 1] * scale - 0.5, marker="+", s=10,
                       c="white", linewidths=0.6, alpha=0.8)
        ax.set_title(f"frame {f}", fontsize=9)
        ax.set_axis_off()
    if extra:
        ax = axes[-1]
        err = mean_error_per_frame(tracks, gt_tracks, gt_visible)
        ax.plot(np.arange(T), err, "o-", ms=3)
        ax.set_xlabel("frame")
        ax.set_ylabel("mean error (px)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"mean {np.nanmean(err[1:] if T > 1 else err):.2f} px", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
