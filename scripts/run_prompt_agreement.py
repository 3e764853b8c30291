"""Prompt agreement of the embedded model (issue 4): generate videos from random world prompts (both families) with
the plain pipeline (CFG 6, no CAG) and measure with OpenCV whether each video shows the prompt's content
(``difftrack.cag_eval.prompt_agreement``: first object's colour + motion direction; scenes: camera motion).
The measure itself is validated on the ground-truth world renders of the same prompts plus ``--world-extra`` more.

Writes ``results/mini_prompt_agreement.json`` (agreement fraction, per-attribute and per-family breakdown, world
validation) and ``figures/mini_samples_grid.png`` (4x4 generated samples, title green = agrees).

Phases (videos cached as .npy per (prompt, seed) under ``--cache``; the generate phase needs no OpenCV):

    python scripts/run_prompt_agreement.py --phase generate --videos 128 --steps 50 --device cuda --batch 128
    python scripts/run_prompt_agreement.py --phase score    --videos 128 --steps 50
    python scripts/run_prompt_agreement.py --phase pack --pack-dir DIR / --phase unpack --pack-dir DIR

Tiny CPU check:  python scripts/run_prompt_agreement.py --phase all --videos 3 --steps 4 --batch 3

Several processes (``torchrun --nproc_per_node N scripts/run_prompt_agreement.py ...``, or ``accelerate launch``):
``generate`` splits the batches of --batch videos (fixed by video index), ``score`` the videos; rank 0 writes.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difftrack import cag_eval as E  # noqa: E402
from difftrack.experiments import cag as X  # noqa: E402
from difftrack.experiments import write_record  # noqa: E402
from difftrack.experiments.distributed import processes  # noqa: E402
from difftrack.provenance import device_name  # noqa: E402

SEED0 = 500  # world seeds of the prompts (disjoint from run_cag_eval's 0..)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("generate", "score", "all", "pack", "unpack"), default="all")
    p.add_argument("--videos", type=int, default=128, help="generated videos (families alternate)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype")
    p.add_argument("--autocast", default="none", choices=("none", "bf16", "fp16"),
                   help="torch.autocast dtype (the embedded model was trained under bf16 autocast; use bf16 on GPU)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--world-extra", type=int, default=200, help="extra world videos for the validation")
    p.add_argument("--weights", default=None, help="a saved pipeline folder (default: the committed weights)")
    p.add_argument("--cache", default=str(ROOT / "cache" / "prompt_agreement"))
    p.add_argument("--out", default=str(ROOT / "results" / "mini_prompt_agreement.json"))
    p.add_argument("--grid", default=str(ROOT / "figures" / "mini_samples_grid.png"))
    p.add_argument("--pack-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def run_dir(a) -> Path:
    return Path(a.cache) / (f"steps{a.steps}_cfg{a.cfg:g}" + ("" if a.dtype == "fp32" else f"_{a.dtype}")
                            + ("" if a.autocast == "none" else f"_amp{a.autocast}"))


def generate(a, procs):
    """The batches split over the processes; rank 0 writes the manifest, checks the folder's weights first and
    merges the timings."""
    import torch

    from difftrack import mini

    if a.threads:
        torch.set_num_threads(a.threads)
    device = procs.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    pipe = mini.load_default(device, dtype, weights=a.weights)
    pipe.set_progress_bar_config(disable=True)
    items = E.eval_prompts(a.videos, seed0=SEED0)
    d = run_dir(a)
    d.mkdir(parents=True, exist_ok=True)
    if procs.is_main:
        (d / "manifest.json").write_text(json.dumps(dict(items=items, steps=a.steps, cfg=a.cfg, dtype=a.dtype,
                                                         autocast=a.autocast), indent=1))
        X.claim_cache(pipe, d / "videos")
    procs.barrier()
    t0 = time.time()
    mine = procs.indices(len(X.batches(items, a.batch)))  # this process's batches, fixed by item index
    first_frame = None
    if mini.is_image_to_video(pipe.transformer):  # issue 30's I2V arm: the world's own first frame of each prompt
        from difftrack.world import World

        world = World()
        first_frame = lambda it: world.sample(it["world_seed"], it["family"], "heldout").video[0]  # noqa: E731
    recs = X.generate_cached(pipe, items, d / "videos", (), 0.0, a.steps, a.cfg, batch_size=a.batch,
                             autocast=None if a.autocast == "none" else a.autocast, claim=False,
                             log=print if procs.is_main else None, only_batches=mine, first_frame=first_frame)
    recs = [dict(r, device=device_name(device)) for part in procs.gather(recs) for r in part]
    if procs.is_main:
        if recs:
            tp = d / "timing_generate.json"
            old = json.loads(tp.read_text()) if tp.exists() else []
            tp.write_text(json.dumps(old + recs, indent=1))
        print(f"[agreement] generated {a.videos} videos ({len(recs)} batches) in {time.time() - t0:.1f} s")


def _agree(task):
    import cv2

    cv2.setNumThreads(1)
    kind, src, prompt, family = task
    if kind == "world":
        from difftrack.world import World

        video = World().sample(src, family, "heldout").video
    else:
        video = np.load(src)
    r = E.prompt_agreement(video, prompt)
    return dict(agree=r["agree"], colour_ok=r["colour_ok"], direction_ok=r["direction_ok"], family=r["family"],
                measured=r["measured"], expected=r["expected"])


def _breakdown(rows: list[dict]) -> dict:
    objs = [r for r in rows if r["family"] == "objects"]
    scenes = [r for r in rows if r["family"] == "scenes"]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    per_camera = {}
    for r in scenes:
        per_camera.setdefault(r["expected"], []).append(r["agree"])
    per_dir = {}
    for r in objs:
        per_dir.setdefault(r["expected"], []).append(r["direction_ok"])
    return dict(
        n=len(rows), agreement=mean([r["agree"] for r in rows]),
        objects=dict(n=len(objs), agreement=mean([r["agree"] for r in objs]),
                     colour_ok=mean([r["colour_ok"] for r in objs]),
                     direction_ok=mean([r["direction_ok"] for r in objs]),
                     direction_ok_by_direction={k: mean(v) for k, v in sorted(per_dir.items())}),
        scenes=dict(n=len(scenes), agreement=mean([r["agree"] for r in scenes]),
                    by_camera_motion={k: mean(v) for k, v in sorted(per_camera.items())}),
    )


def score(a, procs):
    """The videos split over the processes; rank 0 writes the result and the grid."""
    d = run_dir(a)
    items = E.eval_prompts(a.videos, seed0=SEED0)
    paths = [X.video_path(d / "videos", it["index"], it["noise_seed"]) for it in items]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{len(missing)} videos missing (first: {missing[0]}); run --phase generate first")
    world_items = items + E.eval_prompts(a.world_extra, seed0=SEED0 + a.videos)
    tasks = [("video", str(p), it["prompt"], it["family"]) for p, it in zip(paths, items)]
    tasks += [("world", it["world_seed"], it["prompt"], it["family"]) for it in world_items]
    t0 = time.time()
    rows = procs.map(_agree, tasks, desc="agreement score")
    if not procs.is_main:
        return
    gen, wor = rows[:len(items)], rows[len(items):]
    import cv2

    timing = json.loads((d / "timing_generate.json").read_text()) if (d / "timing_generate.json").exists() else []
    g = _breakdown(gen)
    from difftrack.provenance import git_commit

    result = dict(
        commit=git_commit(), devices=sorted({r.get("device", "?") for r in timing}),
        description="Prompt agreement of the embedded model: share of generated videos whose content, measured "
                    "with OpenCV, agrees with the prompt (objects: first object's colour by HSV hue segmentation "
                    "and its motion direction by the robust slope of the blob centroid; scenes: camera motion "
                    "from a similarity fit to DIS optical flow). difftrack.cag_eval.prompt_agreement.",
        target="agreement >= 0.8 over >= 100 generated videos (issue 4)",
        n_videos=len(gen), agreement=g["agreement"], passes_target=bool(g["agreement"] >= 0.8 and len(gen) >= 100),
        generated=g,
        prompt_agreement_on_world_videos=_breakdown(wor)["agreement"],
        world_validation=_breakdown(wor),
        protocol=dict(prompts="difftrack.cag_eval.eval_prompts(n, seed0=%d): random world prompts of the "
                              "held-out split, families alternating" % SEED0,
                      noise_seeds="1000 + index, drawn on the CPU (difftrack.cag_eval.initial_noise)",
                      steps=a.steps, cfg=a.cfg, dtype=a.dtype, autocast=a.autocast,
                      pipeline="MiniVideoPipeline (plain CFG, no CAG)",
                      world_videos="ground-truth world renders of the same prompts plus %d more" % a.world_extra,
                      opencv=cv2.__version__,
                      thresholds=dict(hue_tolerance_deg=E.HUE_TOLERANCE_DEG, min_saturation=E.MIN_SATURATION,
                                      min_value=E.MIN_VALUE, min_area_px=E.MIN_AREA,
                                      min_displacement_px=E.MIN_DISPLACEMENT, max_angle_deg=E.MAX_ANGLE_DEG,
                                      nontranslation_ratio=E.NONTRANSLATION_RATIO,
                                      min_scene_motion_px_per_frame=E.MIN_SCENE_MOTION)),
        generation_timing=timing,
        per_video=[dict(prompt=it["prompt"], noise_seed=it["noise_seed"], **r) for it, r in zip(items, gen)],
    )
    out = Path(a.out)
    write_record(out, X.PromptAgreement.from_json(result))
    import matplotlib

    matplotlib.use("Agg")
    k = min(16, len(items))
    vids = [np.load(p) for p in paths[:k]]
    Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
    from difftrack.viz import plot_sample_grid

    plot_sample_grid(vids, [it["prompt"] for it in items[:k]], [r["agree"] for r in gen[:k]],
                     nrow=4, ncol=4, save=a.grid)
    print(f"[agreement] scored {len(tasks)} videos in {time.time() - t0:.1f} s: generated {g['agreement']:.3f} "
          f"(n={len(gen)}), world {result['prompt_agreement_on_world_videos']:.3f} (n={len(wor)}); wrote {out}, "
          f"{a.grid}")


def pack(a):
    d = run_dir(a)
    dst = Path(a.pack_dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted((d / "videos").glob("*.npy"))
    np.savez_compressed(dst / "agreement_videos.npz", **{f.stem: np.load(f) for f in files})
    for j in d.glob("*.json"):
        (dst / f"agreement_{j.name}").write_text(j.read_text())
    print(f"[agreement] packed {len(files)} videos into {dst}")


def unpack(a):
    src = Path(a.pack_dir)
    d = run_dir(a)
    (d / "videos").mkdir(parents=True, exist_ok=True)
    with np.load(src / "agreement_videos.npz") as z:
        for k in z.files:
            np.save(d / "videos" / f"{k}.npy", z[k])
    for j in src.glob("agreement_*.json"):
        (d / j.name[len("agreement_"):]).write_text(j.read_text())
    print(f"[agreement] unpacked into {d}")


def main(argv=None):
    a = parse_args(argv)
    procs = processes()
    if procs.distributed and a.phase not in ("generate", "score", "all"):
        raise SystemExit(f"--phase {a.phase} runs on one process; launch it without torchrun / accelerate launch")
    if a.phase in ("generate", "all"):
        generate(a, procs)
        procs.barrier()
    if a.phase in ("score", "all"):
        score(a, procs)
    procs.finish()
    if a.phase == "pack":
        pack(a)
    if a.phase == "unpack":
        unpack(a)


if __name__ == "__main__":
    main()
