"""Cross-Attention Guidance (CAG): guide sampling away from a model whose selected layers cannot attend across frames.

The paper's CAG is perturbed-attention guidance (PAG) with one specific perturbation: in the chosen blocks' joint
self-attention, each **video query attends only to the keys of its own latent frame and to the text tokens**
(text queries still attend to everything). The guided velocity is

    v = v_u + w_cfg (v_c - v_u) + s_cag (v_c - v_p)        (with CFG)
    v = v_c + s_cag (v_c - v_p)                           (without CFG)

with ``v_p`` the conditional prediction of the perturbed model. Two perturbations are offered, each by name:

* ``"renormalized"`` (**default**): softmax over the allowed keys only, i.e. SDPA with the block mask. Each video
  query's weights sum to 1; this is what a block mask means and what the published non-CFG processor does.
* ``"zero_after_softmax"``: the published CFG-path behaviour (defect [B20] in ``difftrack_method.md`` section 8):
  full softmax over all keys, then cross-frame probabilities set to zero without renormalising, so a video query's
  weights sum to < 1. The official default run (CFG 6) uses this one; pick it to reproduce their numbers.

Neither builds an ``N x N`` mask. ``"renormalized"`` runs one SDPA call with the frames as an extra batch dimension
(queries of frame f against keys ``[text, frame f]``). ``"zero_after_softmax"`` uses the identity

    sum_{j allowed} exp(s_j - LSE_all) v_j = exp(LSE_allowed - LSE_all) * renormalized_output

and computes both log-sum-exps in query x key chunks (memory ``O(query_chunk x key_chunk)`` per head).

Batch slots. Under CFG the guided forward uses one batch of three slots ``[uncond, cond, perturbed-cond]`` (each of
size B); without CFG ``[cond, perturbed-cond]``. Only the perturbed slot goes through the new attention; the other
slots are handed to the **original processor unchanged**. Which slots are perturbed is held by a :class:`CAGState`
shared by all installed processors (default outside the guided samplers: one slot, perturbed, i.e. the forward is
the perturbed model).

Entry points:

* :class:`CAGConfig` -- layers, scale, variant, schedule, step window; ``to_dict`` / ``from_dict``.
* :func:`apply_cag` -- context manager installing the perturbed processors (restored in ``finally``).
* :func:`cag_combine` -- the guidance formula.
* :func:`generate_with_cag` -- the embedded :class:`~difftrack.mini.MiniVideoPipeline` loop with CAG.
* :func:`cag_hooks` / :func:`generate_with_cag_diffusers` -- CAG for an unmodified ``diffusers.CogVideoXPipeline``
  (forward hooks on its transformer expand the batch to three slots and fold the CAG term into the pipeline's own
  CFG combine).
"""
from __future__ import annotations

import inspect
import math
import numbers
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import checks as _checks
from .backbones import TokenGrid, adapter_for, adapters, experts, family_for, resolve_transformer
from .hooks import (Coverage, SDPAIntercept, check_attention_backend, check_diffusers_hooks, eager_compile,
                    processor_wrapper_class, set_processor, track_grid, unwrap_processor)

VARIANTS = ("renormalized", "zero_after_softmax")
CAG_BACKBONES = tuple(a.name for a in adapters() if a.cag_attention)  # ("cogvideox", "hunyuanvideo", "wan")
SCHEDULES = ("constant", "linear_decay")
PERTURBED = "perturbed attention (cond)"  # what CAG's completeness record (hooks.Coverage) names
QUERY_CHUNK = 1024  # video query rows per chunk in the "zero_after_softmax" log-sum-exp pass
# CAG scales accepted: 0 disables CAG; the paper uses 0.5 .. 2; negative values guide towards the perturbed model and
# very large ones blow the prediction up, so both are refused
CAG_SCALE_RANGE = _checks.CAG_SCALE_RANGE  # one rule for a constant scale and every step of a schedule
KEY_CHUNK = 4096  # keys per chunk in that pass; scores held at once: B x heads x QUERY_CHUNK x KEY_CHUNK fp32


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class CAGConfig:
    """What CAG perturbs and how strongly.

    Attributes:
        layers: transformer block indices (0-based) whose self-attention is perturbed (paper: 13, 17, 21 for
            CogVideoX-2B; 15, 17, 18 for 5B).
        scale: ``s_cag``, finite, in :data:`CAG_SCALE_RANGE` ``[0, 20]``; 0 disables the guidance (the sampler then
            computes exactly the unguided result).
        variant: ``"renormalized"`` (default; masked softmax) or ``"zero_after_softmax"`` (published CFG path).
        schedule: ``"constant"``; ``"linear_decay"`` (``scale`` at ``start_step`` falling linearly to 0 at
            ``stop_step``); or a callable ``step -> factor`` whose value multiplies ``scale`` (leave ``scale=1.0`` to
            make the callable the scale itself). The published ``pag_adaptive_scale`` ``s(t) = max(0, s - a(1000-t))``
            is a callable over the scheduler's timesteps.
        start_step, stop_step: CAG is active for denoising steps ``start_step <= i < stop_step`` (``None`` = to the
            end); the scale is 0 outside. Checked against the run's ``num_inference_steps`` when sampling
            (:meth:`check_steps`): a window outside the run raises instead of silently running without CAG.
    """

    layers: list[int]
    scale: float = 1.0
    variant: str = "renormalized"
    schedule: str | Callable[[int], float] = "constant"
    start_step: int = 0
    stop_step: int | None = None

    def __post_init__(self):
        def is_index(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple)):
            raise ValueError(f"layers={self.layers!r} ({type(self.layers).__name__}) must be a list of block indices, "
                             f"e.g. [13, 17, 21]")
        if not self.layers:
            raise ValueError("layers=[] is empty; give at least one block index, e.g. [13, 17, 21]")
        bad = [l for l in self.layers if not is_index(l) or l < 0]
        if bad:
            raise ValueError(f"layers {bad} are not non-negative ints (got {', '.join(type(l).__name__ for l in bad)}"
                             f"); allowed: block indices 0..num_blocks-1 as ints or numpy integers, not floats or "
                             f"bools")
        self.layers = [int(l) for l in self.layers]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={list(self.layers)} contains duplicates")
        self.scale = _checks.check_cag_scale(self.scale)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; allowed: {VARIANTS}")
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {SCHEDULES} or a callable step -> factor")
        if not is_index(self.start_step) or self.start_step < 0:
            raise ValueError(f"start_step={self.start_step!r} must be an int >= 0")
        self.start_step = int(self.start_step)
        if self.stop_step is not None and (not is_index(self.stop_step) or self.stop_step <= self.start_step):
            raise ValueError(f"stop_step={self.stop_step!r} must be None or an int > start_step={self.start_step}")
        self.stop_step = None if self.stop_step is None else int(self.stop_step)

    def check_steps(self, num_inference_steps: int) -> None:
        """Raise ``ValueError`` when the step window does not fit a run of ``num_inference_steps`` steps: allowed
        ``0 <= start_step < num_inference_steps`` and ``stop_step <= num_inference_steps`` (a window past the end
        would give exactly the unguided result without a word); or when a callable schedule gives, at any step of
        the run, a scale outside :data:`CAG_SCALE_RANGE` (NaN, negative, too large): every step's value is checked
        here, before the run, and again by :meth:`scale_at` when the step runs."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"num_inference_steps={n!r}; must be an int >= 1")
        if self.start_step >= n:
            raise ValueError(f"CAG start_step={self.start_step} is beyond the run of num_inference_steps={n} steps "
                             f"(CAG would never be applied); allowed: start_step in 0..{n - 1}")
        if self.stop_step is not None and self.stop_step > n:
            raise ValueError(f"CAG stop_step={self.stop_step} is beyond the run of num_inference_steps={n} steps; "
                             f"allowed: stop_step in {self.start_step + 1}..{n} or None (to the end)")
        if callable(self.schedule):
            for step in range(self.start_step, n if self.stop_step is None else self.stop_step):
                self.scale_at(step, n)

    def scale_at(self, step: int, num_steps: int) -> float:
        """``s_cag`` at denoising step ``step`` (0 = noisiest) of ``num_steps``; a callable schedule's value is
        checked at every step (:func:`difftrack.checks.check_cag_scale`: NaN, negative or > 20 raises ``ValueError``
        naming the step, never applied)."""
        stop = num_steps if self.stop_step is None else self.stop_step
        if not self.start_step <= step < stop:
            return 0.0
        if callable(self.schedule):
            factor = self.schedule(step)
            try:
                value = self.scale * float(factor)
            except (TypeError, ValueError):
                raise ValueError(f"CAG schedule {self.schedule!r} returned {factor!r} at denoising step {step}; "
                                 f"allowed: a number (the factor multiplying scale={self.scale:g})") from None
            return _checks.check_cag_scale(value, "the CAG schedule's scale", step=step)
        if self.schedule == "linear_decay":
            return self.scale * (1.0 - (step - self.start_step) / (stop - self.start_step))
        return self.scale

    def to_dict(self) -> dict:
        """Plain-JSON dict; a callable schedule cannot be serialised (``ValueError``)."""
        if callable(self.schedule):
            raise ValueError(f"schedule {self.schedule!r} is a callable and cannot be serialised; "
                             f"use one of {SCHEDULES} to save the config")
        return dict(layers=list(self.layers), scale=self.scale, variant=self.variant, schedule=self.schedule,
                    start_step=self.start_step, stop_step=self.stop_step)

    @classmethod
    def from_dict(cls, d: dict) -> "CAGConfig":
        allowed = ("layers", "scale", "variant", "schedule", "start_step", "stop_step")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown CAGConfig key(s) {unknown}; allowed: {allowed}")
        if "layers" not in d:
            raise ValueError("CAGConfig dict needs 'layers'")
        return cls(**d)


# ----------------------------------------------------------------------------------------- frame-local attention
def _frame_ids(n: int, text_len: int, frames: int, text_first: bool, device) -> tuple[torch.Tensor, slice, slice]:
    """``long [n]`` latent frame of each token (-1 for text), and the text / video slices."""
    nv = n - text_len
    tpf = nv // frames
    vid = torch.arange(nv, device=device) // tpf
    txt = torch.full((text_len,), -1, dtype=torch.long, device=device)
    if text_first:
        return torch.cat([txt, vid]), slice(0, text_len), slice(text_len, n)
    return torch.cat([vid, txt]), slice(nv, n), slice(0, nv)


def frame_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, frames: int, text_len: int,
                          variant: str = "renormalized", text_first: bool = True, query_chunk: int = QUERY_CHUNK,
                          key_chunk: int = KEY_CHUNK, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention in which each video query sees only its own latent frame and the text; text queries see all.

    Args:
        q, k, v: ``[B, H, N, D]`` over the joint sequence ``N = text_len + frames * tokens_per_frame`` (video tokens
            frame-major), text first (CogVideoX) or last (``text_first=False``). Scale ``1/sqrt(D)`` as SDPA.
        frames: latent frames in the sequence.
        text_len: text tokens (0 allowed: then video queries see their own frame only).
        variant: ``"renormalized"`` (softmax over allowed keys) or ``"zero_after_softmax"`` (full softmax, then
            cross-frame probabilities zeroed without renormalising).
        query_chunk, key_chunk: chunk sizes of the ``"zero_after_softmax"`` log-sum-exp pass.
        key_mask: optional ``bool [B, N]``, ``False`` for keys no query may see (HunyuanVideo's padded text tokens);
            applied on top of the frame rule in both variants.

    Returns:
        ``[B, H, N, D]`` in ``v``'s dtype. No ``N x N`` tensor is built: peak extra memory is ``O(B H N D)`` for the
        per-frame keys plus ``B H query_chunk key_chunk`` scores in the log-sum-exp pass.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {VARIANTS}")
    B, H, N, D = q.shape
    nv = N - text_len
    if frames < 1 or nv <= 0 or nv % frames:
        raise ValueError(f"{nv} video tokens (sequence {N} - text {text_len}) do not split into {frames} frames")
    P = nv // frames
    col_frame, ts, vs = _frame_ids(N, text_len, frames, text_first, q.device)
    if key_mask is not None:
        key_mask = key_mask.to(device=q.device, dtype=torch.bool)
        if key_mask.shape != (B, N):
            raise ValueError(f"key_mask must be bool [B={B}, N={N}]; got {tuple(key_mask.shape)}")
        if not key_mask[:, vs].all():
            raise ValueError("key_mask hides video keys; only text keys may be masked (padding)")
    out = v.new_empty(B, H, N, v.shape[-1])
    if text_len:  # text rows: ordinary full attention
        m = None if key_mask is None else key_mask[:, None, None, :]
        out[:, :, ts] = F.scaled_dot_product_attention(q[:, :, ts], k, v, attn_mask=m)

    # video rows, renormalised: frames as an extra batch dimension, keys [text, own frame]
    def per_frame(x):  # [B, H, nv, d] -> [B, F, H, P, d]
        return x.reshape(B, H, frames, P, x.shape[-1]).transpose(1, 2)

    def with_text(x, xv):  # -> [B*F, H, text_len + P, d]
        xf = per_frame(xv)
        if text_len:
            xt = x[:, :, ts].unsqueeze(1).expand(B, frames, H, text_len, x.shape[-1])
            xf = torch.cat([xt, xf], dim=3)
        return xf.reshape(B * frames, H, -1, x.shape[-1])

    qf = per_frame(q[:, :, vs]).reshape(B * frames, H, P, D)
    fm = None
    if key_mask is not None and text_len:  # keys of each frame's call: [text (maybe padded), own frame]
        tm = key_mask[:, ts].unsqueeze(1).expand(B, frames, text_len)
        fm = torch.cat([tm, tm.new_ones(B, frames, P)], -1).reshape(B * frames, 1, 1, text_len + P)
    of = F.scaled_dot_product_attention(qf, with_text(k, k[:, :, vs]), with_text(v, v[:, :, vs]), attn_mask=fm)
    ov = of.reshape(B, frames, H, P, -1).transpose(1, 2).reshape(B, H, nv, -1)
    if variant == "zero_after_softmax":
        lse_all, lse_allowed = _video_row_lse(q, k, col_frame, vs, P, query_chunk, key_chunk, key_mask)  # [B,H,nv]
        ov = (ov.float() * torch.exp(lse_allowed - lse_all).unsqueeze(-1)).to(ov.dtype)
    out[:, :, vs] = ov
    return out


def _video_row_lse(q, k, col_frame, vs, P, query_chunk, key_chunk, key_mask=None):
    """Log-sum-exp of the video rows' scaled scores over all keys and over the allowed keys, ``fp32 [B, H, nv]``,
    in chunks of ``query_chunk`` rows x ``key_chunk`` keys."""
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D)
    qv = q[:, :, vs]
    nv = qv.shape[2]
    row_frame = torch.arange(nv, device=q.device) // P
    lse_all = torch.empty(B, H, nv, dtype=torch.float32, device=q.device)
    lse_ok = torch.empty_like(lse_all)
    for i in range(0, nv, query_chunk):
        qc = qv[:, :, i:i + query_chunk].float() * scale
        rf = row_frame[i:i + query_chunk, None]
        parts_all, parts_ok = [], []
        for j in range(0, N, key_chunk):
            s = qc @ k[:, :, j:j + key_chunk].float().transpose(-1, -2)  # [B, H, qc, kc]
            if key_mask is not None:  # invisible keys count in neither sum
                s = s.masked_fill(~key_mask[:, None, None, j:j + key_chunk], float("-inf"))
            cf = col_frame[None, j:j + key_chunk]
            allowed = (cf == -1) | (cf == rf)  # [qc, kc]
            parts_all.append(torch.logsumexp(s, -1))
            parts_ok.append(torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1))
        lse_all[:, :, i:i + query_chunk] = torch.logsumexp(torch.stack(parts_all), 0)
        lse_ok[:, :, i:i + query_chunk] = torch.logsumexp(torch.stack(parts_ok), 0)
    return lse_all, lse_ok


# ------------------------------------------------------------------------------------------------ processors
@dataclass
class CAGState:
    """Shared by the processors installed by one :func:`apply_cag`.

    Attributes:
        num_slots: the batch is ``num_slots`` equal contiguous slots (``[uncond, cond, perturbed]`` = 3).
        perturbed: indices of the slots that get the perturbed attention (empty: none; every processor then calls
            the original processor on the whole batch).
        grid: token layout of the current transformer call (set by a forward pre-hook).
        calls: perturbed attention calls so far (for tests and sanity checks).
        step: next denoising step index (counted by :func:`cag_hooks`).
        expert: the transformer of the current call (``"transformer"``; Wan 2.2 also ``"transformer_2"``).
        calls_by_expert: perturbed attention calls so far per expert.
        step_experts: ``{step: expert}`` of each step :func:`cag_hooks` perturbed (checked: every CAG layer of that
            expert was perturbed).
        coverage: the completeness record of a guided run (:class:`difftrack.hooks.Coverage`; ``None`` outside the
            samplers), with ``current`` the step of the forward now running: each perturbed (layer, step) is marked.
    """

    num_slots: int = 1
    perturbed: tuple[int, ...] = (0,)
    grid: TokenGrid | None = None
    calls: int = 0
    step: int = 0
    expert: str = "transformer"
    calls_by_expert: dict = field(default_factory=dict)
    step_experts: dict = field(default_factory=dict)
    coverage: Coverage | None = None
    current: int | None = None

    def note(self, layer: int) -> None:
        """Layer ``layer`` of the current expert computed its perturbed attention in the current forward."""
        self.calls += 1
        self.calls_by_expert[self.expert] = self.calls_by_expert.get(self.expert, 0) + 1
        if self.coverage is not None and self.current is not None:
            self.coverage.mark(PERTURBED, layer, self.current)

    def set_slots(self, num_slots: int, perturbed: Sequence[int]) -> None:
        perturbed = tuple(sorted(set(perturbed)))
        if num_slots < 1 or any(not 0 <= p < num_slots for p in perturbed):
            raise ValueError(f"perturbed slots {perturbed} out of range for {num_slots} slots; "
                             f"allowed 0..{num_slots - 1}")
        self.num_slots, self.perturbed = num_slots, perturbed

    def split_rows(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perturbed rows, kept rows)`` (``long``) of a batch of ``n`` made of ``num_slots`` equal slots."""
        if n % self.num_slots:
            raise ValueError(f"batch {n} does not split into {self.num_slots} CAG slots")
        rows = torch.arange(n, device=device).view(self.num_slots, n // self.num_slots)
        keep = [i for i in range(self.num_slots) if i not in self.perturbed]
        return rows[list(self.perturbed)].flatten(), rows[keep].flatten()

    @contextmanager
    def slots(self, num_slots: int, perturbed: Sequence[int]):
        """Temporarily set the slot layout."""
        old = (self.num_slots, self.perturbed)
        self.set_slots(num_slots, perturbed)
        try:
            yield self
        finally:
            self.num_slots, self.perturbed = old


class CogVideoXCAGAttnProcessor:
    """Attention processor for a CogVideoX block's ``attn1`` under CAG.

    Unperturbed batch slots are passed to ``original`` (the processor found on the module, normally
    ``CogVideoXAttnProcessor2_0``) untouched. The perturbed slots are recomputed here exactly as upstream computes
    its attention input -- ``to_q/to_k/to_v`` on ``[text, video]``, ``norm_q/norm_k``, RoPE on the video slice via
    ``diffusers.models.embeddings.apply_rotary_emb`` -- and then :func:`frame_local_attention` replaces SDPA, followed
    by ``to_out``. Recomputing is needed because the perturbed branch is a different attention, not a different
    input; it mirrors ``CogVideoXAttnProcessor2_0`` line by line.

    The ``__call__`` signature is upstream's: diffusers' ``Attention`` drops keyword arguments that the processor's
    signature lacks.
    """

    def __init__(self, original, state: CAGState, variant: str, layer: int, query_chunk: int = QUERY_CHUNK,
                 key_chunk: int = KEY_CHUNK):
        self.original, self.state, self.variant, self.layer = original, state, variant, layer
        self.query_chunk, self.key_chunk = query_chunk, key_chunk

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``hidden_states [S*B, N_video, C]``, ``encoder_hidden_states [S*B, L, C]`` ->
        ``(hidden_states [S*B, N_video, C], encoder_hidden_states [S*B, L, C])`` as upstream."""
        st = self.state
        if not st.perturbed:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                                 image_rotary_emb=image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("CAG's perturbed attention does not take an attention_mask (CogVideoX passes none)")
        n = hidden_states.shape[0]
        pert, keep = st.split_rows(n, hidden_states.device)
        hp, ep = self._perturbed(attn, hidden_states[pert], encoder_hidden_states[pert], image_rotary_emb)
        st.note(self.layer)
        if keep.numel() == 0:
            return hp, ep
        hk, ek = self.original(attn, hidden_states[keep], encoder_hidden_states[keep], attention_mask=None,
                               image_rotary_emb=image_rotary_emb)
        h = hk.new_empty((n,) + hk.shape[1:])
        e = ek.new_empty((n,) + ek.shape[1:])
        h[keep], h[pert] = hk, hp
        e[keep], e[pert] = ek, ep
        return h, e

    def _perturbed(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        grid = self.state.grid
        if grid is None:
            raise RuntimeError(f"CAG processor of layer {self.layer} called outside a transformer forward (token "
                               f"grid unknown); run the transformer itself inside apply_cag")
        L = encoder_hidden_states.size(1)
        if hidden_states.shape[1] != grid.num_video:
            raise ValueError(f"layer {self.layer}: {hidden_states.shape[1]} video tokens do not match the grid "
                             f"{grid.frames} frames x {grid.rows} x {grid.cols}")
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, L + N_video, C]
        B = x.shape[0]
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        d = k.shape[-1] // attn.heads
        q = q.view(B, -1, attn.heads, d).transpose(1, 2)
        k = k.view(B, -1, attn.heads, d).transpose(1, 2)
        v = v.view(B, -1, attn.heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, L:] = apply_rotary_emb(q[:, :, L:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, L:] = apply_rotary_emb(k[:, :, L:], image_rotary_emb)
        o = frame_local_attention(q, k, v, frames=grid.frames, text_len=L, variant=self.variant, text_first=True,
                                  query_chunk=self.query_chunk, key_chunk=self.key_chunk)
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * d)
        o = attn.to_out[1](attn.to_out[0](o))
        e, h = o.split([L, o.size(1) - L], dim=1)
        return h, e


def _check_plain_sdpa(call: dict) -> None:
    if call.get("is_causal") or call.get("dropout_p", 0.0) or call.get("scale") is not None or call.get("enable_gqa"):
        raise ValueError("CAG's perturbed attention supports plain SDPA calls only (no causal mask, dropout, custom "
                         "scale or GQA)")


class SDPACAGAttnProcessor:
    """CAG for backbones whose upstream processor computes its joint self-attention with one SDPA call
    (``WanAttnProcessor``, ``HunyuanVideoAttnProcessor2_0``; diffusers' native attention backend).

    The original processor runs **unchanged** on the whole batch -- projections, QK norms, RoPE and output
    projection stay upstream's -- and only its self-attention SDPA call (query and key over the whole sequence of
    the current token grid) is replaced: unperturbed batch slots get the original SDPA on their rows, perturbed slots
    :func:`frame_local_attention` with the grid's text layout (Wan: video only; HunyuanVideo: text last, padded text
    keys masked as upstream's ``attention_mask``). With no perturbed slot the original processor is called as is.

    Subclasses copy the wrapped class's ``__call__`` signature (diffusers' ``Attention`` drops keyword arguments a
    processor's signature lacks), as :mod:`difftrack.capture` does.
    """

    def __init__(self, original, state: CAGState, variant: str, layer: int, query_chunk: int = QUERY_CHUNK,
                 key_chunk: int = KEY_CHUNK):
        self.original, self.state, self.variant, self.layer = original, state, variant, layer
        self.query_chunk, self.key_chunk = query_chunk, key_chunk

    def _run(self, *args, **kwargs):
        st = self.state
        if not st.perturbed:
            return self.original(*args, **kwargs)
        g = st.grid
        if g is None:
            raise RuntimeError(f"CAG processor of layer {self.layer} called outside a transformer forward (token "
                               f"grid unknown); run the transformer itself inside apply_cag")
        n = g.num_video + g.text_len
        # the self-attention call: query and key over the whole token sequence of the grid
        mode = SDPAIntercept(self._replace, match=lambda c: c["query"].dim() == 4 and c["query"].shape[2] == n
                             and c["key"].shape[2] == n)
        with mode:
            out = self.original(*args, **kwargs)
        if not mode.handled:
            raise RuntimeError(f"layer {self.layer}: no self-attention SDPA call over {g.num_video + g.text_len} "
                               f"tokens was seen in {type(self.original).__name__}; CAG needs diffusers' native "
                               f"attention backend")
        st.note(self.layer)
        return out

    def _replace(self, call: dict):
        _check_plain_sdpa(call)
        return self._attention(call["query"], call["key"], call["value"], call.get("attn_mask"))

    def _attention(self, q, k, v, attn_mask):
        st, g = self.state, self.state.grid
        n = q.shape[0]
        pert, keep = st.split_rows(n, q.device)
        key_mask = None
        if attn_mask is not None and _frame_blocks_open(attn_mask, g):
            pass  # a block-causal mask over the video (SkyReels-V2 causal_block_size > 1) never hides a frame from
            # itself, so the frame-local attention of the perturbed rows is already inside it
        elif attn_mask is not None:
            key_mask = _key_padding(attn_mask, self.layer).expand(n, -1)
        out = v.new_empty(q.shape[:3] + (v.shape[-1],))
        out[pert] = frame_local_attention(q[pert], k[pert], v[pert], frames=g.frames, text_len=g.text_len,
                                          variant=self.variant, text_first=g.text_first,
                                          query_chunk=self.query_chunk, key_chunk=self.key_chunk,
                                          key_mask=None if key_mask is None else key_mask[pert])
        if keep.numel():
            am = attn_mask[keep] if attn_mask is not None and attn_mask.shape[0] == n else attn_mask
            out[keep] = F.scaled_dot_product_attention(q[keep], k[keep], v[keep], attn_mask=am)
        return out


def _frame_blocks_open(mask: torch.Tensor, g) -> bool:
    """Whether ``mask`` is a boolean ``[B, 1, N, N]`` mask over the video tokens only (no text in the sequence) whose
    every frame-to-same-frame block is all True."""
    N = g.num_video
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (N, N) or g.text_len:
        return False
    P = g.tokens_per_frame
    blocks = mask.reshape(mask.shape[0], mask.shape[1], g.frames, P, g.frames, P)
    own = blocks.diagonal(dim1=2, dim2=4)  # [B, 1, P, P, F]
    return bool(own.all())


def _key_padding(m: torch.Tensor, layer: int) -> torch.Tensor:
    """``bool [B, N]`` key-padding mask of an SDPA ``attn_mask``: a ``[B, 1, 1, N]`` key mask (HunyuanVideo), or a
    ``[B, 1, N, N]`` mask that is the outer AND of a key mask with itself (HunyuanVideo 1.5: padding masked as keys
    and as queries; its padding queries then attend the valid keys in the perturbed slot -- they are padding, no
    valid token reads them). Any other mask is refused (a video mask that lets every frame see itself,
    SkyReels-V2's block-causal one, is handled before: :func:`_frame_blocks_open`)."""
    if m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        return m[:, 0, 0]
    if m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == m.shape[3]:
        km = m[:, 0].any(1)  # [B, N]: the keys some query may see
        if torch.equal(m[:, 0], km[:, :, None] & km[:, None, :]):
            return km
    raise ValueError(f"layer {layer}: CAG handles a boolean key-padding mask [B, 1, 1, N] (HunyuanVideo's), its "
                     f"outer AND [B, 1, N, N] (HunyuanVideo 1.5's) or a video mask [B, 1, N, N] that lets every frame "
                     f"see itself (SkyReels-V2's block-causal one); got {m.dtype} {tuple(m.shape)}")


def _sdpa_cag_processor(original, state, variant, layer, query_chunk, key_chunk) -> SDPACAGAttnProcessor:
    cls = processor_wrapper_class(SDPACAGAttnProcessor, type(original), "CAG")
    return cls(original, state, variant, layer, query_chunk, key_chunk)


@contextmanager
def apply_cag(model_or_pipe, config: CAGConfig, *, query_chunk: int = QUERY_CHUNK, key_chunk: int = KEY_CHUNK):
    """Install the CAG processors on ``config.layers`` (restored in ``finally``, even when the body raises).

    Args:
        model_or_pipe: a ``CogVideoXTransformer3DModel`` (:class:`CogVideoXCAGAttnProcessor`), a
            ``WanTransformer3DModel`` or ``HunyuanVideoTransformer3DModel`` (:class:`SDPACAGAttnProcessor`; HunyuanVideo
            layers index dual-stream blocks first, then single-stream ones), or a pipeline with ``.transformer``.
            A multi-expert pipeline (Wan 2.2: ``transformer`` and ``transformer_2``) gets the processors on
            ``config.layers`` of every expert, sharing one state (``state.expert`` names the one running).
        config: the :class:`CAGConfig` (its ``layers`` and ``variant`` are used here; ``scale`` by the samplers).
        query_chunk, key_chunk: chunking of the ``"zero_after_softmax"`` log-sum-exp pass.

    Yields:
        the shared :class:`CAGState`. By default the whole batch is one perturbed slot (the forward is the perturbed
        model); set ``state.set_slots(3, [2])`` for ``[uncond, cond, perturbed]``.
    """
    if not isinstance(config, CAGConfig):
        raise ValueError(f"config must be a CAGConfig; got {type(config).__name__}")
    targets = []  # (expert, transformer, adapter, attention modules of config.layers)
    for name, transformer in experts(model_or_pipe).models.items():
        adapter = adapter_for(transformer)
        if adapter.cag_attention is None:
            raise ValueError(f"CAG is implemented for {CAG_BACKBONES} transformers; got "
                             f"{type(transformer).__name__} ({adapter.name})")
        blocks = adapter.blocks(transformer)
        bad = [l for l in config.layers if l >= len(blocks)]
        if bad:
            raise ValueError(f"CAG layer(s) {bad} out of range: {type(transformer).__name__} ({name}) has "
                             f"{len(blocks)} blocks, allowed 0..{len(blocks) - 1}")
        attns = [adapter.self_attention(blocks[l][1]) for l in config.layers]
        fused = [l for l, a in zip(config.layers, attns) if getattr(a, "fused_projections", False)]
        if fused:
            raise ValueError(f"layers {fused} of {name} use fused QKV projections; call "
                             f"{name}.unfuse_qkv_projections() before CAG")
        check_diffusers_hooks(transformer, "CAG")
        if adapter.cag_attention == "sdpa":
            check_attention_backend(list(zip(config.layers, attns)), "CAG")
        targets.append((name, transformer, adapter, attns))
    state = CAGState()
    installed = []
    handles = []
    eager = eager_compile()
    eager.__enter__()  # a compiled transformer runs eagerly: the CAG processors and hooks run exactly
    try:
        for name, transformer, adapter, attns in targets:
            def set_grid(grid, name=name):
                state.grid, state.expert = grid, name

            handles.append(track_grid(transformer, adapter, set_grid))
            for l, attn in zip(config.layers, attns):
                if adapter.cag_attention == "joint":
                    proc = CogVideoXCAGAttnProcessor(attn.processor, state, config.variant, l, query_chunk,
                                                     key_chunk)
                else:
                    proc = _sdpa_cag_processor(attn.processor, state, config.variant, l, query_chunk, key_chunk)
                installed.append((attn, proc))
                set_processor(attn, proc)
        yield state
    finally:
        for attn, proc in reversed(installed):  # order-safe: removes exactly this context's processor
            unwrap_processor(attn, proc)
        for handle in handles:
            handle.remove()
        state.grid = None
        eager.__exit__(None, None, None)

# ------------------------------------------------------------------------------------------ shared prefix
class PrefixShare:
    """Computes the blocks before the first CAG layer once for the conditional and the perturbed slot.

    The perturbed slot of ``[uncond, cond, perturbed]`` (``[cond, perturbed]`` without CFG or for a sequential-CFG
    conditional call) equals the conditional one until the first perturbed block. While :attr:`rows` is
    ``(full, keep)``, every block before ``first`` runs on the first ``keep`` rows of each batched argument (a view,
    no copy), and the outputs of block ``first - 1`` get their last ``full - keep`` rows appended again (a copy of the
    conditional rows), so the blocks from ``first`` on, the model's tail and the caller see the full batch as
    before. ``rows = None`` (the default) leaves every call untouched.

    Generic over backbones: only the block list of the adapter and the batch dimension of the block arguments and
    outputs (tensors or tuples of tensors) are used. Hooks are removed by :meth:`remove` or on leaving a ``with``
    block."""

    def __init__(self, transformer, first: int):
        blocks = [b for _, b in adapter_for(transformer).blocks(transformer)]
        if not 0 <= first <= len(blocks):
            raise ValueError(f"first={first}; allowed 0..{len(blocks)}")
        self.first, self.rows = first, None
        self._handles = []
        if first == 0:  # nothing before the first perturbed block
            return
        for b in blocks[:first]:
            self._handles.append(b.register_forward_pre_hook(self._cut, with_kwargs=True))
        self._handles.append(blocks[first - 1].register_forward_hook(self._grow, with_kwargs=True))

    def _cut(self, module, args, kwargs):
        if self.rows is None:
            return None
        full, keep = self.rows

        def cut(v):
            return v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == full else v

        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    def _grow(self, module, args, kwargs, output):
        if self.rows is None:
            return None
        full, keep = self.rows
        extra = full - keep

        def grow(v):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == keep:
                return torch.cat([v, v[keep - extra:keep]])
            return v

        return tuple(grow(o) for o in output) if isinstance(output, tuple) else grow(output)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.rows = None

    def __enter__(self) -> "PrefixShare":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def shared_prefix(transformer, first: int) -> PrefixShare:
    """:class:`PrefixShare` hooks on ``transformer`` (a pipeline's ``.transformer`` too), as a context manager that
    removes them on exit (also when the body raises)."""
    return PrefixShare(resolve_transformer(transformer), first)


# -------------------------------------------------------------------------------------------------- guidance
def cag_combine(v_uncond: torch.Tensor | None, v_cond: torch.Tensor, v_perturbed: torch.Tensor, cfg_scale: float,
                cag_scale: float) -> torch.Tensor:
    """``v_u + w_cfg (v_c - v_u) + s_cag (v_c - v_p)``; with ``v_uncond=None`` (no CFG) ``v_c + s_cag (v_c - v_p)``.

    All tensors ``[B, ...]`` alike. With ``cag_scale == 0`` the CAG term is skipped, so the result is bitwise the plain
    CFG combine ``v_u + w (v_c - v_u)`` (and ``v_c`` without CFG).
    """
    out = v_cond if v_uncond is None else v_uncond + cfg_scale * (v_cond - v_uncond)
    if cag_scale != 0:
        out = out + cag_scale * (v_cond - v_perturbed)
    return out


@torch.no_grad()
def generate_with_cag(pipe, prompt: str | list[str], config: CAGConfig | None, guidance_scale: float = 6.0,
                      num_inference_steps: int = 50, generator: torch.Generator | None = None,
                      negative_prompt: str | list[str] | None = None, num_frames: int | None = None,
                      height: int | None = None, width: int | None = None, latents: torch.Tensor | None = None,
                      output_type: str = "np", callback_on_step_end=None, progress: bool = True,
                      shared_prefix: bool = True, image=None):
    """Sample from a :class:`~difftrack.mini.MiniVideoPipeline` with CAG.

    The pipeline's own ``__call__`` runs unmodified under :func:`cag_hooks`: on steps whose CAG scale is non-zero
    the transformer gets **one** forward over ``[uncond, cond, perturbed-cond]`` (``[cond, perturbed-cond]`` without
    CFG) and the hooks fold the CAG term into the pipeline's own CFG combine, giving
    ``v_u + w (v_c - v_u) + s (v_c - v_p)`` (:func:`cag_combine`, up to float rounding). With ``shared_prefix=True``
    (default) the blocks before the first CAG layer run without the perturbed slot, which starts from a copy of the
    conditional one (:class:`PrefixShare`).

    Exactness guarantee: steps whose scale is 0 (all steps when ``config.scale == 0``, outside
    ``start_step..stop_step``, or ``config=None``) pass through the hooks untouched, so ``scale=0`` reproduces the
    unguided pipeline bit for bit (tested).

    Args:
        pipe: the embedded pipeline.
        prompt, negative_prompt, num_frames, height, width, generator, latents, callback_on_step_end, progress,
            image: as ``MiniVideoPipeline.__call__`` (``None`` sizes = its defaults; ``image``: the first frames of an
            image-to-video model).
        config: the :class:`CAGConfig`, or ``None`` for no CAG.
        guidance_scale: CFG weight (> 1 enables CFG).
        output_type: ``"np"`` for ``uint8 [B, T, H, W, 3]`` or ``"latent"`` for ``[B, T, 12, H/2, W/2]``.
        shared_prefix: see :func:`cag_hooks`.

    Returns:
        ``MiniVideoPipelineOutput`` as the pipeline.
    """
    from . import mini

    common = dict(negative_prompt=negative_prompt, num_frames=mini.FRAMES if num_frames is None else num_frames,
                  height=mini.HEIGHT if height is None else height, width=mini.WIDTH if width is None else width,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
                  latents=latents, output_type=output_type, callback_on_step_end=callback_on_step_end,
                  progress=progress, image=image)
    _checks.check_guidance_scale(guidance_scale)
    if config is None:
        return pipe(prompt, **common)
    pipe.check_inputs(common["num_frames"], common["height"], common["width"], num_inference_steps, guidance_scale)
    with cag_hooks(pipe, config, guidance_scale, num_inference_steps, do_cfg=guidance_scale > 1.0,
                   shared_prefix=shared_prefix):
        return pipe(prompt, **common)  # MiniVideoPipeline.__call__ runs without autograd


# ------------------------------------------------------------------------------------- unmodified diffusers loop
# batched transformer arguments that get the conditional slot appended (those present and batched)
_EXPANDED = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image",
             "pooled_projections", "encoder_attention_mask", "guidance", "encoder_hidden_states_2",
             "encoder_attention_mask_2", "image_embeds", "timestep_r", "condition_mask")


@contextmanager
def cag_hooks(model_or_pipe, config: CAGConfig, guidance_scale: float, num_inference_steps: int,
              do_cfg: bool | None = None, shared_prefix: bool = True,
              expert_guidance_scales: dict[str, float] | None = None, **apply_kwargs):
    """CAG inside an unmodified diffusers pipeline loop, by forward hooks on its transformer.

    * **Batched CFG** (CogVideoX, ``MiniVideoPipeline``: one call per step on ``[uncond, cond]``, then
      ``u + w (c - u)``): a forward pre-hook turns the batch into ``[uncond, cond, cond]`` (the batched arguments
      in ``_EXPANDED`` get the cond half appended; batch-free ones such as ``image_rotary_emb`` pass unchanged), the
      last slot perturbed; a forward hook returns, in fp32, ``[v_u, v_c + (s/w)(v_c - v_p)]``, so the pipeline's own
      combine yields ``v_u + w (v_c - v_u) + s (v_c - v_p)``.
    * **Sequential CFG** (Wan, HunyuanVideo with true CFG: a conditional call, then an unconditional call with the
      same timestep, then ``u + w (c - u)``): the conditional call gets ``[cond, cond]`` with the second slot
      perturbed and returns ``v_c + (s/w)(v_c - v_p)`` (in its own dtype); the unconditional call passes through.
    * **No CFG** (``do_cfg=False``; HunyuanVideo's default embedded guidance): the one call returns
      ``v_c + s (v_c - v_p)``.

    Steps are counted from the calls (a new timestep starts a step); steps with scale 0 pass through untouched
    (bitwise the plain pipeline). The folding through ``s/w`` equals :func:`cag_combine` up to float rounding.

    With ``shared_prefix=True`` (default) the blocks before the first CAG layer run without the perturbed slot,
    which starts from a copy of the conditional one there (:class:`PrefixShare`; the same values up to float
    rounding, tested in fp32 on the CPU for every supported backbone: not bitwise, because the 3-slot forward itself
    gives identical rows at different batch positions different last bits).

    Multi-expert pipelines (Wan 2.2: ``transformer`` for the high-noise steps, ``transformer_2`` for the low-noise
    ones): the processors and hooks are on every expert and the steps are counted over both, so each step is
    perturbed in ``config.layers`` of whichever expert runs it, folded with that expert's CFG weight
    (``expert_guidance_scales``, Wan 2.2: ``guidance_scale_2`` for ``transformer_2``). After each perturbed forward
    the hooks check that every chosen layer was perturbed (else ``RuntimeError`` naming the step and expert) and
    record the expert in ``state.step_experts``.

    Args:
        guidance_scale: the CFG weight ``w`` the pipeline combines with (HunyuanVideo: ``true_cfg_scale``).
        do_cfg: whether the pipeline runs CFG (default ``guidance_scale > 1``).
        shared_prefix: compute the blocks before the first CAG layer once for the conditional and perturbed slots.
        expert_guidance_scales: ``{expert: w}`` where an expert's steps are combined with another weight than
            ``guidance_scale`` (:meth:`difftrack.backbones.Experts.guidance_scales`).

    Yields:
        the :class:`CAGState` (``state.step`` holds the next step index).

    At exit the run is checked (:class:`difftrack.hooks.Coverage`): it had ``num_inference_steps`` steps and every
    layer was perturbed at every step whose scale is non-zero, else :class:`difftrack.hooks.IncompleteRunError`
    names what was not perturbed and why.
    """
    if not isinstance(config, CAGConfig):
        raise ValueError(f"config must be a CAGConfig; got {type(config).__name__}")
    config.check_steps(num_inference_steps)
    _checks.check_guidance_scale(guidance_scale, positive=True)  # the CFG weight the pipeline combines with
    ex = experts(model_or_pipe)  # Wan 2.2: transformer and transformer_2, hooked alike; else the one transformer
    weights = _expert_weights(guidance_scale, expert_guidance_scales, ex.names)
    do_cfg = guidance_scale > 1.0 if do_cfg is None else bool(do_cfg)
    transformer = ex.models[ex.names[0]]
    adapter = adapter_for(transformer)
    sequential = adapter.cfg == "sequential"
    sigs = {n: inspect.signature(m.forward) for n, m in ex.models.items()}
    handles = []
    n = num_inference_steps
    coverage = Coverage("CAG", (PERTURBED,), config.layers, steps=[s for s in range(n) if config.scale_at(s, n) != 0],
                        num_steps=n, verb="perturbed")
    with apply_cag(model_or_pipe, config, **apply_kwargs) as state, ExitStack() as stack:
        # apply_cag's pre-hook, registered first, sets state.expert to the expert being called
        shares = {name: stack.enter_context(PrefixShare(m, min(config.layers))) if shared_prefix else None
                  for name, m in ex.models.items()}
        state.set_slots(1, [])
        state.step = 0
        state.coverage = coverage
        n_plain = 2 if do_cfg and not sequential else 1
        pending: dict[str, Any] = {"last_t": None}

        def pre(m, args, kwargs):
            check_diffusers_hooks(m, "CAG", "at a transformer call")  # e.g. added by a guider for its forward
            bound = sigs[state.expert].bind(*args, **kwargs).arguments
            share = shares[state.expert]
            t = bound.get("timestep")
            t_rec = float(t.max()) if isinstance(t, torch.Tensor) else t  # the recorded timestep
            if sequential:
                tv = adapter.step_key(t)  # the capture's step key (per-frame levels, ...)
                if do_cfg and pending["last_t"] is not None and tv == pending["last_t"]:
                    pending["s"] = 0.0  # the step's second (unconditional) call
                    state.set_slots(1, [])
                    coverage.call(state.step - 1, t_rec, state.expert if ex.several else None)
                    return None
                pending["last_t"] = tv
            s = config.scale_at(state.step, num_inference_steps)
            pending["step"] = state.step
            coverage.call(state.step, t_rec, state.expert if ex.several else None)
            state.current = state.step
            state.step += 1
            pending["s"] = s
            if share is not None:
                share.rows = None
            if s == 0:
                state.set_slots(1, [])
                return None
            x = bound["hidden_states"]
            if x.shape[0] % n_plain:
                raise ValueError(f"batch {x.shape[0]} is not [uncond, cond] halves (guidance_scale={guidance_scale})")
            b = x.shape[0] // n_plain
            for name in _EXPANDED:
                val = bound.get(name)
                if isinstance(val, torch.Tensor) and val.dim() > 0 and val.shape[0] == x.shape[0]:
                    bound[name] = torch.cat([val, val[-b:]])
            state.set_slots(n_plain + 1, [n_plain])
            if share is not None:
                share.rows = ((n_plain + 1) * b, n_plain * b)
            return (), dict(bound)

        def post(m, args, kwargs, output):
            s = pending.pop("s")
            share = shares[state.expert]
            if share is not None:
                share.rows = None
            if s == 0:
                return None
            state.set_slots(1, [])
            state.step_experts[pending["step"]] = state.expert
            sample = output[0] if isinstance(output, tuple) else output.sample
            parts = sample.float().chunk(n_plain + 1)
            folded = s / weights[state.expert] if do_cfg else s  # the pipeline's own combine multiplies by w
            new = cag_combine(None, parts[-2], parts[-1], 1.0, folded)  # v_c + folded (v_c - v_p)
            if n_plain == 2:
                new = torch.cat([parts[0], new])  # batched CFG: [v_u, ...] in fp32
            else:
                new = new.to(sample.dtype)
            if isinstance(output, tuple):
                return (new,) + tuple(output[1:])
            output.sample = new
            return output

        try:
            for m in ex.models.values():
                handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(m.register_forward_hook(post, with_kwargs=True))
            yield state
            coverage.check()  # every (layer, step) with a non-zero scale was perturbed, in a run of n steps
        finally:
            for h in handles:
                h.remove()


def _expert_weights(guidance_scale, expert_guidance_scales, names) -> dict[str, float]:
    """``{expert: CFG weight}``: ``guidance_scale`` unless ``expert_guidance_scales`` names another; each a finite
    number > 0 (``ValueError`` naming the bad one)."""
    extra = dict(expert_guidance_scales or {})
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise ValueError(f"expert_guidance_scales names {unknown}; allowed: experts {list(names)}")
    for what, w in [("guidance_scale", guidance_scale)] + [(f"the CFG weight of {n}", w) for n, w in extra.items()]:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"{what}={w!r}; allowed: a finite number > 0 (the CFG weight the pipeline combines "
                             f"with; CAG is folded through s / guidance_scale)")
    return {n: extra.get(n, guidance_scale) for n in names}


def generate_with_cag_diffusers(pipe, config: CAGConfig | None, *args, guidance_scale: float = 6.0,
                                num_inference_steps: int = 50, use_dynamic_cfg: bool = False,
                                shared_prefix: bool = True, **kwargs):
    """Run an unmodified ``diffusers.CogVideoXPipeline``, ``WanPipeline``, ``HunyuanVideoPipeline``,
    ``HunyuanVideo15Pipeline`` or ``Cosmos2VideoToWorldPipeline`` (a pipeline of a registered family,
    :func:`difftrack.backbones.family_for`) with CAG.

    ``*args`` / ``**kwargs`` go to ``pipe(...)`` unchanged (prompt, generator, output_type, ...); the return value is
    the pipeline's. Implemented with :func:`cag_hooks` on ``pipe.transformer``: CogVideoX batches ``[uncond, cond]``
    (one extra slot ``[uncond, cond, perturbed]``); Wan calls the transformer for cond then uncond (the cond call gets
    the extra slot); HunyuanVideo uses embedded guidance (``guidance_scale``) and CFG only with ``true_cfg_scale > 1``
    and a negative prompt, which then is the weight folded; HunyuanVideo 1.5 takes ``guidance_scale`` into its
    ``guider`` for the call; Cosmos combines ``c + w (c - u)``, so ``w + 1`` is folded (the family's
    ``cfg_weight``). ``use_dynamic_cfg=True`` is refused (CogVideoX): the
    pipeline changes ``w`` only after the transformer call, so the hook could not fold ``s/w`` correctly (the
    published CAG code ignores dynamic CFG too). Wan 2.2 A14B (``transformer_2``, ``boundary_ratio``): each step is
    perturbed in the expert that runs it, the low-noise expert's steps folded with ``guidance_scale_2`` (default
    ``guidance_scale``, as the pipeline). Calls whose loop the hooks cannot follow are refused, as the pipeline's
    family says (:meth:`PipelineFamily.check_cag_call`: SkyReels-V2's asynchronous diffusion forcing and multi-window
    long videos). Wan 2.2 TI2V and SkyReels-V2 (also with block-causal attention) follow Wan's sequential CFG; Mochi
    has no CAG processor (:func:`apply_cag` refuses). ``shared_prefix``: see :func:`cag_hooks`.
    """
    if use_dynamic_cfg:
        raise ValueError("use_dynamic_cfg=True is not supported with CAG (the CFG weight changes after the "
                         "transformer call); pass use_dynamic_cfg=False")
    _checks.check_guidance_scale(guidance_scale)  # the one rule, with or without CAG (diffusers takes any number)
    family = family_for(pipe)
    if config is None:
        return family.call(pipe, guidance_scale, *args, num_inference_steps=num_inference_steps, **kwargs)
    family.check_cag_call(kwargs)  # SkyReels-V2 diffusion forcing: synchronous loops only
    weight, do_cfg = family.cfg_weight(guidance_scale, kwargs)  # HunyuanVideo: embedded guidance; Cosmos: w + 1
    per_expert = experts(pipe).guidance_scales(weight, kwargs)  # Wan 2.2: guidance_scale_2 for transformer_2
    with cag_hooks(pipe, config, weight, num_inference_steps, do_cfg=do_cfg, shared_prefix=shared_prefix,
                   expert_guidance_scales=per_expert):
        return family.call(pipe, guidance_scale, *args, num_inference_steps=num_inference_steps, **kwargs)
