#!/usr/bin/env python
"""Wan 2.1-14B (and Wan 2.2 A14B) at real scale with random weights, through difftrack's public entry points.

    python bench/bench_wan.py                        # one CUDA GPU: Wan 2.1-14B, ~3 min, into results/bench_gpu.json
    python bench/bench_wan.py --wan22                # then Wan 2.2 A14B (two experts) when memory allows, ~2 min more
    python bench/bench_wan.py --tiny --out /tmp/w.json   # the same code paths with tiny configs on the CPU, seconds

The pipeline is diffusers' ``WanPipeline`` built offline in seconds: the real Wan2.1-T2V-14B transformer config
(:data:`WAN14B`, equal to ``WanTransformer3DModel``'s defaults), constructed directly in bf16 on the GPU with
diffusers' default initialisation (the ``_keep_in_fp32_modules`` then cast to float32, as ``from_pretrained`` with
``torch_dtype=bfloat16`` keeps them); the Wan 2.1 VAE (``AutoencoderKLWan()`` defaults); a UMT5 encoder cut to one
layer with UMT5-XXL's width (``d_model`` 4096) and the tiny tokenizer of :mod:`difftrack.testing`; the
``UniPCMultistepScheduler`` (flow prediction, flow sigmas) the released pipelines use. Wan 2.2 A14B adds a second
expert of the same architecture (``transformer_2``, ``boundary_ratio`` 0.875). Weight values do not matter for
timing; the outputs are checked to be finite.

Measured at 480x832, 81 frames (21 latent frames of 30 x 52 tokens: 32,760 video tokens, UMT5 text 512 tokens),
bf16, every timed call after a warm-up of the same code (skipped once warm), with ``torch.cuda.synchronize``
around it; peak memory from ``torch.cuda.max_memory_allocated`` (reset right before):

1. ``exactness``: per expert, the transformer output of one denoising forward (batch 1, conditional) inside
   ``difftrack.capture.capture(layers=CAPTURE_LAYERS, store=True)`` against the same forward without it (max abs
   difference, expected 0.0; two plain forwards are compared too, for determinism), the captured q/k shapes against
   ``[1, heads, frames, rows, cols, head_dim]``, and both forwards' wall time.
2. ``analysis``: ``difftrack.analysis.analyze_generation(pipe, PROMPT, SEED, num_steps=STEPS, grid_size=GRID)``
   against a plain generation by the library's runner (``VideoRunner.generate``: the pipeline's own ``__call__``),
   same prompt, seed, steps and size, **VAE decode included in both** (as in a real generation). ``STEPS`` is small
   (4) to fit the time; the ratio is per step: a bench-local clock (forward hooks on the transformers, synchronised)
   splits each call into the denoising loop (first transformer call to the end of the last) and the fixed part (text
   encoding, VAE decode, post-processing), and ``analysis_over_plain_50_steps`` extrapolates to a 50-step
   generation: ``(50/S loop_a + fixed_a) / (50/S loop_p + fixed_p)``. The generated videos are compared too (the
   capture changes nothing, so they are expected equal).
3. ``cag``: ``difftrack.guidance.generate_with_cag_diffusers`` with a ``CAGConfig`` on ``CAG_LAYERS`` against the
   same entry point with ``config=None`` (the unmodified pipeline: a plain CFG step), ``CAG_STEPS`` steps, latents
   out; ratio of the denoising loop per step. Wan runs CFG as two forwards per step (cond, uncond); CAG gives the
   conditional call a second, perturbed slot (``[cond, perturbed]``), whose blocks before the first CAG layer are
   computed once (``guidance.PrefixShare``, the default).

The JSON (``--out``, default ``results/bench_gpu.json``) is merged: ``models["wan2.1-t2v-14b"]`` /
``models["wan2.2-t2v-a14b"]`` are replaced by this run's entries (with their own ``meta``: device, versions,
commit), except for the sections this run does not measure (``--sections``), which are kept from an earlier entry
of the same device (``sections_from_earlier_run`` names its run); ``models[key]["by_device"]`` keeps the goals of
the latest run on each device, and every other key (the CogVideoX entries, the top-level ``meta``) is left as it
was. The file is rewritten after every measurement, so a
timeout leaves partial results; an error or OOM is recorded in place of the measurement (``"skipped"``, ``"error"``),
never dropped (``--strict`` re-raises). ``--tiny`` writes to a temporary file unless ``--out`` is given, and never
into ``results/``. See ``bench/README.md``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's difftrack
    sys.path.insert(0, str(ROOT))

GIB = float(1 << 30)

# ------------------------------------------------------------------------------------------------- config
# Wan-AI/Wan2.1-T2V-14B(-Diffusers) transformer/config.json; also diffusers 0.42.1's WanTransformer3DModel defaults
# (checked at run time: ``config_is_diffusers_default``). Wan 2.2 T2V A14B's two experts have this config too.
WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
              pos_embed_seq_len=None)
# UMT5-XXL's encoder width (google/umt5-xxl) cut to one layer; vocabulary: the tiny tokenizer's
UMT5_XXL_1L = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=1, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
VAE_WAN21: dict = {}  # AutoencoderKLWan() defaults = the Wan 2.1 VAE (base_dim 96, z_dim 16, 8x spatial, 4x temporal)
# the released Wan pipelines' scheduler; flow_shift 3.0 is Wan 2.1's 480p setting, 12.0 Wan 2.2 T2V A14B's
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000)
FLOW_SHIFT = {"wan2.1-t2v-14b": 3.0, "wan2.2-t2v-a14b": 12.0}
BOUNDARY_RATIO = 0.875  # Wan 2.2 T2V A14B: transformer at t >= 875, transformer_2 below

SIZE = (81, 480, 832)  # frames, height, width: Wan's 480p setting -> 21 x 30 x 52 = 32,760 video tokens
STEPS = 4  # denoising steps of the timed generations (Wan 2.2 with shift 12: experts [1, 1, 1, 2])
CAG_STEPS = 2
GRID = 10  # analyze_generation's grid of 10 x 10 query points
GUIDANCE = 5.0  # WanPipeline's default CFG weight
CAG_SCALE = 1.0
CAPTURE_LAYERS = [0, 20, 39]  # the exactness check: first, a middle and the last block
# No CAG layers have been selected for Wan yet: CogVideoX-5B's (15, 17, 18 of 42 blocks) at the same relative depth.
# The first CAG layer sets the cost: blocks from it on run the conditional call at batch 2.
CAG_LAYERS = [14, 16, 17]
PROMPT = "a red circle moving left on a blue background"
SEED = 0
BUDGET_S = 480.0  # no measurement starts after this many seconds (the device limit of one command is 600 s)
HEADROOM_GIB = 10.0  # free memory wanted beyond a second expert's weights (activations, VAE decode)
GOALS = dict(analysis_over_plain_50_steps=("<=", 1.15), cag_step_over_cfg_step=("<=", 1.3),
             capture_max_abs_diff=("<=", 0.0))

# the same code paths at tiny size on the CPU (seconds)
TINY = dict(transformer=dict(WAN14B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16,
                             ffn_dim=64, num_layers=4, rope_max_seq_len=32),
            text=dict(d_model=32, d_kv=8, d_ff=64, num_heads=2, num_layers=1, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, feed_forward_proj="gated-gelu"),
            vae=dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]),
            size=(9, 64, 64), capture_layers=[0, 2, 3], cag_layers=[1, 2], steps=4, cag_steps=2)
FULL = dict(transformer=WAN14B, text=UMT5_XXL_1L, vae=VAE_WAN21, size=SIZE, capture_layers=CAPTURE_LAYERS,
            cag_layers=CAG_LAYERS, steps=STEPS, cag_steps=CAG_STEPS)
MODELS = ("wan2.1-t2v-14b", "wan2.2-t2v-a14b")
SECTIONS = ("exactness", "analysis", "cag")

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- building
def build_transformer(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A ``WanTransformer3DModel`` of ``cfg`` created directly in ``dtype`` on ``device`` (diffusers' default
    initialisation, seeded), in eval mode without gradients. The parameters of ``_keep_in_fp32_modules`` (time
    embedder, modulation tables, norms) are then float32, as ``from_pretrained(torch_dtype=...)`` leaves them."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tr = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(default)
    keep = tuple(WanTransformer3DModel._keep_in_fp32_modules or ())
    if dtype != torch.float32:
        for name, p in tr.named_parameters():
            if any(m in name.split(".") for m in keep):
                p.data = p.data.float()
    return tr.eval().requires_grad_(False)


def build_pipeline(cfg: dict, device: torch.device, dtype: torch.dtype, flow_shift: float):
    """``WanPipeline`` (Wan 2.1 layout) with random weights: transformer (seed 0), VAE, one-layer UMT5 encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from difftrack.testing import _t5_tokenizer

    transformer = build_transformer(cfg["transformer"], device, dtype, seed=0)
    tok = _t5_tokenizer()
    torch.manual_seed(1)
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1,
                                                   decoder_start_token_id=0, **cfg["text"]))
        vae = AutoencoderKLWan(**cfg["vae"])
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder.to(dtype).eval().requires_grad_(False),
                       vae=vae.to(dtype).eval().requires_grad_(False), transformer=transformer,
                       scheduler=UniPCMultistepScheduler(flow_shift=flow_shift, **SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_second_expert(pipe, cfg: dict, device: torch.device, dtype: torch.dtype, flow_shift: float):
    """Wan 2.2 A14B: the components of ``pipe`` plus ``transformer_2`` (seed 4) and ``boundary_ratio``."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    second = build_transformer(cfg["transformer"], device, dtype, seed=4)
    out = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                      transformer=pipe.transformer, transformer_2=second, boundary_ratio=BOUNDARY_RATIO,
                      scheduler=UniPCMultistepScheduler(flow_shift=flow_shift, **SCHEDULER))
    out.set_progress_bar_config(disable=True)
    return out


def weights_gib(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / GIB


# ------------------------------------------------------------------------------------------------- timing
class LoopClock:
    """Bench-local: wall time of the denoising loop inside one pipeline call, from the start of the first call of
    any of ``models`` to the end of the last one (each synchronised on CUDA), and the number of calls."""

    def __init__(self, models, cuda: bool):
        self.models, self.cuda = list(models), cuda
        self.start = self.end = None
        self.calls = 0
        self._handles = []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, module, args):
        if self.start is None:
            self._sync()
            self.start = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.end = time.perf_counter()
        self.calls += 1

    def __enter__(self) -> "LoopClock":
        for m in self.models:
            self._handles += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    @property
    def seconds(self) -> float | None:
        return None if self.start is None else self.end - self.start


def timed(fn, models, cuda: bool) -> tuple[dict, object]:
    """``fn()`` once with synchronisation around it: ``({s, loop_s, fixed_s, transformer_calls, peak_gib,
    base_gib}, fn's output)``; ``loop_s`` from :class:`LoopClock` on ``models``, ``fixed_s = s - loop_s``."""
    if cuda:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with LoopClock(models, cuda) as clock:
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    r = dict(s=time.perf_counter() - t0, loop_s=clock.seconds, transformer_calls=clock.calls)
    r["fixed_s"] = None if clock.seconds is None else r["s"] - clock.seconds
    if cuda:
        r.update(peak_gib=torch.cuda.max_memory_allocated() / GIB, base_gib=base / GIB)
    return r, out


def _ratio(a, b):
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------------------------------- bench
class Bench:
    """The run's state: arguments, the JSON being written, the time budget, what is already warm."""

    def __init__(self, args):
        import diffusers
        import transformers

        from difftrack.provenance import device_name, git_commit

        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.cfg = dict(TINY if args.tiny else FULL)
        if args.steps is not None:
            self.cfg["steps"] = args.steps
        if args.cag_layers is not None and not args.tiny:
            self.cfg["cag_layers"] = args.cag_layers
        self.out = Path(args.out)
        self.warm: set[str] = set()
        self.meta = dict(script="bench/bench_wan.py", device=device_name(str(self.device)),
                         device_total_gib=(torch.cuda.get_device_properties(self.device).total_memory / GIB
                                           if self.cuda else None),
                         torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
                         transformers=transformers.__version__, python=platform.python_version(),
                         commit=args.commit or git_commit(), tiny=args.tiny, dtype=str(self.dtype),
                         started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=list(args.argv), budget_s=args.budget_s)
        self.entries: dict[str, dict] = {}
        # the entries as they were before this run (sections it does not measure are kept from them)
        self.earlier = (json.loads(self.out.read_text()).get("models") or {}) if self.out.exists() else {}

    def over_budget(self) -> bool:
        return time.perf_counter() - T0 > self.args.budget_s

    def merged(self, key: str) -> dict:
        """This run's entry for ``key`` as written: plus the sections this run does not measure, kept from the
        earlier entry when that one was measured on the same device (``sections_from_earlier_run`` names their run),
        the goals of the whole, and ``by_device`` (the goals of the latest run on each device)."""
        entry, old = self.entries[key], self.earlier.get(key) or {}
        out, earlier = dict(entry), {}
        if (old.get("meta") or {}).get("device") == self.meta["device"]:
            for sec in SECTIONS:
                if sec not in self.args.sections and sec in old:
                    out[sec] = old[sec]
                    earlier[sec] = ((old.get("sections_from_earlier_run") or {}).get(sec) or
                                    {k: old["meta"].get(k) for k in ("commit", "started")})
        if earlier:
            out["sections_from_earlier_run"] = earlier
        out["goals"] = goals(out)
        by_device = dict(old.get("by_device") or {})
        by_device[self.meta["device"]] = dict(commit=self.meta["commit"], started=self.meta["started"],
                                              goals=out["goals"])
        out["by_device"] = by_device
        return out

    def write(self) -> None:
        """Merge this run's entries into ``--out`` (read fresh, written atomically); every other key stays."""
        data = json.loads(self.out.read_text()) if self.out.exists() else {}
        models = data.setdefault("models", {})
        for key in self.entries:
            models[key] = self.merged(key)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=_json_default))
        tmp.replace(self.out)

    def measure(self, where: dict, key: str, fn) -> dict | None:
        """``where[key] = fn()`` with the JSON rewritten afterwards; over the budget it is skipped, an error or OOM is
        recorded in its place (``--strict`` re-raises)."""
        if self.over_budget():
            where[key] = dict(skipped="time budget", error=f"{time.perf_counter() - T0:.0f} s > --budget-s "
                                                          f"{self.args.budget_s:.0f}")
            log(f"{key}: skipped (time budget)")
            self.write()
            return None
        log(f"{key} ...")
        try:
            where[key] = fn()
        except Exception as e:  # noqa: BLE001 -- recorded, never dropped
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            where[key] = dict(skipped="OOM" if oom else "error", error=f"{type(e).__name__}: {e}"[:2000],
                              traceback=traceback.format_exc()[-3000:])
            log(f"{key}: {where[key]['skipped']}: {where[key]['error'][:300]}")
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            if self.args.strict:
                raise
            self.write()
            return None
        self.write()
        log(f"{key} done: {_summary(where[key])}")
        return where[key]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _summary(r) -> str:
    if not isinstance(r, dict):
        return str(r)
    keys = [k for k in r if isinstance(r[k], (int, float))][:8]  # bools included
    return ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys)


# ------------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def exactness(B: Bench, runner, expert: str, t: float) -> dict:
    """One conditional forward of ``expert`` at timestep ``t`` with and without ``capture`` on the capture layers:
    max abs output difference (and of two plain forwards), captured q/k shapes, wall times."""
    from difftrack.capture import capture

    tr = runner.experts.models[expert]
    T, H, W = B.cfg["size"]
    F_lat, s = runner.latent_frames(T), runner.vae_spatial
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, tr.config.in_channels, F_lat, H // s, W // s, generator=g).to(runner.device)
    kw = runner.forward_kwargs(x, torch.tensor(float(t), device=runner.device), runner.cond(PROMPT))
    layers = [l for l in B.cfg["capture_layers"] if l < tr.config.num_layers]
    first = tr(**kw)[0]  # warm-up, kept for the determinism check
    plain, out = timed(lambda: tr(**kw)[0], [tr], B.cuda)
    with capture(tr, layers=layers, store=True) as cap:
        captured, out_cap = timed(lambda: tr(**kw)[0], [tr], B.cuda)
        shapes = {str(l): dict(q=list(cap.q(l).shape), k=list(cap.k(l).shape), dtype=str(cap.q(l).dtype))
                  for l in layers}
    p = tr.config.patch_size
    heads, hd = tr.config.num_attention_heads, tr.config.attention_head_dim
    expected = [1, heads, F_lat, H // s // p[1], W // s // p[2], hd]
    r = dict(expert=expert, timestep=float(t), layers=layers, input_shape=list(x.shape),
             runner_dtype=str(runner.dtype), transformer_dtype=str(tr.dtype),
             capture_max_abs_diff=float((out.float() - out_cap.float()).abs().max()),
             plain_vs_plain_max_abs_diff=float((out.float() - first.float()).abs().max()),
             output_finite=bool(torch.isfinite(out).all()), output_abs_mean=float(out.float().abs().mean()),
             qk_shapes=shapes, expected_qk_shape=expected,
             qk_shapes_ok=all(v["q"] == expected and v["k"] == expected for v in shapes.values()),
             forward=plain, forward_with_capture=captured,
             capture_over_forward=_ratio(captured["s"], plain["s"]))
    del cap, out, out_cap, first
    return r


def analysis_section(B: Bench, pipe, runner, M: dict) -> None:
    """``analyze_generation`` against ``VideoRunner.generate`` (decode included in both), per-step and 50-step
    ratios, and the two videos compared."""
    from difftrack.analysis import analyze_generation

    S, size = B.cfg["steps"], tuple(B.cfg["size"])
    models = list(runner.experts.models.values())
    A = M.setdefault("analysis", dict(steps=S, size=list(size), grid_size=GRID, guidance_scale=GUIDANCE,
                                      decode_included=True))
    videos = {}

    def plain():
        if "generate" not in B.warm:
            runner.generate(PROMPT, SEED, 1, GUIDANCE, size=size)
            B.warm.add("generate")
        r, videos["plain"] = timed(lambda: runner.generate(PROMPT, SEED, S, GUIDANCE, size=size), models, B.cuda)
        return r

    def analysis():
        if "analysis" not in B.warm:  # Triton kernels, cuDNN plans of the matching
            analyze_generation(pipe, PROMPT, SEED, num_steps=1, grid_size=GRID, guidance_scale=GUIDANCE, size=size)
            B.warm.add("analysis")
        r, (video, rec) = timed(lambda: analyze_generation(pipe, PROMPT, SEED, num_steps=S, grid_size=GRID,
                                                           guidance_scale=GUIDANCE, size=size), models, B.cuda)
        videos["analysis"] = video
        r.update(record_qk_tracks_shape=list(rec.qk_tracks.shape),
                 qk_tracks_finite=float(np.isfinite(rec.qk_tracks).mean()),
                 feat_tracks_finite=float(np.isfinite(rec.feat_tracks).mean()),
                 timesteps=list(rec.timesteps), experts=rec.meta.get("experts"))
        return r

    B.measure(A, "plain_generation", plain)
    B.measure(A, "analyze_generation", analysis)
    p, a = A.get("plain_generation") or {}, A.get("analyze_generation") or {}
    if "s" in p and "s" in a:
        A["analysis_over_plain"] = _ratio(a["s"], p["s"])
        A["analysis_over_plain_per_step"] = _ratio(a["loop_s"], p["loop_s"])
        k = 50 / S
        A["analysis_over_plain_50_steps"] = _ratio(k * a["loop_s"] + a["fixed_s"], k * p["loop_s"] + p["fixed_s"])
        A["plain_s_per_step"] = p["loop_s"] / S
        A["analysis_s_per_step"] = a["loop_s"] / S
        if "peak_gib" in a:
            A["analysis_extra_peak_gib"] = a["peak_gib"] - p["peak_gib"]
        if "plain" in videos and "analysis" in videos:
            A["videos_equal"] = bool(np.array_equal(videos["plain"], videos["analysis"]))
            A["videos_max_abs_diff"] = int(np.abs(videos["plain"].astype(np.int16) -
                                                  videos["analysis"].astype(np.int16)).max())
    B.write()


def cag_section(B: Bench, pipe, runner, M: dict) -> None:
    """One CAG step (``generate_with_cag_diffusers`` with a ``CAGConfig``) against one plain CFG step (the same
    entry point with ``config=None``): denoising-loop seconds per step over ``CAG_STEPS`` steps, latents out."""
    import inspect

    from difftrack.guidance import CAGConfig, generate_with_cag_diffusers

    n = B.cfg["cag_steps"]
    T, H, W = B.cfg["size"]
    layers = [l for l in B.cfg["cag_layers"] if l < runner.num_layers]
    config = CAGConfig(layers=layers, scale=CAG_SCALE)
    models = list(runner.experts.models.values())
    shared = inspect.signature(generate_with_cag_diffusers).parameters["shared_prefix"].default
    L = runner.num_layers
    C = M.setdefault("cag", dict(steps=n, layers=layers, scale=CAG_SCALE, variant=config.variant,
                                 shared_prefix=shared, blocks_at_batch2_fraction=(L - min(layers)) / L,
                                 guidance_scale=GUIDANCE, output_type="latent"))

    def call(cfg, steps):
        return lambda: generate_with_cag_diffusers(
            pipe, cfg, prompt=PROMPT, negative_prompt="", num_frames=T, height=H, width=W,
            num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
            output_type="latent")

    def run(cfg, warm_key):
        if warm_key not in B.warm:
            call(cfg, 1)()
            B.warm.add(warm_key)
        r, out = timed(call(cfg, n), models, B.cuda)
        r["latents_finite"] = bool(torch.isfinite(out.frames).all())
        r["s_per_step"] = r["loop_s"] / n
        return r

    B.measure(C, "cfg_step", lambda: run(None, "generate"))  # the plain loop: warm after a plain generation
    B.measure(C, "cag_step", lambda: run(config, "cag"))
    c, g = C.get("cfg_step") or {}, C.get("cag_step") or {}
    if "s" in c and "s" in g:
        C["cag_step_over_cfg_step"] = _ratio(g["loop_s"], c["loop_s"])
        C["cag_call_over_cfg_call"] = _ratio(g["s"], c["s"])
        if "peak_gib" in g:
            C["cag_extra_peak_gib"] = g["peak_gib"] - c["peak_gib"]
    B.write()


def goals(M: dict) -> dict:
    ex = [e.get("capture_max_abs_diff") for e in (M.get("exactness") or {}).values() if isinstance(e, dict)]
    values = dict(analysis_over_plain_50_steps=(M.get("analysis") or {}).get("analysis_over_plain_50_steps"),
                  cag_step_over_cfg_step=(M.get("cag") or {}).get("cag_step_over_cfg_step"),
                  capture_max_abs_diff=max(ex) if ex and None not in ex else None)
    out = {}
    for k, (op, target) in GOALS.items():
        v = values[k]
        out[k] = dict(value=v, target=f"{op} {target}",
                      met=None if v is None else bool(v <= target if op == "<=" else v >= target))
    return out


def bench_model(B: Bench, key: str, pipe, sections) -> None:
    """Every section for one pipeline (already built) into ``B.entries[key]``."""
    from difftrack.runners import VideoRunner

    runner = VideoRunner(pipe)
    M = B.entries[key]
    M["settings"].update(size=list(B.cfg["size"]), tokens=_tokens(runner, B.cfg["size"]),
                         experts=list(runner.experts.names), sections=list(sections))
    B.write()
    if "exactness" in sections:
        E = M.setdefault("exactness", {})
        ts = runner.timesteps(B.cfg["steps"])
        for expert in runner.experts.names:  # each expert at a timestep of its own side of the boundary
            t = next((x for x in ts if runner.experts.at(x) == expert), ts[0])
            B.measure(E, expert, lambda e=expert, t=t: exactness(B, runner, e, t))
    if "analysis" in sections:
        analysis_section(B, pipe, runner, M)
    if "cag" in sections:
        cag_section(B, pipe, runner, M)
    B.write()
    log(f"{key} goals: " + ", ".join(f"{k}={g['value']} ({g['target']}: {g['met']})"
                                     for k, g in B.merged(key)["goals"].items()))


def _tokens(runner, size) -> dict:
    T, H, W = size
    s = runner.stride
    return dict(frames=runner.latent_frames(T), rows=H // s, cols=W // s,
                video_tokens=runner.latent_frames(T) * (H // s) * (W // s))


def new_entry(B: Bench, key: str) -> dict:
    from diffusers import WanTransformer3DModel
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(WanTransformer3DModel.__init__).parameters.items()
                if k != "self"}
    cfg = B.cfg["transformer"]
    M = B.entries[key] = dict(
        meta=dict(B.meta),
        config=dict(transformer=cfg, config_is_diffusers_default=all(
            (list(v) if isinstance(v, tuple) else v) == (list(defaults[k]) if isinstance(defaults[k], tuple) else
                                                         defaults[k]) for k, v in cfg.items()),
            text_encoder=dict(B.cfg["text"], cls="UMT5EncoderModel"),
            vae="AutoencoderKLWan() defaults (Wan 2.1 VAE)" if not B.args.tiny else B.cfg["vae"],
            scheduler=dict(SCHEDULER, cls="UniPCMultistepScheduler", flow_shift=FLOW_SHIFT[key]),
            boundary_ratio=BOUNDARY_RATIO if key == "wan2.2-t2v-a14b" else None),
        settings=dict(steps=B.cfg["steps"], cag_steps=B.cfg["cag_steps"], grid_size=GRID, guidance_scale=GUIDANCE,
                      capture_layers=B.cfg["capture_layers"], cag_layers=B.cfg["cag_layers"], prompt=PROMPT,
                      seed=SEED, dtype=str(B.dtype)))
    return M


def run(B: Bench) -> None:
    cfg = B.cfg
    pipe21 = None
    for key in B.args.models:
        M = new_entry(B, key)
        B.write()
        if B.over_budget():
            M["skipped"] = "time budget"
            B.write()
            log(f"{key}: skipped (time budget)")
            continue
        try:
            t0 = time.perf_counter()
            if pipe21 is None:
                log(f"{key}: building the Wan 2.1 pipeline ...")
                pipe21 = build_pipeline(cfg, B.device, B.dtype, FLOW_SHIFT["wan2.1-t2v-14b"])
            if key == "wan2.2-t2v-a14b":
                need = weights_gib(pipe21.transformer) + (0 if B.args.tiny else HEADROOM_GIB)
                if B.cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
                    free = torch.cuda.mem_get_info(B.device)[0] / GIB
                    M["memory_before_second_expert"] = dict(free_gib=free, need_gib=need)
                    if free < need:
                        M["skipped"] = "not enough memory"
                        M["error"] = (f"{free:.1f} GiB free < {need:.1f} GiB (a second expert's weights + "
                                      f"{HEADROOM_GIB:.0f} GiB headroom)")
                        B.write()
                        log(f"{key}: skipped: {M['error']}")
                        continue
                log(f"{key}: adding the second expert ...")
                pipe = add_second_expert(pipe21, cfg, B.device, B.dtype, FLOW_SHIFT[key])
            else:
                pipe = pipe21
            if B.cuda:
                torch.cuda.synchronize()
            M["build_s"] = time.perf_counter() - t0
            experts = [pipe.transformer] + ([pipe.transformer_2] if getattr(pipe, "transformer_2", None) else [])
            M["params_per_expert"] = sum(p.numel() for p in pipe.transformer.parameters())
            M["weights_gib"] = sum(weights_gib(m) for m in experts)
            M["fp32_params"] = sum(p.numel() for p in pipe.transformer.parameters() if p.dtype == torch.float32)
            log(f"{key}: built in {M['build_s']:.1f} s ({M['params_per_expert'] / 1e9:.2f} B params x "
                f"{len(experts)}, {M['weights_gib']:.1f} GiB)")
        except Exception as e:  # noqa: BLE001
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            M.update(skipped="OOM" if oom else "error", error=f"{type(e).__name__}: {e}"[:2000],
                     traceback=traceback.format_exc()[-3000:])
            B.write()
            log(f"{key}: build failed: {M['error'][:300]}")
            if B.args.strict:
                raise
            continue
        bench_model(B, key, pipe, B.args.sections)
        M["meta"].update(finished=True, elapsed_s=time.perf_counter() - T0)
        B.write()
        del pipe
        gc.collect()


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS[0], help=f"comma list of {list(MODELS)}")
    ap.add_argument("--wan22", action="store_true", help=f"also {MODELS[1]} after {MODELS[0]}")
    ap.add_argument("--sections", default="exactness,analysis,cag", help="comma list of exactness, analysis, cag")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test; never into results/)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--out", default=None, help="JSON to merge into (default results/bench_gpu.json; --tiny: a "
                                                "temporary file)")
    ap.add_argument("--steps", type=int, default=None, help=f"denoising steps of the analysis section (default "
                                                            f"{STEPS}; Wan 2.2 needs >= 4 to run both experts)")
    ap.add_argument("--cag-layers", default=None, help=f"comma list of CAG blocks (default {CAG_LAYERS})")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="no measurement starts after this many seconds")
    ap.add_argument("--commit", default=None, help="the code's commit (default: difftrack.provenance.git_commit)")
    ap.add_argument("--strict", action="store_true", help="re-raise errors instead of recording them")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.wan22 and MODELS[1] not in a.models:
        a.models.append(MODELS[1])
    bad = [m for m in a.models if m not in MODELS]
    if bad or not a.models:
        ap.error(f"--models: unknown {bad or a.models}; allowed: a comma list of {list(MODELS)}")
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if not a.sections or any(s not in SECTIONS for s in a.sections):
        ap.error(f"--sections {a.sections}; allowed: a comma list of {SECTIONS}")
    if a.steps is not None and a.steps < 1:
        ap.error(f"--steps {a.steps}; allowed: an integer >= 1")
    if a.cag_layers is not None:
        try:
            a.cag_layers = sorted({int(v) for v in a.cag_layers.split(",") if v.strip()})
        except ValueError:
            ap.error(f"--cag-layers {a.cag_layers!r}; allowed: a comma list of block indices, e.g. 14,16,17")
        if not a.cag_layers or min(a.cag_layers) < 0 or max(a.cag_layers) >= WAN14B["num_layers"]:
            ap.error(f"--cag-layers {a.cag_layers}; allowed: block indices 0..{WAN14B['num_layers'] - 1}")
    if not (a.budget_s > 0):
        ap.error(f"--budget-s {a.budget_s}; allowed: a number of seconds > 0")
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device: the full-size run needs one GPU; pass --tiny for the CPU smoke test")
    if not a.tiny and not a.device.startswith("cuda"):
        ap.error(f"--device {a.device}: the full-size configs need a CUDA GPU; pass --tiny for the CPU smoke test")
    results = (ROOT / "results").resolve()
    if a.out is None:
        a.out = (str(Path(tempfile.gettempdir()) / f"bench_wan_tiny_{os.getpid()}.json") if a.tiny
                 else str(results / "bench_gpu.json"))
    if a.tiny and results in Path(a.out).resolve().parents:
        ap.error(f"--tiny --out {a.out}: tiny timings mean nothing and never go into {results}; pass another path")
    return a


def main(argv=None) -> dict:
    """Run the benchmark; returns ``{model key: entry}`` as written into ``--out``."""
    args = parse_args(argv)
    B = Bench(args)
    log(f"bench_wan: device {B.meta['device']}, torch {B.meta['torch']}, diffusers {B.meta['diffusers']}, "
        f"transformers {B.meta['transformers']}, commit {B.meta['commit']}, models {args.models}, out {B.out}")
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: threads only spin
    try:
        run(B)
    finally:
        torch.set_num_threads(threads)
    log(f"done -> {B.out}")
    return B.entries


if __name__ == "__main__":
    main()
