"""Evaluate Cross-Attention Guidance (CAG) on the embedded model (issue 7) and write results/cag.json.

Settings, all on the same prompts and noise seeds: no CAG (plain CFG), CAG on the 3 dominant layers, CAG on the
3 least-dominant layers (the paper's control, Table A.5), each at every ``--scales`` value. Measures: see
``difftrack/cag_eval.py`` (prompt agreement, object integrity, warp error, motion magnitude, sharpness, contrast),
computed on every generated video and on the ground-truth world render of the same prompt (reference row).

Phases (videos are cached per (setting, prompt, seed) as .npy under ``--cache``, so every phase resumes):

    generate  needs torch + numpy + diffusers only (no OpenCV): runs on a GPU box
    score     needs OpenCV: scores the cached videos, writes --out (and results/cag_per_video.json)
    all       generate then score
    time      seconds per denoising step, plain CFG vs CAG, at --time-batch videos: added to --timing-file
              (results/cag_timing.json) and merged into --out if present
    pack      write the cached videos of this run as compressed shards (<= 15 MiB) into --pack-dir
    unpack    restore shards from --pack-dir into the cache

Full run on one H100 (bf16 autocast, as the model was trained; generation expected ~1-3 minutes for the 700 videos,
scoring ~1 minute on 16 cores), from the repo root:

    python scripts/run_cag_eval.py --phase time --device cuda --time-batch 1 --time-steps 6
    python scripts/run_cag_eval.py --phase all --prompts 100 --steps 50 --scales 0.5 1 2 --device cuda \
        --autocast bf16 --batch 100

On a GPU box without OpenCV: ``--phase generate`` there, ``--phase pack --pack-dir DIR`` to bring the videos back
(~112 MB raw for 700 videos, compressed shards), ``--phase unpack --pack-dir DIR`` and ``--phase score`` here.

Tiny CPU check:  python scripts/run_cag_eval.py --phase all --prompts 3 --steps 4 --scales 1 --batch 3

Several processes (``torchrun --nproc_per_node N scripts/run_cag_eval.py ...``, or ``accelerate launch``; see the
README): ``generate`` splits the pipeline calls ((setting, batch of --batch prompts) pairs, fixed by prompt index)
over the processes, ``score`` splits the videos; rank 0 writes the results. The other phases run on one process.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difftrack import cag_eval as E  # noqa: E402  (imports neither torch nor OpenCV at module level)
from difftrack.experiments import cag as X  # noqa: E402
from difftrack.experiments import json_clean, write_json, write_record  # noqa: E402
from difftrack.experiments.distributed import processes  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("generate", "score", "all", "time", "pack", "unpack"), default="all")
    p.add_argument("--prompts", type=int, default=100, help="number of world prompts (families alternate)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="CAG scales")
    p.add_argument("--cfg", type=float, default=6.0, help="classifier-free guidance weight")
    p.add_argument("--variant", default="renormalized", choices=("renormalized", "zero_after_softmax"))
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype")
    p.add_argument("--autocast", default="none", choices=("none", "bf16", "fp16"),
                   help="torch.autocast dtype (the embedded model was trained under bf16 autocast; use bf16 on GPU)")
    p.add_argument("--batch", type=int, default=100, help="videos per pipeline call")
    p.add_argument("--analysis-summary", default=None,
                   help="layer ranking source (default: results/analysis_summary.json)")
    p.add_argument("--require-measured-layers", action="store_true",
                   help="fail unless both layer sets come from the analysis summary's measured ranking")
    p.add_argument("--layers-top", type=int, nargs=3, default=None, help="override the dominant layers")
    p.add_argument("--layers-bottom", type=int, nargs=3, default=None, help="override the least-dominant layers")
    p.add_argument("--cache", default=str(ROOT / "cache" / "cag"))
    p.add_argument("--out", default=str(ROOT / "results" / "cag.json"))
    p.add_argument("--time-batch", type=int, default=1, help="videos per step in the 'time' phase")
    p.add_argument("--timing-file", default=str(ROOT / "results" / "cag_timing.json"),
                   help="the 'time' phase adds its measurement here; 'score' copies it into --out")
    p.add_argument("--time-steps", type=int, default=4, help="steps timed in the 'time' phase (first is warm-up)")
    p.add_argument("--pack-dir", default=None)
    p.add_argument("--pack-prompts", type=int, default=None, help="pack only the videos of the first N prompts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def run_tag(a) -> str:
    return (f"steps{a.steps}_cfg{a.cfg:g}_{a.variant}" + ("" if a.dtype == "fp32" else f"_{a.dtype}")
            + ("" if a.autocast == "none" else f"_amp{a.autocast}"))


def plan(a):
    """Prompts, layer sets and settings of this run."""
    items = E.eval_prompts(a.prompts)
    layers = X.layer_sets(a.analysis_summary)
    if a.require_measured_layers and ("default" in layers["source"] or a.layers_top or a.layers_bottom):
        raise SystemExit(f"--require-measured-layers: the layer sets are not the measured ranking ({layers['source']}); "
                         f"run the analysis first (scripts/run_analysis.py) or pass --analysis-summary")
    if a.layers_top:
        layers.update(top3=list(a.layers_top), source=layers["source"] + "; top3 overridden on the command line")
    if a.layers_bottom:
        layers.update(bottom3=list(a.layers_bottom),
                      source=layers["source"] + "; bottom3 overridden on the command line")
    return items, layers, X.cag_settings(layers, a.scales)


def load_pipe(a, procs=None):
    import torch

    from difftrack import mini

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    pipe = mini.load_default(procs.device(a.device) if procs else a.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def device_tag(a, procs=None) -> str:
    import torch

    if a.device.startswith("cuda"):
        dev = procs.device(a.device) if procs else a.device
        return "cuda_" + torch.cuda.get_device_name(torch.device(dev)).replace(" ", "_")
    return "cpu"


setting_dir = X.setting_dir  # cache folder of one setting


def generate(a, procs):
    """Every (setting, batch) pipeline call split over the processes (:meth:`Processes.indices`); rank 0 writes the
    manifest, checks each setting folder's weights first and merges the per-call timings."""
    items, layers, settings = plan(a)
    run_dir = Path(a.cache) / run_tag(a)
    run_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipe(a, procs)
    tag = device_tag(a, procs)
    if procs.is_main:
        (run_dir / "manifest.json").write_text(json.dumps(dict(items=items, layers=layers, settings=settings,
                                                               steps=a.steps, cfg=a.cfg, variant=a.variant,
                                                               dtype=a.dtype, autocast=a.autocast), indent=1))
        for name, s in settings.items():
            X.claim_cache(pipe, setting_dir(run_dir, name, s))
        print(f"[cag] generate {len(items)} prompts x {len(settings)} settings, {a.steps} steps on {a.device} "
              f"({tag}, {procs.world_size} process(es)); layers {layers}")
    procs.barrier()
    t0 = time.time()
    units = [(name, b) for name in settings for b in range(len(X.batches(items, a.batch)))]
    mine = procs.mine(units)
    recs = {}
    for name, s in settings.items():
        only = [b for n, b in mine if n == name]
        if only:
            recs[name] = X.generate_cached(pipe, items, setting_dir(run_dir, name, s), s["layers"], s["scale"],
                                           a.steps, a.cfg, a.variant, a.batch, only_batches=only, claim=False,
                                           autocast=None if a.autocast == "none" else a.autocast,
                                           log=print if procs.is_main else None)
    gathered = procs.gather(recs)
    if procs.is_main:
        tpath = run_dir / f"timing_generate_{tag}.json"
        timing = json.loads(tpath.read_text()) if tpath.exists() else {}
        for part in gathered:
            for name, rs in part.items():
                if rs:
                    timing.setdefault(name, []).extend(rs)
        tpath.write_text(json.dumps(timing, indent=1))
        print(f"[cag] generate done in {time.time() - t0:.1f} s")


def time_phase(a):
    _, layers, _ = plan(a)
    pipe = load_pipe(a)
    r = X.time_steps(pipe, layers["top3"], a.time_batch, a.time_steps, variant=a.variant,
                     autocast=None if a.autocast == "none" else a.autocast)
    r.update(dtype=a.dtype, measured_at=time.strftime("%Y-%m-%d %H:%M:%S"), load_average=_loadavg())
    tag = device_tag(a)
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    key = f"{tag}_b{a.time_batch}" + ("" if a.autocast == "none" else f"_amp{a.autocast}")
    (Path(a.cache) / f"timing_{key}.json").write_text(json.dumps(r, indent=1))
    tfile = Path(a.timing_file)  # committed record of every per-step timing (travels with the tree)
    book = json.loads(tfile.read_text()) if tfile.exists() else {}
    book[key] = r
    tfile.parent.mkdir(parents=True, exist_ok=True)
    tfile.write_text(json.dumps(book, indent=1))
    print(f"[cag] time per step on {tag} at batch {a.time_batch}: plain CFG {r['plain_cfg_s_per_step']:.3f} s, "
          f"CAG {r['cag_s_per_step']:.3f} s (x{r['cag_over_plain']:.2f})")
    out = Path(a.out)
    if out.exists() and json.loads(out.read_text()).get("source") != "notebook":
        d = json.loads(out.read_text())
        d.setdefault("timing", {}).setdefault("per_step", {})[key] = r
        out.write_text(json.dumps(d, indent=1))
        print(f"[cag] merged into {out}")


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _score_one(task):
    kind, path_or_seed, prompt, family = task
    import cv2

    cv2.setNumThreads(1)
    if kind == "world":
        from difftrack.world import World

        video = World().sample(path_or_seed, family, "heldout").video
    else:
        video = np.load(path_or_seed)
    return E.score_video(video, prompt)


def score(a, procs):
    """The videos scored by every process (a share each), rank 0 writes the results."""
    items, layers, settings = plan(a)
    run_dir = Path(a.cache) / run_tag(a)
    man = run_dir / "manifest.json"
    if man.exists():  # score what was generated (layer sets from the generate phase)
        m = json.loads(man.read_text())
        if [it["prompt"] for it in m["items"]] != [it["prompt"] for it in items]:
            raise SystemExit(f"{man} was generated for other prompts (--prompts {len(m['items'])}?)")
        layers, settings = m["layers"], m["settings"]
    tasks = [("world", it["world_seed"], it["prompt"], it["family"]) for it in items]
    for name, s in settings.items():
        d = setting_dir(run_dir, name, s)
        tasks += [("video", str(X.video_path(d, it["index"], it["noise_seed"])), it["prompt"], it["family"])
                  for it in items]
    missing = [t[1] for t in tasks if t[0] == "video" and not Path(t[1]).exists()]
    if missing:
        raise SystemExit(f"{len(missing)} videos missing (first: {missing[0]}); run --phase generate first")
    t0 = time.time()
    scores = procs.map(_score_one, tasks, desc="cag score")
    if not procs.is_main:
        return
    print(f"[cag] scored {len(tasks)} videos in {time.time() - t0:.1f} s ({procs.world_size} process(es))")
    n = len(items)
    world_scores = scores[:n]
    per = {name: scores[n * (k + 1): n * (k + 2)] for k, name in enumerate(settings)}
    base = per["none"]
    out_settings = {}
    for name, s in settings.items():
        out_settings[name] = dict(s, n_videos=n,
                                  summary=E.summarize(per[name], None if name == "none" else base))
    timing = {}
    out = Path(a.out)
    if out.exists():  # keep per-step timings measured earlier (e.g. --phase time on a CPU), not a notebook run's
        old = json.loads(out.read_text())
        if old.get("source") != "notebook":
            timing = {k: v for k, v in old.get("timing", {}).items() if k == "per_step"}
    if Path(a.timing_file).exists():
        timing.setdefault("per_step", {}).update(json.loads(Path(a.timing_file).read_text()))
    for f in sorted(Path(a.cache).glob("timing_*.json")):
        timing.setdefault("per_step", {})[f.stem.replace("timing_", "")] = json.loads(f.read_text())
    for f in sorted(run_dir.glob("timing_generate_*.json")):
        recs = json.loads(f.read_text())
        dev = f.stem.replace("timing_generate_", "")
        g = {}
        for name, rs in recs.items():
            g[name] = dict(batch=max(r["batch"] for r in rs),
                           step_seconds=float(np.median([r["step_seconds"] for r in rs])),
                           total_seconds=float(sum(r["total_seconds"] for r in rs)))
        plain = g.get("none")
        for name, v in g.items():
            if plain and name != "none":
                v["over_plain"] = v["step_seconds"] / plain["step_seconds"]
        timing.setdefault("generation", {})[dev] = g
    import cv2

    from difftrack.provenance import git_commit

    result = dict(
        source="scripts/run_cag_eval.py", commit=git_commit(),
        devices=sorted(timing.get("generation", {})),
        description="CAG on the embedded mini CogVideoX (64x64, 13 frames, 12 blocks): no CAG vs CAG on the 3 "
                    "dominant layers vs CAG on the 3 least-dominant layers, same prompts and noise seeds; our own "
                    "measures (the paper's evaluation code is not published). See difftrack/cag_eval.py.",
        measures={
            "agree": "prompt agreement: first object's colour and motion direction (objects) / camera motion "
                     "(scenes) measured with OpenCV agree with the prompt (share of videos)",
            "colour_ok": "objects only: a blob of the named hue is present in >= half of the frames",
            "direction_ok": "motion direction (objects: centroid of the named colour; scenes: camera motion "
                            "from a similarity fit to DIS flow) agrees with the prompt",
            "object_integrity": "share of Lucas-Kanade tracks seeded on the prompt-coloured objects in frame 0 "
                                "that survive the round trip 0 -> T-1 -> 0 within 1 px (scenes: 2-px grid over "
                                "the frame); videos without the object are skipped (n counts the rest)",
            "frame_integrity": "same round trip for a 2-px grid over the whole frame",
            "warp_error": "mean |frame t+1 - warp(frame t, DIS flow)| in RGB [0,1] over flow-consistent pixels "
                          "(lower is better)",
            "motion_magnitude": "mean DIS flow magnitude, px/frame (Dynamic-Degree analogue)",
            "sharpness": "mean over frames of the variance of the Laplacian of the grey frame (quality proxy: "
                         "blurring lowers it)",
            "frame_contrast": "mean over frames of the grey-level standard deviation",
        },
        protocol=dict(n_prompts=n, n_seeds_per_prompt=1, n_videos_per_setting=n,
                      families={f: sum(it["family"] == f for it in items) for f in ("objects", "scenes")},
                      prompt_source="difftrack.cag_eval.eval_prompts (world prompts, held-out split, families "
                                    "alternating); noise seed 1000 + index, drawn on the CPU",
                      steps=a.steps, cfg=a.cfg, cag_variant=a.variant, dtype=a.dtype, autocast=a.autocast,
                      layers=layers,
                      scales=list(a.scales), opencv=cv2.__version__,
                      summary_statistics="mean, standard error over videos; for CAG settings the paired "
                                         "difference to no CAG (delta) with a 95% normal interval"),
        prompt_agreement_on_world_videos=E.summarize(world_scores, measures=("agree",))["agree"]["mean"],
        world_reference=dict(n_videos=n, summary=E.summarize(world_scores)),
        settings=out_settings,
        timing=timing,
    )
    result["conclusion"] = conclusion(result)
    write_record(out, X.CagResult.from_json(result))
    per_video = dict(items=items, world=world_scores, settings=per)
    write_json(out.parent / (out.stem + "_per_video.json"), json_clean(per_video), indent=None)
    print(f"[cag] wrote {out}")
    print(X.metrics_table(out_settings).to_string())
    print(result["conclusion"])


def conclusion(result: dict) -> str:
    """One paragraph: which CAG settings changed which measures beyond their 95% interval."""
    motion = ("agree", "direction_ok", "object_integrity", "frame_integrity", "warp_error")
    lines = []
    for name, s in result["settings"].items():
        if name == "none":
            continue
        better, worse = [], []
        for m, d in s["summary"].items():
            lo, hi = d.get("delta_ci95", [float("nan")] * 2)
            if any(math.isnan(x) for x in (lo, hi)):
                continue
            sign = -1 if m in E.LOWER_IS_BETTER else 1
            if (lo > 0 and sign > 0) or (hi < 0 and sign < 0):
                better.append(f"{m} {d['delta']:+.3g}")
            elif (hi < 0 and sign > 0) or (lo > 0 and sign < 0):
                worse.append(f"{m} {d['delta']:+.3g}")
        lines.append(f"{name} ({s['layers']}): better: {', '.join(better) or 'none'}; worse: "
                     f"{', '.join(worse) or 'none'}")
    improved = [n for n, s in result["settings"].items() if n != "none" and s["layer_set"] == "top3" and any(
        (d.get("delta_ci95", [0, 0])[0] > 0 if m not in E.LOWER_IS_BETTER else d.get("delta_ci95", [0, 0])[1] < 0)
        for m, d in s["summary"].items() if m in motion)]
    head = ("CAG on the dominant layers improved at least one motion measure beyond its 95% interval in: "
            + ", ".join(improved) if improved else
            "CAG on the dominant layers improved no motion measure beyond its 95% interval")
    return head + ". Per setting (paired deltas vs no CAG, significant ones only): " + " | ".join(lines)


def pack(a):
    """Compressed shards of this run's videos (each under ~15 MiB raw) plus the manifest and timings, in
    --pack-dir (the device tool brings back at most 8 files of 16 MiB)."""
    run_dir = Path(a.cache) / run_tag(a)
    dst = Path(a.pack_dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(run_dir.glob("*/*.npy"))
    if a.pack_prompts is not None:
        files = [f for f in files if int(f.stem.split("_")[0]) < a.pack_prompts]
    shard, size, k = {}, 0, 0

    def flush():
        nonlocal shard, size, k
        if shard:
            np.savez_compressed(dst / f"cag_videos_{k:02d}.npz", **shard)
            k, shard, size = k + 1, {}, 0

    for f in files:
        v = np.load(f)
        if size + v.nbytes > 15 * 2 ** 20:
            flush()
        shard[f"{f.parent.name}__{f.stem}"] = v
        size += v.nbytes
    flush()
    meta = {p.name: json.loads(p.read_text()) for p in run_dir.glob("*.json")}
    (dst / "cag_meta.json").write_text(json.dumps(dict(tag=run_tag(a), files=meta)))
    print(f"[cag] packed {len(files)} videos into {k} shard(s) in {dst}")


def unpack(a):
    src = Path(a.pack_dir)
    meta = json.loads((src / "cag_meta.json").read_text())
    run_dir = Path(a.cache) / meta["tag"]
    for name, content in meta["files"].items():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(json.dumps(content, indent=1))
    n = 0
    for f in sorted(src.glob("cag_videos_*.npz")):
        with np.load(f) as z:
            for key in z.files:
                setting, stem = key.split("__")
                (run_dir / setting).mkdir(parents=True, exist_ok=True)
                np.save(run_dir / setting / f"{stem}.npy", z[key])
                n += 1
    print(f"[cag] unpacked {n} videos into {run_dir}")


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
    if a.phase == "time":
        time_phase(a)
    if a.phase == "pack":
        pack(a)
    if a.phase == "unpack":
        unpack(a)


if __name__ == "__main__":
    main()
