"""Classical point trackers with the same call as the diffusion tracker.

Every tracker is a callable object::

    tracks, visible = tracker(video, queries)

* ``video``: `[T, H, W, 3]`, uint8, RGB.
* ``queries``: `[N, 3]`, float32, ``(t, x, y)``; ``t`` an integer frame index in
  ``[0, T)``, ``x, y`` edge-convention pixels in ``[0, W] x [0, H]``.
* ``tracks``: `[N, T, 2]`, float32, edge-convention pixels ``(x, y)``; ``tracks[n,
  t_n]`` equals the query position.
* ``visible``: `[N, T]`, bool, True = visible; always True at the query frame.

Queries may sit at any frame: the chained trackers run forward in time from the
query frame *and* backward to frame 0. OpenCV works with pixel centres at integers,
so coordinates are shifted by 0.5 at the OpenCV boundary only (``docs/conventions.md``).

Trackers:

* :class:`LucasKanadeTracker`: pyramidal Lucas-Kanade chained frame to frame, with a
  forward-backward check.
* :class:`DenseFlowTracker`: dense optical flow (DIS or Farneback) chained frame to
  frame, bilinear flow sampling, forward-backward check.
* :class:`PatchMatchTracker`: normalised cross-correlation of the query patch against
  every location of every frame (no chaining, no drift).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import cv2
import numpy as np

from .checks import check_queries, check_video

__all__ = ["Tracker", "LucasKanadeTracker", "DenseFlowTracker", "PatchMatchTracker"]

#: Offset between edge-convention pixels (ours) and OpenCV's centre-at-integer pixels.
_CV_OFFSET = 0.5

# A step moves points from frame ``src`` to frame ``dst`` (``|src - dst| = 1``).
# Arguments: src, dst, points `[M, 2]` float32 OpenCV pixels. Returns the new points
# `[M, 2]` float32 OpenCV pixels and a reliability flag `[M]` bool.
StepFn = Callable[[int, int, np.ndarray], Tuple[np.ndarray, np.ndarray]]


def _check_inputs(video: np.ndarray, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the common call; return ``(video, queries float32 [N, 3], frames int64 [N])``
    (:mod:`difftrack.checks`)."""
    video = check_video(video)
    queries, frames = check_queries(queries, *video.shape[:3], allow_empty=True)
    return video, queries, frames


def _inside(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[M]` bool: edge-convention ``points [M, 2]`` lie within ``[0, W] x [0, H]``."""
    return (points[:, 0] >= 0) & (points[:, 0] <= width) & (points[:, 1] >= 0) & (points[:, 1] <= height)


def _to_gray(video: np.ndarray) -> np.ndarray:
    """`[T, H, W, 3]` uint8 RGB -> `[T, H, W]` uint8 gray."""
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in video])


def _chain(
    step: StepFn,
    queries: np.ndarray,
    frames: np.ndarray,
    num_frames: int,
    height: int,
    width: int,
    appearance: "_AppearanceCheck | None" = None,
):
    """Propagate every query forward and backward in time with ``step``.

    One forward sweep (``t -> t + 1``) carries every point whose query frame is
    ``<= t``; one backward sweep (``t -> t - 1``) carries every point whose query
    frame is ``>= t``. So each frame pair is visited once per direction whatever
    the number of distinct query frames.

    A point is visible at ``dst`` when ``step`` calls it reliable, it lies inside the
    frame and (if given) it passes the ``appearance`` check.

    Returns:
        tracks `[N, T, 2]` float32 edge pixels, visible `[N, T]` bool.
    """
    n = queries.shape[0]
    tracks = np.zeros((n, num_frames, 2), np.float32)
    visible = np.zeros((n, num_frames), bool)
    rows = np.arange(n)
    tracks[rows, frames] = queries[:, 1:]
    visible[rows, frames] = True

    for direction in (+1, -1):
        order = range(0, num_frames - 1) if direction > 0 else range(num_frames - 1, 0, -1)
        for src in order:
            dst = src + direction
            active = frames <= src if direction > 0 else frames >= src
            if not active.any():
                continue
            idx = np.flatnonzero(active)
            pts_cv = (tracks[idx, src] - _CV_OFFSET).astype(np.float32)
            new_cv, reliable = step(src, dst, pts_cv)
            new = new_cv + _CV_OFFSET
            tracks[idx, dst] = new
            ok = reliable & _inside(new, height, width)
            if appearance is not None:
                ok &= appearance(dst, new_cv, idx)
            visible[idx, dst] = ok
    return tracks, visible


def _extract_patches(image: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Bilinear ``size x size`` patches of a gray ``image [H, W]`` centred at OpenCV pixels ``centres [M, 2]``.

    Pixels beyond the border are replicated. Returns `[M, size, size]` float32.
    """
    offsets = np.arange(size, dtype=np.float32) - (size - 1) / 2.0
    map_x = (centres[:, 0, None, None] + offsets[None, None, :]).repeat(size, axis=1)  # (M, size, size)
    map_y = (centres[:, 1, None, None] + offsets[None, :, None]).repeat(size, axis=2)  # (M, size, size)
    m = centres.shape[0]
    out = cv2.remap(
        image.astype(np.float32),
        map_x.reshape(m * size, size).astype(np.float32),
        map_y.reshape(m * size, size).astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return out.reshape(m, size, size)


class _AppearanceCheck:
    """Median-Flow-style appearance test: NCC between the query patch and the tracked patch.

    ``check(frame, centres_cv [M, 2], idx [M]) -> [M] bool`` is True where the
    normalised cross-correlation in ``[-1, 1]`` between the gray patch around query
    ``idx`` (in its query frame) and the gray patch around the tracked position in
    ``frame`` is at least ``threshold``. Queries whose own patch is flat (std below one
    gray level) cannot be judged by appearance and always pass.
    """

    def __init__(self, gray: np.ndarray, queries: np.ndarray, frames: np.ndarray, size: int, threshold: float):
        self.gray = gray
        self.size = size
        self.threshold = threshold
        centres = queries[:, 1:] - _CV_OFFSET
        templates = np.stack(
            [_extract_patches(gray[f], centres[i : i + 1], size)[0] for i, f in enumerate(frames)]
        )  # (N, size, size)
        templates = templates.reshape(len(frames), -1)
        self.flat = templates.std(axis=1) < 1.0
        self.templates = templates - templates.mean(axis=1, keepdims=True)

    def __call__(self, frame: int, centres: np.ndarray, idx: np.ndarray) -> np.ndarray:
        patches = _extract_patches(self.gray[frame], centres, self.size).reshape(len(idx), -1)
        patches = patches - patches.mean(axis=1, keepdims=True)
        tmpl = self.templates[idx]
        denom = np.sqrt((tmpl**2).sum(1) * (patches**2).sum(1))
        ncc = np.where(denom > 1e-6, (tmpl * patches).sum(1) / np.maximum(denom, 1e-6), 0.0)
        return self.flat[idx] | (ncc >= self.threshold)


class Tracker:
    """Base class: validates the common call and dispatches to :meth:`_track`."""

    name: str = "tracker"

    def __call__(self, video: np.ndarray, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return self.track(video, queries)

    def track(self, video: np.ndarray, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Track ``queries`` through ``video``.

        Args:
            video: `[T, H, W, 3]`, uint8, RGB.
            queries: `[N, 3]`, float32, ``(t, x, y)``, integer ``t`` in ``[0, T)``,
                edge-convention pixels ``x in [0, W]``, ``y in [0, H]``.

        Returns:
            tracks `[N, T, 2]` float32 edge pixels ``(x, y)``; visible `[N, T]` bool.
        """
        video, queries, frames = _check_inputs(video, queries)
        t = video.shape[0]
        if queries.shape[0] == 0:
            return np.zeros((0, t, 2), np.float32), np.zeros((0, t), bool)
        tracks, visible = self._track(video, queries, frames)
        return tracks.astype(np.float32), visible.astype(bool)

    def _track(self, video: np.ndarray, queries: np.ndarray, frames: np.ndarray):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "name")
        return f"{type(self).__name__}({args})"


def _check_positive(name: str, value, integer: bool = False, odd: bool = False):
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type or not value > 0 or (odd and value % 2 == 0):
        kind = "a positive odd int" if odd else "a positive int" if integer else "a positive number"
        raise ValueError(f"{name}={value!r}; expected {kind}")


def _check_ncc(ncc_threshold, ncc_patch_size) -> None:
    if ncc_threshold is not None and (
        isinstance(ncc_threshold, bool)
        or not isinstance(ncc_threshold, (int, float, np.number))
        or not -1.0 <= ncc_threshold <= 1.0
    ):
        raise ValueError(f"ncc_threshold={ncc_threshold!r}; expected None or a number in [-1, 1]")
    _check_positive("ncc_patch_size", ncc_patch_size, integer=True, odd=True)


class LucasKanadeTracker(Tracker):
    """Pyramidal Lucas-Kanade (``cv2.calcOpticalFlowPyrLK``) chained frame to frame.

    At each step ``t -> t +/- 1`` the point is tracked to the next frame and back; the
    forward-backward (FB) error is the distance between the start point and the
    back-tracked point.

    Loss policy (per frame, not sticky): the point is marked **invisible** at a frame
    when LK fails (status 0), when the FB error exceeds ``fb_threshold``, when it lies
    outside the frame, or when its appearance no longer matches the query (NCC below
    ``ncc_threshold``, the Median-Flow test; this is what catches a point stuck on the
    static background at the border after its object left the frame). Tracking
    **continues** from the LK estimate whenever LK returned one, so a point can be
    re-acquired after a short occlusion; only when LK returns no estimate does the
    point keep its last position.

    Args:
        win_size: side of the LK integration window, pixels (positive int).
        max_level: number of pyramid levels above the base (0 = no pyramid).
        fb_threshold: largest FB error, pixels, for a point to count as visible.
        max_iters, eps: LK termination criteria.
        ncc_threshold: smallest NCC in ``[-1, 1]`` between the gray
            ``ncc_patch_size``-square patches at the query and at the tracked
            position for a visible point; ``None`` disables the test.
        ncc_patch_size: side of those patches, pixels (positive odd int).
    """

    name = "lucas_kanade"

    def __init__(
        self,
        win_size: int = 21,
        max_level: int = 3,
        fb_threshold: float = 1.0,
        max_iters: int = 30,
        eps: float = 0.01,
        ncc_threshold: float | None = 0.5,
        ncc_patch_size: int = 11,
    ):
        _check_positive("win_size", win_size, integer=True)
        if isinstance(max_level, bool) or not isinstance(max_level, (int, np.integer)) or max_level < 0:
            raise ValueError(f"max_level={max_level!r}; expected a non-negative int")
        _check_positive("fb_threshold", fb_threshold)
        _check_positive("max_iters", max_iters, integer=True)
        _check_positive("eps", eps)
        _check_ncc(ncc_threshold, ncc_patch_size)
        self.win_size = int(win_size)
        self.max_level = int(max_level)
        self.fb_threshold = float(fb_threshold)
        self.max_iters = int(max_iters)
        self.eps = float(eps)
        self.ncc_threshold = None if ncc_threshold is None else float(ncc_threshold)
        self.ncc_patch_size = int(ncc_patch_size)

    def _lk(self, src: np.ndarray, dst: np.ndarray, pts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, self.max_iters, self.eps)
        out, status, _ = cv2.calcOpticalFlowPyrLK(
            src,
            dst,
            pts.reshape(-1, 1, 2),
            None,
            winSize=(self.win_size, self.win_size),
            maxLevel=self.max_level,
            criteria=criteria,
        )
        if out is None:  # OpenCV returns None for an empty point set
            return pts.copy(), np.zeros(len(pts), bool)
        return out.reshape(-1, 2).astype(np.float32), status.reshape(-1).astype(bool)

    def _track(self, video, queries, frames):
        gray = _to_gray(video)
        t, h, w = gray.shape

        def step(src: int, dst: int, pts: np.ndarray):
            fwd, ok_f = self._lk(gray[src], gray[dst], pts)
            back, ok_b = self._lk(gray[dst], gray[src], fwd)
            fb_error = np.linalg.norm(back - pts, axis=-1)
            new = np.where(ok_f[:, None], fwd, pts)  # no estimate: keep the last position
            reliable = ok_f & ok_b & (fb_error <= self.fb_threshold)
            return new, reliable

        return _chain(step, queries, frames, t, h, w, _appearance(self, gray, queries, frames))


def _appearance(tracker, gray, queries, frames):
    if tracker.ncc_threshold is None:
        return None
    return _AppearanceCheck(gray, queries, frames, tracker.ncc_patch_size, tracker.ncc_threshold)


def _bilinear(field: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Sample ``field [H, W, C]`` at OpenCV pixel positions ``pts [M, 2]`` (x, y).

    Bilinear, with positions clamped to the centres of the border pixels.
    Returns `[M, C]` float32.
    """
    h, w = field.shape[:2]
    x = np.clip(pts[:, 0], 0, w - 1)
    y = np.clip(pts[:, 1], 0, h - 1)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, max(w - 2, 0))
    y0 = np.clip(np.floor(y).astype(np.int64), 0, max(h - 2, 0))
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    ax = (x - x0)[:, None]
    ay = (y - y0)[:, None]
    top = field[y0, x0] * (1 - ax) + field[y0, x1] * ax
    bottom = field[y1, x0] * (1 - ax) + field[y1, x1] * ax
    return (top * (1 - ay) + bottom * ay).astype(np.float32)


class DenseFlowTracker(Tracker):
    """Dense optical flow chained frame to frame.

    For each pair of consecutive frames the flow is computed in both directions (once
    per call, cached). A point moves by the flow sampled bilinearly at its position;
    the forward-backward error ``|p + f(p) + b(p + f(p)) - p|`` decides visibility.

    Loss policy (per frame, not sticky): invisible when the FB error exceeds
    ``fb_threshold``, the point lies outside the frame, or its appearance no longer
    matches the query (NCC below ``ncc_threshold``, as in :class:`LucasKanadeTracker`).
    Points keep moving with the sampled flow (outside the frame: the flow of the
    nearest border pixel).

    Args:
        method: ``'dis'`` (``cv2.DISOpticalFlow``) or ``'farneback'``
            (``cv2.calcOpticalFlowFarneback``).
        fb_threshold: largest FB error, pixels, for a point to count as visible.
        ncc_threshold: smallest query-vs-track patch NCC for a visible point; ``None``
            disables the test.
        ncc_patch_size: side of the NCC patches, pixels (positive odd int).
        dis_preset: DIS preset, one of ``'ultrafast'``, ``'fast'``, ``'medium'``.
        dis_finest_scale: finest DIS pyramid level (0 = full resolution; OpenCV's
            presets use 1 or 2, i.e. flow at 1/2 or 1/4 resolution, which is too coarse
            for pixel-accurate tracking at 256x256).
    """

    name = "dense_flow"

    _DIS_PRESETS = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }

    def __init__(
        self,
        method: str = "dis",
        fb_threshold: float = 1.0,
        ncc_threshold: float | None = 0.5,
        ncc_patch_size: int = 11,
        dis_preset: str = "medium",
        dis_finest_scale: int = 0,
    ):
        if method not in ("dis", "farneback"):
            raise ValueError(f"method={method!r}; expected 'dis' or 'farneback'")
        if dis_preset not in self._DIS_PRESETS:
            raise ValueError(f"dis_preset={dis_preset!r}; expected one of {sorted(self._DIS_PRESETS)}")
        _check_positive("fb_threshold", fb_threshold)
        _check_ncc(ncc_threshold, ncc_patch_size)
        if (
            isinstance(dis_finest_scale, bool)
            or not isinstance(dis_finest_scale, (int, np.integer))
            or dis_finest_scale < 0
        ):
            raise ValueError(f"dis_finest_scale={dis_finest_scale!r}; expected a non-negative int")
        self.method = method
        self.fb_threshold = float(fb_threshold)
        self.ncc_threshold = None if ncc_threshold is None else float(ncc_threshold)
        self.ncc_patch_size = int(ncc_patch_size)
        self.dis_preset = dis_preset
        self.dis_finest_scale = int(dis_finest_scale)
        self.name = f"dense_flow_{method}"

    def _flow_fn(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """Return ``flow(src_gray, dst_gray) -> [H, W, 2] float32`` (OpenCV pixels)."""
        if self.method == "dis":
            dis = cv2.DISOpticalFlow_create(self._DIS_PRESETS[self.dis_preset])
            dis.setFinestScale(self.dis_finest_scale)
            return lambda a, b: dis.calc(a, b, None)
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    def _track(self, video, queries, frames):
        gray = _to_gray(video)
        t, h, w = gray.shape
        flow_fn = self._flow_fn()
        cache: Dict[Tuple[int, int], np.ndarray] = {}

        def flow(src: int, dst: int) -> np.ndarray:
            if (src, dst) not in cache:
                cache[(src, dst)] = flow_fn(gray[src], gray[dst])
            return cache[(src, dst)]

        def step(src: int, dst: int, pts: np.ndarray):
            new = pts + _bilinear(flow(src, dst), pts)
            back = new + _bilinear(flow(dst, src), new)
            fb_error = np.linalg.norm(back - pts, axis=-1)
            return new, fb_error <= self.fb_threshold

        return _chain(step, queries, frames, t, h, w, _appearance(self, gray, queries, frames))


class PatchMatchTracker(Tracker):
    """Raw-pixel patch matching against the query frame (no chaining).

    The ``patch_size x patch_size`` patch (gray, or RGB with ``color=True``) centred on
    the query (sub-pixel, via ``cv2.getRectSubPix``) is compared with every location of
    every frame by normalised cross-correlation (``cv2.matchTemplate``,
    ``TM_CCOEFF_NORMED``). Frames
    are padded by ``patch_size // 2`` with border replication so that any pixel of the
    frame can be a match centre. The track is the score peak, refined to sub-pixel by
    a parabola fit along x and y; the point is visible when the peak score is at least
    ``score_threshold``. At the query frame the track is the query itself.

    Args:
        patch_size: side of the template, pixels (positive odd int).
        score_threshold: smallest peak NCC in ``[-1, 1]`` for a visible point.
        subpixel: refine the peak with a parabola fit.
        color: match RGB patches instead of gray ones (more discriminative, but
            OpenCV's 3-channel ``matchTemplate`` is about 8x slower).
    """

    name = "patch_match"

    def __init__(
        self, patch_size: int = 21, score_threshold: float = 0.7, subpixel: bool = True, color: bool = False
    ):
        _check_positive("patch_size", patch_size, integer=True, odd=True)
        if not isinstance(score_threshold, (int, float, np.number)) or not -1.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold={score_threshold!r}; expected a number in [-1, 1]")
        self.patch_size = int(patch_size)
        self.score_threshold = float(score_threshold)
        self.subpixel = bool(subpixel)
        self.color = bool(color)

    @staticmethod
    def _parabola(left: float, centre: float, right: float) -> float:
        """Sub-pixel offset in ``[-0.5, 0.5]`` of the peak of a parabola through three samples."""
        denom = left - 2.0 * centre + right
        if not np.isfinite(denom) or denom >= 0:
            return 0.0
        return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))

    def _track(self, video, queries, frames):
        t, h, w, _ = video.shape
        p = self.patch_size
        half = p // 2
        frames_f = (video if self.color else _to_gray(video)).astype(np.float32)  # (T, H, W[, 3])
        padded = [cv2.copyMakeBorder(f, half, half, half, half, cv2.BORDER_REPLICATE) for f in frames_f]

        n = queries.shape[0]
        tracks = np.zeros((n, t, 2), np.float32)
        visible = np.zeros((n, t), bool)
        for i in range(n):
            t0 = int(frames[i])
            x, y = float(queries[i, 1]), float(queries[i, 2])
            template = cv2.getRectSubPix(frames_f[t0], (p, p), (x - _CV_OFFSET, y - _CV_OFFSET))
            flat = float(template.std()) < 1e-6  # NCC undefined: never visible
            for k in range(t):
                if k == t0:
                    tracks[i, k] = (x, y)
                    visible[i, k] = True
                    continue
                score = cv2.matchTemplate(padded[k], template, cv2.TM_CCOEFF_NORMED)  # (H, W)
                score = np.nan_to_num(score, nan=-1.0, posinf=-1.0, neginf=-1.0)
                r, c = np.unravel_index(int(np.argmax(score)), score.shape)
                dx = dy = 0.0
                if self.subpixel:
                    if 0 < c < score.shape[1] - 1:
                        dx = self._parabola(score[r, c - 1], score[r, c], score[r, c + 1])
                    if 0 < r < score.shape[0] - 1:
                        dy = self._parabola(score[r - 1, c], score[r, c], score[r + 1, c])
                # Result cell (r, c) is the match centred on OpenCV pixel (c, r) of the
                # unpadded frame, i.e. edge-convention (c + 0.5, r + 0.5).
                tracks[i, k] = (c + dx + _CV_OFFSET, r + dy + _CV_OFFSET)
                visible[i, k] = (not flat) and score[r, c] >= self.score_threshold
        return tracks, visible
