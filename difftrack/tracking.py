"""Zero-shot point tracking from the query/key of a video diffusion transformer (DiffTrack, shared reference section 7).

A CoTracker-style callable::

    tracker = DiffTracker()                      # the embedded model, defaults measured on train-split world videos
    tracks, visible = tracker(video, queries)   # uint8 [T, H, W, 3], float32 [N, 3] (t, x, y) pixels
    # tracks float32 [N, T, 2] pixels (x, y), visible bool [N, T]

The recipe (published defaults in brackets, defects of the published code fixed by default):

1. **Per-frame encoding.** Every frame is encoded on its own (the embedded model: its fixed patching; a VAE backbone:
   :func:`vae_encode_frames`, each frame as a 1-frame video times ``vae.config.scaling_factor``), **once per video**:
   the query frame is not re-encoded for every chunk [B11].
2. **Chunks that re-insert the query frame** (:func:`plan_chunks`): for each query frame ``tq``, chunks
   ``[tq] + targets`` of at most ``chunk_len - 1`` other frames, interleaved with the stride ``(T-1) // (chunk_len-1)``
   [13, interleaved]. Unlike the published loop it works for any ``T >= 2`` (the published one divides by zero for
   ``T < 12``) and never needs more chunks than necessary; every chunk is full, and frames seen by several chunks get
   the mean of their costs [``--average_overlapped_corr``].
3. **One forward per chunk and timestep** at the timestep embedding ``scheduler.timesteps[step]`` of a
   ``num_steps``-step schedule [t = 19 of 50], on the clean latent [published] or on a forward-noised latent
   (``noise="add"``, seeded, the same noise for a frame in every chunk). Batch 1, conditional branch only (no
   duplicated CFG pass), the forward stops after the deepest needed block (:func:`difftrack.capture.run_until`), no
   scheduler step, no VAE decode [B11].
4. **Cost** (:func:`difftrack.matching.qk_cost`): head-averaged softmax of ``q . k / tau`` between the query frame
   and each target frame, bidirectional [as published], ``tau = sqrt(head_dim)`` [the published tracking code used
   ``sqrt(num_heads)``, B2: ``tau="heads"``]. Several layers / timesteps are fused by averaging their costs
   (``fuse="mean"``) or, as published, by concatenating the descriptors (sum of logits, ``fuse="concat"``).
5. **Cost to position** in token-centre units (fixes the normalisation hack and border bug B4). Default
   ``refine="paper"``: argmax per source token, then bilinear interpolation of that match map at the query
   [the published rule, with border padding instead of zeros]; it measured best on train-split world videos
   (delta_avg 0.485 vs 0.424 for ``"softargmax"``: blending cost rows and taking their peak loses the query's
   sub-token offset, interpolating the match map keeps it). Also ``"softargmax"`` (soft-argmax of the blended cost
   rows in a ``(2 radius + 1)^2`` window), ``"argmax"`` and ``"interp"`` (soft-argmax per source token, then the
   interpolated displacement field).
6. **Occlusion** (not in any published code): a point is visible in frame ``k`` when the cycle ``query -> k ->
   query`` (forward match, then the transposed cost back to the query frame) returns within ``cycle_threshold``
   tokens of the query (``occlusion="cycle"``, default), and/or the matched cost peak is at least
   ``confidence_threshold``. The thresholds were calibrated on **train-split** world videos only
   (``scripts/calibrate_occlusion.py``; numbers in the comment above ``DEFAULT_NOISE``).
7. Optional, **our extension** (``pixel_refine="ncc"``): the transformer's match refined to sub-pixel precision by
   local normalised cross-correlation of the query patch, plus an NCC visibility test.

Queries may sit at any frame (a chunk plan per distinct query frame); videos of any length ``T >= 2`` and **any
size** are accepted. By default (``work_size="model"``) the tracker works at the model's own frame size: the one its
weights are made for (64x64 for the embedded model, ``sample_height x sample_width`` for CogVideoX, 480x720 for
2B/5B); the video is resized to it (:func:`difftrack.tapvid.resize_video`), the queries scaled in and the tracks
scaled back to the caller's pixels (edge convention, ``x * W / w``). Wan and HunyuanVideo fix no size in their
config (RoPE positions): they keep the caller's size when it is a multiple of the token stride and fits the memory
limit below, else they work at the pipeline's default size (480x832, 720x1280). ``work_size="input"`` works at the caller's size (it must be divisible by the
token stride: 4 px for the embedded model, 16 px for CogVideoX), ``work_size=(h, w)`` at a chosen one. Before any
forward the memory of the cost matrices is estimated (:meth:`DiffTracker.estimate_cost_bytes`, about ``4 M^2``
bytes per matrix for ``M`` tokens a frame) and a size that needs more than ``max_cost_bytes`` (default 4 GiB) is
refused with an error naming it.

Backbones: the embedded model (``mini.load_default()``, default), any ``MiniVideoPipeline``, a diffusers
``CogVideoXPipeline`` (its VAE encodes the frames, its T5 encodes ``prompt``) or a bare transformer of a class
supported by :mod:`difftrack.backbones` (CogVideoX, Wan, HunyuanVideo layouts; pass ``encode=``, ``token_stride=``
and ``encoder_hidden_states=`` for a bare transformer without the embedded model's 12-channel input).

:class:`FeatureTracker` is the same tracker on block-output features (cosine similarity), the paper's "intermediate
features" control; the random-weights control is ``DiffTracker(mini.build_untrained())``.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Sequence

import numpy as np
import torch

from . import checks as _checks
from .backbones import (adapter_for, adapters, attention_heads, compute_dtype, experts, family_of_class,
                        frame_encoder, patch_sizes, pipeline_families, resolve_transformer, scale_vae_latents,
                        scheduler_add_noise)
from .capture import capture, run_until
from .matching import (REFINE, _bilinear_rows, check_heads, feature_cost, match_from_cost, px_to_tokens, qk_cost,
                       refine_peak, select_heads, tokens_to_px)

__all__ = ["DiffTracker", "FeatureTracker", "plan_chunks", "vae_encode_frames", "check_video", "check_queries",
           "OCCLUSION", "WORK_SIZES", "DEFAULT_MAX_COST_BYTES"]

REFINE_ALL = tuple(REFINE) + ("interp",)
OCCLUSION = ("cycle", "confidence", "cycle+confidence", "none")
NOISE = ("none", "add")
FUSE = ("mean", "concat")
WORK_SIZES = ("model", "input")
# cost matrices held at once are bounded by this by default (4 GiB): the embedded model needs 6 MiB at its 64x64,
# ~1.5 GiB at 256x256 (13 frames), ~13 GiB for two 512x512 frames (minutes and 7.9 GB on the CPU), ~1 TiB at 1080p
DEFAULT_MAX_COST_BYTES = 4 * 2**30

# Defaults chosen on TRAIN-split world videos only (scripts/calibrate_occlusion.py; held-out never used):
# * settings sweep, 16 + 16 train videos, 64 grid queries, delta_avg at 256x256 with occlusion off (H100 run,
#   cache/occlusion_calibration.json, stage "select"): clean latent 0.424 vs forward-noised 0.390 (t=19; the gap grows
#   at earlier steps: t=219 0.371 vs 0.308) -> noise="none" (the published default); layer 8 best single layer
#   (11: 0.375, 7: 0.277); fusing 8+11 0.408 (mean) / 0.422 (concat): no gain; refine="paper" (argmax per source
#   token + bilinear interpolation of the match map, with the B4 coordinate fix) 0.485 vs soft-argmax 0.424 and
#   displacement interpolation 0.468 -> "paper"; tau=sqrt(heads) 0.449 vs sqrt(head_dim) 0.424 with soft-argmax
#   but 0.479 vs 0.485 with refine="paper" -> sqrt(head_dim) kept.
# * occlusion, same 32 videos, thresholds maximising the mean average Jaccard (ties within 0.002 broken by OA):
#   cycle error <= 1.0 token: AJ 0.398 (0.3982 at 0.75), OA 0.833; without occlusion AJ 0.358, OA 0.899; the cost
#   peak adds nothing with refine="paper" (best threshold 0); for refine="softargmax" it is best at 0.041.
# * pixel_refine="ncc" (CPU run, 8 + 8 train videos): cycle <= 2.0 tokens and NCC >= 0.75: AJ 0.577, OA 0.843.
DEFAULT_NOISE = "none"
DEFAULT_REFINE = "paper"
DEFAULT_OCCLUSION = "cycle"
DEFAULT_CYCLE_THRESHOLD = 1.0
DEFAULT_CONFIDENCE_THRESHOLD = 0.04
DEFAULT_NCC_CYCLE_THRESHOLD = 2.0
DEFAULT_NCC_THRESHOLD = 0.75


# ----------------------------------------------------------------------------------------------- validation
def check_video(video, min_frames: int = 2) -> np.ndarray:
    """Validate a public-API video: ``uint8 [T, H, W, 3]`` with ``T >= min_frames`` (2: something to track into);
    returns it as an ndarray (:func:`difftrack.checks.check_video`)."""
    return _checks.check_video(video, min_frames)


check_queries = _checks.check_queries


def _check_number(name: str, value, lo: float, hi: float, allow_none: bool = False, lo_open: bool = False
                  ) -> float | None:
    """``value`` as a float, finite and in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``ValueError`` naming it."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name}={value!r}; allowed: a finite number in {rng}" + (" or None" if allow_none else ""))
    return float(value)


def _check_index_list(name: str, value, what: str) -> list[int]:
    """An int (numpy integers too) or a non-empty sequence of them; ``ValueError`` naming floats, bools, strings."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    items = [value] if is_int(value) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) and not isinstance(items, np.ndarray):
        raise ValueError(f"{name}={value!r} ({type(value).__name__}); allowed: {what} (an int or a sequence of ints)")
    items = list(items)
    bad = [v for v in items if not is_int(v)]
    if bad or not items:
        raise ValueError(f"{name}={value!r}; allowed: {what} (ints, not floats or bools)" if bad else
                         f"{name}={value!r} is empty; allowed: {what}")
    return [int(v) for v in items]


# ----------------------------------------------------------------------------------------------- chunk planning
def _published_chunks(T: int, query_frame: int, targets: list[int], m: int, interleave: bool) -> list[list[int]]:
    """The published chunk loop (``evaluate_tapvid.py``) over target positions ``1 .. T - 1``."""
    I = T // m if interleave else 1
    stride = 1 if interleave else m
    start, end, seen, chunks = 1, (m - 1) * I + 1, set(), []
    while len(seen) < T - 1:
        pos = list(range(start, end + 1, I))
        chunks.append([query_frame] + [targets[p - 1] for p in pos])
        seen.update(pos)
        start += stride
        end = min(start + (m - 1) * I, T - 1)
    return chunks


CHUNK_PLANS = ("difftrack", "published")


def plan_chunks(num_frames: int, query_frame: int, chunk_len: int = 13, interleave: bool = True,
                plan: str = "difftrack") -> list[list[int]]:
    """Chunks of frame indices, each ``[query_frame] + targets`` (targets in increasing order).

    With ``n = T - 1`` targets and ``m = chunk_len - 1`` targets per chunk:

    * ``n <= m``: one chunk with every frame (query frame first).
    * ``interleave=True`` (the published ``--chunk_frame_interval``): targets are taken with the stride
      ``I = n // m`` (``T // (chunk_len - 1)`` in the published code). The smallest target not yet covered starts a
      window of ``m`` targets with that stride; a window that would run past the last target is shifted back by
      whole strides (same residue, so it still covers the target) to stay full. For ``T = 50`` this gives the
      published five chunks ``{1,5,..,45}, {2,..,46}, {3,..}, {4,..}, {5,..,49}``; unlike the published loop it
      does not crash for ``T < 12`` and does not slide one frame at a time when ``n`` is not a multiple of ``m``.
    * ``interleave=False``: consecutive blocks of ``m`` targets, the last one shifted back to stay full.

    Frames appearing in several chunks have their costs averaged by the tracker.

    ``plan="published"``: the published loop itself (reference section 7.2), over the targets in order: interleave
    stride ``I = T // (chunk_len - 1)`` (1 without interleaving), windows ``start, start + I, .., end`` with
    ``end = start + (chunk_len - 2) I`` clipped at the last target, ``start`` advancing by 1 (by ``chunk_len - 1``
    without interleaving) until every target is covered -- so the last windows may be short and slide one frame at a
    time. Where the published loop divides by zero (``I = 0``, fewer than ``chunk_len - 1`` frames) one chunk holds
    every frame, as ``"difftrack"``.

    Raises:
        ValueError: ``num_frames < 2``, ``query_frame`` out of range, ``chunk_len < 2`` or an unknown ``plan``.
    """
    if plan not in CHUNK_PLANS:
        raise ValueError(f"plan={plan!r}; allowed: {CHUNK_PLANS}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
        raise ValueError(f"num_frames={num_frames!r}; at least 2 frames are needed")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, (int, np.integer)) or chunk_len < 2:
        raise ValueError(f"chunk_len={chunk_len!r}; allowed: an int >= 2 (the query frame + at least one target)")
    if not 0 <= query_frame < num_frames:
        raise ValueError(f"query_frame={query_frame!r}; allowed: 0..{num_frames - 1}")
    targets = [f for f in range(num_frames) if f != query_frame]
    n, m = len(targets), int(chunk_len) - 1
    if n <= m:
        return [[int(query_frame)] + targets]
    if plan == "published":
        return _published_chunks(int(num_frames), int(query_frame), targets, m, interleave)
    step = max(1, n // m) if interleave else 1
    span = (m - 1) * step  # positions covered by a full window: s, s+step, ..., s+span
    covered = np.zeros(n, bool)
    chunks = []
    while not covered.all():
        p = int(np.argmax(~covered))
        if interleave:
            back = max(0, math.ceil((p + span - (n - 1)) / step))
            s = max(p - back * step, p % step)
            pos = list(range(s, min(s + span, n - 1) + 1, step))
        else:
            s = min(p, n - m)
            pos = list(range(s, s + m))
        covered[pos] = True
        chunks.append([int(query_frame)] + [targets[i] for i in pos])
    return chunks


# ----------------------------------------------------------------------------------------------- encoders
@torch.no_grad()
def vae_encode_frames(vae, frames: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                      batch_size: int = 4) -> torch.Tensor:
    """Encode every frame independently as a 1-frame video (the published ``frame_as_latent=True``).

    Args:
        vae: a diffusers video VAE whose ``encode`` takes ``[B, 3, F, H, W]`` in ``[-1, 1]``
            (``AutoencoderKLCogVideoX``, ``AutoencoderKLHunyuanVideo``, ``AutoencoderKLWan``).
        frames: ``float [T, 3, H, W]`` in ``[-1, 1]`` or ``uint8 [T, H, W, 3]`` (numpy or torch).
        sample: draw from the posterior (the published code) instead of taking its mean (default, deterministic).
        generator: for ``sample=True``.
        batch_size: frames encoded at once (memory bound).

    Returns:
        ``[T, C, h, w]`` latents in the transformer's scale: multiplied by ``vae.config.scaling_factor`` (CogVideoX,
        HunyuanVideo), or normalised by ``latents_mean`` / ``latents_std`` where the config has them (Wan). The
        published code forgets the scaling for HunyuanVideo [B6]; here it is always applied.
    """
    if isinstance(frames, np.ndarray) or (isinstance(frames, torch.Tensor) and frames.dtype == torch.uint8):
        v = torch.as_tensor(np.asarray(frames) if isinstance(frames, np.ndarray) else frames)
        if v.dim() != 4 or v.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T, H, W, 3]; got {tuple(v.shape)}")
        frames = v.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be float [T, 3, H, W] in [-1, 1]; got {tuple(frames.shape)}")
    p = next(vae.parameters())
    out = []
    for i in range(0, frames.shape[0], batch_size):
        x = frames[i:i + batch_size].to(device=p.device, dtype=compute_dtype(vae)).unsqueeze(2)  # [b, 3, 1, H, W]
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        out.append(z[:, :, 0].float())  # [b, C, h, w]
    return scale_vae_latents(vae, torch.cat(out))


# ----------------------------------------------------------------------------------------------- the tracker
class DiffTracker:
    """Zero-shot point tracker from a video diffusion transformer's query/key (see the module docstring).

    Args:
        pipe_or_transformer: ``None`` (the embedded model, ``mini.load_default()``), a ``MiniVideoPipeline``, a
            diffusers ``CogVideoXPipeline`` (VAE + T5 are used) or a supported bare transformer.
        layers: block indices whose descriptors are matched (0-based; several are fused, see ``fuse``).
            Default 8: the best single layer of the embedded model on world videos (layer 11 second).
        step: denoising-loop index (or a sequence of them, fused) into a ``num_steps`` schedule; the timestep
            embedding used is ``scheduler.timesteps[step]`` (``-1``: the last step, t = 19 of 50, as published).
        num_steps: length of that schedule (50 as published for CogVideoX).
        noise: ``"none"`` -- the clean latent with the timestep embedding (the published default) -- or ``"add"``
            -- ``scheduler.add_noise(x0, eps, t)`` with ``eps`` drawn from a generator seeded by ``noise_seed``.
            Default chosen by measurement on train-split world videos (``scripts/calibrate_occlusion.py``).
        noise_seed: seed of that noise.
        chunk_len: frames per transformer call (query frame + ``chunk_len - 1`` targets), see :func:`plan_chunks`.
        interleave: interleaved chunks (the published setting) or consecutive blocks.
        chunk_plan: ``"difftrack"`` (default: full windows, fewest chunks) or ``"published"`` (the published loop,
            :func:`plan_chunks`; the same chunks for ``T = 13, 25, 50, 250``, more and shorter ones e.g. for 30).
        tau: softmax temperature: ``None``/``"dim"`` = sqrt(head_dim) (default), ``"heads"`` = sqrt(num_heads)
            (reproduces [B2]) or a number.
        bidirectional: average the forward and backward softmax (the paper's cost).
        refine: ``"softargmax"`` (default), ``"argmax"`` or ``"paper"`` (argmax + bilinear match-map sampling).
        radius: soft-argmax window radius in tokens.
        fuse: how several (layer, step) descriptors combine: ``"mean"`` of their costs (default) or ``"concat"``
            (the published channel concatenation = sum of logits per head; QK only).
        occlusion: ``"cycle"``, ``"confidence"``, ``"cycle+confidence"`` (both must pass) or ``"none"`` (always
            visible, as published).
        cycle_threshold: largest cycle error, tokens, of a visible point (default 1.0; 2.0 with
            ``pixel_refine="ncc"``).
        confidence_threshold: smallest cost peak of a visible point.
        prompt: text for the transformer (``""``: the unconditional-looking empty prompt, used as the cond branch
            of a batch of 1; there is no CFG pass).
        encoder_hidden_states: ``[1, L, D]`` text embeddings to use instead of encoding ``prompt`` (required for a
            bare transformer that is not the embedded layout).
        transformer_kwargs: extra keyword arguments of every transformer call (e.g. HunyuanVideo's
            ``pooled_projections``, ``encoder_attention_mask``, ``guidance``).
        encode: ``video uint8 [T, H, W, 3] -> latents [T, C, h, w]`` (or ``[1, T, C, h, w]``) per frame. Default:
            the embedded model's patching (``mini.video_uint8_to_latents``) for a 12-channel CogVideoX layout,
            :func:`vae_encode_frames` with the pipeline's VAE otherwise.
        token_stride: pixels per token side; inferred for the embedded layout (4) and for VAE pipelines
            (VAE factor x patch size), needed with a custom ``encode`` on other layouts.
        scheduler: supplies ``timesteps`` and ``add_noise``; default the pipeline's, else CogVideoX-2B's
            ``CogVideoXDDIMScheduler`` configuration.
        feature_tau: cosine-similarity temperature of :class:`FeatureTracker`.
        pixel_refine: ``None`` (pure DiffTrack, default) or ``"ncc"``: **our extension, not the paper's** -- refine
            each match to sub-pixel precision by normalised cross-correlation of the query's ``ncc_patch``-pixel
            patch (on frames upsampled ``ncc_upsample`` times) in a window of one token plus one pixel around the
            DiffTrack estimate (the transformer supplies the coarse, drift-free correspondence, the pixels the last
            fraction of a token).
        ncc_patch, ncc_upsample: template side (upsampled pixels) and upsampling factor of that refinement.
        ncc_threshold: with ``pixel_refine="ncc"``, a visible point must also reach this NCC peak (``None``: no
            test).
        device, dtype: where / in which dtype the transformer runs (default: where it is; ``dtype`` as
            :func:`difftrack.checks.check_dtype`: ``"bf16"``, ``"float16"``, ``torch.float32`` ...). The caller's
            model is never modified: when either differs from the model's own, the tracker runs on a private copy of the
            transformer (``copy.deepcopy(...).to(device, dtype)``; one extra copy of the weights in memory). The
            text encoder and VAE of a pipeline stay where they are; their outputs are cast.
        work_size: the frame size the tracker works at (see the module docstring): ``"model"`` (default) the
            model's own frame size (:meth:`resolve_work_size`; the video is resized to it and the tracks mapped back
            to the caller's pixels), ``"input"`` the caller's size (must be divisible by the token stride), or
            ``(height, width)``.
        heads: match with the cost averaged over these attention heads of each layer only (``None``: every head,
            the paper's head average); e.g. the best single head measured by ``scripts/head_study.py``.
        max_cost_bytes: the largest estimated memory of the cost matrices held at once
            (:meth:`estimate_cost_bytes`); a larger working size raises ``ValueError`` naming it before any forward
            (default :data:`DEFAULT_MAX_COST_BYTES`, 4 GiB).
        expert: on a multi-expert pipeline (Wan 2.2 A14B), the transformer that computes the descriptors:
            ``None`` (default) the one the pipeline itself calls at each chosen timestep (``transformer`` at
            ``t >= boundary_ratio * num_train_timesteps``, ``transformer_2`` below; :attr:`step_experts`), or a
            name (``"transformer"``, ``"transformer_2"``) for every timestep. One-transformer pipelines and bare
            transformers have the one expert ``"transformer"``.

    Calibration (``scripts/calibrate_occlusion.py``, train-split world videos only): see the module constants
    ``DEFAULT_OCCLUSION``, ``DEFAULT_CYCLE_THRESHOLD``, ``DEFAULT_CONFIDENCE_THRESHOLD``, ``DEFAULT_NOISE``.
    """

    descriptor = "qk"

    def __init__(self, pipe_or_transformer=None, layers: int | Sequence[int] = (8,), step: int | Sequence[int] = -1,
                 num_steps: int = 50, noise: str | None = None, noise_seed: int = 0, chunk_len: int = 13,
                 interleave: bool = True, tau: float | str | None = None, bidirectional: bool = True,
                 refine: str = DEFAULT_REFINE, radius: int = 1, fuse: str = "mean",
                 occlusion: str = DEFAULT_OCCLUSION, cycle_threshold: float | None = None,
                 confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD, prompt: str = "",
                 encoder_hidden_states: torch.Tensor | None = None, transformer_kwargs: dict | None = None,
                 encode: Callable[[np.ndarray], torch.Tensor] | None = None, token_stride: int | None = None,
                 scheduler=None, feature_tau: float = 0.05, pixel_refine: str | None = None,
                 ncc_patch: int = 21, ncc_upsample: int = 4, ncc_threshold: float | None = DEFAULT_NCC_THRESHOLD,
                 device=None, dtype: torch.dtype | None = None, work_size: str | tuple[int, int] = "model",
                 max_cost_bytes: int = DEFAULT_MAX_COST_BYTES, heads: Sequence[int] | None = None,
                 expert: str | None = None, chunk_plan: str = "difftrack"):
        if pipe_or_transformer is None:
            from .mini import load_default

            pipe_or_transformer = load_default()
        self.pipe = pipe_or_transformer
        self.transformer = resolve_transformer(pipe_or_transformer)
        self.adapter = adapter_for(self.transformer)
        self._experts = experts(pipe_or_transformer)
        if expert is not None and (not isinstance(expert, str) or expert not in self._experts.names):
            raise ValueError(f"expert={expert!r}; allowed: None (the pipeline's choice at each timestep) or one of "
                             f"{list(self._experts.names)}")
        self.expert = expert
        if not self.adapter.trackable:
            allowed = sorted({a.name for a in adapters() if a.trackable})
            raise ValueError(f"backbone {self.adapter.name!r} is not supported for tracking; allowed: "
                             f"{', '.join(allowed)} layouts")
        n_blocks = min(len(adapter_for(m).blocks(m)) for m in self._experts.models.values())
        self.layers = sorted(set(_check_index_list("layers", layers, f"block indices in 0..{n_blocks - 1}")))
        if any(not 0 <= l < n_blocks for l in self.layers):
            raise ValueError(f"layers={layers!r}; allowed: block indices in 0..{n_blocks - 1}")
        if heads is not None and self.descriptor != "qk":
            raise ValueError(f"heads={heads!r}: head selection applies to query-key matching only; allowed: None")
        self.heads = check_heads(heads, attention_heads(self.transformer, self.layers))
        self._tau_layer = None  # the layers' temperature when matching a head subset
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r}; allowed: an int >= 1 (the length of the denoising schedule)")
        steps = _check_index_list("step", step, f"denoising-loop indices in -{num_steps}..{num_steps - 1}")
        if any(not -num_steps <= s < num_steps for s in steps):
            raise ValueError(f"step={step!r}; allowed: indices in -{num_steps}..{num_steps - 1} of a {num_steps}-step "
                             f"schedule")
        self.steps = sorted({int(s) % num_steps for s in steps})
        self.num_steps = int(num_steps)
        noise = DEFAULT_NOISE if noise is None else noise
        if noise not in NOISE:
            raise ValueError(f"noise={noise!r}; allowed: {NOISE}")
        if refine not in REFINE_ALL:
            raise ValueError(f"refine={refine!r}; allowed: {REFINE_ALL}")
        if occlusion not in OCCLUSION:
            raise ValueError(f"occlusion={occlusion!r}; allowed: {OCCLUSION}")
        if fuse not in FUSE:
            raise ValueError(f"fuse={fuse!r}; allowed: {FUSE}")
        if fuse == "concat" and self.descriptor != "qk":
            raise ValueError("fuse='concat' concatenates query/key channels; allowed for features: 'mean'")
        if isinstance(chunk_len, bool) or not isinstance(chunk_len, (int, np.integer)) or chunk_len < 2:
            raise ValueError(f"chunk_len={chunk_len!r}; allowed: an int >= 2")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"radius={radius!r}; allowed: an int >= 0")
        self.noise, self.noise_seed = noise, int(noise_seed)
        self.chunk_len, self.interleave = int(chunk_len), bool(interleave)
        if chunk_plan not in CHUNK_PLANS:
            raise ValueError(f"chunk_plan={chunk_plan!r}; allowed: {CHUNK_PLANS}")
        self.chunk_plan = chunk_plan
        self.tau, self.bidirectional, self.refine, self.radius, self.fuse = tau, bidirectional, refine, radius, fuse
        self.occlusion = occlusion
        if cycle_threshold is None:
            cycle_threshold = DEFAULT_NCC_CYCLE_THRESHOLD if pixel_refine == "ncc" else DEFAULT_CYCLE_THRESHOLD
        self.cycle_threshold = _check_number("cycle_threshold", cycle_threshold, 0.0, math.inf)  # tokens
        self.confidence_threshold = _check_number("confidence_threshold", confidence_threshold, 0.0, 1.0)
        self.feature_tau = _check_number("feature_tau", feature_tau, 0.0, math.inf, lo_open=True)
        if isinstance(tau, numbers.Real) and not isinstance(tau, bool):
            _check_number("tau", tau, 0.0, math.inf, lo_open=True)
        if pixel_refine not in (None, "ncc"):
            raise ValueError(f"pixel_refine={pixel_refine!r}; allowed: None or 'ncc'")
        if isinstance(ncc_patch, bool) or not isinstance(ncc_patch, (int, np.integer)) or ncc_patch < 3 or \
                ncc_patch % 2 == 0:
            raise ValueError(f"ncc_patch={ncc_patch!r}; allowed: an odd int >= 3")
        if isinstance(ncc_upsample, bool) or not isinstance(ncc_upsample, (int, np.integer)) or ncc_upsample < 1:
            raise ValueError(f"ncc_upsample={ncc_upsample!r}; allowed: an int >= 1")
        self.pixel_refine, self.ncc_patch, self.ncc_upsample = pixel_refine, int(ncc_patch), int(ncc_upsample)
        self.ncc_threshold = _check_number("ncc_threshold", ncc_threshold, -1.0, 1.0, allow_none=True)
        self.work_size = self._check_work_size(work_size)
        if (isinstance(max_cost_bytes, bool) or not isinstance(max_cost_bytes, numbers.Real)
                or not max_cost_bytes > 0):
            raise ValueError(f"max_cost_bytes={max_cost_bytes!r}; allowed: a positive number of bytes")
        self.max_cost_bytes = max_cost_bytes
        self.prompt = prompt
        self.transformer_kwargs = dict(transformer_kwargs or {})
        p0 = next(self.transformer.parameters())
        self.device = torch.device(device) if device is not None else p0.device
        self.dtype = compute_dtype(self.transformer) if dtype is None else _checks.as_torch_dtype(dtype)
        self._ehs_cache: dict[str, torch.Tensor] = {}
        self._cond_extra: dict[str, dict] = {}  # extra conditional kwargs per prompt (HunyuanVideo)
        if encoder_hidden_states is not None:
            self._ehs_cache[prompt] = encoder_hidden_states
        self._fixed_ehs = encoder_hidden_states
        name = type(self.pipe).__name__
        # the pipeline's family (None for a bare transformer): schedule, noising, timestep argument, VAE factor
        self.family = family_of_class(name) if name in pipeline_families() else None
        self._setup_encoder(encode, token_stride)
        own_scheduler = scheduler is None
        if scheduler is None:
            scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None:
            from diffusers import CogVideoXDDIMScheduler

            from .mini import scheduler_config

            scheduler = CogVideoXDDIMScheduler(**scheduler_config())
        self.scheduler = scheduler
        if own_scheduler and self.family is not None:  # the pipeline's own schedule (Mochi: its sigma schedule)
            self.family.set_timesteps(scheduler, self.num_steps, None)
        else:
            scheduler.set_timesteps(self.num_steps)
        self.timesteps = [scheduler.timesteps[s].clone() for s in self.steps]
        # the expert of each timestep: the pipeline's rule (Wan 2.2: transformer / transformer_2), or the one named
        self.step_experts = [self.expert or self._experts.at(t) for t in self.timesteps]
        self.transformers: dict[str, torch.nn.Module] = {}
        for name in dict.fromkeys(self.step_experts):
            m = self._experts.models[name]
            p = next(m.parameters())
            if self.device != p.device or self.dtype != compute_dtype(m):
                # never convert the caller's model in place: work on a private copy
                m = copy.deepcopy(m).to(device=self.device, dtype=self.dtype)
                m.eval()
            self.transformers[name] = m
        self.transformer = self.transformers[self.step_experts[0]]

    # ------------------------------------------------------------------ setup helpers
    def _setup_encoder(self, encode, token_stride):
        cfg = self.transformer.config
        pt, p = patch_sizes(self.transformer)
        if pt != 1:
            raise ValueError(f"temporal patch size {pt}: per-frame tracking needs one latent frame per token frame "
                             f"(CogVideoX 1.0 / Wan / HunyuanVideo layouts; not CogVideoX 1.5)")
        self.patch = p
        vae = getattr(self.pipe, "vae", None)
        pixels = frame_encoder(self.transformer, vae)  # the embedded model's patched pixels (no VAE)
        if encode is not None:
            self.encode = encode
            self.token_stride = token_stride
        elif pixels is not None:
            self.encode, self.token_stride = pixels
        elif vae is not None:
            self.encode = lambda video: vae_encode_frames(vae, video)
            factor = self.family.compression(self.pipe)[1] if self.family is not None else (
                getattr(self.pipe, "vae_scale_factor_spatial", None) or getattr(self.pipe, "vae_scale_factor", None)
                or 2 ** (len(vae.config.block_out_channels) - 1))
            self.token_stride = int(factor) * p
        else:
            raise ValueError(f"cannot encode frames for {type(self.transformer).__name__} with "
                             f"{cfg.in_channels} input channels and no VAE; pass encode= (video uint8 -> latents "
                             f"[T, C, h, w]) and token_stride=")
        if token_stride is not None:
            self.token_stride = int(token_stride)

    def text_embeddings(self, prompt: str | None = None) -> torch.Tensor:
        """``[1, L, D]`` conditional text embeddings of ``prompt`` (cached)."""
        prompt = self.prompt if prompt is None else prompt
        if self._fixed_ehs is not None:
            return self._fixed_ehs.to(self.device, self.dtype)
        if prompt not in self._ehs_cache:
            if type(self.pipe).__name__ in pipeline_families():
                from .runners import VideoRunner

                c = VideoRunner(self.pipe).cond(prompt)  # HunyuanVideo: + pooled projections, mask, guidance
                e = c.pop("encoder_hidden_states")
                self._cond_extra[prompt] = c
            else:
                raise ValueError(f"no text encoder for {type(self.pipe).__name__}; pass encoder_hidden_states= "
                                 f"([1, L, D] text embeddings) to DiffTracker")
            self._ehs_cache[prompt] = e.detach()
        return self._ehs_cache[prompt].to(self.device, self.dtype)

    def _latents(self, video: np.ndarray) -> torch.Tensor:
        z = self.encode(video)
        z = torch.as_tensor(z)
        if z.dim() == 5 and z.shape[0] == 1:
            z = z[0]
        if z.dim() != 4 or z.shape[0] != video.shape[0]:
            raise ValueError(f"encode returned latents of shape {tuple(z.shape)}; expected [T={video.shape[0]}, C, h, "
                             f"w] (one latent frame per video frame)")
        return z.to(self.device, torch.float32)

    def _check_size(self, H: int, W: int):
        s = self.token_stride
        if s is None:
            return
        if H % s or W % s:
            raise ValueError(f"frame size {H}x{W} (HxW) is not a multiple of this backbone's token stride {s} px; "
                             f"allowed: heights and widths divisible by {s} (e.g. resize to "
                             f"{max(s, round(H / s) * s)}x{max(s, round(W / s) * s)}), or work_size='model' "
                             f"(any video size, resized to the model's)")

    @staticmethod
    def _check_work_size(work_size):
        if isinstance(work_size, str):
            if work_size not in WORK_SIZES:
                raise ValueError(f"work_size={work_size!r}; allowed: {WORK_SIZES} or (height, width)")
            return work_size
        try:
            h, w = work_size
        except (TypeError, ValueError):
            raise ValueError(f"work_size={work_size!r}; allowed: {WORK_SIZES} or (height, width)") from None
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in (h, w)):
            raise ValueError(f"work_size={work_size!r}; allowed: {WORK_SIZES} or (height, width) positive ints")
        return int(h), int(w)

    def model_frame_size(self) -> tuple[int, int] | None:
        """``(height, width)`` the model's weights are made for: the embedded model's 64x64, or a CogVideoX
        transformer's ``sample_height x sample_width`` latent size in pixels (480x720 for CogVideoX-2B/5B); else the
        pipeline's default size (:meth:`difftrack.runners.VideoRunner.default_size`: Wan 480x832, HunyuanVideo
        720x1280); ``None`` for a bare transformer without either."""
        fixed = self._weights_frame_size()
        if fixed is not None:
            return fixed
        from .runners import PIPELINES, VideoRunner

        if type(self.pipe).__name__ in PIPELINES:
            return tuple(int(v) for v in VideoRunner(self.pipe).default_size()[1:])
        return None

    def _weights_frame_size(self) -> tuple[int, int] | None:
        """The frame size fixed by the weights' config (embedded, CogVideoX), else ``None`` (Wan, HunyuanVideo:
        RoPE positions, no trained size in the config)."""
        tokens = self.adapter.trained_tokens(self.transformer) if self.adapter.trained_tokens else None
        if tokens is None or not self.token_stride:
            return None
        return tokens[0] * self.token_stride, tokens[1] * self.token_stride

    def resolve_work_size(self, num_frames: int, height: int, width: int, query_frames=(0,)) -> tuple[int, int]:
        """The ``(h, w)`` a ``height x width`` video is tracked at under this tracker's ``work_size``.

        ``"model"``: the size the weights are made for when their config fixes one (embedded 64x64, CogVideoX
        ``sample_height x sample_width``); for backbones whose config fixes none (Wan, HunyuanVideo: RoPE, any size
        works) the caller's size when it is a multiple of the token stride and fits ``max_cost_bytes``, else the
        pipeline's default size."""
        if self.work_size == "input":
            return int(height), int(width)
        if self.work_size != "model":
            return self.work_size
        fixed = self._weights_frame_size()
        if fixed is not None:
            return int(fixed[0]), int(fixed[1])
        s = self.token_stride
        if s and height % s == 0 and width % s == 0 and \
                self.estimate_cost_bytes(num_frames, height, width, query_frames) <= self.max_cost_bytes:
            return int(height), int(width)
        size = self.model_frame_size()
        if size is None:
            raise ValueError(f"the frame size of a bare {type(self.transformer).__name__} is unknown and "
                             f"{height}x{width} cannot be used as is; pass work_size='input' or work_size=(height, "
                             f"width) (multiples of the token stride {s})")
        return size

    def _max_pending(self, num_frames: int, query_frames) -> int:
        """Most target-frame costs held at once while the chunk plans of ``query_frames`` run."""
        most = 1
        for tq in set(int(f) for f in query_frames):
            plan = plan_chunks(num_frames, tq, self.chunk_len, self.interleave, self.chunk_plan)
            left = {f: sum(f in c[1:] for c in plan) for f in range(num_frames) if f != tq}
            held = set()
            for chunk in plan:
                held |= set(chunk[1:])
                most = max(most, len(held))
                for f in chunk[1:]:
                    left[f] -= 1
                    if left[f] == 0:
                        held.discard(f)
        return most

    def estimate_cost_bytes(self, num_frames: int, height: int, width: int, query_frames=(0,)) -> int:
        """Estimated peak memory (bytes) of the cost matrices when tracking at ``height x width`` (working size).

        ``M = (height / stride) (width / stride)`` tokens a frame; each ``[M, M]`` float32 cost is ``4 M^2`` bytes.
        Held at once: the costs of the frames whose chunks are not all done (:func:`plan_chunks`), plus the
        per-head softmax temporaries of :func:`difftrack.matching.qk_cost` (3 per head of a chunk of at most 8),
        plus 3 for fusion and the transposed cost of the cycle check. An estimate of the matching only; the
        transformer forward's own memory is not included."""
        s = self.token_stride or 1
        M = (int(height) // s) * (int(width) // s)
        if self.descriptor == "qk":
            heads = int(getattr(self.transformer.config, "num_attention_heads", 1) or 1)
            temps = 3 * min(heads, 8) + 3
        else:
            temps = 4
        return 4 * M * M * (self._max_pending(num_frames, query_frames) + temps)

    def _check_memory(self, num_frames: int, height: int, width: int, query_frames, input_size) -> None:
        need = self.estimate_cost_bytes(num_frames, height, width, query_frames)
        if need > self.max_cost_bytes:
            model = self.model_frame_size()
            hint = (f"work_size='model' ({model[0]}x{model[1]}, the default)" if model is not None and
                    tuple(model) != (height, width) else "a smaller work_size=(height, width)")
            raise ValueError(
                f"tracking at {height}x{width} px (video {input_size[0]}x{input_size[1]}, {num_frames} frames, "
                f"{(height // self.token_stride) * (width // self.token_stride)} tokens a frame) needs about "
                f"{need / 2**30:.1f} GiB for its cost matrices, more than max_cost_bytes="
                f"{self.max_cost_bytes / 2**30:.1f} GiB; allowed: use {hint}, or raise max_cost_bytes")

    def transformer_at(self, t) -> torch.nn.Module:
        """The transformer that computes the descriptors at timestep ``t``: the expert named by ``expert``, else the
        one the pipeline runs at ``t`` (Wan 2.2: ``transformer`` at or above the boundary, ``transformer_2`` below);
        a private copy where ``device`` / ``dtype`` differ from the model's."""
        return self.transformers[self.expert or self._experts.at(t)]

    # ------------------------------------------------------------------ descriptors of one chunk
    def _forward_chunk(self, x: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor, extra: dict,
                       clean: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Run the transformer of timestep ``t`` (:meth:`transformer_at`) on chunk latents ``x [F, C, h, w]`` up to
        ``max(layers)``; returns per layer
        ``(q, k) [H, F, M, D]`` each, or features ``[F, M, C]``. ``extra``: conditional keyword arguments besides the
        text embeddings (HunyuanVideo's pooled projections, mask, guidance)."""
        model = self.transformer_at(t)
        F_, C, h, w = x.shape
        rows, cols = h // self.patch, w // self.patch
        hs = self.adapter.latent_input(x)
        if self.family is not None and clean is not None:  # an image-to-video model's clean-frame conditioning
            hs = self.family.model_input(self.pipe, hs, self.adapter.latent_input(clean))
        hs = hs.to(self.dtype)
        tt = (t.reshape(1) if self.family is None else self.family.timestep_input(self.pipe, t, hs)).to(self.device)
        kw = dict(hidden_states=hs, encoder_hidden_states=ehs, timestep=tt,
                  return_dict=False, **self.adapter.rope_kwargs(model, self.pipe, F_, rows, cols,
                                                                self.device))
        kw.update({k: v.to(self.device, self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                   else v for k, v in extra.items()})
        kw.update(self.transformer_kwargs)
        what = ("q", "k") if self.descriptor == "qk" else ("features",)
        training = model.training  # eval mode for the forward only: the caller's flag is left as it was
        model.eval()
        try:
            with capture(model, layers=self.layers, what=what, cfg=False, dtype=torch.float32) as cap:
                run_until(model, max(self.layers), **kw)
        finally:
            model.train(training)
        out = {}
        for l in self.layers:
            if self.descriptor == "qk":
                q, k = cap.q(l)[0], cap.k(l)[0]  # [H, F, rows, cols, D]
                H, Fq, r, c, D = q.shape
                if self.heads is not None:  # the chosen heads only, at the layer's own temperature
                    q, k, self._tau_layer = select_heads(q, k, self.heads, self.tau)
                    H = q.shape[0]
                out[l] = (q.reshape(H, Fq, r * c, D), k.reshape(H, Fq, r * c, D))
            else:
                f = cap.features(l)[0]  # [F, rows, cols, C]
                out[l] = f.reshape(f.shape[0], -1, f.shape[-1])
        cap.clear()
        return out, (rows, cols)

    def _chunk_costs(self, desc: dict, j: int) -> torch.Tensor:
        """Fused cost ``[M, M]`` between chunk frame 0 (the query frame) and chunk frame ``j``."""
        if self.descriptor == "features":
            return sum(feature_cost(f[0], f[j], self.feature_tau, self.bidirectional) for f in desc.values()) / len(desc)
        tau = self.tau if self.heads is None else self._tau_layer
        if self.fuse == "concat":
            q = torch.cat([desc[l][0] for l in self.layers], -1)
            k = torch.cat([desc[l][1] for l in self.layers], -1)
            return qk_cost(q[:, 0], k[:, 0], q[:, j], k[:, j], tau, self.bidirectional)
        return sum(qk_cost(q[:, 0], k[:, 0], q[:, j], k[:, j], tau, self.bidirectional)
                   for q, k in desc.values()) / len(desc)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def __call__(self, video, queries, prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Track ``queries [N, 3] (t, x, y)`` in ``video uint8 [T, H, W, 3]``.

        Returns:
            ``(tracks float32 [N, T, 2] pixels (x, y), visible bool [N, T])``; at its query frame a point is the
            query itself and visible.
        """
        out = self.track(video, queries, prompt=prompt)
        return out["tracks"], out["visible"]

    @torch.no_grad()
    def track(self, video, queries, prompt: str | None = None) -> dict:
        """As :meth:`__call__`, returning a dict with ``tracks``, ``visible`` and the raw occlusion scores
        ``cycle_error [N, T]`` (tokens of the working grid; 0 at the query frame) and ``confidence [N, T]`` (cost
        peak; ``inf`` at the query frame), and ``work_size`` ``(h, w)``, the frame size tracked at. Tracks are in the
        caller's pixels whatever the working size."""
        video = check_video(video)
        T, H0, W0, _ = video.shape
        q0, qframes = check_queries(queries, T, H0, W0)
        H, W = self.resolve_work_size(T, H0, W0, qframes)
        self._check_size(H, W)
        if self.token_stride is not None:
            self._check_memory(T, H, W, qframes, (H0, W0))
        q = q0
        if (H, W) != (H0, W0):
            from .tapvid import rescale_queries, resize_video

            video = resize_video(video, (H, W))
            q = rescale_queries(q0, (H0, W0), (H, W))
        z0 = self._latents(video)
        if self.token_stride is None:  # custom encoder without a declared stride: infer from the latent size
            s = H / (z0.shape[2] // self.patch)
            if s != int(s) or W / (z0.shape[3] // self.patch) != s:
                raise ValueError(f"frame size {H}x{W} does not map to a whole token grid with latents "
                                 f"{tuple(z0.shape[2:])} and patch {self.patch}; pass token_stride=")
            self.token_stride = int(s)
            self._check_memory(T, H, W, qframes, (H0, W0))
        stride = self.token_stride
        ehs = self.text_embeddings(prompt)
        extra = self._cond_extra.get(self.prompt if prompt is None else prompt, {})
        gen = torch.Generator("cpu").manual_seed(self.noise_seed)
        inputs = []
        for t in self.timesteps:
            if self.noise == "add":
                eps = torch.randn(z0.shape, generator=gen).to(self.device)
                x = (scheduler_add_noise(self.scheduler, z0, eps, t) if self.family is None
                     else self.family.add_noise(self.scheduler, z0, eps, t))
            else:
                x = z0
            inputs.append((x, t))

        N = q.shape[0]
        tracks = np.zeros((N, T, 2), np.float32)
        cyc = np.zeros((N, T), np.float32)
        conf = np.full((N, T), np.inf, np.float32)
        pts_px_all = torch.from_numpy(q[:, 1:]).to(self.device)
        for tq in sorted(set(qframes.tolist())):
            idx = np.flatnonzero(qframes == tq)
            pts_tok = px_to_tokens(pts_px_all[idx], stride)
            tracks[idx, tq] = q[idx, 1:]
            cyc[idx, tq] = 0.0
            plan = plan_chunks(T, tq, self.chunk_len, self.interleave, self.chunk_plan)
            expected = {f: sum(f in c[1:] for c in plan) for f in range(T) if f != tq}
            acc: dict[int, torch.Tensor] = {}
            seen = {f: 0 for f in expected}
            for chunk in plan:
                for x, t in inputs:
                    desc, (rows, cols) = self._forward_chunk(x[chunk], t, ehs, extra, clean=z0[chunk])
                    for j, f in enumerate(chunk[1:], start=1):
                        c = self._chunk_costs(desc, j)
                        acc[f] = c if f not in acc else acc[f] + c
                    del desc
                for f in chunk[1:]:
                    seen[f] += 1
                    if seen[f] == expected[f]:  # every chunk holding f is done: finalise and free its cost
                        cost = acc.pop(f) / (expected[f] * len(inputs))
                        pos, pk, ce = self._match(cost, rows, cols, pts_tok)
                        tracks[idx, f] = tokens_to_px(pos, stride).cpu().numpy()
                        conf[idx, f] = pk.cpu().numpy()
                        cyc[idx, f] = ce.cpu().numpy()
        out = {"cycle_error": cyc, "confidence": conf}
        if self.pixel_refine == "ncc":
            out["coarse_tracks"] = tracks.copy()
            tracks, out["ncc"] = _ncc_refine(video, q, qframes, tracks, self.ncc_patch, self.ncc_upsample,
                                             stride * self.ncc_upsample + self.ncc_upsample)
        visible = self.decide_visible(cyc, conf, ncc=out.get("ncc"))
        visible[np.arange(N), qframes] = True
        if (H, W) != (H0, W0):  # back to the caller's pixels; the query frame holds the caller's query exactly
            from .tapvid import rescale_tracks

            tracks = rescale_tracks(tracks, (H, W), (H0, W0))
            tracks[np.arange(N), qframes] = q0[:, 1:]
            if "coarse_tracks" in out:
                out["coarse_tracks"] = rescale_tracks(out["coarse_tracks"], (H, W), (H0, W0))
        out.update(tracks=tracks, visible=visible, work_size=(H, W))
        return out

    def _match(self, cost: torch.Tensor, rows: int, cols: int, pts_tok: torch.Tensor):
        """Forward match, its confidence, and the cycle error (tokens) through the transposed cost."""
        pos, peak = _match(cost, rows, cols, pts_tok, self.refine, self.radius)
        back, _ = _match(cost.T.contiguous(), rows, cols, pos, self.refine, self.radius)
        return pos, peak, (back - pts_tok).norm(dim=-1)

    def decide_visible(self, cycle_error: np.ndarray, confidence: np.ndarray, occlusion: str | None = None,
                       cycle_threshold: float | None = None, confidence_threshold: float | None = None,
                       ncc: np.ndarray | None = None, ncc_threshold: float | None = None) -> np.ndarray:
        """Visibility from the raw scores (used by the calibration to sweep thresholds without re-running)."""
        occlusion = occlusion or self.occlusion
        if occlusion not in OCCLUSION:
            raise ValueError(f"occlusion={occlusion!r}; allowed: {OCCLUSION}")
        ct = self.cycle_threshold if cycle_threshold is None else _check_number("cycle_threshold", cycle_threshold,
                                                                                0.0, math.inf)
        pt = self.confidence_threshold if confidence_threshold is None else _check_number(
            "confidence_threshold", confidence_threshold, 0.0, 1.0)
        if ncc_threshold is not None:
            _check_number("ncc_threshold", ncc_threshold, -1.0, 1.0)
        vis = np.ones(cycle_error.shape, bool)
        if "cycle" in occlusion:
            vis &= cycle_error <= ct
        if "confidence" in occlusion:
            vis &= confidence >= pt
        nt = self.ncc_threshold if ncc_threshold is None else ncc_threshold
        if ncc is not None and nt is not None and occlusion != "none":
            vis &= ncc >= nt
        return vis

    def __repr__(self) -> str:
        ex = f", experts={self.step_experts}" if self._experts.several else ""
        return (f"{type(self).__name__}({type(self.transformer).__name__}{ex}, layers={self.layers}, "
                f"steps={self.steps}/{self.num_steps}, noise={self.noise!r}, tau={self.tau!r}, "
                f"occlusion={self.occlusion!r})")


def _match(cost: torch.Tensor, rows: int, cols: int, pts_tok: torch.Tensor, refine: str, radius: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[n, 2]`` (token units) and confidence ``[n]`` (the cost peak of the bilinear source row divided by
    the row's mass) of points ``pts_tok`` through ``cost [M_src, M_tgt]``."""
    if refine == "paper":
        return match_from_cost(cost, rows, cols, pts_tok, refine, radius)
    if refine == "interp":  # match every source token, then interpolate the displacement field at the points
        pos_all, peak_all = refine_peak(cost, rows, cols, "softargmax", radius)
        peak_all = peak_all / cost.sum(-1).clamp_min(1e-12)
        blended = _bilinear_rows(torch.cat([pos_all, peak_all[:, None]], 1), rows, cols, pts_tok)
        return blended[:, :2], blended[:, 2]
    row = _bilinear_rows(cost, rows, cols, pts_tok)
    pos, peak = refine_peak(row, rows, cols, refine, radius)
    return pos, peak / row.sum(-1).clamp_min(1e-12)


def _parabola(left: float, centre: float, right: float) -> float:
    denom = left - 2.0 * centre + right
    if not np.isfinite(denom) or denom >= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))


def _ncc_refine(video: np.ndarray, q: np.ndarray, qframes: np.ndarray, tracks: np.ndarray, patch: int,
                upsample: int, search: int) -> tuple[np.ndarray, np.ndarray]:
    """Local sub-pixel refinement of coarse tracks by NCC template matching (see ``pixel_refine``).

    Frames are converted to gray and enlarged ``upsample`` times (bilinear); the template is the ``patch``-square
    around the query (sub-pixel, ``cv2.getRectSubPix``); each target frame is searched within ``+-search``
    upsampled pixels of the coarse estimate; the NCC peak is refined by a parabola fit. Returns the refined tracks
    (pixels, edge convention) and the NCC peak ``[N, T]`` (1 at the query frame; -1 for a flat template).
    """
    import cv2

    T, H, W, _ = video.shape
    s = int(upsample)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video]
    big = [cv2.resize(g, (W * s, H * s), interpolation=cv2.INTER_LINEAR).astype(np.float32) if s > 1
           else g.astype(np.float32) for g in gray]
    half = patch // 2
    pad = half + search + 2
    padded = [cv2.copyMakeBorder(b, pad, pad, pad, pad, cv2.BORDER_REPLICATE) for b in big]
    out = tracks.copy()
    ncc = np.ones(tracks.shape[:2], np.float32)
    for i in range(q.shape[0]):
        t0 = int(qframes[i])
        # edge-convention pixels -> OpenCV centre-at-integer pixels of the upsampled frame
        tmpl = cv2.getRectSubPix(big[t0], (patch, patch), (float(q[i, 1]) * s - 0.5, float(q[i, 2]) * s - 0.5))
        if float(tmpl.std()) < 1e-6:
            ncc[i, np.arange(T) != t0] = -1.0
            continue
        for k in range(T):
            if k == t0:
                continue
            cx = int(np.clip(np.round(tracks[i, k, 0] * s - 0.5), 0, W * s - 1))
            cy = int(np.clip(np.round(tracks[i, k, 1] * s - 0.5), 0, H * s - 1))
            y0, x0 = cy - search - half + pad, cx - search - half + pad
            region = padded[k][y0:y0 + 2 * search + patch, x0:x0 + 2 * search + patch]
            score = np.nan_to_num(cv2.matchTemplate(region, tmpl, cv2.TM_CCOEFF_NORMED), nan=-1.0)
            r, c = np.unravel_index(int(np.argmax(score)), score.shape)
            dx = _parabola(score[r, c - 1], score[r, c], score[r, c + 1]) if 0 < c < score.shape[1] - 1 else 0.0
            dy = _parabola(score[r - 1, c], score[r, c], score[r + 1, c]) if 0 < r < score.shape[0] - 1 else 0.0
            out[i, k, 0] = (cx - search + c + dx + 0.5) / s
            out[i, k, 1] = (cy - search + r + dy + 0.5) / s
            ncc[i, k] = score[r, c]
    return out, ncc


class FeatureTracker(DiffTracker):
    """:class:`DiffTracker` on block-output features of the same model (cosine similarity / ``feature_tau``),
    same chunking, matching and occlusion logic. ``fuse`` must be ``"mean"``."""

    descriptor = "features"

    def __init__(self, pipe_or_transformer=None, layers: int | Sequence[int] = (5,), feature_tau: float = 0.05,
                 occlusion: str = "cycle", cycle_threshold: float = 1.0, **kwargs):
        # layer 5 / tau 0.05: the best block-feature setting on 32 train-split world videos (calibrate_occlusion.py
        # select stage, soft-argmax: delta_avg 0.285 vs 0.274 at layer 8, tau 0.1 always worse); cycle <= 1 token:
        # train AJ 0.329 (best 0.331 at 0.875 tokens, OA 0.826 vs 0.815; no occlusion: AJ 0.302).
        super().__init__(pipe_or_transformer, layers=layers, feature_tau=feature_tau, occlusion=occlusion,
                         cycle_threshold=cycle_threshold, **kwargs)


