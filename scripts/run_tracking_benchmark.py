"""Zero-shot point-tracking benchmark on held-out world videos: embedded DiffTrack vs baselines, TAP-Vid metrics.

    python scripts/run_tracking_benchmark.py                 # 25 + 25 held-out videos, every method (~20-30 min)
    python scripts/run_tracking_benchmark.py --methods difftrack,lucas_kanade@64 --per-family 4

Data: ``world.make_dataset(n, family, split="heldout", grid_size=8)`` for both families (objects, scenes): 13 frames
of 64x64, an 8x8 grid of queries at frame 0 (query-first: every query is visible at frame 0, so TAP-Vid's "first"
sampler returns exactly these), exact ground truth. Held-out photographs never appear in the model's training or in
the calibration (``scripts/calibrate_occlusion.py`` uses the train split).

Metrics: ``difftrack.tapvid.compute_tapvid_metrics`` (query_mode "first") at 256x256: pixel tracks are scaled from
64 to 256 with ``tapvid.rescale_tracks``; delta_avg = average_pts_within_thresh (thresholds 1, 2, 4, 8, 16 px at
256 = 0.25 ... 4 px at 64, i.e. 1/16 ... 1 token of the embedded model), AJ = average_jaccard, OA =
occlusion_accuracy, each averaged over videos with equal weight.

Methods (every one on the same videos and queries):

* ``difftrack``: ``DiffTracker()`` with its defaults (embedded model, layer 8, clean latent at t = 19 of 50, empty
  prompt, tau = sqrt(head_dim), bidirectional cost, match-map interpolation, cycle-consistency occlusion).
* ``difftrack_layers8+11``: the same with layers 8 and 11 fused (mean of costs).
* ``difftrack_published``: the published recipe's switches (tau = sqrt(heads) [B2], no occlusion prediction [B5]).
* ``difftrack+ncc``: our extension -- DiffTrack's match refined to sub-pixel by local NCC (``pixel_refine="ncc"``).
* ``block_features``: ``FeatureTracker()`` (block-output features of the same model, same chunking).
* ``untrained``: ``DiffTracker(mini.build_untrained())`` (same architecture, random weights, same settings).
* ``lucas_kanade``, ``dense_flow_dis``, ``dense_flow_farneback``, ``patch_match`` (``difftrack.baselines``, default
  parameters), each run on the native 64x64 frames (``@64``) and on frames enlarged to 256x256 (``@256``, the
  metric resolution; the enlargement time is counted).

Outputs ``results/tracking_benchmark.json`` / ``.csv``; per-(method, video) predictions are cached under
``cache/tracking/`` so that an interrupted run resumes (delete the folder to re-run from scratch). Several processes
(``torchrun --nproc_per_node N scripts/run_tracking_benchmark.py ...``, or ``accelerate launch``) split the videos of
every method, model-based and classical alike (the launcher's processes replace the old pool of classical
trackers); rank 0 reads the predictions back and writes the results.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from difftrack import baselines, mini, tapvid  # noqa: E402
from difftrack.experiments import write_record  # noqa: E402
from difftrack.experiments.distributed import Processes, processes  # noqa: E402
from difftrack.experiments.tracking import TrackingBenchmark  # noqa: E402
from difftrack.provenance import git_commit  # noqa: E402
from difftrack.tracking import DiffTracker, FeatureTracker  # noqa: E402
from difftrack.world import FAMILIES, make_dataset  # noqa: E402

EVAL = (256, 256)
CLASSICAL = ("lucas_kanade", "dense_flow_dis", "dense_flow_farneback", "patch_match")  # model-free methods
KEYS = ["average_pts_within_thresh", "average_jaccard", "occlusion_accuracy"] + \
       [f"pts_within_{d}" for d in tapvid.DEFAULT_THRESHOLDS] + [f"jaccard_{d}" for d in tapvid.DEFAULT_THRESHOLDS]


def build_methods(pipe_cache: dict, device: str = "cpu") -> dict:
    """name -> (description, input size, factory). Model-based trackers run on ``device``."""
    def trained():
        if "trained" not in pipe_cache:
            pipe_cache["trained"] = mini.load_default(device)
        return pipe_cache["trained"]

    m = {
        "difftrack": ("DiffTracker() defaults: embedded model, layer 8, clean latent, t=19/50, empty prompt, "
                      "tau=sqrt(head_dim), bidirectional, match-map interpolation, cycle occlusion", 64,
                      lambda: DiffTracker(trained())),
        "difftrack_layers8+11": ("DiffTracker(layers=(8, 11)): mean of the two layers' costs", 64,
                                 lambda: DiffTracker(trained(), layers=(8, 11))),
        "difftrack_published": ("published switches: tau=sqrt(num_heads) [B2], no occlusion prediction [B5] "
                                "(still per-frame encoding once, early exit, no CFG duplicate)", 64,
                                lambda: DiffTracker(trained(), tau="heads", refine="paper", occlusion="none")),
        "difftrack+ncc": ("our extension: DiffTrack match refined by local NCC (pixel_refine='ncc'), "
                          "cycle + NCC occlusion", 64, lambda: DiffTracker(trained(), pixel_refine="ncc")),
        "block_features": ("FeatureTracker(): block-output features of the same model (layer 5), cosine, "
                           "same chunking, cycle occlusion", 64, lambda: FeatureTracker(trained())),
        "untrained": ("DiffTracker(mini.build_untrained()): same architecture and settings, random weights", 64,
                      lambda: DiffTracker(mini.build_untrained().to(device))),
    }
    classical = {
        "lucas_kanade": ("OpenCV pyramidal LK chained frame to frame, FB + NCC checks", baselines.LucasKanadeTracker),
        "dense_flow_dis": ("OpenCV DIS dense flow chained, FB + NCC checks",
                           lambda: baselines.DenseFlowTracker("dis")),
        "dense_flow_farneback": ("OpenCV Farneback dense flow chained, FB + NCC checks",
                                 lambda: baselines.DenseFlowTracker("farneback")),
        "patch_match": ("raw-pixel NCC patch matching against the query frame", baselines.PatchMatchTracker),
    }
    assert set(classical) == set(CLASSICAL)
    for name, (desc, fac) in classical.items():
        for size in (64, 256):
            m[f"{name}@{size}"] = (f"{desc}; input {size}x{size}", size, fac)
    return m


def load_videos(n: int, grid: int) -> list[dict]:
    vids = []
    for fam in FAMILIES:
        for d in make_dataset(n, fam, split="heldout", grid_size=grid):
            T, H, W, _ = d["video"].shape
            s = tapvid.sample_queries_first(d["occluded"], d["points"])
            q = tapvid.queries_tyx_to_txy(s["query_points"][0]).astype(np.float32)
            q[:, 1] *= W
            q[:, 2] *= H
            vids.append(dict(video=d["video"], queries=q, gt=s["target_points"][0] * np.float32([W, H]),
                             occluded=s["occluded"][0], family=fam, seed=int(d["seed"]), name=f"{fam}_{d['seed']:03d}"))
    return vids


def video_metrics(v: dict, tracks: np.ndarray, visible: np.ndarray) -> dict:
    H, W = v["video"].shape[1:3]
    q = tapvid.rescale_queries(v["queries"], (H, W), EVAL)
    m = tapvid.compute_tapvid_metrics(tapvid.queries_txy_to_tyx(q)[None], v["occluded"][None],
                                      tapvid.rescale_tracks(v["gt"], (H, W), EVAL)[None], ~visible[None],
                                      tapvid.rescale_tracks(tracks, (H, W), EVAL)[None], "first")
    return {k: float(m[k][0]) for k in KEYS}


def _cache_dir(cache_dir: Path, name: str) -> Path:
    return cache_dir / name.replace("@", "_at_").replace("+", "_plus_")


def _predict_one(tracker, size: int, v: dict, f: Path) -> dict:
    """Track one video (resized to ``size`` first when that differs) and cache the prediction atomically."""
    video, q = v["video"], v["queries"]
    H, W = video.shape[1:3]
    t0 = time.perf_counter()
    if size != H:
        video = tapvid.resize_video(video, (size, size))
        q = tapvid.rescale_queries(q, (H, W), (size, size))
    tracks, visible = tracker(video, q)
    if size != H:
        tracks = tapvid.rescale_tracks(tracks, (size, size), (H, W))
    sec = time.perf_counter() - t0
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, tracks=tracks.astype(np.float32), visible=visible.astype(bool), seconds=sec)
    os.replace(tmp, f)
    return dict(tracks=tracks, visible=visible, seconds=sec, cached=False)


def run_method(name: str, size: int, factory, vids: list[dict], cache_dir: Path, procs=None) -> list[dict] | None:
    """Predictions of one method on every video, cached per video (an interrupted run resumes). Each process tracks
    its share of the videos (:meth:`Processes.indices`) not cached yet, then every process waits; rank 0 returns
    every prediction read back from the cache, in video order (other ranks: ``None``). Seconds stay per video."""
    procs = procs or Processes()
    cdir = _cache_dir(cache_dir, name)
    cdir.mkdir(parents=True, exist_ok=True)
    files = [cdir / f"{v['name']}.npz" for v in vids]
    todo = [i for i in procs.indices(len(vids)) if not files[i].exists()]
    if todo:
        if procs.distributed and name.split("@")[0] in CLASSICAL:
            import cv2

            cv2.setNumThreads(1)  # one core per process
        t0 = time.time()
        tracker = factory()
        if procs.is_main:
            print(f"  [{name}] built in {time.time() - t0:.1f}s", flush=True)
        for i in procs.progress(todo, name):
            _predict_one(tracker, size, vids[i], files[i])
    fresh = {i for part in procs.gather(todo) for i in part}  # also waits for every process
    if not procs.is_main:
        return None
    out = []
    for i, f in enumerate(files):
        z = np.load(f)
        out.append(dict(tracks=z["tracks"], visible=z["visible"], seconds=float(z["seconds"]), cached=i not in fresh))
    return out


def motion_breakdown(vids: list[dict], preds: list[dict], token_px: float = 4.0) -> dict:
    """Where the errors are: accuracy within one / half a token (of the embedded model, 4 px at 64) of visible
    points after the query frame, split by the true displacement from the query (small: < 1 token, large: > 2
    tokens), and the median true vs predicted displacement (an under-estimate means a bias toward no motion)."""
    out = {}
    for fam in FAMILIES + ("all",):
        E, D, P = [], [], []
        for v, p in zip(vids, preds):
            if fam != "all" and v["family"] != fam:
                continue
            vis = ~v["occluded"]
            vis[np.arange(len(vis)), v["queries"][:, 0].astype(int)] = False
            q = v["queries"][:, None, 1:]
            E.append(np.linalg.norm(p["tracks"] - v["gt"], axis=-1)[vis])
            D.append(np.linalg.norm(v["gt"] - q, axis=-1)[vis])
            P.append(np.linalg.norm(p["tracks"] - q, axis=-1)[vis])
        E, D, P = map(np.concatenate, (E, D, P))
        small, large = D < token_px, D > 2 * token_px
        out[fam] = dict(within_1_token=float(np.mean(E < token_px)), within_half_token=float(np.mean(E < token_px / 2)),
                        within_1_token_small_motion=float(np.mean(E[small] < token_px)),
                        within_1_token_large_motion=float(np.mean(E[large] < token_px)),
                        share_large_motion=float(np.mean(large)), median_true_motion_px=float(np.median(D)),
                        median_predicted_motion_px=float(np.median(P)),
                        median_true_motion_px_large=float(np.median(D[large])),
                        median_predicted_motion_px_large=float(np.median(P[large])))
    return out


def environment() -> dict:
    env = dict(python=platform.python_version(), platform=platform.platform(), processor=platform.processor(),
               torch=torch.__version__, torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        import cv2

        env["opencv"] = cv2.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.check_output(["lscpu"], text=True)
        env["cpu_model"] = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                                 if l.startswith("Model name")), None)
        env["lscpu"] = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                        if ":" in l and l.split(":", 1)[0].strip() in ("Architecture", "CPU(s)", "Model name",
                                                                      "Thread(s) per core", "Hypervisor vendor",
                                                                      "L2 cache", "L3 cache")}
    except Exception:  # noqa: BLE001
        pass
    env["git_commit"] = git_commit()
    if os.environ.get("GIT_COMMIT"):  # the caller named the commit (a copied tree whose .git may be stale)
        env["git_dirty_files"] = "not checked: the commit was given by $GIT_COMMIT"
        return env
    try:
        env["git_dirty_files"] = subprocess.check_output(["git", "status", "--porcelain", "--", "difftrack", "scripts"],
                                                         cwd=ROOT, text=True).strip().splitlines()
    except Exception:  # noqa: BLE001
        env["git_dirty_files"] = None
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-family", "--n", dest="n", type=int, default=25,
                    help="held-out videos per family (2 families); under torchrun write --per-family (torchrun's own "
                         "parser takes --n for an ambiguous abbreviation of its options)")
    ap.add_argument("--grid", type=int, default=8, help="queries: grid_size x grid_size at frame 0")
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: several times faster than 2 when the 2-core machine is shared)")
    ap.add_argument("--device", default="cpu", help="where the model-based trackers run (cpu, cuda)")
    ap.add_argument("--cache", default=str(ROOT / "cache" / "tracking"))
    ap.add_argument("--out", default=str(ROOT / "results" / "tracking_benchmark.json"))
    args = ap.parse_args(argv)
    procs = processes()
    if not procs.distributed:  # under a launcher: its threads per process
        torch.set_num_threads(args.threads)
    vids = load_videos(args.n, args.grid)
    methods = build_methods({}, procs.device(args.device))
    names = list(methods) if not args.methods else args.methods.split(",")
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; allowed: {list(methods)}")
    if procs.is_main:
        print(f"{len(vids)} held-out videos, {vids[0]['queries'].shape[0]} queries each, methods: {names}, "
              f"{procs.world_size} process(es)", flush=True)
    env = environment() if procs.is_main else {}  # at the start: the commit whose code produces the predictions
    env.update(device=args.device, processes=procs.world_size,
               gpu=torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None)
    results = {}
    loads = {}
    fresh = {}
    for name in names:
        desc, size, fac = methods[name]
        l0 = os.getloadavg()
        t0 = time.time()
        preds = run_method(name, size, fac, vids, Path(args.cache), procs)
        if preds is None:  # not rank 0: its share is cached
            continue
        fresh[name] = sum(not p["cached"] for p in preds)
        loads[name] = dict(loadavg_before=l0, loadavg_after=os.getloadavg(), wall_s=time.time() - t0,
                           fresh_predictions=fresh[name])
        per = [video_metrics(v, p["tracks"], p["visible"]) for v, p in zip(vids, preds)]
        res = {k: float(np.mean([m[k] for m in per])) for k in KEYS}
        res["per_family"] = {fam: {k: float(np.mean([m[k] for m, v in zip(per, vids) if v["family"] == fam]))
                                   for k in ("average_pts_within_thresh", "average_jaccard", "occlusion_accuracy")}
                             for fam in FAMILIES}
        res["seconds_per_video"] = float(np.mean([p["seconds"] for p in preds]))
        res["seconds_per_video_median"] = float(np.median([p["seconds"] for p in preds]))
        res["predicted_visible_fraction"] = float(np.mean([p["visible"][:, 1:].mean() for p in preds]))
        res["description"], res["input_size"], res["n_videos"] = desc, size, len(vids)
        res["error_breakdown_at_64px"] = motion_breakdown(vids, preds)
        results[name] = res
        print(f"{name:26s} delta_avg {res['average_pts_within_thresh']:.4f}  AJ {res['average_jaccard']:.4f}  "
              f"OA {res['occlusion_accuracy']:.4f}  {res['seconds_per_video']:.2f} s/video", flush=True)
    if not procs.is_main:
        procs.finish()
        return
    gt_vis = float(np.mean([(~v["occluded"][:, 1:]).mean() for v in vids]))
    ranking = {k: sorted(results, key=lambda n: -results[n][k]) for k in
               ("average_pts_within_thresh", "average_jaccard", "occlusion_accuracy")}
    report = dict(
        task="zero-shot point tracking, query-first, held-out world videos",
        settings=dict(n_videos=len(vids), per_family=args.n, families=list(FAMILIES), split="heldout",
                      frames=int(vids[0]["video"].shape[0]), size=list(vids[0]["video"].shape[1:3]),
                      queries_per_video=int(vids[0]["queries"].shape[0]), query_mode="first",
                      metric_size=list(EVAL), thresholds_px_at_256=list(tapvid.DEFAULT_THRESHOLDS),
                      seeds=sorted({v["seed"] for v in vids}), gt_visible_fraction_after_query=gt_vis),
        methods=results, ranking=ranking, timing_conditions=loads, environment=env,
        notes=("seconds_per_video: wall time of tracker(video, queries) on this machine (model loading excluded; "
               "resizing included for @256), CPU shared with other jobs -- see timing_conditions' load averages."),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else None
    if old is not None:  # predictions read back from the cache keep the timing conditions of the run that made them
        for name in names:
            if fresh[name] == 0 and name in old.get("timing_conditions", {}):
                report["timing_conditions"][name] = old["timing_conditions"][name]
        if not any(fresh.values()) and "environment" in old:
            report["environment"] = {**old["environment"], "report_regenerated_at_commit": env.get("git_commit")}
    if old is not None and "findings" in old:  # hand-written interpretation of the numbers, kept across re-runs
        report["findings"] = old["findings"]
    if old is not None and args.methods:  # partial re-run: merge into the existing report
        old_methods = old.get("methods", {})
        old_methods.update(results)
        report["methods"] = old_methods
        report["timing_conditions"] = {**old.get("timing_conditions", {}), **loads}
        report["ranking"] = {k: sorted(old_methods, key=lambda n: -old_methods[n][k]) for k in ranking}
    write_record(out, TrackingBenchmark.from_json(report), clean=False)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        cols = ["method", "delta_avg", "AJ", "OA"] + [f"pts_within_{d}" for d in tapvid.DEFAULT_THRESHOLDS] + \
               ["delta_avg_objects", "delta_avg_scenes", "seconds_per_video", "input_size", "n_videos"]
        w.writerow(cols)
        for name, r in sorted(report["methods"].items(), key=lambda kv: -kv[1]["average_pts_within_thresh"]):
            w.writerow([name, f"{r['average_pts_within_thresh']:.4f}", f"{r['average_jaccard']:.4f}",
                        f"{r['occlusion_accuracy']:.4f}"]
                       + [f"{r[f'pts_within_{d}']:.4f}" for d in tapvid.DEFAULT_THRESHOLDS]
                       + [f"{r['per_family']['objects']['average_pts_within_thresh']:.4f}",
                          f"{r['per_family']['scenes']['average_pts_within_thresh']:.4f}",
                          f"{r['seconds_per_video']:.3f}", r["input_size"], r["n_videos"]])
    print("wrote", out, "and", out.with_suffix(".csv"))


if __name__ == "__main__":
    main()
