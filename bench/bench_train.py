"""Training throughput of the embedded model (issue 20): where a step of ``scripts/train_mini.py`` spends its time.

    python bench/bench_train.py --out /tmp/train.json          # one GPU, about 1 minute
    python bench/bench_train.py --tiny --out /tmp/t.json       # CPU smoke test (batch 2; timings mean nothing)

Times, with the training script's settings (batch 48, bf16 autocast, fused AdamW, EMA), separately: rendering a
batch from the world and encoding it to latents; the model step (text encoder + transformer forward, backward,
clip, optimiser, EMA) on a fixed batch; and both together. Variants of the model step: float32 matmuls without
TF32, and ``torch.compile`` of the transformer. JSON: ``meta`` (device, torch, diffusers, commit), ``results`` (ms
per step and steps per second per variant).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from difftrack import mini, world as W  # noqa: E402
from difftrack.provenance import device_name, git_commit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the transformer")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    B, reps = (2, 2) if a.tiny else (a.batch_size, a.reps)
    rng = np.random.default_rng(0)
    world = W.World(mini.FRAMES, mini.HEIGHT, mini.WIDTH)
    pipe = mini.build_untrained(0)
    model, text_encoder, scheduler = pipe.transformer.to(dev), pipe.text_encoder.to(dev), pipe.scheduler
    params = list(model.parameters()) + list(text_encoder.parameters())
    ema = [q.detach().clone().float() for q in params]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    alphas = scheduler.alphas_cumprod.to(device=dev, dtype=torch.float32)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def render():
        layers, prompts = [], []
        for _ in range(B):
            ls, pr = world.sample_layers(rng, "scenes" if rng.random() < 0.4 else "objects", "train")
            layers.append(ls)
            prompts.append(pr)
        return mini.pixels_to_latents(world.render_fast(layers, device=dev)), prompts

    def step(x0, prompts, fwd):
        ids = text_encoder.tokenize(prompts)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), device=dev)
        noise = torch.randn_like(x0)
        al = alphas[t].view(-1, 1, 1, 1, 1)
        xt, v = al.sqrt() * x0 + (1 - al).sqrt() * noise, al.sqrt() * noise - (1 - al).sqrt() * x0
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            pred = fwd(hidden_states=xt, encoder_hidden_states=text_encoder(ids), timestep=t, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, 0.999)
            torch._foreach_add_(ema, [q.detach().float() for q in params], alpha=0.001)

    def timed(fn, n):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        ms = (time.perf_counter() - t0) / n * 1e3
        return dict(ms=ms, per_s=1e3 / ms)

    fixed = render()
    res = {}
    res["render_batch"] = timed(render, reps)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    res["model_step"] = timed(lambda: step(*fixed, model), reps)
    res["render_and_step"] = timed(lambda: step(*render(), model), reps)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        res["model_step_no_tf32"] = timed(lambda: step(*fixed, model), reps)
        torch.backends.cuda.matmul.allow_tf32 = True
    if a.compile:
        t0 = time.perf_counter()
        cm = torch.compile(model)
        step(*fixed, cm)
        sync()
        res["compile_s"] = time.perf_counter() - t0
        res["model_step_compiled"] = timed(lambda: step(*fixed, cm), reps)
    import diffusers

    meta = dict(device=device_name(dev), torch=torch.__version__, diffusers=diffusers.__version__,
                commit=git_commit(), batch_size=B, reps=reps, tiny=a.tiny,
                params_m=sum(q.numel() for q in model.parameters()) / 1e6,
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, results=res), indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
