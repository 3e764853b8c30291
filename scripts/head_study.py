"""Single attention heads against the head average (issue 19, part 2) on the embedded model.

HeFT (arXiv 2512.04619) reports that one attention head can match better than the head average DiffTrack uses.
This measures it on the embedded model with the protocol of ``scripts/eval_mini.py`` (world videos, clean video
forward-noised to the last of 50 steps, one conditional forward, 10x10 grid at frame 0, bidirectional cost with
the layer's temperature, bilinear source rows + 3x3 soft-argmax, PCK of visible points of frames 1.. within half a
token and one token), for every layer and every head set: each single head, each head pair and all heads (= the
head average; it reproduces ``per_layer_qk_acc`` of ``results/mini_model.json``).

The choice is made on **train-split** videos and reported on **held-out** videos (photographs never seen in
training); the held-out optimum is printed too, for transparency, but is not the reported choice.

    python scripts/head_study.py [--videos 40] [--out results/heads.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difftrack import analysis as A  # noqa: E402
from difftrack import mini  # noqa: E402
from difftrack.provenance import device_name, git_commit  # noqa: E402
from difftrack.world import World  # noqa: E402


def head_sets(n_heads: int) -> list[list[int]]:
    """Every single head, every pair, and all heads (the head average), in that order."""
    singles = [[h] for h in range(n_heads)]
    pairs = [list(p) for p in itertools.combinations(range(n_heads), 2)] if n_heads > 2 else []
    return singles + pairs + [list(range(n_heads))]


def evaluate(pipe, split: str, n: int, seed0: int, sets: list[list[int]], steps: int, grid: int, progress=True):
    """Pooled PCK ``{"half": [L, K], "one": [L, K]}`` over ``n`` videos of ``split`` and the visible point-frames."""
    from tqdm.auto import tqdm

    w = World()
    hits = {"half": 0.0, "one": 0.0}
    n_vis = 0
    for i in tqdm(range(n), desc=f"{split} videos", disable=not progress):
        s = w.sample(seed0 + i, ("objects", "scenes")[i % 2], split)
        rec = A.analyze_exact(pipe, s, num_steps=steps, steps=[steps - 1], grid_size=grid, noise_seed=i,
                              features=False, head_sets=sets)
        q = np.concatenate([np.zeros((len(rec.queries), 1), np.float32), rec.queries], 1)
        gt, vis = w.tracks(s, q)
        v = int(vis[:, 1:].sum())
        for thr, tag in ((0.5, "half"), (1.0, "one")):
            tab = A.score_tables(rec, gt, vis, threshold_tokens=thr)
            hits[tag] = hits[tag] + tab["qk_acc_heads"][-1] * v  # [L, K]
        n_vis += v
    return {k: h / max(n_vis, 1) for k, h in hits.items()}, n_vis


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=40, help="videos per split")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--grid", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "results" / "heads.json"))
    a = ap.parse_args(argv)
    if a.videos < 1 or a.steps < 1 or a.grid < 1:
        ap.error("--videos, --steps and --grid must be >= 1")
    t0 = time.time()
    pipe = mini.load_default(device=a.device)
    n_heads = pipe.transformer.config.num_attention_heads
    sets = head_sets(n_heads)
    names = ["+".join(map(str, s)) if len(s) < n_heads else "all" for s in sets]
    avg = names.index("all")
    res = {}
    for split, seed0 in (("train", 0), ("heldout", 5000)):  # eval_mini's held-out seeds
        acc, nv = evaluate(pipe, split, a.videos, seed0, sets, a.steps, a.grid)
        res[split] = dict(visible_point_frames=nv, **{f"acc_{k}": np.round(v, 4).tolist() for k, v in acc.items()})
    tr, ho = (np.asarray(res[s]["acc_half"]) for s in ("train", "heldout"))
    single = [j for j, s in enumerate(sets) if len(s) == 1]
    pair = [j for j, s in enumerate(sets) if len(s) == 2]

    def pick(table, cols):  # best (layer, head set) among cols
        sub = table[:, cols]
        l, j = np.unravel_index(int(np.argmax(sub)), sub.shape)
        return int(l), cols[int(j)]

    choice = {}
    for kind, cols in (("head_average", [avg]), ("single_head", single), ("head_pair", pair)):
        if not cols:
            continue
        l, j = pick(tr, cols)
        lo, jo = pick(ho, cols)
        choice[kind] = dict(layer=l, heads=sets[j], train_half=float(tr[l, j]), heldout_half=float(ho[l, j]),
                            heldout_one=float(np.asarray(res["heldout"]["acc_one"])[l, j]),
                            heldout_oracle=dict(layer=lo, heads=sets[jo], heldout_half=float(ho[lo, jo])))
    best_single, best_avg = choice["single_head"], choice["head_average"]
    verdict = ("beats" if best_single["heldout_half"] > best_avg["heldout_half"] else "does not beat")
    out = dict(
        description=__doc__.split("\n\n")[0],
        protocol=dict(videos_per_split=a.videos, families="objects/scenes alternating", train_seeds="0..",
                      heldout_seeds="5000.. (scripts/eval_mini.py)", step_index=a.steps - 1, num_steps=a.steps,
                      grid=f"{a.grid}x{a.grid} at frame 0", thresholds_px=dict(half=2.0, one=4.0),
                      selection="best (layer, head set) on the train split, reported on the held-out split",
                      temperature="the layer's sqrt(head_dim) for every head set"),
        num_heads=n_heads, head_sets=sets, head_set_names=names, num_layers=len(tr),
        per_split=res, choice=choice,
        finding=(f"On held-out videos the single head chosen on train videos (layer {best_single['layer']}, head "
                 f"{best_single['heads'][0]}) {verdict} the best head average chosen the same way (layer "
                 f"{best_avg['layer']}): {100 * best_single['heldout_half']:.1f} % vs "
                 f"{100 * best_avg['heldout_half']:.1f} % within half a token."),
        device=device_name(a.device), torch=torch.__version__, commit=git_commit(), seconds=round(time.time() - t0, 1),
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(out["finding"])
    for kind, c in choice.items():
        print(f"{kind:13s} train-chosen layer {c['layer']:2d} heads {c['heads']}: train {100 * c['train_half']:.1f} %, "
              f"held-out {100 * c['heldout_half']:.1f} % (one token {100 * c['heldout_one']:.1f} %); held-out oracle "
              f"{c['heldout_oracle']}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
