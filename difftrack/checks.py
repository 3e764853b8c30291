"""Input checks shared by the public entry points (trackers, baselines, metrics, video I/O, CAG measures).

Light on purpose: numpy only (a torch tensor is accepted through its ``detach``/``cpu``/``numpy`` methods without
importing torch). Every check raises ``ValueError`` naming the bad value and what is allowed, and returns the value
normalised (``np.ndarray`` of the documented dtype).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_video", "check_queries", "check_hw"]


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_video(video: Any, min_frames: int = 1, name: str = "video") -> np.ndarray:
    """``uint8 [T, H, W, 3]`` (RGB) with ``T >= min_frames`` and a non-empty frame; returns it as an ndarray.

    Raises ``ValueError`` naming ``name``, the shape or dtype found and what is allowed."""
    v = _as_numpy(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"{name} has shape {v.shape}; expected uint8 [T, H, W, 3] (RGB)")
    if v.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {v.dtype}; expected uint8 [T, H, W, 3] (values 0..255)")
    T, H, W, _ = v.shape
    if T < min_frames:
        raise ValueError(f"{name} has {T} frame(s); at least {min_frames} frames are needed")
    if H == 0 or W == 0:
        raise ValueError(f"{name} has an empty frame size {H}x{W}")
    return v


def check_queries(queries: Any, num_frames: int, height: int, width: int, allow_empty: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``float [N, 3]`` queries ``(t, x, y)``; returns ``(queries float32 [N, 3], frames int64 [N])``
    (``N = 0`` only with ``allow_empty``).

    ``t`` must be an integer frame index in ``[0, T-1]``; ``(x, y)`` edge-convention pixels in ``[0, W] x [0, H]``.
    """
    queries = _as_numpy(queries)
    if queries.ndim != 2 or queries.shape[1] != 3:
        raise ValueError(f"queries has shape {queries.shape}; expected float32 [N, 3] as (t, x, y) pixels")
    if queries.shape[0] == 0 and not allow_empty:
        raise ValueError("queries is empty; expected at least one (t, x, y) query")
    if queries.dtype == np.bool_ or not (np.issubdtype(queries.dtype, np.floating)
                                         or np.issubdtype(queries.dtype, np.integer)):
        raise ValueError(f"queries has dtype {queries.dtype}; expected float32 [N, 3] as (t, x, y) pixels")
    q = queries.astype(np.float32)
    if not np.isfinite(q).all():
        raise ValueError("queries contains non-finite values; expected finite (t, x, y)")
    frames = np.round(q[:, 0]).astype(np.int64)
    bad = (np.abs(q[:, 0] - frames) > 1e-3) | (frames < 0) | (frames >= num_frames)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"query {i} has frame t={float(q[i, 0])!r}; allowed: an integer frame index in "
                         f"[0, {num_frames - 1}]")
    out = (q[:, 1] < 0) | (q[:, 1] > width) | (q[:, 2] < 0) | (q[:, 2] > height)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(f"query {i} at (x, y)=({float(q[i, 1])!r}, {float(q[i, 2])!r}) lies outside the frame; "
                         f"allowed: x in [0, {width}], y in [0, {height}] (edge-convention pixels)")
    return q, frames


def check_hw(name: str, size: Any, none_ok: bool = False) -> tuple[int, int] | None:
    """A ``(height, width)`` pair of positive ints (``None`` passes through when ``none_ok``)."""
    if size is None and none_ok:
        return None
    allowed = ("None or " if none_ok else "") + "a (height, width) pair of positive ints"
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={size!r}; expected {allowed}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}={size!r}; expected {allowed}")
    return h, w
