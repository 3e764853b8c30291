"""Evaluation of generated videos for Cross-Attention Guidance (CAG) on the embedded model, and prompt agreement.

The paper has no evaluation code for CAG (shared reference ``difftrack_method.md`` section 8); it reports VBench
Subject/Background Consistency, Dynamic Degree and Imaging Quality plus a user study, none of which runs here
(VBench needs DINO/CLIP/MUSIQ/RAFT weights). The measures below are our own, computable offline with OpenCV on the
embedded model's 64x64, 13-frame videos. Every measure takes one video ``uint8 [T, H, W, 3]`` RGB (the public layout
of ``docs/conventions.md``) and returns plain floats.

Measures (higher is better unless marked):

* :func:`prompt_agreement` -- does the measured content agree with the prompt? Objects family: the **first** object's
  colour (HSV hue segmentation around the named world colour) and motion direction (robust slope of the segmented
  blob's centroid track). Scenes family: the camera motion, from a similarity-motion fit (translation, divergence,
  curl) to dense DIS optical flow. ``agree = colour_ok and direction_ok`` (colour is not applicable to scenes).
* :func:`object_integrity` -- share of Lucas-Kanade tracks (OpenCV ``calcOpticalFlowPyrLK``) seeded on the
  generated objects in frame 0 that survive a forward-backward check over **all** frames: tracked 0 -> T-1 and back
  to 0, every step found, always inside the frame, and back within ``fb_threshold`` px of the seed. Objects that
  melt, split or flicker lose tracks. Seeds: pixels of the prompt's colours (objects family; ``nan`` when no such
  object is found in frame 0) or a regular grid (scenes family, and the ``frame`` variant for every video).
* :func:`warp_error` (lower is better) -- mean absolute RGB difference in ``[0, 1]`` between frame ``t+1`` and frame
  ``t`` warped by the estimated optical flow (DIS), over pixels that pass a forward-backward flow check; the
  "warping error" of video temporal-consistency work. 0 for a static video.
* :func:`motion_magnitude` -- mean DIS flow magnitude, pixels per frame (our Dynamic Degree analogue). Reported so
  that a guidance cannot win integrity or warp error by freezing the video.
* :func:`sharpness` -- per-frame quality proxy: variance of the Laplacian of the grey frame (0..255 scale), mean
  over frames; blurring lowers it. :func:`frame_contrast` (std of grey levels) is reported beside it. Noise and
  high-frequency artefacts *raise* it, so read it together with warp error and integrity, which noise lowers.

Generation helpers (no OpenCV needed, so the generate phase runs on a machine without it): :func:`eval_prompts`,
:func:`initial_noise`, :func:`generate_videos`; statistics: :func:`summarize`. Cached generation, the layer sets and
result tables are in :mod:`difftrack.experiments.cag`; the plots in :mod:`difftrack.viz`.

OpenCV is imported inside the functions that need it.
"""
from __future__ import annotations

import colorsys
import math
import re
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from . import world as _world
from .checks import check_video

# --------------------------------------------------------------------------------------------- constants
HUE_TOLERANCE_DEG = 15.0  # half-width of the hue window around a named colour (world hues are >= 55 deg apart)
MIN_SATURATION = 0.6  # HSV saturation in [0, 1] a pixel needs to count as coloured (world objects: ~0.8)
MIN_VALUE = 0.2  # HSV value in [0, 1] (excludes near-black pixels, whose hue is noise)
MIN_AREA = 12  # pixels of the largest blob for an object to count as present in a frame
MAX_AREA_FRACTION = 0.35  # a blob larger than this share of the frame is a colour wash, not an object
MIN_EXTENT = 0.3  # blob area / bounding-box area (world shapes: >= 0.5 unoccluded); ragged smears fall below
MIN_DISPLACEMENT = 3.0  # pixels over the clip for a motion to count (world objects move 8..35 px)
MAX_ANGLE_DEG = 45.0  # largest angle between measured and prompted motion direction
NONTRANSLATION_RATIO = 0.5  # scenes: zoom/rotation when their flow energy exceeds this share of the translation's
MIN_SCENE_MOTION = 0.15  # scenes: px/frame below which the measured camera motion counts as none
FB_THRESHOLD = 1.0  # px: object_integrity round-trip tolerance
DIS_PRESET = "medium"

MEASURES = ("agree", "colour_ok", "direction_ok", "object_integrity", "frame_integrity", "warp_error",
            "motion_magnitude", "sharpness", "frame_contrast")
LOWER_IS_BETTER = ("warp_error",)
MEASURE_LABELS = {
    "agree": "prompt agreement",
    "colour_ok": "colour agrees",
    "direction_ok": "motion agrees",
    "object_integrity": "object integrity",
    "frame_integrity": "frame integrity",
    "warp_error": "warp error (lower better)",
    "motion_magnitude": "motion (px/frame)",
    "sharpness": "sharpness (Laplacian var)",
    "frame_contrast": "contrast (grey std)",
}


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class ParsedPrompt:
    """What a world prompt asks for.

    Attributes:
        family: ``"objects"`` or ``"scenes"``.
        colour, shape, direction: the first object's (objects family), else ``None``.
        colours: every object colour named in the prompt.
        camera: the scene's camera motion (``"panning left"``, ``"zooming in"``, ...), else ``None``.
        background: ``"still"`` or ``"drifting <dir>"`` (objects family).
    """

    family: str
    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    colours: tuple[str, ...] = ()
    camera: str | None = None
    background: str | None = None


_OBJ_RE = re.compile(r"a (\w+) (\w+) moving (\w+)")


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a prompt of the world grammar (``World.sample_layers``); ``ValueError`` for anything else."""
    p = " ".join(prompt.lower().split())
    if p.startswith("a scene , camera "):
        cam = p[len("a scene , camera "):]
        if cam not in _world.CAMERA_MOTIONS:
            raise ValueError(f"unknown camera motion {cam!r} in {prompt!r}; allowed: {_world.CAMERA_MOTIONS}")
        return ParsedPrompt("scenes", camera=cam)
    objs = _OBJ_RE.findall(p)
    if not objs:
        raise ValueError(f"prompt {prompt!r} is not of the world grammar ('a red circle moving left on a still "
                         f"background' or 'a scene , camera panning left')")
    for c, s, d in objs:
        if c not in _world.COLOURS or s not in _world.SHAPES or d not in _world.DIRECTIONS:
            raise ValueError(f"unknown colour/shape/direction in {prompt!r}: {(c, s, d)}")
    bg = p.split(" on ", 1)[1] if " on " in p else None
    if bg is not None:
        bg = "still" if "still" in bg else bg.replace("a background ", "")
    c, s, d = objs[0]
    return ParsedPrompt("objects", colour=c, shape=s, direction=d, colours=tuple(o[0] for o in objs), background=bg)


def eval_prompts(n: int, seed0: int = 0, families: Sequence[str] = _world.FAMILIES, split: str = "heldout"
                 ) -> list[dict]:
    """``n`` world prompts, families alternating, each with its world seed and a noise seed.

    Returns dicts ``{"index", "prompt", "family", "world_seed", "noise_seed"}``. The prompt is the one
    ``World().sample(world_seed, family, split)`` renders (drawn here without rendering), so the ground-truth world
    video of the same prompt is available as a reference.
    """
    w = _world.World()
    out = []
    for i in range(n):
        fam = families[i % len(families)]
        ws = seed0 + i // len(families)
        rng = np.random.default_rng([int(ws), _world.FAMILIES.index(fam), _world.SPLITS.index(split)])
        _, prompt = w.sample_layers(rng, fam, split)
        out.append(dict(index=i, prompt=prompt, family=fam, world_seed=int(ws), noise_seed=int(1000 + i)))
    return out


# --------------------------------------------------------------------------------------------- colour
def colour_hue_deg(name: str) -> float:
    """Hue in degrees of a named world colour."""
    if name not in _world.COLOURS:
        raise ValueError(f"unknown colour {name!r}; allowed: {list(_world.COLOURS)}")
    return colorsys.rgb_to_hsv(*_world.COLOURS[name])[0] * 360.0


def colour_mask(video: np.ndarray, colour: str, hue_tol: float = HUE_TOLERANCE_DEG, min_sat: float = MIN_SATURATION,
                min_val: float = MIN_VALUE) -> np.ndarray:
    """``bool [T, H, W]``: pixels whose HSV hue lies within ``hue_tol`` degrees of ``colour``'s and that are saturated
    and bright enough (OpenCV HSV, hue in half-degrees)."""
    import cv2

    video = _check_video(video, min_frames=1)
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in video]).astype(np.float32)
    h = hsv[..., 0] * 2.0  # degrees
    d = np.abs((h - colour_hue_deg(colour) + 180.0) % 360.0 - 180.0)
    return (d <= hue_tol) & (hsv[..., 1] >= min_sat * 255) & (hsv[..., 2] >= min_val * 255)


def blob_track(mask: np.ndarray, min_area: int = MIN_AREA, max_area_fraction: float = MAX_AREA_FRACTION,
               min_extent: float = MIN_EXTENT) -> tuple[np.ndarray, np.ndarray]:
    """Centroid ``float32 [T, 2]`` (x, y edge-convention pixels; ``nan`` where absent) and area ``int [T]`` of the
    tracked blob of ``mask [T, H, W]``.

    Frame by frame, the candidates are the connected components (8-connectivity) that look like one object: at least
    ``min_area`` pixels, at most ``max_area_fraction`` of the frame, and filling at least ``min_extent`` of their
    bounding box. The blob is the candidate that is largest after discounting its distance to the previous centroid
    (``area - 4 * distance``), so a static patch of similar colour in the background does not capture the track once
    the object is found.
    """
    import cv2

    T = mask.shape[0]
    cent = np.full((T, 2), np.nan, np.float32)
    area = np.zeros(T, np.int64)
    prev = None
    for t in range(T):
        n, _, stats, cents = cv2.connectedComponentsWithStats(mask[t].astype(np.uint8), connectivity=8)
        if n <= 1:
            continue
        areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
        box = (stats[1:, cv2.CC_STAT_WIDTH] * stats[1:, cv2.CC_STAT_HEIGHT]).astype(np.float64)
        c = cents[1:] + 0.5  # OpenCV centre-at-integer -> edge convention
        ok = (areas >= min_area) & (areas <= max_area_fraction * mask[t].size) & (areas >= min_extent * box)
        if not ok.any():
            continue
        score = areas.copy()
        if prev is not None:
            score = score - 4.0 * np.linalg.norm(c - prev, axis=1)
        score[~ok] = -np.inf
        k = int(np.argmax(score))
        cent[t], area[t] = c[k], int(areas[k])
        prev = c[k]
    return cent, area


def theil_sen_slope(t: np.ndarray, y: np.ndarray) -> float:
    """Median of pairwise slopes (robust to ~29% outliers); ``nan`` with fewer than 2 points."""
    if len(t) < 2:
        return float("nan")
    i, j = np.triu_indices(len(t), 1)
    return float(np.median((y[j] - y[i]) / (t[j] - t[i])))


# --------------------------------------------------------------------------------------------- flow
def _gray(video: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video])


def _dis():
    import cv2

    presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
    dis = cv2.DISOpticalFlow_create(presets[DIS_PRESET])
    dis.setFinestScale(0)  # full resolution: 64x64 frames are small
    return dis


def dense_flows(video: np.ndarray, backward: bool = False) -> np.ndarray:
    """``float32 [T-1, H, W, 2]``: DIS flow from frame ``t`` to ``t+1`` (``backward``: from ``t+1`` to ``t``), in
    pixels (dx, dy), indexed by the pixel of the source frame."""
    g = _gray(_check_video(video))
    dis = _dis()
    if backward:
        return np.stack([dis.calc(g[t + 1], g[t], None) for t in range(len(g) - 1)])
    return np.stack([dis.calc(g[t], g[t + 1], None) for t in range(len(g) - 1)])


def _remap(img: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``img [H, W, C]`` at ``pixel + flow`` (bilinear); returns the warped image and an inside mask."""
    import cv2

    H, W = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    mx, my = gx + flow[..., 0], gy + flow[..., 1]
    out = cv2.remap(img, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = (mx >= 0) & (mx <= W - 1) & (my >= 0) & (my <= H - 1)
    return out, inside


def similarity_motion(flow: np.ndarray, border: int = 4) -> dict:
    """Least-squares fit of ``u = tx + s (x - cx) - r (y - cy)``, ``v = ty + s (y - cy) + r (x - cx)`` to one flow
    field ``[H, W, 2]`` (y axis down, so ``r > 0`` turns content clockwise on screen; ``s > 0`` expands it).

    Returns ``{"tx", "ty", "s", "r", "rms_radius"}`` (translation in px at the frame centre, ``s``/``r`` per frame).
    """
    H, W = flow.shape[:2]
    ys, xs = np.mgrid[border:H - border, border:W - border].astype(np.float64)
    x = (xs + 0.5 - W / 2).ravel()
    y = (ys + 0.5 - H / 2).ravel()
    u = flow[border:H - border, border:W - border, 0].astype(np.float64).ravel()
    v = flow[border:H - border, border:W - border, 1].astype(np.float64).ravel()
    one, zero = np.ones_like(x), np.zeros_like(x)
    A = np.concatenate([np.stack([one, zero, x, -y], 1), np.stack([zero, one, y, x], 1)])
    b = np.concatenate([u, v])
    (tx, ty, s, r), *_ = np.linalg.lstsq(A, b, rcond=None)
    return dict(tx=float(tx), ty=float(ty), s=float(s), r=float(r), rms_radius=float(np.sqrt(np.mean(x * x + y * y))))


def classify_camera(video: np.ndarray, flows: np.ndarray | None = None) -> tuple[str | None, dict]:
    """Camera motion of a scene video, in the world's prompt words, from the mean similarity motion of its
    consecutive-frame DIS flows.

    Rule: zoom or rotation when ``max(|s|, |r|) * rms_radius`` exceeds ``NONTRANSLATION_RATIO`` times the
    translation ``|t|`` (a rotation/zoom about an off-centre point also translates the centre, but by less than its
    own rms displacement); then the larger of the two, by sign. Otherwise a pan along the dominant axis of ``-t``
    (a camera panning left moves the content right). ``None`` when all motion is below ``MIN_SCENE_MOTION`` px/frame.
    World conventions (validated on world renders): "zooming in" = ``s > 0`` (content expands), "rotating clockwise"
    = ``r > 0`` (content turns clockwise on screen, y down).

    Returns ``(label, params)`` with the mean fit parameters and the three energies.
    """
    flows = dense_flows(video) if flows is None else flows
    fits = [similarity_motion(f) for f in flows]
    p = {k: float(np.mean([f[k] for f in fits])) for k in fits[0]}
    R = p["rms_radius"]
    e_t, e_s, e_r = math.hypot(p["tx"], p["ty"]), abs(p["s"]) * R, abs(p["r"]) * R
    p.update(e_translation=e_t, e_zoom=e_s, e_rotation=e_r)
    if max(e_t, e_s, e_r) < MIN_SCENE_MOTION:
        return None, p
    if max(e_s, e_r) > NONTRANSLATION_RATIO * e_t:
        if e_s >= e_r:
            return ("zooming in" if p["s"] > 0 else "zooming out"), p
        return ("rotating clockwise" if p["r"] > 0 else "rotating counterclockwise"), p
    # content moves by t; the camera moves the other way
    if abs(p["tx"]) >= abs(p["ty"]):
        return ("panning left" if p["tx"] > 0 else "panning right"), p
    return ("panning up" if p["ty"] > 0 else "panning down"), p


# --------------------------------------------------------------------------------------------- measures
def _check_video(video: np.ndarray, min_frames: int = 2) -> np.ndarray:
    return np.ascontiguousarray(check_video(video, min_frames))


def object_direction(video: np.ndarray, colour: str) -> dict:
    """Measured motion of the ``colour`` object: ``{"found_frames", "displacement" (dx, dy) px over the clip,
    "centroids" [T, 2]}`` (Theil-Sen slope of the blob centroid times ``T - 1``)."""
    mask = colour_mask(video, colour)
    cent, area = blob_track(mask)
    found = ~np.isnan(cent[:, 0])
    t = np.flatnonzero(found).astype(np.float64)
    T = len(video)
    if found.sum() >= 3:
        disp = (theil_sen_slope(t, cent[found, 0]) * (T - 1), theil_sen_slope(t, cent[found, 1]) * (T - 1))
    else:
        disp = (float("nan"), float("nan"))
    return dict(found_frames=int(found.sum()), displacement=tuple(float(d) for d in disp), centroids=cent)


def prompt_agreement(video: np.ndarray, prompt: str, flows: np.ndarray | None = None) -> dict:
    """Does ``video`` (``uint8 [T, H, W, 3]``) show what ``prompt`` (world grammar) asks for?

    * Objects family (first object only): ``colour_ok`` -- a blob of the named hue (``colour_mask``, at least
      ``MIN_AREA`` px) is present in at least half of the frames; ``direction_ok`` -- its centroid moves at least
      ``MIN_DISPLACEMENT`` px over the clip, within ``MAX_ANGLE_DEG`` of the named direction.
    * Scenes family: ``colour_ok`` is ``None`` (not applicable); ``direction_ok`` -- :func:`classify_camera` returns
      the prompt's camera motion.

    Returns:
        ``{"colour_ok": bool | None, "direction_ok": bool, "agree": bool, "family", "measured"}`` where ``measured``
        is the object's displacement ``[dx, dy]`` (px) or the classified camera motion. ``flows``: the video's
        :func:`dense_flows`, if already computed.
    """
    video = _check_video(video)
    pp = parse_prompt(prompt)
    if pp.family == "scenes":
        label, params = classify_camera(video, flows)
        ok = label == pp.camera
        return dict(colour_ok=None, direction_ok=bool(ok), agree=bool(ok), family="scenes", measured=label,
                    expected=pp.camera, params=params)
    m = object_direction(video, pp.colour)
    T = len(video)
    colour_ok = m["found_frames"] >= math.ceil(T / 2)
    dx, dy = m["displacement"]
    dist = math.hypot(dx, dy) if not math.isnan(dx) else 0.0
    ex, ey = _world.DIRECTIONS[pp.direction]
    direction_ok = bool(dist >= MIN_DISPLACEMENT
                        and (dx * ex + dy * ey) / dist >= math.cos(math.radians(MAX_ANGLE_DEG)))
    return dict(colour_ok=bool(colour_ok), direction_ok=direction_ok, agree=bool(colour_ok and direction_ok),
                family="objects", measured=[dx, dy], expected=pp.direction)


def _seed_points(video: np.ndarray, colours: Iterable[str], step: int = 2, max_points: int = 300) -> np.ndarray:
    """OpenCV-pixel seeds ``float32 [M, 2]`` on the eroded frame-0 masks of ``colours`` (a regular grid when no
    colour is given)."""
    import cv2

    T, H, W, _ = video.shape
    colours = list(colours)
    if colours:
        m = np.zeros((H, W), bool)
        for c in colours:
            m |= colour_mask(video[:1], c)[0]
        m = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    else:
        m = np.zeros((H, W), bool)
        m[4:H - 4, 4:W - 4] = True
    grid = np.zeros((H, W), bool)
    grid[::step, ::step] = True
    ys, xs = np.nonzero(m & grid)
    pts = np.stack([xs, ys], 1).astype(np.float32)
    if len(pts) > max_points:
        pts = pts[np.linspace(0, len(pts) - 1, max_points).astype(int)]
    return pts


def track_survival(video: np.ndarray, points: np.ndarray, fb_threshold: float = FB_THRESHOLD) -> np.ndarray:
    """``bool [M]``: which OpenCV-pixel ``points [M, 2]`` of frame 0 survive Lucas-Kanade tracking to the last frame
    and back (all steps found, always inside the frame, back within ``fb_threshold`` px)."""
    import cv2

    g = _gray(video)
    T, H, W = g.shape
    if len(points) == 0:
        return np.zeros(0, bool)
    lk = dict(winSize=(9, 9), maxLevel=2, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    p = points.reshape(-1, 1, 2).astype(np.float32)
    ok = np.ones(len(points), bool)
    order = list(range(T - 1)) + list(range(T - 1, 0, -1))
    nxt = [t + 1 for t in range(T - 1)] + [t - 1 for t in range(T - 1, 0, -1)]
    for src, dst in zip(order, nxt):
        p, st, _ = cv2.calcOpticalFlowPyrLK(g[src], g[dst], p, None, **lk)
        q = p.reshape(-1, 2)
        ok &= (st.ravel() == 1) & (q[:, 0] >= -0.5) & (q[:, 0] <= W - 0.5) & (q[:, 1] >= -0.5) & (q[:, 1] <= H - 0.5)
    err = np.linalg.norm(p.reshape(-1, 2) - points, axis=1)
    return ok & (err <= fb_threshold)


def object_integrity(video: np.ndarray, prompt: str | None = None, fb_threshold: float = FB_THRESHOLD) -> float:
    """Share of frame-0 Lucas-Kanade tracks that survive the forward-backward round trip over all frames.

    Seeds: every 2nd pixel of the frame-0 pixels of the prompt's object colours (objects family), else a 2-px grid
    over the frame (scenes, or ``prompt=None``). ``nan`` when an objects prompt finds no seed (no object drawn).
    """
    video = _check_video(video)
    colours: tuple[str, ...] = ()
    if prompt is not None:
        pp = parse_prompt(prompt)
        colours = pp.colours
    pts = _seed_points(video, colours)
    if len(pts) == 0:
        return float("nan")
    return float(track_survival(video, pts, fb_threshold).mean())


def warp_error(video: np.ndarray, fb_threshold: float = 1.0, flows: tuple[np.ndarray, np.ndarray] | None = None
               ) -> float:
    """Mean absolute difference (RGB in ``[0, 1]``) between frame ``t+1`` and frame ``t`` warped to it by the DIS flow,
    over pixels whose flow passes a forward-backward check (``fb_threshold`` px) and stays inside; mean over the
    frame pairs. Lower is better; 0 for a static video. ``flows``: ``(forward, backward)`` :func:`dense_flows` if
    already computed."""
    video = _check_video(video)
    if flows is None:
        flows = dense_flows(video), dense_flows(video, backward=True)
    fwd, bwd = flows  # pixel of t -> position in t+1; pixel of t+1 -> position in t
    errs = []
    vid = video.astype(np.float32) / 255.0
    for t in range(len(video) - 1):
        warped, inside = _remap(vid[t], bwd[t])
        f_at, _ = _remap(fwd[t], bwd[t])  # forward flow sampled where each t+1 pixel came from
        fb = np.linalg.norm(bwd[t] + f_at, axis=-1)
        valid = inside & (fb <= fb_threshold)
        if not valid.any():
            continue
        errs.append(float(np.abs(warped - vid[t + 1]).mean(-1)[valid].mean()))
    return float(np.mean(errs)) if errs else float("nan")


def motion_magnitude(video: np.ndarray, flows: np.ndarray | None = None) -> float:
    """Mean DIS flow magnitude between consecutive frames, pixels per frame (``flows``: forward
    :func:`dense_flows` if already computed)."""
    flows = dense_flows(video) if flows is None else flows
    return float(np.linalg.norm(flows, axis=-1).mean())


def sharpness(video: np.ndarray) -> float:
    """Variance of the Laplacian of each grey frame (0..255), mean over frames. Lower = blurrier."""
    import cv2

    g = _gray(_check_video(video)).astype(np.float64)
    return float(np.mean([cv2.Laplacian(f, cv2.CV_64F).var() for f in g]))


def frame_contrast(video: np.ndarray) -> float:
    """Standard deviation of the grey levels (0..255) of each frame, mean over frames."""
    g = _gray(_check_video(video)).astype(np.float64)
    return float(g.reshape(len(g), -1).std(1).mean())


def score_video(video: np.ndarray, prompt: str) -> dict:
    """Every measure of :data:`MEASURES` for one video (``colour_ok`` is ``nan`` for scenes)."""
    video = _check_video(video)
    fwd, bwd = dense_flows(video), dense_flows(video, backward=True)
    pa = prompt_agreement(video, prompt, fwd)
    return dict(
        agree=float(pa["agree"]), colour_ok=float("nan") if pa["colour_ok"] is None else float(pa["colour_ok"]),
        direction_ok=float(pa["direction_ok"]), object_integrity=object_integrity(video, prompt),
        frame_integrity=object_integrity(video, None), warp_error=warp_error(video, flows=(fwd, bwd)),
        motion_magnitude=motion_magnitude(video, fwd), sharpness=sharpness(video), frame_contrast=frame_contrast(video))


# --------------------------------------------------------------------------------------------- statistics
def summarize(scores: Sequence[dict], reference: Sequence[dict] | None = None, measures: Sequence[str] = MEASURES
              ) -> dict:
    """Mean, standard error and count of each measure over videos (``nan`` ignored); with ``reference`` (the same
    prompts and seeds without CAG, same order) also the paired difference ``delta`` and its 95% interval."""
    out = {}
    for m in measures:
        x = np.array([s[m] for s in scores], np.float64)
        ok = ~np.isnan(x)
        n = int(ok.sum())
        d = dict(mean=float(x[ok].mean()) if n else float("nan"),
                 sem=float(x[ok].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"), n=n)
        if reference is not None:
            r = np.array([s[m] for s in reference], np.float64)
            both = ok & ~np.isnan(r)
            dd = x[both] - r[both]
            nd = int(both.sum())
            d["delta"] = float(dd.mean()) if nd else float("nan")
            half = 1.96 * dd.std(ddof=1) / math.sqrt(nd) if nd > 1 else float("nan")
            d["delta_ci95"] = [d["delta"] - half, d["delta"] + half]
            d["n_paired"] = nd
        out[m] = d
    return out


def nan_if_none(x) -> float:
    """``None`` (a ``nan`` after :func:`difftrack.experiments.json_clean`) -> ``nan``."""
    return float("nan") if x is None else float(x)

# --------------------------------------------------------------------------------------------- generation
def initial_noise(seed: int, num_frames: int | None = None, height: int | None = None, width: int | None = None):
    """The initial latent noise ``float32 [1, T, 12, H/2, W/2]`` of one video, drawn on the CPU from
    ``torch.Generator().manual_seed(seed)``, so a video does not depend on its batch or device."""
    import torch

    from . import mini

    T = mini.FRAMES if num_frames is None else num_frames
    H = mini.HEIGHT if height is None else height
    W = mini.WIDTH if width is None else width
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, T, 3 * mini.PATCH * mini.PATCH, H // mini.PATCH, W // mini.PATCH), generator=g)


def generate_videos(pipe, prompts: Sequence[str], seeds: Sequence[int], layers: Sequence[int] = (),
                    scale: float = 0.0, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                    variant: str = "renormalized", step_times: list | None = None, autocast: str | None = None,
                    images: np.ndarray | None = None) -> np.ndarray:
    """Generate one batch: ``uint8 [B, T, H, W, 3]`` for ``prompts`` with per-video noise :func:`initial_noise`
    (``images``: the first frames ``uint8 [B, H, W, 3]`` of an image-to-video model).

    ``scale == 0`` or no ``layers``: the plain pipeline (CFG batch ``2B``); else
    :func:`difftrack.guidance.generate_with_cag` (3-slot batch). ``step_times``, if given, receives the wall-clock
    seconds of every denoising step (synchronised on CUDA). ``autocast``: ``None`` (run in the weights' dtype) or
    ``"bf16"`` / ``"fp16"`` (``torch.autocast`` on the pipeline's device, as the embedded model was trained).
    """
    import torch

    from .guidance import CAGConfig, generate_with_cag

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = pipe._execution_device
    latents = torch.cat([initial_noise(s) for s in seeds]).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    last = [None]

    def cb(p, i, t, kw):
        sync()
        now = time.perf_counter()
        if step_times is not None:
            step_times.append(now - last[0])
        last[0] = now

    config = CAGConfig(list(layers), scale=float(scale), variant=variant) if (layers and scale != 0) else None
    sync()
    last[0] = time.perf_counter()
    with autocast_context(device, autocast):
        out = generate_with_cag(pipe, list(prompts), config, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, latents=latents, callback_on_step_end=cb,
                                progress=False, image=images)
    return np.asarray(out.frames)


def autocast_context(device, name: str | None):
    """``torch.autocast`` for a half-precision ``name`` (``"bf16"``, ``"fp16"``, ``"bfloat16"`` ... as
    :func:`difftrack.checks.check_dtype`) on ``device``'s type, or a no-op for ``None``."""
    import contextlib

    import torch

    from .checks import DTYPE_ALIASES, check_dtype

    if name in (None, "none"):
        return contextlib.nullcontext()
    allowed = [k for k, v in DTYPE_ALIASES.items() if v != "float32"]
    try:
        dt = check_dtype(name, "autocast")
    except ValueError:
        dt = None
    if dt in (None, "float32"):
        raise ValueError(f"autocast={name!r}; allowed: None or a half-precision dtype {allowed} (or torch.float16 / "
                         f"torch.bfloat16)")
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dt))
