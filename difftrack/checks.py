"""Input checks shared by the public entry points (trackers, baselines, metrics, video I/O, CAG measures).

Light on purpose: numpy only (a torch tensor is accepted through its ``detach``/``cpu``/``numpy`` methods without
importing torch). Every check raises ``ValueError`` naming the bad value and what is allowed, and returns the value
normalised (``np.ndarray`` of the documented dtype).

One rule per quantity, for every entry point: dtypes (:func:`check_dtype`), query grid sizes with their memory
estimate (:func:`check_grid_size`), guidance scales (:func:`check_guidance_scale`), CAG scales at every step
(:func:`check_cag_scale`).
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

__all__ = ["check_video", "check_queries", "check_hw", "check_int", "check_dtype", "as_torch_dtype", "check_real",
           "check_guidance_scale", "check_cag_scale", "check_grid_size", "grid_memory_bytes", "max_grid_bytes"]


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


# ---------------------------------------------------------------------------------------------- one rule per quantity
#: dtype spellings every entry point that takes a dtype accepts (a ``torch.dtype`` of these too): name -> canonical
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32",
                 "float16": "float16", "fp16": "float16", "half": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
DTYPES = ("float32", "float16", "bfloat16")  # the canonical names
#: CFG weight of every entry point that generates (<= 1 runs without CFG; the embedded model was trained with 6)
GUIDANCE_SCALE_RANGE = (0.0, 50.0)
#: CAG scale at every denoising step (0: no CAG at that step; negative values would guide towards the perturbed
#: model and very large ones blow the prediction up, so both are refused, whether constant or from a schedule)
CAG_SCALE_RANGE = (0.0, 20.0)
#: default limit of the memory a query grid may need (:func:`grid_memory_bytes`); ``DIFFTRACK_MAX_GRID_BYTES`` in
#: the environment or an entry point's ``max_grid_bytes`` argument raises it
DEFAULT_MAX_GRID_BYTES = 4 * 2**30


def is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool and not a float such as ``4.0``."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` in ``[lo, hi]`` (either bound ``None``: open); ``ValueError`` naming it otherwise
    (``4.0``, ``True`` and strings are refused, never rounded)."""
    rng = (f"in {lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None
           else f"<= {hi}" if hi is not None else "")
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        got = "" if is_int(value) else f" ({type(value).__name__})"
        raise ValueError(f"{name}={value!r}{got}; allowed: an int {rng}".rstrip())
    return int(value)


def check_dtype(dtype: Any, name: str = "dtype") -> str:
    """The canonical name (``"float32"``, ``"float16"``, ``"bfloat16"``) of ``dtype``: one of the spellings of
    :data:`DTYPE_ALIASES` (``"bf16"``, ``"fp16"``, ``"half"`` ...) or a ``torch.dtype`` of them; ``ValueError`` naming
    the value and the allowed spellings otherwise."""
    text = str(dtype)
    key = text[len("torch."):] if text.startswith("torch.") and type(dtype).__name__ == "dtype" else text
    if not isinstance(dtype, str) and type(dtype).__name__ != "dtype" or key not in DTYPE_ALIASES:
        raise ValueError(f"{name}={dtype!r}; allowed: {sorted(DTYPE_ALIASES)} or torch.float32 / torch.float16 / "
                         f"torch.bfloat16")
    return DTYPE_ALIASES[key]


def as_torch_dtype(dtype: Any, name: str = "dtype"):
    """:func:`check_dtype`, as the ``torch.dtype`` (torch imported only here)."""
    import torch

    return getattr(torch, check_dtype(dtype, name))


def check_real(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, note: str = "") -> float:
    """A finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``) as a ``float``; bools, strings, NaN and
    infinities are refused with ``ValueError`` naming the value and the range (``note`` appended)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        rng = (f"> {lo:g}" + (f" and <= {hi:g}" if math.isfinite(hi) else "")) if lo_open else f"in [{lo:g}, {hi:g}]"
        raise ValueError(f"{name}={value!r}; allowed: a finite number {rng}" + (f" ({note})" if note else ""))
    return float(value)


def check_guidance_scale(value: Any, name: str = "guidance_scale", positive: bool = False) -> float:
    """The CFG weight: finite, in :data:`GUIDANCE_SCALE_RANGE` ``[0, 50]`` (``positive``: ``> 0``, where CAG
    divides by it); the same rule for every entry point that generates."""
    lo, hi = GUIDANCE_SCALE_RANGE
    note = ("CAG folds its scale through s / guidance_scale" if positive else
            "<= 1 runs without classifier-free guidance, > 1 with it; the embedded model's trained default is 6")
    return check_real(name, value, lo, hi, lo_open=positive, note=note)


def check_cag_scale(value: Any, name: str = "scale", step: int | None = None) -> float:
    """A CAG scale (constant or a schedule's value at denoising ``step``): finite, in :data:`CAG_SCALE_RANGE`."""
    lo, hi = CAG_SCALE_RANGE
    try:
        return check_real(name, value, lo, hi, note="0 disables CAG; the paper uses 0.5 .. 2")
    except ValueError as err:
        if step is None:
            raise
        raise ValueError(f"at denoising step {step}: {err} (refused, not applied)") from None


def max_grid_bytes(limit: Any = None) -> float:
    """The grid memory limit: ``limit`` if given, else ``DIFFTRACK_MAX_GRID_BYTES`` from the environment, else
    :data:`DEFAULT_MAX_GRID_BYTES` (4 GiB); ``ValueError`` for one that is not a positive number of bytes."""
    src = "max_grid_bytes"
    if limit is None:
        env = os.environ.get("DIFFTRACK_MAX_GRID_BYTES")
        if env is None:
            return float(DEFAULT_MAX_GRID_BYTES)
        src = "DIFFTRACK_MAX_GRID_BYTES"
        try:
            limit = float(env)
        except ValueError:
            raise ValueError(f"{src}={env!r} in the environment; allowed: a positive number of bytes") from None
    return check_real(src, limit, 0.0, math.inf, lo_open=True, note="bytes")


def grid_memory_bytes(points: int, num_steps: int, num_layers: int, frames: int, tokens_per_frame: int,
                      head_sets: int = 0) -> int:
    """Estimated bytes an analysis of ``points`` query points needs: its per-(step, layer) float32 tables
    (tracks from query-key and features ``[S, L, n, F, 2]`` each, confidence and attention scores, per-head tracks)
    plus the attention rows of one layer call (``[n, F x tokens_per_frame]`` float32 for up to 8 heads at once, their
    softmax and the head sum)."""
    S, L, n, F = int(num_steps), int(num_layers), int(points), int(frames)
    tables = 4 * S * L * n * (6 * F + 2 + 2 * F * int(head_sets))
    rows = 4 * n * F * int(tokens_per_frame) * (2 * 8 + 1)
    return tables + rows


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def check_grid_size(grid_size: Any, name: str = "grid_size", num_steps: int | None = None,
                    num_layers: int | None = None, frames: int | None = None, tokens_per_frame: int | None = None,
                    head_sets: int = 0, max_bytes: Any = None) -> int:
    """A query grid side: an int >= 1 (``grid_size**2`` points; not ``4.0``, not a bool). With the run's geometry
    (``num_steps``, ``num_layers``, latent ``frames``, ``tokens_per_frame``) the memory it needs
    (:func:`grid_memory_bytes`) is estimated and a grid above ``max_bytes`` (:func:`max_grid_bytes`: 4 GiB unless
    raised) is refused with ``ValueError`` naming the estimate, the limit and how to raise it."""
    g = check_int(name, grid_size, lo=1)
    if None in (num_steps, num_layers, frames, tokens_per_frame):
        return g
    need = grid_memory_bytes(g * g, num_steps, num_layers, frames, tokens_per_frame, head_sets)
    limit = max_grid_bytes(max_bytes)
    if need > limit:
        raise ValueError(f"{name}={g} ({g * g} points) over {num_steps} steps x {num_layers} layers x {frames} latent "
                         f"frames of {tokens_per_frame} tokens needs about {_gib(need)}, above the limit of "
                         f"{_gib(limit)}; allowed: a smaller grid, or raise the limit (max_grid_bytes=..., or "
                         f"DIFFTRACK_MAX_GRID_BYTES in the environment)")
    return g
