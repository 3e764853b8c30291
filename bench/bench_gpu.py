#!/usr/bin/env python
"""GPU benchmark of difftrack at full CogVideoX size (random weights, bf16), issue 8.

Measures, side by side in one process, for CogVideoX-2B (and CogVideoX-5B when it fits in memory and time):

1. ``plain``: one transformer forward (a denoising step) at CFG batch 2 and at batch 1;
2. ``capture``: the same forward with :func:`difftrack.capture.capture` of layer 17 (then of all layers) and an
   ``on_qk`` callback that matches frame 0 against frames 1..12 (bidirectional head-averaged QK cost, argmax per
   source token -> ``long [12, 1350]``), in a naive version (``qk_cost`` one frame pair at a time, fp32) and in a
   batched version (12 pairs in one bf16 matmul per head chunk, softmax accumulated in fp32);
3. ``tracking``: one 13-frame chunk tracked our way (per-frame VAE encode + forward stopped after layer 17 with
   :func:`difftrack.capture.run_until`, batch 1, no decode) against the published recipe re-enacted with the same
   models (per-frame VAE encode + full forward at CFG batch 2 on duplicated empty-prompt embeddings + CFG combine +
   one scheduler step + VAE decode of the 13 latent frames); with and without the VAE parts;
4. ``cag``: one CAG step (3-slot batch ``[uncond, cond, perturbed]``, :func:`difftrack.guidance.apply_cag` on
   layers 13/17/21, variants ``renormalized`` and ``zero_after_softmax``) against a plain CFG step, against a
   dense-mask reference (full ``N x N`` boolean mask to SDPA for the perturbed slot, defined here), and against a
   bench-local prototype that computes the blocks before the first CAG layer once for cond and perturbed-cond
   (``shared_prefix``).

Every measurement: warm-up, then ``--reps`` timed repetitions with ``torch.cuda.synchronize`` around each (wall
clock; CUDA-event time too), peak memory by ``torch.cuda.max_memory_allocated`` reset right before the timed reps.
The JSON (``--out``) is rewritten after every measurement, so a timeout leaves partial results. OOM and other errors
are caught per measurement and recorded (``"skipped": "OOM"`` / ``"error"``); ``--strict`` re-raises instead.

``--tiny`` runs the same code paths with tiny configs (same layer counts, tiny widths) on CPU in seconds.

Only torch, numpy, diffusers and the standard library are used (no opencv/pandas). See ``bench/README.md``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make the repo's difftrack importable
    sys.path.insert(0, str(ROOT))

from difftrack.backbones import adapter_for  # noqa: E402
from difftrack.capture import capture, run_until  # noqa: E402
from difftrack.guidance import CAGConfig, CogVideoXCAGAttnProcessor, apply_cag, cag_combine  # noqa: E402
from difftrack.matching import qk_cost, temperature  # noqa: E402

GIB = float(1 << 30)

# ------------------------------------------------------------------------------------------------- configs
# CogVideoX-2B transformer config (THUDM/CogVideoX-2b transformer/config.json); 5B differs in heads, layers, RoPE.
COG2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
             freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30, dropout=0.0, attention_bias=True,
             sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
             max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
             norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
             temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False,
             use_learned_positional_embeddings=False)
COG5B = dict(COG2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
# tiny: 22 layers (layers 17 and 13/17/21 exist), tiny widths; 13 latent frames of 4x6 -> 2x3 tokens
_TINY = dict(attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=16,
             sample_width=6, sample_height=4, max_text_seq_length=8, num_layers=22)
TINY2B = dict(COG2B, num_attention_heads=2, **_TINY)
TINY5B = dict(COG5B, num_attention_heads=3, **_TINY)

MODELS = {  # name -> (full config, tiny config, tracking layer, CAG layers)
    "cogvideox-2b": (COG2B, TINY2B, 17, [13, 17, 21]),
    "cogvideox-5b": (COG5B, TINY5B, 17, [15, 17, 18]),
}
# AutoencoderKLCogVideoX defaults are CogVideoX's VAE (block_out_channels (128, 256, 256, 512), latent 16, ...).
VAE_FULL: dict = {}
VAE_TINY = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                sample_height=32, sample_width=48)
# CogVideoX-2b scheduler_config.json
SCHEDULER = dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
                 snr_shift_scale=3.0, clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085,
                 beta_end=0.012, set_alpha_to_one=True, steps_offset=0, num_train_timesteps=1000)
LATENT_FRAMES = 13  # 49 frames -> 13 latent frames
CFG_SCALE = 6.0
# measured in an earlier trial (H100, this configuration, random weights, bf16), for side-by-side reading
ANCHORS_H100 = {"plain_cfg_step_b2_ms": 635, "plain_b1_ms": 320, "plain_b2_peak_gib": 4.8,
                "run_until_17_b1_ms": 193, "vae_encode_13_per_frame_ms": 442, "vae_decode_13_ms": 2279,
                "published_dense_mask_cag_step_ms": 1157}


# ------------------------------------------------------------------------------------------------- matching
class ArgmaxMatcher:
    """``on_qk`` callback: for one captured layer, the head-averaged bidirectional QK cost of frame 0 against every
    other frame, reduced to the best target token per source token. ``out[layer]`` = ``long [F-1, P]`` (kept on
    the device; no host sync).

    Variants (identical meaning; argmax of ``sum_h softmax_j(q0 k_f / tau) + sum_h softmax_i(q_f k0 / tau)^T``):

    * ``naive``: :func:`difftrack.matching.qk_cost` one frame pair at a time (fp32 matmul and softmax);
    * ``batched_fp32``: the F-1 pairs in one bf16 matmul per head chunk, fp32 softmax (fp32 output), fp32 head sum;
    * ``batched_bf16``: as above, softmax computed in fp32 internally but written in the input dtype, head sum
      accumulated in fp32 (half the bytes of ``batched_fp32``);
    * ``batched_bf16_T``: as ``batched_bf16``, backward direction as ``q_f k0`` with a transposed add instead of a
      softmax over dim -2.
    """

    VARIANTS = ("naive", "batched_fp32", "batched_bf16", "batched_bf16_T")

    def __init__(self, variant: str = "batched_bf16", tau=None, chunk_bytes: int = 512 << 20):
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown matcher variant {variant!r}; allowed: {self.VARIANTS}")
        self.variant, self.tau, self.chunk_bytes = variant, tau, chunk_bytes
        self.out: dict[int, torch.Tensor] = {}
        self.calls = 0

    def __call__(self, ev) -> None:
        qv, kv = ev.q_video[0], ev.k_video[0]  # [H, F, rows, cols, D] (views of the model's tensors)
        H, Fr, r, c, D = qv.shape
        self.out[ev.layer] = self.match(qv.reshape(H, Fr, r * c, D), kv.reshape(H, Fr, r * c, D))
        self.calls += 1

    def match(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q, k [H, F, P, D]`` -> ``long [F-1, P]``."""
        if self.variant == "naive":
            return torch.stack([qk_cost(q[:, 0], k[:, 0], q[:, f], k[:, f], self.tau, True).argmax(-1)
                                for f in range(1, q.shape[1])])
        return self.cost(q, k).argmax(-1)

    def cost(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Batched ``fp32 [F-1, P, P]`` = ``H`` x 2 x the cost of :func:`qk_cost` (same argmax)."""
        H, Fr, P, D = q.shape
        scale = 1.0 / temperature(self.tau, H, D)
        fp32 = self.variant == "batched_fp32"
        out_bytes = 4 if fp32 else q.element_size()
        hc = max(1, min(H, self.chunk_bytes // max(1, (Fr - 1) * P * P * (q.element_size() + out_bytes))))
        q0, k0 = q[:, :1] * scale, k[:, :1]  # [H, 1, P, D]
        qt, kt = q[:, 1:] * scale, k[:, 1:]  # [H, F-1, P, D]
        acc = torch.zeros(Fr - 1, P, P, dtype=torch.float32, device=q.device)
        sm = (lambda s, d: torch.softmax(s, d, dtype=torch.float32)) if fp32 else (lambda s, d: torch.softmax(s, d))
        for h0 in range(0, H, hc):
            hs = slice(h0, h0 + hc)
            s = torch.matmul(q0[hs], kt[hs].transpose(-1, -2))  # [hc, F-1, P_src, P_tgt]
            acc += sm(s, -1).sum(0, dtype=torch.float32)
            del s
            if self.variant == "batched_bf16_T":
                s = torch.matmul(qt[hs], k0[hs].transpose(-1, -2))  # [hc, F-1, P_tgt, P_src]
                acc += sm(s, -1).sum(0, dtype=torch.float32).transpose(-1, -2)
            else:
                s = torch.matmul(k0[hs], qt[hs].transpose(-1, -2))  # [hc, F-1, P_src, P_tgt] = k0_i . q_j
                acc += sm(s, -2).sum(0, dtype=torch.float32)
            del s
        return acc


# --------------------------------------------------------------------------------- dense-mask CAG reference
class DenseMaskCAGProcessor(CogVideoXCAGAttnProcessor):
    """Reference perturbation with a dense ``N x N`` boolean mask (as the published non-CFG PAG processor): the
    perturbed slot's attention is SDPA with ``attn_mask`` = (same latent frame) | (text row) | (text column), i.e.
    the ``"renormalized"`` variant computed the expensive way. The mask is rebuilt on every call, as published.
    Unperturbed slots go to the original processor (inherited ``__call__``)."""

    def _perturbed(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        grid = self.state.grid
        L = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B, N = x.shape[:2]
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, L:] = apply_rotary_emb(q[:, :, L:], image_rotary_emb)
            k[:, :, L:] = apply_rotary_emb(k[:, :, L:], image_rotary_emb)
        fid = torch.cat([torch.full((L,), -1, device=x.device),
                         torch.arange(N - L, device=x.device) // grid.tokens_per_frame])
        mask = (fid[:, None] == fid[None, :]) | (fid[:, None] < 0) | (fid[None, :] < 0)  # bool [N, N]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        del mask
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * d)
        o = attn.to_out[1](attn.to_out[0](o))
        e, h = o.split([L, o.size(1) - L], dim=1)
        return h, e


def install_dense(model, state, layers) -> list:
    """Swap the processors installed by ``apply_cag`` for the dense-mask reference; returns ``[(attn, CAG
    processor)]`` to put back before ``apply_cag`` exits (it removes exactly its own processors, so a processor
    swapped from outside would otherwise stay installed)."""
    blocks = adapter_for(model).blocks(model)
    undo = []
    for l in layers:
        attn = blocks[l][1].attn1
        p = attn.processor
        undo.append((attn, p))
        attn.set_processor(DenseMaskCAGProcessor(p.original, state, "renormalized", l))
    return undo


def cag_shared_prefix_forward(model, state, x2, text2, t2, rope, first: int) -> torch.Tensor:
    """Bench-local prototype: a CAG forward whose perturbed-cond slot shares the blocks before ``first`` (the first
    CAG layer) with the cond slot. Mirrors ``CogVideoXTransformer3DModel.forward`` (CogVideoX 1.0, no ofs), runs
    ``[uncond, cond]`` up to block ``first - 1`` and ``[uncond, cond, cond]`` (last slot perturbed) from ``first``
    on. Returns the 3-slot output ``[3B, F, C, H, W]`` (same values as the 3-slot forward up to rounding)."""
    b = x2.shape[0] // 2
    _, frames, _, height, width = x2.shape
    state.grid = adapter_for(model).grid(model, (), dict(hidden_states=x2, encoder_hidden_states=text2))
    emb = model.time_embedding(model.time_proj(t2).to(dtype=x2.dtype), None)
    h = model.embedding_dropout(model.patch_embed(text2, x2))
    L = text2.shape[1]
    e, h = h[:, :L], h[:, L:]
    for i, blk in enumerate(model.transformer_blocks):
        if i == first:
            h, e, emb = (torch.cat([t, t[-b:]]) for t in (h, e, emb))
            state.set_slots(3, [2])
        h, e = blk(hidden_states=h, encoder_hidden_states=e, temb=emb, image_rotary_emb=rope)
    h = model.proj_out(model.norm_out(model.norm_final(h), temb=emb))
    p = model.config.patch_size
    out = h.reshape(h.shape[0], frames, height // p, width // p, -1, p, p)
    return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


# ------------------------------------------------------------------------------------------------- helpers
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free():
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # (on CPU a gc pass costs more than it frees)
        gc.collect()
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def timeit(fn, dev, reps: int, warmup: int) -> dict:
    """Mean wall ms over ``reps`` synchronized calls after ``warmup`` calls; CUDA-event ms and peak memory on GPU."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    cuda = dev.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(dev)
        static = torch.cuda.memory_allocated(dev)
    wall, gpu = [], []
    for _ in range(reps):
        _sync(dev)
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        fn()
        if cuda:
            e1.record()
        _sync(dev)
        wall.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            gpu.append(e0.elapsed_time(e1))
    r = {"ms": float(np.mean(wall)), "ms_std": float(np.std(wall)), "ms_min": float(np.min(wall)),
         "ms_all": [round(x, 3) for x in wall], "reps": reps, "warmup": warmup}
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev)
        r.update(gpu_ms=float(np.mean(gpu)), peak_gib=peak / GIB, static_gib=static / GIB,
                 transient_gib=(peak - static) / GIB)
    else:
        r.update(gpu_ms=None, peak_gib=None, static_gib=None, transient_gib=None)
    return r


def _git_commit(arg: str | None) -> str:
    """``--commit`` when given, else :func:`difftrack.provenance.git_commit` ($GIT_COMMIT, then git)."""
    from difftrack.provenance import git_commit

    return arg or git_commit()


class Bench:
    """Holds the results dict, the clock and the JSON writer."""

    def __init__(self, args, dev, dtype):
        self.args, self.dev, self.dtype = args, dev, dtype
        self.t_start = time.perf_counter()
        import diffusers

        self.res = {
            "meta": {
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor()})",
                "device_total_gib": (torch.cuda.get_device_properties(dev).total_memory / GIB
                                     if dev.type == "cuda" else None),
                "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
                "commit": _git_commit(args.commit), "tiny": bool(args.tiny), "dtype": str(dtype).replace("torch.", ""),
                "reps": args.reps, "warmup": args.warmup, "budget_s": args.budget_s,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": 0.0, "finished": False,
                "argv": sys.argv[1:] if args.argv is None else args.argv,
                "anchors_h100_earlier_trial": ANCHORS_H100,
            },
            "vae": {},
            "models": {},
        }
        self.out = Path(args.out)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

    def write(self) -> None:
        self.res["meta"]["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=_json_default))
        os.replace(tmp, self.out)

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def measure(self, section: dict, name: str, fn, reps: int | None = None, extra: dict | None = None):
        """Time ``fn`` into ``section[name]``; OOM / errors recorded (re-raised with --strict)."""
        if self.over_budget():
            section[name] = {"skipped": f"time budget ({self.args.budget_s:.0f} s) spent"}
            self.log(f"{name}: skipped (time budget)")
            self.write()
            return None
        try:
            r = timeit(fn, self.dev, reps or self.args.reps, self.args.warmup)
            if extra:
                r.update(extra)
            section[name] = r
            pk = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
            self.log(f"{name}: {r['ms']:.1f} ms{pk}")
        except Exception as e:  # noqa: BLE001
            if self.args.strict:
                raise
            section[name] = {"skipped": "OOM" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:600]}
            self.log(f"{name}: {section[name]['skipped']} ({type(e).__name__})")
            r = None
        _free()
        self.write()
        return r


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _ratio(a: dict | None, b: dict | None, key: str = "ms"):
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def _extra_peak(a: dict | None, b: dict | None):
    """Extra peak memory of ``a`` over ``b``: difference of (peak - memory allocated before the timed reps)."""
    if not a or not b or a.get("transient_gib") is None or b.get("transient_gib") is None:
        return None
    return a["transient_gib"] - b["transient_gib"]


def _goal(value, target: float, kind: str) -> dict:
    met = None if value is None else (value <= target if kind == "<=" else value >= target)
    return {"value": value, "target": f"{kind} {target}", "met": met}


# ------------------------------------------------------------------------------------------------- builders
def build_transformer(cfg: dict, dev, dtype):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    with torch.device(dev):  # random init directly on the device (fast), then cast
        m = CogVideoXTransformer3DModel(**cfg)
    return m.to(dev, dtype).eval().requires_grad_(False)


def build_vae(cfg: dict, dev, dtype):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(1)
    with torch.device(dev):
        v = AutoencoderKLCogVideoX(**cfg)
    return v.to(dev, dtype).eval().requires_grad_(False)


def rotary(model, dev):
    """The pipeline's RoPE tables (``CogVideoXPipeline._prepare_rotary_positional_embeddings``, CogVideoX 1.0)."""
    c = model.config
    if not c.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = c.patch_size
    gh, gw = c.sample_height // p, c.sample_width // p
    crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // p, c.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                   temporal_size=LATENT_FRAMES, device=dev)


def make_inputs(model, batch: int, dev, dtype, t: int, seed: int = 0, latents=None, text=None) -> dict:
    c = model.config
    g = torch.Generator(dev).manual_seed(seed)
    if latents is None:
        latents = torch.randn(1, LATENT_FRAMES, c.in_channels, c.sample_height, c.sample_width, generator=g,
                              device=dev, dtype=dtype)
    if text is None:
        text = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g, device=dev, dtype=dtype)
    return dict(hidden_states=latents.expand(batch, *latents.shape[1:]).contiguous(),
                encoder_hidden_states=text.expand(batch, *text.shape[1:]).contiguous(),
                timestep=torch.full((batch,), t, dtype=torch.long, device=dev),
                image_rotary_emb=rotary(model, dev), return_dict=False)


# ---------------------------------------------------------------------------------------------- sections
def section_plain(B: Bench, model, M: dict):
    s = M["plain"] = {}
    inp2 = make_inputs(model, 2, B.dev, B.dtype, 999)
    inp1 = make_inputs(model, 1, B.dev, B.dtype, 999)
    B.measure(s, "forward_b2", lambda: model(**inp2))
    B.measure(s, "forward_b1", lambda: model(**inp1))
    layer = M["tracking_layer"]
    B.measure(s, f"run_until_{layer}_b1", lambda: run_until(model, layer, **inp1))


def microbench_matchers(B: Bench, model, M: dict) -> str:
    """Callback cost alone on real layer-17 q/k, agreement of the batched variants with the naive one; returns the
    fastest batched variant."""
    s = M["callback"] = {}
    layer = M["tracking_layer"]
    inp1 = make_inputs(model, 1, B.dev, B.dtype, 999)
    with capture(model, layers=[layer]) as cache:
        run_until(model, layer, **inp1)
    q, k = cache.q(layer)[0], cache.k(layer)[0]  # [H, F, r, c, D]
    H, Fr, r, c, D = q.shape
    q, k = q.reshape(H, Fr, r * c, D), k.reshape(H, Fr, r * c, D)
    del cache
    s["shape_H_F_P_D"] = [H, Fr, r * c, D]
    ref_idx = ArgmaxMatcher("naive").match(q, k)
    ref_cost = torch.stack([qk_cost(q[:, 0], k[:, 0], q[:, f], k[:, f]) for f in range(1, Fr)])  # [F-1, P, P]
    best = ref_cost.max(-1).values
    times = {}
    for v in ArgmaxMatcher.VARIANTS:
        m = ArgmaxMatcher(v)
        r_ = B.measure(s, v, lambda m=m: m.match(q, k), reps=B.args.reps if B.args.tiny else max(B.args.reps, 5))
        if r_ is None:
            continue
        times[v] = r_["ms"]
        idx = m.match(q, k)
        gap = (best - ref_cost.gather(-1, idx.unsqueeze(-1)).squeeze(-1)) / best.clamp_min(1e-30)
        s[v].update(agree_with_naive=float((idx == ref_idx).float().mean()),
                    rel_cost_gap_max=float(gap.max()), rel_cost_gap_mean=float(gap.mean()),
                    per_layer_overhead_vs_plain_b2=_ratio(r_, M["plain"].get("forward_b2")))
    fast = [v for v in times if v != "naive"]
    choice = min(fast, key=times.get) if fast else "batched_bf16"
    s["fast_variant"] = choice
    del q, k, ref_cost
    B.write()
    return choice


def section_capture(B: Bench, model, M: dict, fast: str, with_naive_all: bool):
    s = M["capture"] = {}
    layer = M["tracking_layer"]
    n = len(adapter_for(model).blocks(model))
    inp = {2: make_inputs(model, 2, B.dev, B.dtype, 999), 1: make_inputs(model, 1, B.dev, B.dtype, 999)}

    def run(layers, variant, b):
        m = ArgmaxMatcher(variant)

        def fn():
            with capture(model, layers=layers, store=False, on_qk=m):
                model(**inp[b])
        return fn, m

    plan = [("one_layer", [layer], "naive", 2), ("one_layer", [layer], fast, 2), ("one_layer", [layer], fast, 1),
            ("all_layers", "all", fast, 2), ("all_layers", "all", fast, 1)]
    if with_naive_all:
        plan.append(("all_layers", "all", "naive", 2))
    for what, layers, variant, b in plan:
        name = f"{what}_{'fast' if variant != 'naive' else 'naive'}_b{b}"
        fn, m = run(layers, variant, b)
        r = B.measure(s, name, fn, extra={"variant": variant, "layers": n if layers == "all" else len(layers)})
        if r is not None:
            base = M["plain"].get(f"forward_b{b}")
            want = n if layers == "all" else 1
            ok = len(m.out) == want and all(tuple(v.shape) == (LATENT_FRAMES - 1, v.shape[1]) for v in m.out.values())
            r.update(ratio_vs_plain=_ratio(r, base), extra_peak_gib=_extra_peak(r, base),
                     matches_per_call=len(m.out), match_shape=list(next(iter(m.out.values())).shape) if m.out else None,
                     outputs_ok=bool(ok))
            B.write()


def section_tracking(B: Bench, model, vae, sched, M: dict, fast: str, vae_parts: bool = True):
    s = M["tracking"] = {}
    c = model.config
    layer = M["tracking_layer"]
    dev, dtype = B.dev, B.dtype
    g = torch.Generator(dev).manual_seed(3)
    text1 = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g, device=dev, dtype=dtype)
    text2 = text1.expand(2, *text1.shape[1:]).contiguous()  # [uncond(""), cond("")]: duplicated empty prompt
    t = sched.timesteps[-1]  # the published tracking step (inverse_step 49 -> t = 19)
    rope = rotary(model, dev)
    s["timestep"] = int(t)

    if vae is not None:
        ph, pw = c.sample_height * vae_scale(vae), c.sample_width * vae_scale(vae)
        frames = torch.rand(LATENT_FRAMES, 3, 1, ph, pw, generator=g, device=dev, dtype=dtype) * 2 - 1
        sf = vae.config.scaling_factor
        eb = max(1, B.args.encode_batch)

        def encode():  # each RGB frame VAE-encoded independently as a 1-frame video -> [1, 13, C, h, w]
            z = torch.cat([vae.encode(frames[i:i + eb]).latent_dist.sample(g) for i in range(0, LATENT_FRAMES, eb)])
            return (z * sf).permute(2, 0, 1, 3, 4)
    else:
        lat0 = torch.randn(1, LATENT_FRAMES, c.in_channels, c.sample_height, c.sample_width, generator=g, device=dev,
                           dtype=dtype)

        def encode():
            return lat0

    def ours(use_vae=True):
        lat = encode() if use_vae else lat_fixed
        m = ArgmaxMatcher(fast)
        with capture(model, layers=[layer], store=False, on_qk=m):
            run_until(model, layer, hidden_states=lat, encoder_hidden_states=text1,
                      timestep=t.expand(1), image_rotary_emb=rope, return_dict=False)
        return m.out[layer]

    def published(use_vae=True):
        lat = encode() if use_vae else lat_fixed
        m = ArgmaxMatcher(fast)
        x = torch.cat([lat, lat])
        with capture(model, layers=[layer], store=False, on_qk=m):
            out = model(hidden_states=x, encoder_hidden_states=text2, timestep=t.expand(2), image_rotary_emb=rope,
                        return_dict=False)[0].float()
        u, cc = out.chunk(2)
        v = u + CFG_SCALE * (cc - u)
        lat2 = sched.step(v, t, lat.float(), return_dict=False)[0].to(dtype)
        if use_vae:
            vae.decode(lat2.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor)  # published: decode to PIL [B11]
        return m.out[layer]

    lat_fixed = encode()
    if vae is not None:
        if vae_parts:  # the VAE alone (the same VAE for every model: measured with the first model only)
            B.measure(s, "vae_encode_13_per_frame", encode, extra={"encode_batch": eb})
            zl = lat_fixed.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
            r = B.measure(s, "vae_decode_13", lambda: vae.decode(zl))
            if r is None and s["vae_decode_13"].get("skipped") == "OOM":  # fall back to diffusers' tiled decode
                vae.enable_tiling()
                s["vae_tiling"] = True
                B.measure(s, "vae_decode_13_tiled", lambda: vae.decode(zl))
            del zl
        B.measure(s, "ours", ours)
        B.measure(s, "published", published)
        s["speedup_published_over_ours"] = _ratio(s.get("published"), s.get("ours"))
    else:
        s["vae"] = "disabled (--no-vae)"
    B.measure(s, "ours_no_vae", lambda: ours(False))
    B.measure(s, "published_no_vae", lambda: published(False))
    s["speedup_published_over_ours_no_vae"] = _ratio(s.get("published_no_vae"), s.get("ours_no_vae"))
    try:  # same meaning: both recipes' matches on the same latent (outputs differ only by the CFG batch)
        a, b = ours(False), published(False)
        s["ours_vs_published_argmax_agree"] = float((a == b).float().mean())
    except Exception as e:  # noqa: BLE001
        if B.args.strict:
            raise
        s["ours_vs_published_argmax_agree"] = f"error: {type(e).__name__}"
    B.write()


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def section_cag(B: Bench, model, M: dict):
    s = M["cag"] = {}
    layers = M["cag_layers"]
    s["layers"] = layers
    inp2 = make_inputs(model, 2, B.dev, B.dtype, 999, seed=5)
    x2, e2, t2, rope = (inp2[k] for k in ("hidden_states", "encoder_hidden_states", "timestep", "image_rotary_emb"))
    x3 = torch.cat([x2, x2[1:]])
    e3 = torch.cat([e2, e2[1:]])
    t3 = torch.cat([t2, t2[1:]])

    def cfg_step():
        out = model(**inp2)[0].float()
        u, c = out.chunk(2)
        return u + CFG_SCALE * (c - u)

    def cag_forward(variant, dense=False):
        with apply_cag(model, CAGConfig(layers=layers, variant=variant)) as st:
            undo = install_dense(model, st, layers) if dense else []
            try:
                st.set_slots(3, [2])
                return model(hidden_states=x3, encoder_hidden_states=e3, timestep=t3, image_rotary_emb=rope,
                             return_dict=False)[0]
            finally:
                for attn, proc in undo:
                    attn.set_processor(proc)

    def cag_step(variant, dense=False):
        u, c, p = cag_forward(variant, dense).float().chunk(3)
        return cag_combine(u, c, p, CFG_SCALE, 1.0)

    def shared_prefix_forward(variant="renormalized"):
        with apply_cag(model, CAGConfig(layers=layers, variant=variant)) as st:
            return cag_shared_prefix_forward(model, st, x2, e2, t2, rope, min(layers))

    def shared_prefix_step():
        u, c, p = shared_prefix_forward().float().chunk(3)
        return cag_combine(u, c, p, CFG_SCALE, 1.0)

    base = B.measure(s, "cfg_step_b2", lambda: (cfg_step(), None)[1])
    for name, fn in [("cag_renormalized", lambda: cag_step("renormalized")),
                     ("cag_zero_after_softmax", lambda: cag_step("zero_after_softmax")),
                     ("cag_renormalized_shared_prefix", shared_prefix_step),
                     ("cag_dense_mask", lambda: cag_step("renormalized", dense=True))]:
        r = B.measure(s, name, lambda fn=fn: (fn(), None)[1])
        if r is not None:
            r.update(ratio_vs_cfg=_ratio(r, base), extra_peak_gib=_extra_peak(r, base))
            B.write()
    # correctness of the references (max |diff| of the 3-slot transformer output, perturbed slot)
    checks = s["checks"] = {}
    for name, fn in [("dense_mask_vs_renormalized", lambda: cag_forward("renormalized", dense=True)),
                     ("shared_prefix_vs_renormalized", shared_prefix_forward)]:
        if B.over_budget():
            checks[name] = "skipped: time budget"
            continue
        try:
            ref = cag_forward("renormalized").float()
            other = fn().float()
            checks[name] = {"max_abs_diff_perturbed": float((ref[2:] - other[2:]).abs().max()),
                            "max_abs_diff_all": float((ref - other).abs().max()),
                            "ref_abs_max": float(ref.abs().max())}
            del ref, other
        except Exception as e:  # noqa: BLE001
            if B.args.strict:
                raise
            checks[name] = {"skipped": "OOM" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:400]}
        _free()
        B.write()


def goals(M: dict) -> dict:
    cap, tr, cag = M.get("capture", {}), M.get("tracking", {}), M.get("cag", {})
    g = lambda d, k, f: (d.get(k) or {}).get(f)  # noqa: E731
    one = g(cap, "one_layer_fast_b2", "ratio_vs_plain")
    extra = [g(cap, k, "extra_peak_gib") for k in cap if "fast" in k]
    extra = [x for x in extra if x is not None]
    return {
        "one_layer_capture_overhead_b2": _goal(None if one is None else one - 1.0, 0.03, "<="),
        "all_layers_capture_ratio_b2": _goal(g(cap, "all_layers_fast_b2", "ratio_vs_plain"), 1.2, "<="),
        "capture_extra_peak_gib_max": _goal(max(extra) if extra else None, 1.0, "<="),
        "tracking_speedup_with_vae": _goal(tr.get("speedup_published_over_ours"), 5.0, ">="),
        "tracking_speedup_no_vae": _goal(tr.get("speedup_published_over_ours_no_vae"), 5.0, ">="),
        "cag_step_ratio_renormalized": _goal(g(cag, "cag_renormalized", "ratio_vs_cfg"), 1.3, "<="),
        "cag_step_ratio_zero_after_softmax": _goal(g(cag, "cag_zero_after_softmax", "ratio_vs_cfg"), 1.3, "<="),
        "cag_step_ratio_shared_prefix_prototype": _goal(g(cag, "cag_renormalized_shared_prefix", "ratio_vs_cfg"),
                                                        1.3, "<="),
    }


# ------------------------------------------------------------------------------------------------- main
def run_model(B: Bench, name: str, vae, sched, first: bool):
    full, tiny, layer, cag_layers = MODELS[name]
    cfg = tiny if B.args.tiny else full
    M = B.res["models"][name] = {"config": {k: v for k, v in cfg.items()}, "tracking_layer": layer,
                                 "cag_layers": cag_layers}
    if B.over_budget():
        M["skipped"] = "time budget"
        B.write()
        return
    B.log(f"building {name} ({cfg['num_layers']} layers, {cfg['num_attention_heads']} heads)")
    model = None
    try:
        t0 = time.perf_counter()
        model = build_transformer(cfg, B.dev, B.dtype)
        _sync(B.dev)
        M["build_s"] = time.perf_counter() - t0
        M["params"] = sum(p.numel() for p in model.parameters())
        M["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
        B.log(f"built {name}: {M['params'] / 1e9:.2f} B params in {M['build_s']:.1f} s")
        B.write()
        with torch.inference_mode():
            section_plain(B, model, M)
            fast = microbench_matchers(B, model, M)
            section_capture(B, model, M, fast, with_naive_all=first or B.args.tiny)
            section_tracking(B, model, vae, sched, M, fast, vae_parts=first)
            section_cag(B, model, M)
    except Exception as e:  # noqa: BLE001
        if B.args.strict:
            raise
        M["skipped"] = "OOM" if _is_oom(e) else "error"
        M["error"] = f"{type(e).__name__}: {e}"[:600]
        B.log(f"{name}: {M['skipped']} ({type(e).__name__}: {str(e)[:200]})")
    finally:
        M["goals"] = goals(M)
        del model
        _free()
        B.write()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_gpu.json"), help="JSON output path")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test, seconds)")
    ap.add_argument("--commit", default=None, help="git commit to record (default: $GIT_COMMIT, then git)")
    ap.add_argument("--models", default="cogvideox-2b,cogvideox-5b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; tiny 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per measurement (default 1; tiny 0)")
    ap.add_argument("--no-vae", action="store_true", help="skip the VAE (tracking measured without encode/decode)")
    ap.add_argument("--encode-batch", type=int, default=1,
                    help="frames per VAE encode call (1 = per-frame encode as published; results identical)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip remaining measurements after this many seconds (default 420; tiny 600)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    ap.add_argument("--strict", action="store_true", help="re-raise errors instead of recording them")
    args = ap.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.reps is None:
        args.reps = 1 if args.tiny else 3
    if args.warmup is None:
        args.warmup = 0 if args.tiny else 1
    if args.budget_s is None:
        args.budget_s = 600.0 if args.tiny else 420.0
    bad = [m for m in args.models.split(",") if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; allowed: {sorted(MODELS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    threads = torch.get_num_threads()
    if dev.type == "cpu" and args.tiny:
        torch.set_num_threads(1)  # tiny ops: threads only spin (and crawl on a loaded machine)
    try:
        return _main(args, dev, dtype)
    finally:
        torch.set_num_threads(threads)


def _main(args, dev, dtype) -> dict:
    B = Bench(args, dev, dtype)
    B.log(f"device {B.res['meta']['device']}, torch {torch.__version__}, diffusers {B.res['meta']['diffusers']}, "
          f"commit {B.res['meta']['commit']}, out {B.out}")
    B.write()
    from diffusers import CogVideoXDDIMScheduler

    sched = CogVideoXDDIMScheduler(**SCHEDULER)
    sched.set_timesteps(50, device=dev)
    vae = None
    if not args.no_vae:
        try:
            t0 = time.perf_counter()
            vae = build_vae(VAE_TINY if args.tiny else VAE_FULL, dev, dtype)
            _sync(dev)
            B.res["vae"] = {"config": "AutoencoderKLCogVideoX defaults" if not args.tiny else VAE_TINY,
                            "build_s": time.perf_counter() - t0,
                            "params": sum(p.numel() for p in vae.parameters())}
            B.log(f"built VAE: {B.res['vae']['params'] / 1e6:.0f} M params in {B.res['vae']['build_s']:.1f} s")
        except Exception as e:  # noqa: BLE001
            if args.strict:
                raise
            vae = None
            B.res["vae"] = {"skipped": "OOM" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:400]}
    else:
        B.res["vae"] = {"skipped": "--no-vae"}
    B.write()
    for i, name in enumerate(args.models.split(",")):
        run_model(B, name, vae, sched, first=i == 0)
    B.res["meta"]["finished"] = True
    B.write()
    B.log(f"done -> {B.out}")
    return B.res


if __name__ == "__main__":
    main()
