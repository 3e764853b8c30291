"""A procedural video world with exact ground-truth tracks.

Two families, like the paper's two data sets (shared reference section 5):

* ``"objects"``: one to three textured, colour-tinted shapes that move, rotate and scale, occlude each other, enter and
  leave, over a photo background that may drift slowly;
* ``"scenes"``: a static photo scene under camera motion (pan, zoom or rotation).

Every layer (the background and each object) is a texture moved by a per-frame similarity transform, so the true
position and visibility of any point in any frame is known exactly: this replaces the paper's CoTracker pseudo
ground truth with exact ground truth.

Coordinates follow ``docs/conventions.md``: pixels with the edge convention (the image spans ``[0, W] x [0, H]``).
Internally the renderer uses normalised screen coordinates ``n = 2 * px / size - 1`` (``grid_sample`` with
``align_corners=False``).

Typical use::

    world = World()                                   # 13 frames of 64x64
    sample = world.sample(seed=3, family="objects", split="heldout")
    sample.video            # uint8 [T, H, W, 3]
    sample.prompt           # "a red circle moving left on a still background"
    q = world.grid_queries(8)                          # [N, 3] (t, x, y) pixels at frame 0
    tracks, visible = world.tracks(sample, q)          # [N, T, 2], [N, T]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = ("objects", "scenes")
SPLITS = ("train", "heldout")
COLOURS = {  # name -> RGB in [0, 1]; hues 60 degrees apart so an off-the-shelf hue measure separates them
    "red": (0.95, 0.15, 0.12),
    "yellow": (0.95, 0.9, 0.15),
    "green": (0.15, 0.85, 0.2),
    "cyan": (0.15, 0.85, 0.9),
    "blue": (0.15, 0.25, 0.95),
    "purple": (0.75, 0.2, 0.9),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
CAMERA_MOTIONS = ("panning left", "panning right", "panning up", "panning down", "zooming in", "zooming out",
                  "rotating clockwise", "rotating counterclockwise")
TEXTURE_FILE = Path(__file__).parent / "data" / "textures.npz"


@lru_cache(maxsize=None)
def texture_bank() -> tuple[torch.Tensor, tuple[str, ...], tuple[str, ...]]:
    """The texture bank: ``(images float32 [K, 3, 256, 256] in [0, 1], names, held-out names)``."""
    with np.load(TEXTURE_FILE) as z:
        images = torch.from_numpy(z["images"]).permute(0, 3, 1, 2).float() / 255.0
        names = tuple(str(n) for n in z["names"])
        heldout = tuple(str(n) for n in z["heldout"])
    return images, names, heldout


def texture_ids(split: str) -> list[int]:
    """Indices into the texture bank usable for ``split`` (held-out photographs never appear in ``"train"``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    _, names, heldout = texture_bank()
    if split == "heldout":
        return [i for i, n in enumerate(names) if n in heldout]
    return [i for i, n in enumerate(names) if n not in heldout]


@dataclass
class Layer:
    """One moving texture. ``pos [T, 2]``, ``scale [T]``, ``angle [T]`` map canonical ``c in [-1, 1]^2`` to
    normalised screen coordinates: ``n = pos + scale * R(angle) @ c``."""

    texture: int
    pos: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    tex_offset: tuple[float, float] = (0.0, 0.0)  # texture coords = tex_offset + tex_scale * c
    tex_scale: float = 1.0
    shape: str | None = None  # None for the background
    colour: str | None = None
    direction: str | None = None


@dataclass
class WorldSample:
    """A rendered video and everything needed for exact ground truth."""

    video: np.ndarray  # uint8 [T, H, W, 3]
    prompt: str
    family: str
    split: str
    seed: int
    layers: list[Layer] = field(repr=False)  # background first, then objects bottom to top


def _rot(a: torch.Tensor) -> torch.Tensor:
    """``[..., 2, 2]`` rotation matrices for angles ``a [...]`` (radians, y axis pointing down)."""
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _shape_alpha(shape: str, c: torch.Tensor, sharp: float = 40.0) -> torch.Tensor:
    """Soft coverage in ``[0, 1]`` of a canonical shape at canonical points ``c [..., 2]``."""
    x, y = c[..., 0], c[..., 1]
    if shape == "circle":
        sdf = torch.sqrt(x * x + y * y + 1e-12) - 0.95
    elif shape == "square":
        sdf = torch.maximum(x.abs(), y.abs()) - 0.85
    elif shape == "diamond":
        sdf = (x.abs() + y.abs()) / math.sqrt(2) - 0.7
    elif shape == "triangle":  # pointing up
        sdf = torch.maximum(torch.maximum(-y - 0.8, (2 * x.abs() + y) / math.sqrt(5) - 0.45), y - 0.8)
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {SHAPES}")
    return torch.sigmoid(-sdf * sharp)


class World:
    """Renders world videos and answers exact track queries.

    Args:
        frames: number of frames ``T`` (at least 2).
        height, width: frame size in pixels.
        object_count_p: probabilities of 1, 2 and 3 objects in an object video (the default is the world's; a
            training recipe may ask for more single-object videos).
    """

    OBJECT_COUNT_P = (0.45, 0.35, 0.2)

    def __init__(self, frames: int = 13, height: int = 64, width: int = 64,
                 object_count_p: tuple[float, float, float] = OBJECT_COUNT_P):
        p = np.asarray(object_count_p, dtype=float)
        if p.shape != (3,) or not np.all(np.isfinite(p)) or np.any(p < 0) or abs(p.sum() - 1) > 1e-6:
            raise ValueError(f"object_count_p={object_count_p!r}; allowed: three probabilities (of 1, 2, 3 objects) "
                             f">= 0 that sum to 1")
        self.object_count_p = tuple(float(x) for x in p)
        if frames < 2:
            raise ValueError(f"frames={frames}: a video needs at least 2 frames")
        if height < 8 or width < 8:
            raise ValueError(f"frame size {height}x{width} too small; need at least 8x8 pixels")
        self.frames, self.height, self.width = frames, height, width

    # ------------------------------------------------------------------ sampling of parameters
    def sample_layers(self, rng: np.random.Generator, family: str, split: str) -> tuple[list[Layer], str]:
        """Draw the layers and the prompt of one video."""
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; allowed: {FAMILIES}")
        tex = texture_ids(split)
        T = self.frames
        t = np.linspace(0.0, 1.0, T)
        if family == "scenes":
            motion = CAMERA_MOTIONS[rng.integers(len(CAMERA_MOTIONS))]
            zoom0 = rng.uniform(2.4, 3.4)
            pos0 = rng.uniform(-0.5, 0.5, 2)
            ang0 = rng.uniform(-0.3, 0.3)
            pos = np.repeat(pos0[None], T, 0)
            zoom = np.full(T, zoom0)
            ang = np.full(T, ang0)
            amount = rng.uniform(0.6, 1.0)
            if motion.startswith("panning"):
                d = np.array(DIRECTIONS[motion.split()[1]])
                # camera pans left -> content moves right on screen
                pos = pos + (-d)[None] * (t[:, None] * amount * 0.75)
            elif motion == "zooming in":
                zoom = zoom0 * (1 + 0.45 * amount * t)
            elif motion == "zooming out":
                zoom = zoom0 * (1 + 0.45 * amount) / (1 + 0.45 * amount * t)
            else:
                sign = 1.0 if motion.endswith(" clockwise") else -1.0
                ang = ang0 + sign * t * amount * 0.5
            layers = [Layer(int(rng.choice(tex)), pos, zoom, ang)]
            return layers, f"a scene , camera {motion}"

        # objects
        bg_drift = rng.random() < 0.4
        pos0 = rng.uniform(-0.4, 0.4, 2)
        zoom0 = rng.uniform(2.4, 3.4)
        if bg_drift:
            bdir = list(DIRECTIONS)[rng.integers(4)]
            pos = pos0[None] + np.array(DIRECTIONS[bdir])[None] * t[:, None] * rng.uniform(0.15, 0.3)
            bg_words = f"a background drifting {bdir}"
        else:
            pos = np.repeat(pos0[None], T, 0)
            bg_words = "a still background"
        layers = [Layer(int(rng.choice(tex)), pos, np.full(T, zoom0), np.full(T, rng.uniform(-0.2, 0.2)))]
        n_obj = int(rng.choice([1, 2, 3], p=list(self.object_count_p)))
        colours = rng.permutation(list(COLOURS))[:n_obj]
        words = []
        for k in range(n_obj):
            direction = list(DIRECTIONS)[rng.integers(4)]
            d = np.array(DIRECTIONS[direction])
            speed = rng.uniform(0.5, 1.1)  # normalised units over the clip (0.5 = 16 px on a 64 px frame)
            perp = np.array([-d[1], d[0]]) * rng.uniform(-0.15, 0.15)
            vel = d * speed + perp
            start = rng.uniform(-0.55, 0.55, 2) - vel * rng.uniform(0.3, 0.7)
            if rng.random() < 0.2:  # enters or leaves the frame
                start = start - vel * 0.4
            s0 = rng.uniform(0.2, 0.38)
            scale = s0 * (1 + rng.uniform(-0.25, 0.25) * t)
            ang = rng.uniform(-0.5, 0.5) + rng.uniform(-0.8, 0.8) * t
            shape = SHAPES[rng.integers(len(SHAPES))]
            ts = s0 * rng.uniform(0.8, 1.6)
            off = tuple(rng.uniform(-1 + ts, 1 - ts, 2))
            layers.append(Layer(int(rng.choice(tex)), start[None] + vel[None] * t[:, None], scale, ang,
                                tex_offset=off, tex_scale=ts, shape=shape, colour=str(colours[k]),
                                direction=direction))
            words.append(f"a {colours[k]} {shape} moving {direction}")
        return layers, " and ".join(words) + " on " + bg_words

    def sample(self, seed: int, family: str = "objects", split: str = "train", device: str | torch.device = "cpu"
               ) -> WorldSample:
        """Render video ``seed`` of ``family`` using textures of ``split`` (deterministic by seed)."""
        rng = np.random.default_rng([int(seed), FAMILIES.index(family) if family in FAMILIES else 9,
                                     SPLITS.index(split) if split in SPLITS else 9])
        layers, prompt = self.sample_layers(rng, family, split)
        video = self.render([layers], device=device)[0]
        video = (video.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return WorldSample(video=video, prompt=prompt, family=family, split=split, seed=int(seed), layers=layers)

    # ------------------------------------------------------------------ rendering
    def _screen_grid(self, device) -> torch.Tensor:
        """Normalised screen coordinates of pixel centres, ``[H, W, 2]`` (x, y)."""
        ys = (torch.arange(self.height, device=device) + 0.5) / self.height * 2 - 1
        xs = (torch.arange(self.width, device=device) + 0.5) / self.width * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx, gy], -1)

    def _to_canonical(self, layer: Layer, n: torch.Tensor) -> torch.Tensor:
        """Screen ``n [T, ..., 2]`` -> canonical coordinates of ``layer`` (per frame)."""
        dev = n.device
        pos = torch.as_tensor(layer.pos, dtype=torch.float32, device=dev)
        scale = torch.as_tensor(layer.scale, dtype=torch.float32, device=dev)
        rinv = _rot(-torch.as_tensor(layer.angle, dtype=torch.float32, device=dev))  # [T, 2, 2]
        extra = n.dim() - 2
        d = n - pos.view(-1, *([1] * extra), 2)
        r = rinv.view(-1, *([1] * extra), 2, 2)
        return (r @ d.unsqueeze(-1)).squeeze(-1) / scale.view(-1, *([1] * extra), 1)

    def _to_screen(self, layer: Layer, c: torch.Tensor) -> torch.Tensor:
        """Canonical ``c [N, 2]`` -> screen coordinates ``[T, N, 2]`` in every frame."""
        dev = c.device
        pos = torch.as_tensor(layer.pos, dtype=torch.float32, device=dev)
        scale = torch.as_tensor(layer.scale, dtype=torch.float32, device=dev)
        r = _rot(torch.as_tensor(layer.angle, dtype=torch.float32, device=dev))
        return pos[:, None] + scale[:, None, None] * (r[:, None] @ c[None, :, :, None]).squeeze(-1)

    def _layer_rgba(self, layer: Layer, n: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour ``[T, 3, H, W]`` and coverage ``[T, 1, H, W]`` of a layer at screen grid ``n [T, H, W, 2]``."""
        c = self._to_canonical(layer, n)
        uv = torch.as_tensor(layer.tex_offset, dtype=torch.float32, device=n.device) + layer.tex_scale * c
        tex = images[layer.texture].unsqueeze(0).expand(c.shape[0], -1, -1, -1)
        rgb = F.grid_sample(tex, uv, mode="bilinear", padding_mode="reflection", align_corners=False)
        if layer.shape is None:
            return rgb, torch.ones_like(rgb[:, :1])
        lum = rgb.mean(1, keepdim=True)
        tint = torch.tensor(COLOURS[layer.colour], device=n.device).view(1, 3, 1, 1)
        rgb = tint * (0.3 + 0.7 * lum)
        return rgb, _shape_alpha(layer.shape, c).unsqueeze(1)

    def render(self, videos: list[list[Layer]], device: str | torch.device = "cpu") -> torch.Tensor:
        """Render a batch of videos: ``float32 [B, T, 3, H, W]`` in ``[0, 1]``."""
        images = texture_bank()[0].to(device)
        grid = self._screen_grid(device).expand(self.frames, -1, -1, -1)
        out = []
        for layers in videos:
            frame, _ = self._layer_rgba(layers[0], grid, images)
            for layer in layers[1:]:
                rgb, a = self._layer_rgba(layer, grid, images)
                frame = frame * (1 - a) + rgb * a
            out.append(frame)
        return torch.stack(out)

    def render_fast(self, videos: list[list[Layer]], device: str | torch.device = "cpu") -> torch.Tensor:
        """Vectorised :meth:`render` (one ``grid_sample`` for all layers of all videos; used for training).

        Returns ``float32 [B, T, 3, H, W]`` in ``[0, 1]``, equal to :meth:`render` up to float rounding."""
        images = texture_bank()[0].to(device)
        B, T, K = len(videos), self.frames, max(len(v) for v in videos)
        tex = np.zeros((B, K), np.int64)
        pos = np.zeros((B, K, T, 2), np.float32)
        scale = np.ones((B, K, T), np.float32)
        ang = np.zeros((B, K, T), np.float32)
        toff = np.zeros((B, K, 2), np.float32)
        tsc = np.ones((B, K), np.float32)
        shape = np.full((B, K), -1, np.int64)  # -1 background / absent
        colour = np.zeros((B, K, 3), np.float32)
        present = np.zeros((B, K), np.float32)
        for b, layers in enumerate(videos):
            for k, L in enumerate(layers):
                tex[b, k], pos[b, k], scale[b, k], ang[b, k] = L.texture, L.pos, L.scale, L.angle
                toff[b, k], tsc[b, k], present[b, k] = L.tex_offset, L.tex_scale, 1.0
                if L.shape is not None:
                    shape[b, k] = SHAPES.index(L.shape)
                    colour[b, k] = COLOURS[L.colour]
        t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        tex, pos, scale, ang, toff, tsc, shape, colour, present = map(t, (tex, pos, scale, ang, toff, tsc, shape,
                                                                          colour, present))
        grid = self._screen_grid(device)  # [H, W, 2]
        d = grid.view(1, 1, 1, self.height, self.width, 2) - pos.view(B, K, T, 1, 1, 2)
        rinv = _rot(-ang).view(B, K, T, 1, 1, 2, 2)
        c = (rinv @ d.unsqueeze(-1)).squeeze(-1) / scale.view(B, K, T, 1, 1, 1)  # canonical [B,K,T,H,W,2]
        uv = toff.view(B, K, 1, 1, 1, 2) + tsc.view(B, K, 1, 1, 1, 1) * c
        src = images[tex.view(-1)]  # [B*K, 3, S, S]
        rgb = F.grid_sample(src, uv.view(B * K, T * self.height, self.width, 2), mode="bilinear",
                            padding_mode="reflection", align_corners=False)
        rgb = rgb.view(B, K, 3, T, self.height, self.width).permute(0, 1, 3, 2, 4, 5)  # [B,K,T,3,H,W]
        lum = rgb.mean(3, keepdim=True)
        tinted = colour.view(B, K, 1, 3, 1, 1) * (0.3 + 0.7 * lum)
        alpha = torch.zeros(B, K, T, 1, self.height, self.width, device=device)
        for si, name in enumerate(SHAPES):
            a = _shape_alpha(name, c).unsqueeze(3)
            alpha = torch.where((shape == si).view(B, K, 1, 1, 1, 1), a, alpha)
        alpha = alpha * present.view(B, K, 1, 1, 1, 1)
        frame = rgb[:, 0]
        for k in range(1, K):
            frame = frame * (1 - alpha[:, k]) + tinted[:, k] * alpha[:, k]
        return frame

    # ------------------------------------------------------------------ ground truth
    def grid_queries(self, grid_size: int, frame: int = 0, margin: float | None = None) -> np.ndarray:
        """``float32 [grid_size**2, 3]`` queries ``(t, x, y)`` on a regular grid (x fastest), in pixels."""
        if grid_size < 1:
            raise ValueError(f"grid_size={grid_size}; must be >= 1")
        m = self.width / 16 if margin is None else margin
        xs = np.linspace(m, self.width - m, grid_size)
        ys = np.linspace(m * self.height / self.width, self.height - m * self.height / self.width, grid_size)
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        return np.stack([np.full(gx.size, frame), gx.ravel(), gy.ravel()], -1).astype(np.float32)

    def tracks(self, sample: WorldSample, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact tracks of query points.

        Args:
            sample: a rendered world video.
            queries: ``float32 [N, 3]`` as ``(t, x, y)``, pixels (edge convention), ``0 <= t < T``.

        Returns:
            tracks ``float32 [N, T, 2]`` pixels ``(x, y)``, and visible ``bool [N, T]`` (False when occluded by a
            nearer layer or outside the frame). The query frame is visible by construction.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != 3:
            raise ValueError(f"queries must have shape [N, 3] as (t, x, y); got {q.shape}")
        T, H, W = self.frames, self.height, self.width
        t = q[:, 0]
        if (t < 0).any() or (t > T - 1).any() or (t != np.round(t)).any():
            raise ValueError(f"query frames must be integers in [0, {T - 1}]; got {sorted(set(t.tolist()))[:5]}")
        if (q[:, 1] < 0).any() or (q[:, 1] > W).any() or (q[:, 2] < 0).any() or (q[:, 2] > H).any():
            raise ValueError(f"query points must lie inside the {W}x{H} frame (x in [0, {W}], y in [0, {H}])")
        n = torch.from_numpy(np.stack([q[:, 1] / W * 2 - 1, q[:, 2] / H * 2 - 1], -1))  # [N, 2]
        layers = sample.layers
        ti = torch.from_numpy(t.astype(np.int64))
        # which layer owns each query: the top-most object covering it at its query frame
        owner = torch.zeros(len(q), dtype=torch.long)
        for li, layer in enumerate(layers[1:], start=1):
            c = self._to_canonical(layer, n.unsqueeze(0).expand(T, -1, -1))[ti, torch.arange(len(q))]
            cover = _shape_alpha(layer.shape, c) > 0.5
            owner[cover] = li
        tracks = torch.zeros(len(q), T, 2)
        visible = torch.zeros(len(q), T, dtype=torch.bool)
        for li, layer in enumerate(layers):
            idx = (owner == li).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            c_all = self._to_canonical(layer, n[idx].unsqueeze(0).expand(T, -1, -1))  # [T, n, 2]
            c = c_all[ti[idx], torch.arange(idx.numel())]  # canonical coords at the query frame
            s = self._to_screen(layer, c)  # [T, n, 2]
            vis = (s.abs() <= 1).all(-1)
            for upper in layers[li + 1:]:
                cu = self._to_canonical(upper, s)
                vis &= _shape_alpha(upper.shape, cu) <= 0.5
            tracks[idx] = s.permute(1, 0, 2)
            visible[idx] = vis.T
        px = torch.stack([(tracks[..., 0] + 1) / 2 * W, (tracks[..., 1] + 1) / 2 * H], -1)
        visible[torch.arange(len(q)), ti] = True
        return px.numpy().astype(np.float32), visible.numpy()

    def object_mask(self, sample: WorldSample, frame: int = 0) -> np.ndarray:
        """``bool [H, W]``: pixels of ``frame`` covered by any object (the paper's foreground mask)."""
        grid = self._screen_grid("cpu").expand(self.frames, -1, -1, -1)
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        for layer in sample.layers[1:]:
            c = self._to_canonical(layer, grid)[frame]
            mask |= _shape_alpha(layer.shape, c) > 0.5
        return mask.numpy()


def to_tapvid(video: np.ndarray, tracks: np.ndarray, visible: np.ndarray) -> dict:
    """Pack a video with pixel tracks into the TAP-Vid dictionary format.

    Args:
        video: ``uint8 [T, H, W, 3]``.
        tracks: ``float32 [N, T, 2]`` pixels ``(x, y)``.
        visible: ``bool [N, T]``.

    Returns:
        ``{"video": uint8 [T, H, W, 3], "points": float32 [N, T, 2] in [0, 1] (x, y), "occluded": bool [N, T]}``.
    """
    T, H, W, _ = video.shape
    if tracks.shape[1] != T or visible.shape != tracks.shape[:2]:
        raise ValueError(f"tracks {tracks.shape} / visible {visible.shape} do not match a {T}-frame video")
    points = tracks / np.array([W, H], dtype=np.float32)
    return {"video": video, "points": points.astype(np.float32), "occluded": ~visible.astype(bool)}


def make_dataset(n: int, family: str, split: str = "heldout", grid_size: int = 10, seed0: int = 0,
                 world: World | None = None, query_frame: int = 0) -> list[dict]:
    """``n`` TAP-Vid-format dictionaries of world videos with exact tracks for a ``grid_size`` grid of queries,
    plus ``"prompt"`` and ``"seed"`` keys."""
    world = world or World()
    out = []
    for i in range(n):
        s = world.sample(seed0 + i, family, split)
        tr, vis = world.tracks(s, world.grid_queries(grid_size, frame=query_frame))
        d = to_tapvid(s.video, tr, vis)
        d.update(prompt=s.prompt, seed=seed0 + i, family=family)
        out.append(d)
    return out
