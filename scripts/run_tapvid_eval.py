"""TAP-Vid evaluation of your own copy of the dataset (nothing is downloaded): DiffTracker and Lucas-Kanade on the
first videos of a ``tapvid_davis.pkl``-style pickle or a Kinetics shard folder, "first" query mode, scored at 256x256.

    python scripts/run_tapvid_eval.py --tapvid /data/tapvid_davis.pkl --out results/tapvid_davis.json
    torchrun --nproc_per_node 8 scripts/run_tapvid_eval.py --tapvid /data/tapvid_davis.pkl \
        --model /models/CogVideoX-2b --device cuda --dtype bfloat16 --out results/tapvid_davis_2b.json

Each video is cut to ``--max-frames`` frames, resized to the model's frame size and queried at most
``--max-points`` times (evenly subsampled); predictions are cached per (method, video) under ``--cache`` (a killed run
resumes). Under a launcher every process tracks its share of the videos and rank 0 scores and writes
(:func:`difftrack.experiments.tracking.evaluate_tapvid`). With the embedded 64x64 model the numbers are not comparable
to the paper's CogVideoX ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from difftrack.experiments import json_clean, write_json  # noqa: E402
from difftrack.experiments.distributed import processes  # noqa: E402
from difftrack.experiments.tracking import evaluate_tapvid  # noqa: E402

METHODS = ("difftrack", "lucas_kanade")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tapvid", required=True, help="TAP-Vid pickle (DAVIS) or Kinetics shard folder")
    ap.add_argument("--model", default="embedded", help="'embedded' or a local diffusers pipeline folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--layer", type=int, default=None, help="DiffTracker layer (default: the backbone's)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--max-videos", type=int, default=None)
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--max-points", type=int, default=None)
    ap.add_argument("--cache", default=str(ROOT / "cache" / "tapvid"))
    ap.add_argument("--out", required=True, help="results JSON")
    a = ap.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in METHODS]
    if bad or not a.methods:
        ap.error(f"--methods {','.join(a.methods)!r}: unknown {bad}; allowed: {', '.join(METHODS)}")
    if not Path(a.tapvid).exists():
        ap.error(f"--tapvid {a.tapvid!r} does not exist; pass your tapvid_davis.pkl or Kinetics shard folder")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    procs = processes()
    device = procs.device(a.device)
    state: dict = {}

    def pipe():
        if "pipe" not in state:
            from difftrack.runners import load_pipeline

            state["pipe"] = load_pipeline(a.model, device, a.dtype)
        return state["pipe"]

    def difftrack_factory():
        from difftrack.tracking import DiffTracker

        return DiffTracker(pipe(), **({"layers": (a.layer,)} if a.layer is not None else {}))

    def lk_factory():
        from difftrack.baselines import LucasKanadeTracker

        return LucasKanadeTracker()

    from difftrack.runners import VideoRunner

    size = tuple(VideoRunner(pipe()).resolve_size(None)[1:])  # the model's (H, W)
    factories = {"difftrack": difftrack_factory, "lucas_kanade": lk_factory}
    settings = {"difftrack": dict(model=a.model, dtype=a.dtype, layer=a.layer), "lucas_kanade": "defaults"}
    res = evaluate_tapvid({m: factories[m] for m in a.methods}, a.tapvid, a.cache, size, a.max_videos, a.max_frames,
                          a.max_points, settings={m: settings[m] for m in a.methods}, processes=procs)
    if procs.is_main:
        res.update(dataset=str(a.tapvid), model=a.model, dtype=a.dtype, size=list(size), processes=procs.world_size,
                   limits=dict(max_videos=a.max_videos, max_frames=a.max_frames, max_points=a.max_points),
                   query_mode="first", metric_size=[256, 256])
        write_json(a.out, json_clean(res))
        for m, r in res["methods"].items():
            print(f"{m:14s} delta_avg {r['metrics']['average_pts_within_thresh']:.4f} AJ "
                  f"{r['metrics']['average_jaccard']:.4f} OA {r['metrics']['occlusion_accuracy']:.4f} "
                  f"({len(res['videos'])} videos)")
        print(f"wrote {a.out}")
    procs.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
