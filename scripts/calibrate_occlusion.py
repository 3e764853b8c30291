"""Choose the DiffTracker defaults and calibrate its occlusion thresholds on TRAIN-split world videos only.

    python scripts/calibrate_occlusion.py                      # both stages, CPU (slow: ~1 s per forward)
    # what produced the committed defaults (see the comment above DEFAULT_NOISE in difftrack/tracking.py):
    python scripts/calibrate_occlusion.py --device cuda --n 16 --stage select                       # H100
    python scripts/calibrate_occlusion.py --device cuda --n 16 --stage all --only "base;tau=;interp;paper"
    python scripts/calibrate_occlusion.py --n 8 --stage occlusion --select-from <previous json> \
        --variants default,pixel_refine=ncc,features                                               # CPU (OpenCV)

Stage ``select``: a sweep over the tracking settings (noise on/off, timestep, layers and their fusion, temperature,
prompt, refinement, input resolution) and over the FeatureTracker's layer, scored by position accuracy only
(``delta_avg`` = average_pts_within_thresh at 256x256, occlusion off). Stage ``occlusion``: with the selected
settings, the raw per-point scores (cycle error in tokens, cost-peak confidence) of every train video are collected
once and the thresholds of each occlusion rule are grid-searched to maximise the mean average Jaccard (AJ); the
occlusion accuracy (OA) of the winner is reported too. The held-out split is never touched here.

Writes ``cache/occlusion_calibration.json`` (git-ignored) (every configuration's train metrics, the chosen defaults and the
threshold grid). The chosen values are copied by hand into ``difftrack/tracking.py`` with a comment citing this run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difftrack.provenance import git_commit  # noqa: E402
try:
    import cv2  # noqa: F401  (difftrack.tapvid imports it; the metric itself is pure numpy)
except ImportError:  # a GPU box without OpenCV: the metric code does not need it
    sys.modules["cv2"] = types.ModuleType("cv2")

from difftrack import mini, tapvid, world as W  # noqa: E402
from difftrack.tracking import DiffTracker, FeatureTracker  # noqa: E402

EVAL = 256  # TAP-Vid metric frame


def train_videos(n_per_family: int, seed0: int = 100_000, grid: int = 8) -> list[dict]:
    """World videos of the TRAIN split (both families), query-first grid queries, exact GT."""
    world = W.World()
    out = []
    for fam in W.FAMILIES:
        for i in range(n_per_family):
            s = world.sample(seed0 + i, fam, "train")
            q = world.grid_queries(grid)
            gt, vis = world.tracks(s, q)
            out.append(dict(video=s.video, queries=q, gt=gt, vis=vis, prompt=s.prompt, family=fam))
    return out


def metrics(v: dict, tracks: np.ndarray, visible: np.ndarray) -> dict:
    """TAP-Vid metrics of one video at 256x256 (query-first)."""
    H, W_ = v["video"].shape[1:3]
    sz = (EVAL, EVAL)
    q = tapvid.rescale_queries(v["queries"], (H, W_), sz)
    m = tapvid.compute_tapvid_metrics(tapvid.queries_txy_to_tyx(q)[None], ~v["vis"][None],
                                      tapvid.rescale_tracks(v["gt"], (H, W_), sz)[None], ~visible[None],
                                      tapvid.rescale_tracks(tracks, (H, W_), sz)[None], "first")
    return {k: float(x[0]) for k, x in m.items()}


def run(tracker, videos, resize: int | None = None, use_prompt: bool = False):
    """Track every video; returns per-video (raw dict, metrics)."""
    outs = []
    for v in videos:
        video, q = v["video"], v["queries"]
        H, W_ = video.shape[1:3]
        if resize:
            video = _torch_resize(video, resize)
            q = tapvid.rescale_queries(q, (H, W_), (resize, resize))
        o = tracker.track(video, q, prompt=v["prompt"] if use_prompt else None)
        if resize:
            o["tracks"] = tapvid.rescale_tracks(o["tracks"], (resize, resize), (H, W_))
        outs.append(o)
    return outs


def _torch_resize(video: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def summarise(videos, outs, visible_fn=None) -> dict:
    ms = [metrics(v, o["tracks"], visible_fn(o) if visible_fn else o["visible"])
          for v, o in zip(videos, outs)]
    keys = ["average_pts_within_thresh", "average_jaccard", "occlusion_accuracy"] + [f"pts_within_{d}" for d in
                                                                                    (1, 2, 4, 8, 16)]
    res = {k: float(np.nanmean([m[k] for m in ms])) for k in keys}
    for fam in W.FAMILIES:
        sel = [m for m, v in zip(ms, videos) if v["family"] == fam]
        res[f"delta_avg_{fam}"] = float(np.mean([m["average_pts_within_thresh"] for m in sel]))
    return res


def select_stage(pipe, videos, device, quick: bool = False, only=None, feature_layers=range(2, 12)) -> dict:
    base = dict(layers=(8,), step=-1, noise="none", occlusion="none", device=device)
    grid: list[tuple[str, dict, dict]] = [("base l8 t19 clean", {}, {})]
    for noise in ("none", "add"):
        for step in (-1, -3, -6, -11):
            if noise == "none" and step == -1:
                continue
            grid.append((f"noise={noise} step={step}", dict(noise=noise, step=step), {}))
    for l in range(3, 12):
        if l != 8:
            grid.append((f"layer {l}", dict(layers=(l,)), {}))
    for ls in ((8, 11), (7, 8), (8, 9), (7, 8, 9), (8, 9, 10, 11), (6, 8, 11)):
        grid.append((f"layers {ls} mean", dict(layers=ls), {}))
    grid.append(("layers (8, 11) concat", dict(layers=(8, 11), fuse="concat"), {}))
    grid.append(("steps (-1, -3) fused", dict(step=(-1, -3)), {}))
    grid.append(("tau=heads [B2]", dict(tau="heads"), {}))
    grid.append(("unidirectional", dict(bidirectional=False), {}))
    grid.append(("refine=argmax", dict(refine="argmax"), {}))
    grid.append(("refine=paper", dict(refine="paper"), {}))
    grid.append(("softargmax r=2", dict(radius=2), {}))
    grid.append(("softargmax r=0 (argmax)", dict(radius=0), {}))
    grid.append(("video prompt", {}, dict(use_prompt=True)))
    grid.append(("chunk_len 7 (2 chunks)", dict(chunk_len=7), {}))
    grid.append(("input 128x128", {}, dict(resize=128)))
    for tau in ("heads", 1.0, 2.0, 4.0):
        grid.append((f"tau={tau} softargmax", dict(tau=tau), {}))
        for r in (1, 2):
            grid.append((f"tau={tau} interp r={r}", dict(tau=tau, refine="interp", radius=r), {}))
            grid.append((f"tau={tau} interp r={r} layers (8, 11)", dict(tau=tau, refine="interp", radius=r,
                                                                         layers=(8, 11)), {}))
    grid.append(("interp r=1", dict(refine="interp"), {}))
    grid.append(("tau=heads paper", dict(tau="heads", refine="paper"), {}))
    grid.append(("tau=2 paper", dict(tau=2.0, refine="paper"), {}))
    if only:
        grid = [g for g in grid if any(o in g[0] for o in only)]
    if quick:
        grid = grid[:2] + grid[-1:]
    results = {}
    for name, kw, rkw in grid:
        t0 = time.time()
        tr = DiffTracker(pipe, **{**base, **kw})
        outs = run(tr, videos, **rkw)
        results[name] = dict(tracker_settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
                             run_settings=rkw, settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in {**kw, **rkw}.items()},
                             seconds=time.time() - t0, **summarise(videos, outs))
        print(f"{name:32s} delta_avg {results[name]['average_pts_within_thresh']:.4f}  "
              f"<8px {results[name]['pts_within_8']:.3f}  <16px {results[name]['pts_within_16']:.3f}  "
              f"({results[name]['seconds']:.1f}s)", flush=True)
    feats = {}
    for l in (feature_layers if not quick else (8,)):
        for ft in ((0.05, 0.1) if not quick else (0.05,)):
            tr = FeatureTracker(pipe, layers=(l,), occlusion="none", feature_tau=ft, device=device)
            feats[f"features layer {l} tau {ft}"] = dict(layer=l, feature_tau=ft, **summarise(videos, run(tr, videos)))
            print(f"features l{l} tau {ft}: delta_avg {feats[f'features layer {l} tau {ft}']['average_pts_within_thresh']:.4f}",
                  flush=True)
    return dict(qk=results, features=feats)


def occlusion_stage(tracker, videos, label: str) -> dict:
    """Grid-search the thresholds of each occlusion rule on the raw scores (one tracking pass)."""
    outs = run(tracker, videos)
    cyc_grid = [0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 1e9]
    conf_vals = np.concatenate([o["confidence"][np.isfinite(o["confidence"])] for o in outs])
    conf_grid = [0.0] + [float(x) for x in np.quantile(conf_vals, np.linspace(0.02, 0.5, 25))]
    has_ncc = "ncc" in outs[0]
    ncc_grid = [None] + ([0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9] if has_ncc else [])
    rules = [("none", [1e9], [0.0], [None]), ("cycle", cyc_grid, [0.0], [None]),
             ("confidence", [1e9], conf_grid, [None]), ("cycle+confidence", cyc_grid, conf_grid, [None])]
    if has_ncc:
        rules += [("ncc", [1e9], [0.0], ncc_grid[1:]), ("cycle+ncc", cyc_grid, [0.0], ncc_grid[1:])]
    table = []
    for name, cg, pg, ng in rules:
        occ = {"ncc": "none_but_ncc", "cycle+ncc": "cycle"}.get(name, name)
        for ct in cg:
            for pt in pg:
                for nt in ng:
                    def fn(o, occ=occ, ct=ct, pt=pt, nt=nt):
                        vis = tracker.decide_visible(o["cycle_error"], o["confidence"],
                                                     "cycle" if occ == "none_but_ncc" else occ,
                                                     1e9 if occ == "none_but_ncc" else ct, pt)
                        if nt is not None:
                            vis &= o["ncc"] >= nt
                        return vis | ~np.isfinite(o["confidence"])
                    sm = summarise(videos, outs, fn)
                    table.append(dict(occlusion=name, cycle_threshold=ct, confidence_threshold=pt, ncc_threshold=nt,
                                      AJ=sm["average_jaccard"], OA=sm["occlusion_accuracy"],
                                      delta_avg=sm["average_pts_within_thresh"]))
    best = {}
    for name, *_ in rules:
        rows = [r for r in table if r["occlusion"] == name]
        best[name] = max(rows, key=lambda r: r["AJ"])
        b = best[name]
        print(f"[{label}] {name:18s} best AJ {b['AJ']:.4f} OA {b['OA']:.4f} delta_avg {b['delta_avg']:.4f} at "
              f"cycle<={b['cycle_threshold']} conf>={b['confidence_threshold']:.4g} ncc>={b['ncc_threshold']}",
              flush=True)
    vis_rate = float(np.mean(np.concatenate([v["vis"][:, 1:].ravel() for v in videos])))
    return dict(best=best, table=table, gt_visible_fraction=vis_rate)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="train videos per family")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stage", default="all", choices=("select", "occlusion", "all"))
    ap.add_argument("--out", default=str(ROOT / "cache" / "occlusion_calibration.json"))
    ap.add_argument("--select-from", help="occlusion stage: take the selection from this earlier report")
    ap.add_argument("--only", help="select stage: only configurations whose name contains one of these (';'-separated)")
    ap.add_argument("--feature-layers", default="2,3,4,5,6,7,8,9,10,11")
    ap.add_argument("--variants", help="occlusion stage: comma-separated subset of default,noise=add,noise=none,"
                                       "pixel_refine=ncc,selected,features")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 configurations only")
    args = ap.parse_args()
    torch.manual_seed(0)
    videos = train_videos(args.n)
    pipe = mini.load_default(device=args.device)
    report = dict(split="train", n_videos=len(videos), grid_queries=64, eval_size=EVAL,
                  device=str(args.device), torch=torch.__version__, platform=platform.platform(),
                  gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    report["git_commit"] = git_commit()
    if args.stage in ("select", "all"):
        report["select"] = sel = select_stage(pipe, videos, args.device, args.quick,
                                              args.only.split(";") if args.only else None,
                                              [int(x) for x in args.feature_layers.split(",")])
        # the best tracker-only settings (configurations that change the input or the prompt are reported only)
        cands = {k: v for k, v in sel["qk"].items() if not v["run_settings"]}
        best = max(cands, key=lambda k: cands[k]["average_pts_within_thresh"])
        fbest = max(sel["features"], key=lambda k: sel["features"][k]["average_pts_within_thresh"])
        report["selected"] = dict(qk=best, qk_settings=cands[best]["tracker_settings"], features=fbest)
        print("selected:", report["selected"], flush=True)
    if args.select_from:
        prev = json.loads(Path(args.select_from).read_text())
        report["select"], report["selected"] = prev["select"], prev["selected"]
    if args.stage in ("occlusion", "all"):
        variants = [("default", {}), ("noise=add", dict(noise="add")), ("noise=none", dict(noise="none")),
                    ("pixel_refine=ncc", dict(pixel_refine="ncc"))]
        if args.variants:
            variants = [v for v in variants if v[0] in args.variants.split(",")]
        fkw = {}
        if "selected" in report:
            s = dict(report["selected"]["qk_settings"])
            s = {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}
            variants.append(("selected: " + report["selected"]["qk"], s))
            f = report["select"]["features"][report["selected"]["features"]]
            fkw = dict(layers=(f["layer"],), feature_tau=f["feature_tau"])
        occ = {}
        if "selected" in report and args.variants and "selected" not in args.variants.split(","):
            variants = [v for v in variants if not v[0].startswith("selected")]
        for label, kw in variants:
            occ[label] = occlusion_stage(DiffTracker(pipe, device=args.device, **kw), videos, label)
            occ[label]["tracker_settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
        if args.variants and "features" not in args.variants.split(","):
            report["occlusion"] = occ
            occ = None
        if occ is not None:
            occ["features"] = occlusion_stage(FeatureTracker(pipe, device=args.device, **fkw), videos, "features")
            occ["features"]["tracker_settings"] = {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in fkw.items()}
            report["occlusion"] = occ
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
