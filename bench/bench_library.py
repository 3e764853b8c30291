#!/usr/bin/env python
"""The library's own entry points at real scale (issue 16): full-size CogVideoX pipelines with random weights.

    python bench/bench_library.py --models cogvideox-2b --out /tmp/bench_library.json   # on a CUDA GPU
    python bench/bench_library.py --tiny --out /tmp/bl.json                              # CPU smoke test
    python bench/bench_library.py --merge /tmp/bench_library.json                        # into results/bench_gpu.json

The pipeline is diffusers' ``CogVideoXPipeline`` built offline: the real CogVideoX-2B (or 5B) transformer config
(``bench_gpu.COG2B`` / ``COG5B``), the real VAE config (``AutoencoderKLCogVideoX()`` defaults), the real scheduler
config, a T5 encoder cut to one layer with ``d_model`` 4096 and the tiny tokenizer of :mod:`difftrack.testing`;
random weights, bf16, 480x720x49. Timing does not depend on weight values.

Measured, each after a warm-up, with ``torch.cuda.synchronize`` around it and peak memory from
``torch.cuda.max_memory_allocated`` (reset before):

* ``plain_generation``: ``VideoRunner.generate`` (the pipeline's own ``__call__``, CFG 6, decode included);
* ``analyze_generation``: :func:`difftrack.analysis.analyze_generation` on the same prompt and seed -- every layer
  and step, query-key matching, confidence and attention scores, block-feature matching (what notebooks 02/03 and
  the paper-scale analysis run);
* ``breakdown``: the same at ``--breakdown-steps`` steps with parts switched off (plain; QK matching only; QK +
  scores; everything) -- where the extra time goes;
* ``profile``: ``torch.profiler`` over ``--profile-steps`` steps of the analysis, the top operators by device time
  (``profile_top``);
* ``cag``: :func:`difftrack.guidance.generate_with_cag_diffusers` (the public CAG entry point; the paper's layers)
  against the unmodified pipeline, ``--cag-steps`` steps, latents out (no decode): seconds per step and the ratio;
* ``tracking``: :class:`difftrack.tracking.DiffTracker` on one 13-frame 480x720 chunk (64 queries; VAE encode per
  frame, forward to the tracking layer) against the published recipe re-enacted with the same models (per-frame VAE
  encode, full forward at CFG batch 2, CFG combine, a scheduler step, VAE decode of the 13 latent frames).

The JSON (``--out``) is rewritten after every measurement, so a timeout leaves partial results. ``--merge FILE``
copies a run's per-model results into ``results/bench_gpu.json`` under ``models[<name>]["library"]`` with the
goal keys ``analyze_generation_over_plain``, ``analysis_extra_peak_gib``, ``cag_step_over_cfg_step`` and
``tracking_published_over_ours``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import COG2B, COG5B, SCHEDULER, TINY2B, TINY5B, VAE_TINY  # noqa: E402

from difftrack.provenance import device_name, git_commit  # noqa: E402

GIB = float(1 << 30)
MODELS = {"cogvideox-2b": (COG2B, TINY2B, 17, [13, 17, 21]), "cogvideox-5b": (COG5B, TINY5B, 17, [15, 17, 18])}
PROMPT = "a red circle moving left on a blue background"
GOALS = dict(analyze_generation_over_plain=("<=", 1.2), analysis_extra_peak_gib=("<=", 1.0),
             cag_step_over_cfg_step=("<=", 1.3), tracking_published_over_ours=(">=", 5.0))


def build_pipeline(name: str, tiny: bool, dev: str, dtype: torch.dtype):
    """``CogVideoXPipeline`` with the real (or, ``tiny``, the bench's tiny) configs and random weights."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    from difftrack.testing import _t5_tokenizer

    full, small, _, _ = MODELS[name]
    cfg = dict(small, max_text_seq_length=226) if tiny else full  # the pipeline always pads prompts to 226
    tok = _t5_tokenizer()
    d_model = cfg["text_embed_dim"]
    t5 = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=64, d_ff=4 * d_model if tiny else 10240, num_layers=1,
                  num_decoder_layers=1, num_heads=max(1, d_model // 64), pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)
    torch.manual_seed(0)
    with torch.device(dev):
        transformer = CogVideoXTransformer3DModel(**cfg)
        vae = AutoencoderKLCogVideoX(**(VAE_TINY if tiny else {}))
        text_encoder = T5EncoderModel(t5)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=text_encoder.to(dev, dtype).eval(),
                             vae=vae.to(dev, dtype).eval(), transformer=transformer.to(dev, dtype).eval(),
                             scheduler=CogVideoXDDIMScheduler(**SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    return pipe


class Timer:
    def __init__(self, dev: str):
        self.cuda = dev.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, warmup=None) -> dict:
        if warmup is not None:
            warmup()
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        r = dict(seconds=time.perf_counter() - t0)
        if self.cuda:
            r.update(peak_gib=torch.cuda.max_memory_allocated() / GIB, base_gib=base / GIB)
        del out
        return r


def _ratio(a, b):
    return a / b if a and b else None


def bench_model(name: str, args, res: dict, write) -> None:
    from difftrack.analysis import analyze_generation
    from difftrack.guidance import CAGConfig, generate_with_cag_diffusers
    from difftrack.runners import as_runner
    from difftrack.tracking import DiffTracker, vae_encode_frames

    dev, dtype = args.device, torch.bfloat16 if not args.tiny else torch.float32
    timer = Timer(dev)
    t0 = time.perf_counter()
    pipe = build_pipeline(name, args.tiny, dev, dtype)
    runner = as_runner(pipe)
    T, H, W = runner.resolve_size(None)
    M = res.setdefault("models", {}).setdefault(name, {})
    M.update(build_s=time.perf_counter() - t0, size=[T, H, W], steps=args.steps, cfg=6.0, grid=args.grid,
             dtype=str(dtype), params=sum(p.numel() for p in pipe.transformer.parameters()))
    tiny_steps = 2

    def plain(n):
        return lambda: runner.generate(PROMPT, 0, n, 6.0)

    def analysis(n, **kw):
        return lambda: analyze_generation(pipe, PROMPT, 0, num_steps=n, grid_size=args.grid, **kw)

    if "analysis" in args.sections:
        M["plain_generation"] = timer(plain(args.steps), warmup=plain(tiny_steps))
        write()
        M["analyze_generation"] = timer(analysis(args.steps), warmup=analysis(tiny_steps))
        a, p = M["analyze_generation"], M["plain_generation"]
        M["analyze_generation_over_plain"] = _ratio(a["seconds"], p["seconds"])
        if "peak_gib" in a:
            M["analysis_extra_peak_gib"] = a["peak_gib"] - p["peak_gib"]
        write()
    if "exactness" in args.sections:
        M["exactness"] = exactness(pipe, MODELS[name][2], args.grid)
        write()
    if "breakdown" in args.sections:
        n = args.breakdown_steps
        bd = M["breakdown"] = dict(steps=n)
        bd["plain"] = timer(plain(n))
        bd["qk_only"] = timer(analysis(n, features=False, scores=False))
        bd["qk_scores"] = timer(analysis(n, features=False))
        bd["all"] = timer(analysis(n))
        for k in ("qk_only", "qk_scores", "all"):
            bd[f"{k}_over_plain"] = _ratio(bd[k]["seconds"], bd["plain"]["seconds"])
        write()
    if "profile" in args.sections:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
        with profile(activities=acts) as prof:
            analysis(args.profile_steps)()
            timer.sync()
        key = "self_device_time_total" if timer.cuda else "self_cpu_time_total"
        rows = []
        for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))[:30]:
            rows.append(dict(op=e.key, calls=e.count, self_device_ms=getattr(e, "self_device_time_total", 0) / 1e3,
                             self_cpu_ms=e.self_cpu_time_total / 1e3))
        M["profile_top"] = dict(steps=args.profile_steps, sort=key, rows=rows)
        write()
    if "cag" in args.sections:
        n = args.cag_steps
        cfg = CAGConfig(layers=[l for l in MODELS[name][3] if l < pipe.transformer.config.num_layers], scale=1.0)
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        base = lambda: pipe(prompt=PROMPT, num_inference_steps=n, guidance_scale=6.0, generator=g(),  # noqa: E731
                            output_type="latent", use_dynamic_cfg=False)
        cag = lambda: generate_with_cag_diffusers(pipe, cfg, prompt=PROMPT, num_inference_steps=n,  # noqa: E731
                                                  guidance_scale=6.0, generator=g(), output_type="latent")
        import inspect

        shared = inspect.signature(generate_with_cag_diffusers).parameters["shared_prefix"].default
        c = M["cag"] = dict(steps=n, layers=cfg.layers, scale=cfg.scale, variant=cfg.variant, shared_prefix=shared)
        c["cfg"] = timer(base, warmup=base)
        c["cag"] = timer(cag, warmup=cag)
        M["cag_step_over_cfg_step"] = _ratio(c["cag"]["seconds"], c["cfg"]["seconds"])
        write()
    if "tracking" in args.sections:
        layer = min(MODELS[name][2], pipe.transformer.config.num_layers - 1)
        rng = np.random.default_rng(0)
        video = rng.integers(0, 256, (13, H, W, 3), dtype=np.uint8)
        queries = np.stack([np.zeros(64), rng.uniform(0, W - 1, 64), rng.uniform(0, H - 1, 64)], 1).astype(np.float32)
        tracker = DiffTracker(pipe, layers=[layer])
        tr = M["tracking"] = dict(frames=13, queries=64, layer=layer)
        tr["ours"] = timer(lambda: tracker(video, queries), warmup=lambda: tracker(video, queries))
        tr["published"] = timer(_published(pipe, video, layer, vae_encode_frames),
                                warmup=_published(pipe, video, layer, vae_encode_frames))
        M["tracking_published_over_ours"] = _ratio(tr["published"]["seconds"], tr["ours"]["seconds"])
        write()


@torch.no_grad()
def exactness(pipe, layer: int, grid: int) -> dict:
    """The half-precision CUDA matching path (tensor-core products, float32 accumulation) against the float32 path
    on the same captured bf16 query/key/features of one forward: largest and mean track difference (pixels) and the
    largest attention-row difference."""
    from bench_gpu import make_inputs

    from difftrack import matching as Mt
    from difftrack.capture import capture
    from difftrack.world import World

    tr = pipe.transformer
    layer = min(layer, tr.config.num_layers - 1)
    dev, dt = tr.device, tr.dtype
    with capture(tr, layers=[layer], store=True, what=("q", "k", "features")) as cap:
        tr(**make_inputs(tr, 1, dev, dt, 500))
        q, k, f = cap.q(layer)[0], cap.k(layer)[0], cap.features(layer)[0]
    H, Fr, rows, cols, D = q.shape
    stride = pipe.vae_scale_factor_spatial * tr.config.patch_size
    pts = torch.from_numpy(World(Fr, rows * stride, cols * stride).grid_queries(grid)[:, 1:]).to(dev)
    out = dict(layer=layer, dtype=str(q.dtype), shape_H_F_rows_cols_D=[H, Fr, rows, cols, D])
    for name, fast, ref in (
            ("qk", lambda: Mt.match_video(q, k, pts, stride)[0], lambda: Mt.match_video(q.float(), k.float(), pts,
                                                                                           stride)[0]),
            ("features", lambda: Mt.match_video_features(f, pts, stride)[0],
             lambda: Mt.match_video_features(f.float(), pts, stride)[0])):
        d = (fast() - ref()).abs()
        out[f"{name}_track_diff_px_max"] = float(d.max())
        out[f"{name}_track_diff_px_mean"] = float(d.mean())
    # the CUDA source-row subset (the rows around the points, flash log-sum-exp for the backward softmax) against
    # the float32 full-cost path on the CPU, which is what every earlier version computed
    cpu = dict(qk=Mt.match_video(q.float().cpu(), k.float().cpu(), pts.cpu(), stride)[0],
               features=Mt.match_video_features(f.float().cpu(), pts.cpu(), stride)[0])
    for name, fast in (("qk", lambda: Mt.match_video(q, k, pts, stride)[0]),
                       ("features", lambda: Mt.match_video_features(f, pts, stride)[0])):
        d = (fast().cpu() - cpu[name]).abs()
        out[f"{name}_track_diff_vs_cpu_full_px_max"] = float(d.max())
        out[f"{name}_track_diff_vs_cpu_full_px_mean"] = float(d.mean())
    # one layer-call of the matching, subset path against the full cost on the same device (ms, CUDA events)
    qf, kf = q.reshape(H, Fr, rows * cols, D), k.reshape(H, Fr, rows * cols, D)
    tok = Mt.px_to_tokens(pts.float(), stride)

    def full_qk():
        c = Mt.qk_cost_frames(qf[:, 0], kf[:, 0], qf[:, 1:], kf[:, 1:])
        return Mt._place_tracks(c, tok, Fr, 0, rows, cols, stride, "softargmax", 1, 1.0)

    for name, fn in (("qk_subset", lambda: Mt.match_video(q, k, pts, stride)), ("qk_full", full_qk),
                     ("features_subset", lambda: Mt.match_video_features(f, pts, stride))):
        if dev.type == "cuda":
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            out[f"per_call_ms_{name}"] = (time.perf_counter() - t0) / 5 * 1e3
    qs, ks = q.reshape(H, -1, D), k.reshape(H, -1, D)
    idx = torch.arange(0, qs.shape[1], max(1, qs.shape[1] // 100), device=dev)
    out["attention_rows_diff_max"] = float((Mt.attention_rows(qs, ks, idx) - Mt.attention_rows(qs.float(), ks.float(),
                                                                                              idx)).abs().max())
    return out


def _published(pipe, video: np.ndarray, layer: int, vae_encode_frames):
    """The published tracking recipe, re-enacted: every frame VAE-encoded as a 1-frame video (posterior sample),
    the full transformer at CFG batch 2 on the empty prompt with the query-key of ``layer`` matched frame 0 to every
    frame, CFG combine, one scheduler step, VAE decode of the latents (it decodes to PIL)."""
    from difftrack.capture import capture
    from difftrack.matching import match_video

    @torch.no_grad()
    def run():
        tr, vae, sched = pipe.transformer, pipe.vae, pipe.scheduler
        dev, dt = tr.device, tr.dtype
        sched.set_timesteps(50, device=dev)
        t = sched.timesteps[-1]
        g = torch.Generator(dev).manual_seed(0)
        z = vae_encode_frames(vae, video, sample=True, generator=g).to(dt).unsqueeze(0)  # [1, F, C, h, w]
        emb = pipe.encode_prompt(prompt="", negative_prompt="", do_classifier_free_guidance=True, device=dev)
        text = torch.cat([emb[1], emb[0]]).to(dt)
        rope = pipe._prepare_rotary_positional_embeddings(video.shape[1], video.shape[2], z.shape[1], dev) \
            if tr.config.use_rotary_positional_embeddings else None
        H, W = video.shape[1:3]
        pts = torch.tensor([[W / 2, H / 2]], device=dev)
        out = {}
        with capture(tr, layers=[layer], store=False,
                     on_qk=lambda ev: out.setdefault("m", match_video(ev.q_video[0], ev.k_video[0], pts, 16.0))):
            v = tr(hidden_states=torch.cat([z, z]), encoder_hidden_states=text, timestep=t.expand(2),
                   image_rotary_emb=rope, return_dict=False)[0].float()
        u, c = v.chunk(2)
        lat = sched.step(u + 6.0 * (c - u), t, z.float(), return_dict=False)[0].to(dt)
        vae.decode(lat.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor)
        return out["m"]

    return run


def merge(src: Path, dst: Path) -> None:
    """A run's per-model results into ``results/bench_gpu.json`` under ``models[name]["library"]``: each measured
    key replaces the earlier value and ``measured_by[key]`` names the run (commit, device, start) it came from;
    the goals are recomputed from the merged values."""
    run = json.loads(src.read_text())
    out = json.loads(dst.read_text()) if dst.exists() else {"meta": {}, "models": {}}
    who = {k: run["meta"].get(k) for k in ("commit", "device", "started", "torch", "diffusers")}
    for name, m in run.get("models", {}).items():
        lib = out.setdefault("models", {}).setdefault(name, {}).setdefault("library", {})
        for k, v in m.items():
            lib[k] = v
            lib.setdefault("measured_by", {})[k] = who
        lib["goals"] = {k: dict(value=lib.get(k), target=f"{op} {v}",
                                met=None if lib.get(k) is None else (lib[k] <= v if op == "<=" else lib[k] >= v))
                        for k, (op, v) in GOALS.items()}
        lib["script"] = "bench/bench_library.py"
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(dst)
    print(f"merged {src} into {dst}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cogvideox-2b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--sections", default="analysis,exactness,breakdown,profile,cag,tracking")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps of the generation / analysis")
    ap.add_argument("--breakdown-steps", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--cag-steps", type=int, default=10)
    ap.add_argument("--grid", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="bench_library.json")
    ap.add_argument("--merge", default=None, help="merge this run's JSON into --merge-into and exit")
    ap.add_argument("--merge-into", default=str(ROOT / "results" / "bench_gpu.json"))
    a = ap.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; allowed: {sorted(MODELS)}")
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    allowed = ("analysis", "exactness", "breakdown", "profile", "cag", "tracking")
    if any(s not in allowed for s in a.sections):
        ap.error(f"--sections {a.sections}; allowed: {allowed}")
    for k in ("steps", "breakdown_steps", "profile_steps", "cag_steps", "grid"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    a.device = a.device or ("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    if a.device == "cpu" and not a.tiny and not a.merge:
        ap.error("full-size configs need a CUDA GPU; pass --tiny for the CPU smoke test")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.merge:
        merge(Path(a.merge), Path(a.merge_into))
        return 0
    import diffusers

    res = dict(meta=dict(device=device_name(a.device), torch=torch.__version__, diffusers=diffusers.__version__,
                         commit=git_commit(), tiny=a.tiny, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                         command=" ".join(sys.argv), script="bench/bench_library.py"))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        out.write_text(json.dumps(res, indent=1, default=float))

    for name in a.models:
        try:
            bench_model(name, a, res, write)
        except torch.cuda.OutOfMemoryError as e:
            res.setdefault("models", {}).setdefault(name, {})["error"] = f"OOM: {e}"[:500]
        write()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        m = res["models"].get(name, {})
        print(name, {k: m.get(k) for k in GOALS}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
