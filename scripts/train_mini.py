"""Train the embedded mini video DiT on the procedural world. Read top to bottom; the config is right below.

    python scripts/train_mini.py                    # full run (one H100: about 17 minutes)
    python scripts/train_mini.py --smoke            # a few CPU steps, used by the tests
    python scripts/train_mini.py --minutes 5 --out /tmp/w

Every batch is rendered fresh from the world (train split: held-out photographs never appear), so there is no
data set on disk and no over-fitting to a fixed set of clips. Loss: v-prediction MSE at uniform timesteps, as
CogVideoX. Prompts are dropped 10% of the time for classifier-free guidance. Weights are saved in fp16
safetensors (EMA copy), with the training log and loss curve, in the diffusers pipeline layout.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from difftrack import mini, world as W  # noqa: E402

# ----------------------------------------------------------------------------- config
minutes = 17.0  # wall-clock training budget (the run stops at whichever of minutes / max_steps comes first)
max_steps = 100_000
batch_size = 48
lr = 6e-4
min_lr_frac = 0.05
warmup = 300
weight_decay = 0.01
grad_clip = 1.0
p_uncond = 0.1  # prompt dropout for classifier-free guidance
p_scenes = 0.4  # share of scene videos (the rest are object videos)
object_count_p = W.World.OBJECT_COUNT_P  # probabilities of 1, 2, 3 objects in an object video
high_noise_frac = 0.0  # share of each batch drawn at t >= high_noise_t (where only the text can say the motion)
high_noise_t = 600
change_weight = 0.0  # loss weight 1 + change_weight * |x0[f] - x0[f-1]| / mean (0: the plain v-prediction MSE)
ema_decay = 0.999
log_every = 50
seed = 1234
out = str(mini.WEIGHTS_DIR)
dtype = "bf16"  # autocast dtype on GPU
smoke = False
# -----------------------------------------------------------------------------

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true")
p.add_argument("--minutes", type=float)
p.add_argument("--max-steps", type=int)
p.add_argument("--batch-size", type=int)
p.add_argument("--out")
p.add_argument("--init", help="start from these weights (a saved pipeline folder)")
p.add_argument("--lr", type=float)
p.add_argument("--seed", type=int, help="data and noise seed (a resumed round should not replay the first's batches)")
p.add_argument("--p-uncond", type=float, help=f"prompt dropout (default {p_uncond})")
p.add_argument("--single-object-frac", type=float,
               help="share of object videos with one object (the rest split 2:1 between two and three objects)")
p.add_argument("--high-noise-frac", type=float, help="share of each batch at t >= 600 (default 0: uniform t)")
p.add_argument("--change-weight", type=float, help="loss weight on what changes between frames (default 0)")
p.add_argument("--warmup", type=int, help=f"linear warm-up steps (default {warmup}; a short resumed round wants fewer)")
p.add_argument("--arm", default=None, help="name of an A/B arm (recorded in the log)")
p.add_argument("--compile", action="store_true", help="torch.compile the transformer (GPU: about 2x the steps per "
               "second after a one-minute compile; bench/bench_train.py)")
args = p.parse_args()
smoke = args.smoke
if smoke:
    minutes, max_steps, batch_size, log_every, warmup = 2.0, 3, 2, 1, 1
minutes = args.minutes or minutes
max_steps = args.max_steps or max_steps
batch_size = args.batch_size or batch_size
out = Path(args.out or out)
lr = args.lr or lr
seed = seed if args.seed is None else args.seed
init = args.init
p_uncond = p_uncond if args.p_uncond is None else args.p_uncond
if args.single_object_frac is not None:
    f1 = args.single_object_frac
    object_count_p = (f1, (1 - f1) * 2 / 3, (1 - f1) / 3)
high_noise_frac = high_noise_frac if args.high_noise_frac is None else args.high_noise_frac
change_weight = change_weight if args.change_weight is None else args.change_weight
warmup = warmup if args.warmup is None or smoke else args.warmup
for name, v in (("p_uncond", p_uncond), ("high_noise_frac", high_noise_frac)) + tuple(
        (f"object_count_p[{i}]", x) for i, x in enumerate(object_count_p)):
    if not 0.0 <= v <= 1.0:
        p.error(f"{name}={v}; allowed: 0 to 1")
if change_weight < 0:
    p.error(f"--change-weight {change_weight}; allowed: >= 0")

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(seed)
rng = np.random.default_rng(seed)
world = W.World(mini.FRAMES, mini.HEIGHT, mini.WIDTH, object_count_p=object_count_p)
pipe = mini.build_untrained(seed)
if init:  # continue training from a saved pipeline
    pipe = mini.MiniVideoPipeline.from_pretrained(init, dtype=torch.float32)
model, text_encoder, scheduler = pipe.transformer.to(device), pipe.text_encoder.to(device), pipe.scheduler
params = list(model.parameters()) + list(text_encoder.parameters())
fwd = torch.compile(model) if args.compile else model  # same parameters; the saved weights are the model's
ema = [q.detach().clone().float() for q in params]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99), fused=device == "cuda")
alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" and dtype == "bf16" else torch.autocast(
    "cpu", enabled=False)
if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
print(f"device {device}, transformer {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params, "
      f"batch {batch_size}, budget {minutes} min", flush=True)


def batch():
    """Render a fresh batch: latents [B, T, 12, 32, 32] and prompts."""
    layers, prompts = [], []
    for _ in range(batch_size):
        fam = "scenes" if rng.random() < p_scenes else "objects"
        ls, pr = world.sample_layers(rng, fam, "train")
        layers.append(ls)
        prompts.append("" if rng.random() < p_uncond else pr)
    video = world.render_fast(layers, device=device)
    # light photometric jitter so the model does not memorise exact texture colours
    video = (video * torch.empty(batch_size, 1, 1, 1, 1, device=device).uniform_(0.85, 1.15)).clamp(0, 1)
    return mini.pixels_to_latents(video), prompts


def lr_at(step, frac):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


log, t0, step = [], time.time(), 0
while step < max_steps and (time.time() - t0) < minutes * 60:
    x0, prompts = batch()
    ids = text_encoder.tokenize(prompts)
    T = scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (batch_size,), device=device)
    n_high = int(round(high_noise_frac * batch_size))
    if n_high:  # the first n_high samples at high noise (the batch order is random already)
        t[:n_high] = torch.randint(high_noise_t, T, (n_high,), device=device)
    noise = torch.randn_like(x0)
    a = alphas[t].view(-1, 1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # v-prediction target
    for g in opt.param_groups:
        g["lr"] = lr_at(step, max((time.time() - t0) / (minutes * 60), step / max_steps))  # whichever ends first
    with amp:
        emb = text_encoder(ids)
        pred = fwd(hidden_states=xt, encoder_hidden_states=emb, timestep=t, return_dict=False)[0]
        if change_weight:  # weight what changes between frames: [B, T, C, H, W] -> per-pixel weights
            dx = (x0[:, 1:] - x0[:, :-1]).abs().mean(2, keepdim=True)
            dx = torch.cat([dx[:, :1], dx], 1)  # frame 0 takes frame 1's change
            w = 1 + change_weight * dx / dx.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
            loss = (w * (pred.float() - v) ** 2).mean() / w.mean()
        else:
            loss = F.mse_loss(pred.float(), v)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    with torch.no_grad():
        d = min(ema_decay, (1 + step) / (10 + step))
        for e, q in zip(ema, params):
            e.mul_(d).add_(q.detach().float(), alpha=1 - d)
    if step % log_every == 0:
        rec = dict(step=step, loss=round(loss.item(), 5), grad_norm=round(gn.item(), 4),
                   lr=opt.param_groups[0]["lr"], seconds=round(time.time() - t0, 1))
        log.append(rec)
        print(json.dumps(rec), flush=True)
    step += 1

# ----------------------------------------------------------------------------- save (EMA weights, fp16)
with torch.no_grad():
    for e, q in zip(ema, params):
        q.copy_(e.to(q.dtype))
out.mkdir(parents=True, exist_ok=True)
pipe.transformer.to("cpu", torch.float16)
pipe.text_encoder.to("cpu", torch.float16)
pipe.save_pretrained(str(out), safe_serialization=True, max_shard_size="15MB")  # files under 16 MB
try:
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                           text=True).stdout.strip() or None
except Exception:
    commit = None
meta = dict(init=init, compile=bool(args.compile), steps=step, batch_size=batch_size, minutes=round((time.time() - t0) / 60, 2), lr=lr,
            p_uncond=p_uncond, p_scenes=p_scenes, object_count_p=list(object_count_p), high_noise_frac=high_noise_frac,
            high_noise_t=high_noise_t, change_weight=change_weight, warmup=warmup, arm=args.arm, ema_decay=ema_decay, seed=seed, device=device,
            device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            torch=torch.__version__, commit=commit, final_loss=log[-1]["loss"] if log else None, smoke=smoke)
(out / "training_log.json").write_text(json.dumps(dict(meta=meta, log=log), indent=1))
print("saved", out, json.dumps(meta), flush=True)
