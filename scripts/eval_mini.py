"""Measure the embedded model's headline numbers (issue 4) and write results/mini_model.json.

Protocol (shared reference section 4.4, defects fixed): held-out world videos (photographs never seen in training,
both families), clean video forward-noised to the last of 50 denoising steps (t = 19), one transformer forward
(conditional branch, the video's prompt), query-key matching from frame 0 to every other frame for a 10x10 grid of
points, bidirectional cost with tau = sqrt(head_dim), bilinear source rows + 3x3 soft-argmax; PCK over visible
points of frames 1..12 within half a token (2 px; the paper's 8 px at 480x720) and within one token (4 px).

    python scripts/eval_mini.py [--videos 40] [--out results/mini_model.json]
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from difftrack import analysis as A, mini  # noqa: E402
from difftrack.provenance import git_commit  # noqa: E402
from difftrack.world import World  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--videos", type=int, default=40)
p.add_argument("--steps", type=int, default=50)
p.add_argument("--out", default="results/mini_model.json")
p.add_argument("--device", default="cpu")
p.add_argument("--weights", help="a saved pipeline folder to evaluate instead of the committed weights")
p.add_argument("--cpu-forward", choices=["measure", "skip", "only"], default="measure",
               help="time one CFG-batch-2 forward of the evaluated weights (--weights, else the committed model) on this "
                    "machine's CPU (skip on a GPU box; 'only' merges it into --out)")
args = p.parse_args()
if args.cpu_forward == "only" and args.weights and Path(args.out).resolve() == Path("results/mini_model.json").resolve():
    p.error(f"--cpu-forward only --weights {args.weights}: --out {args.out} is the committed model's record; "
            "pass another --out (an existing JSON file the timing is merged into)")


def evaluate(pipe, n):
    w = World()
    acc = {"qk_half": [], "qk_one": [], "feat_half": [], "feat_one": []}
    for i in range(n):
        fam = ("objects", "scenes")[i % 2]
        s = w.sample(5000 + i, fam, "heldout")
        rec = A.analyze_exact(pipe, s, num_steps=args.steps, steps=[args.steps - 1], grid_size=10, noise_seed=i)
        q = np.concatenate([np.zeros((len(rec.queries), 1), np.float32), rec.queries], 1)
        gt, vis = w.tracks(s, q)
        for thr, tag in ((0.5, "half"), (1.0, "one")):
            tab = A.score_tables(rec, gt, vis, threshold_tokens=thr)
            acc[f"qk_{tag}"].append(tab["qk_acc"][-1] * vis[:, 1:].sum())
            acc[f"feat_{tag}"].append(tab["feat_acc"][-1] * vis[:, 1:].sum())
        acc.setdefault("n_vis", []).append(vis[:, 1:].sum())
    tot = float(np.sum(acc["n_vis"]))
    return {k: np.sum(v, 0) / tot for k, v in acc.items() if k != "n_vis"}, int(tot)


def cpu_forward_seconds(pipe, reps=3):
    x = torch.randn(2, mini.FRAMES, pipe.transformer.config.in_channels, mini.HEIGHT // 2, mini.WIDTH // 2)  # i2v: 24
    e = torch.randn(2, mini.TEXT_LEN, pipe.transformer.config.text_embed_dim)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        pipe.transformer(hidden_states=x, encoder_hidden_states=e, timestep=t)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pipe.transformer(hidden_states=x, encoder_hidden_states=e, timestep=t)
            ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


t0 = time.time()
if args.cpu_forward == "only":
    load_before = os.getloadavg()[0]  # other work on the machine slows this timing down: record it
    fmin, fmed = cpu_forward_seconds(mini.load_default(weights=args.weights))
    res = json.loads(Path(args.out).read_text())
    if res.get("cpu_forward_s_cfg2") is not None:  # the machine's speed varies from day to day: keep earlier timings
        res.setdefault("cpu_forward_history", []).append({k: res.get(k) for k in (
            "cpu_forward_s_cfg2", "cpu_forward_s_cfg2_median", "cpu_forward_commit", "cpu_forward_load_avg_1min",
            "cpu_forward_date", "cpu_forward_note")})
        res.pop("cpu_forward_note", None)  # it spoke of the timing now in the history
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    res.update(cpu_forward_s_cfg2=round(fmin, 3), cpu_forward_s_cfg2_median=round(fmed, 3), cpu=cpu,
               cpu_threads=torch.get_num_threads(), cpu_forward_torch=torch.__version__,
               cpu_forward_commit=git_commit(), cpu_forward_load_avg_1min=round(load_before, 2),
               cpu_forward_date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               **({"cpu_forward_weights": args.weights} if args.weights else {}))
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    sys.exit(0)
pipe = (mini.MiniVideoPipeline.from_pretrained(args.weights, dtype=torch.float32) if args.weights
        else mini.load_default()).to(args.device)
trained, n_pts = evaluate(pipe, args.videos)
untrained, _ = evaluate(mini.build_untrained(0).to(args.device), args.videos)
fmin, fmed = cpu_forward_seconds(mini.load_default(weights=args.weights)) if args.cpu_forward == "measure" else (float("nan"),) * 2
L = int(np.argmax(trained["qk_half"]))
sched = pipe.scheduler
sched.set_timesteps(args.steps)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
res = dict(
    qk_best_acc=round(float(trained["qk_half"].max()), 4),
    qk_best_acc_1tok=round(float(trained["qk_one"].max()), 4),
    best_layer=L,
    best_layer_1tok=int(np.argmax(trained["qk_one"])),
    feat_best_acc=round(float(trained["feat_half"].max()), 4),
    feat_best_acc_1tok=round(float(trained["feat_one"].max()), 4),
    feat_best_layer=int(np.argmax(trained["feat_half"])),
    untrained_qk_best_acc=round(float(untrained["qk_half"].max()), 4),
    untrained_qk_best_acc_1tok=round(float(untrained["qk_one"].max()), 4),
    per_layer_qk_acc=[round(float(x), 4) for x in trained["qk_half"]],
    per_layer_qk_acc_1tok=[round(float(x), 4) for x in trained["qk_one"]],
    per_layer_feat_acc=[round(float(x), 4) for x in trained["feat_half"]],
    per_layer_untrained_qk_acc=[round(float(x), 4) for x in untrained["qk_half"]],
    step_index=args.steps - 1, num_steps=args.steps, timestep=int(sched.timesteps[-1]),
    videos=args.videos, families="objects/scenes alternating", split="heldout", grid="10x10 at frame 0",
    visible_point_frames=n_pts, threshold_half_token_px=2.0, threshold_one_token_px=4.0,
    matching="bidirectional, tau=sqrt(head_dim)=8, bilinear source rows, softargmax radius 1",
    features="block output (residual stream), cosine, tau 0.05, same refinement",
    cpu_forward_s_cfg2=round(fmin, 3), cpu_forward_s_cfg2_median=round(fmed, 3), cpu=cpu,
    cpu_threads=torch.get_num_threads(), torch=torch.__version__, eval_device=args.device,
    eval_device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    commit=git_commit(),
    seconds=round(time.time() - t0, 1),
)
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
