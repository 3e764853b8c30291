"""Sub-token refinement study for the embedded model's query-key matching (issue 4): which rule turns a frame-pair
cost into a position best, measured within half a token (the paper's threshold) and within one token.

Protocol = scripts/eval_mini.py's (world videos, noised to the last of 50 steps, t = 19, one conditional forward,
frame 0 -> every other frame, 10x10 grid, bidirectional cost with tau = sqrt(head_dim), visible points of frames
1..12), with the q/k of every layer captured once per video and every refinement rule applied to the same costs.
The rule is **chosen on train-split videos** (textures seen in training) and only then reported on the held-out
split, so the held-out number is not tuned on.

    python scripts/subtoken_study.py [--videos 40] [--out results/subtoken_refinement.json]

Rules (``difftrack.matching.REFINE`` names where the library has them):
* ``argmax`` -- the integer peak of the bilinearly blended source rows;
* ``softargmax`` r / sharpen -- soft-argmax in a (2r+1)^2 window around that peak, weights ``w^(1/sharpen)``;
* ``parabola`` -- separable 1-D parabola through the log-probabilities at the peak and its 4 neighbours;
* ``paper`` -- argmax per source token, then bilinear interpolation of the integer match map at the query.
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
from difftrack.provenance import git_commit  # noqa: E402
from difftrack import matching as M  # noqa: E402
from difftrack import mini  # noqa: E402
from difftrack.capture import capture  # noqa: E402
from difftrack.runners import VideoRunner  # noqa: E402
from difftrack.world import World  # noqa: E402

RULES = {  # name: match_from_cost keyword arguments
    "argmax": dict(refine="argmax"),
    "softargmax r1": dict(refine="softargmax", radius=1),
    "softargmax r1 sharpen 0.5": dict(refine="softargmax", radius=1, sharpen=0.5),
    "softargmax r1 sharpen 2": dict(refine="softargmax", radius=1, sharpen=2.0),
    "softargmax r2": dict(refine="softargmax", radius=2),
    "softargmax r2 sharpen 0.5": dict(refine="softargmax", radius=2, sharpen=0.5),
    "parabola": dict(refine="parabola"),
    "paper": dict(refine="paper"),
}


def collect(pipe, split: str, n: int, steps: int = 50):
    """Per video: (q, k) of every layer ``float16 [L, H, F, rows, cols, D]``, queries, exact tracks, visibility."""
    runner = VideoRunner(pipe)
    w = World()
    out = []
    for i in range(n):
        fam = ("objects", "scenes")[i % 2]
        s = w.sample(5000 + i, fam, split)
        qs, ks = {}, {}

        def on_qk(ev):
            qs[ev.layer], ks[ev.layer] = ev.q_video[0].half().clone(), ev.k_video[0].half().clone()

        with torch.no_grad(), capture(pipe, layers="all", store=False, on_qk=on_qk) as cap:
            runner.noised_forwards(s.video, s.prompt, steps, [steps - 1], noise_seed=i, cap=cap)
        queries = w.grid_queries(10)
        gt, vis = w.tracks(s, queries)
        L = len(qs)
        out.append(dict(q=torch.stack([qs[l] for l in range(L)]), k=torch.stack([ks[l] for l in range(L)]),
                        pts=queries[:, 1:], gt=gt, vis=vis))
    return out


def evaluate(videos, stride: float = 4.0) -> dict:
    """PCK (half / one token) per rule and layer over all videos: ``{rule: {"half": [L], "one": [L]}}``."""
    L = videos[0]["q"].shape[0]
    hits = {r: {"half": np.zeros(L), "one": np.zeros(L)} for r in RULES}
    total = 0
    for v in videos:
        vis = v["vis"][:, 1:]
        total += vis.sum()
        pts = M.px_to_tokens(torch.from_numpy(v["pts"]).float(), stride)
        for l in range(L):
            q, k = v["q"][l].float(), v["k"][l].float()  # [H, F, rows, cols, D]
            H, Fr, rows, cols, D = q.shape
            qf, kf = q.reshape(H, Fr, -1, D), k.reshape(H, Fr, -1, D)
            costs = M.qk_cost_frames(qf[:, 0], kf[:, 0], qf[:, 1:], kf[:, 1:])  # [F-1, Ms, Mk]
            for name, kw in RULES.items():
                pos, _ = M._match_frames(costs, rows, cols, pts, kw["refine"], kw.get("radius", 1),
                                         kw.get("sharpen", 1.0))
                err = np.linalg.norm(M.tokens_to_px(pos, stride).numpy() - v["gt"][:, 1:], axis=-1)
                hits[name]["half"][l] += ((err < 0.5 * stride) & vis).sum()
                hits[name]["one"][l] += ((err < stride) & vis).sum()
    return {r: {t: (h / total).round(4).tolist() for t, h in d.items()} for r, d in hits.items()}, int(total)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=40, help="videos per split (families alternate)")
    ap.add_argument("--out", default=str(ROOT / "results" / "subtoken_refinement.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    pipe = mini.load_default()
    res = {}
    for split in ("train", "heldout"):
        table, n_vis = evaluate(collect(pipe, split, args.videos))
        res[split] = dict(visible_point_frames=n_vis, rules=table)
        best = {r: (max(d["half"]), int(np.argmax(d["half"]))) for r, d in table.items()}
        print(split, {r: f"{a:.3f}@{l}" for r, (a, l) in best.items()}, flush=True)
    train = res["train"]["rules"]
    chosen = max(train, key=lambda r: max(train[r]["half"]))
    held = res["heldout"]["rules"][chosen]
    lay = int(np.argmax(train[chosen]["half"]))
    res.update(chosen_on_train=chosen, chosen_layer_on_train=lay,
               heldout_at_chosen=dict(half=held["half"][lay], one=held["one"][lay],
                                      best_layer_half=max(held["half"]), best_layer_one=max(held["one"])),
               rules_kwargs=RULES, videos_per_split=args.videos, timestep_index=49, num_steps=50,
               threshold_px=dict(half=2.0, one=4.0), device="cpu", torch=torch.__version__,
               threads=torch.get_num_threads(), seconds=round(time.time() - t0, 1),
               commit=git_commit())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"chosen on train: {chosen} (layer {lay}); held-out: half {held['half'][lay]:.3f}, one {held['one'][lay]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
