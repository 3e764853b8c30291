"""Few-step sampling of the embedded model on the CPU (issue 20): how close do 10-15 steps of DDIM, DPM-Solver++ 2M
and UniPC (``difftrack.mini.few_step_scheduler``) get to the 50-step DDIM sample of the same noise?

All three solve the same probability-flow ODE (DDIM with eta 0), so the 50-step DDIM video of the same prompt and
noise is the reference: PSNR (uint8 frames, all frames) and mean absolute difference to it measure the solver error.
Prompt agreement (``difftrack.cag_eval.prompt_agreement``, the measure of ``results/mini_prompt_agreement.json``) and
the wall time per video on this machine's CPU are reported too. Prompts: held-out world prompts
(``cag_eval.eval_prompts(n, seed0=500)``, families alternating, the prompt-agreement protocol); noise
``cag_eval.initial_noise(noise_seed)``; CFG 6; fp32 on the CPU.

    python scripts/scheduler_study.py [--prompts 6] [--out results/scheduler_study.json]

Every video is cached under ``--cache`` (one ``.npz`` per prompt, scheduler and step count, keyed by the weights'
hash and the settings): an interrupted run recomputes only what is missing. Writes the JSON (atomically) and
``figures/scheduler_study.png`` (the middle frame of the first prompts under every setting).
"""
from __future__ import annotations

import argparse
import platform
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = "scheduler_study/1"
SCHEDULERS = ("ddim", "dpm++", "unipc")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6, help="held-out world prompts (families alternate)")
    ap.add_argument("--settings", default="ddim:10,ddim:15,dpm++:10,dpm++:15,unipc:10",
                    help="comma-separated scheduler:steps to compare with the reference (schedulers: "
                         f"{', '.join(SCHEDULERS)})")
    ap.add_argument("--reference-steps", type=int, default=50, help="DDIM steps of the reference sample")
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--weights", default=None, help="a saved pipeline folder (default: the committed weights)")
    ap.add_argument("--cache", default=str(ROOT / "cache" / "scheduler_study"))
    ap.add_argument("--out", default=str(ROOT / "results" / "scheduler_study.json"))
    ap.add_argument("--figure", default=str(ROOT / "figures" / "scheduler_study.png"))
    ap.add_argument("--figure-prompts", type=int, default=3)
    a = ap.parse_args(argv)
    settings = []
    for item in a.settings.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in SCHEDULERS or not steps.isdigit() or int(steps) < 1:
            ap.error(f"--settings item {item!r}: expected scheduler:steps with scheduler in {', '.join(SCHEDULERS)} "
                     "and steps a positive integer, e.g. dpm++:10")
        settings.append((name, int(steps)))
    if a.prompts < 1 or a.reference_steps < 1:
        ap.error(f"--prompts {a.prompts} / --reference-steps {a.reference_steps}: both must be >= 1")
    a.settings = settings
    return a


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    import diffusers
    from difftrack import cag_eval as E
    from difftrack import mini
    from difftrack.experiments import cache_key, json_clean, weights_digest, write_json
    from difftrack.fileio import load_npz
    from difftrack.provenance import device_name, git_commit

    folder = Path(a.weights) if a.weights else mini.WEIGHTS_DIR
    pipe = (mini.MiniVideoPipeline.from_pretrained(str(folder), dtype=torch.float32) if a.weights
            else mini.load_default())
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler
    schedulers = {"ddim": base, "dpm++": mini.few_step_scheduler("dpm++", base.config),
                  "unipc": mini.few_step_scheduler("unipc", base.config)}
    wid = weights_digest(folder)
    prompts = E.eval_prompts(a.prompts, seed0=500)
    runs = [("ddim", a.reference_steps)] + [s for s in a.settings if s != ("ddim", a.reference_steps)]
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)

    videos, seconds = {}, {}
    todo = [(p, s) for p in prompts for s in runs]
    for p, (name, steps) in tqdm(todo, desc="videos", unit="video"):
        key = cache_key("scheduler_study", SCHEMA, dict(weights=wid, prompt=p["prompt"], noise_seed=p["noise_seed"],
                                                        scheduler=name, steps=steps, cfg=a.cfg, dtype="fp32"))
        f = cache / f"{key}.npz"
        if f.exists():
            z = load_npz(f, "cached scheduler-study video", "delete it to generate it again")
            video, sec = z["video"], float(z["seconds"])
        else:
            pipe.scheduler = schedulers[name]
            t0 = time.perf_counter()
            video = pipe(p["prompt"], num_inference_steps=steps, guidance_scale=a.cfg,
                         latents=E.initial_noise(p["noise_seed"]), progress=False).frames[0]
            sec = time.perf_counter() - t0
            tmp = f.with_name(f.stem + ".tmp.npz")
            np.savez_compressed(tmp, video=video, seconds=sec)
            tmp.replace(f)
        videos[p["index"], name, steps] = video
        seconds[p["index"], name, steps] = sec

    per_video, summary = [], {}
    for name, steps in runs:
        rows = []
        for p in prompts:
            v, ref = videos[p["index"], name, steps], videos[p["index"], "ddim", a.reference_steps]
            ag = E.prompt_agreement(v, p["prompt"])
            rows.append(dict(index=p["index"], prompt=p["prompt"], family=p["family"], psnr_db=psnr(v, ref),
                             mean_abs_diff=float(np.abs(v.astype(np.float64) - ref).mean()),
                             agrees=bool(ag["agree"]), colour_ok=ag.get("colour_ok"),
                             direction_ok=ag.get("direction_ok"), seconds=seconds[p["index"], name, steps]))
        per_video += [dict(scheduler=name, steps=steps, **r) for r in rows]
        is_ref = (name, steps) == ("ddim", a.reference_steps)
        colour = [r["colour_ok"] for r in rows if r["colour_ok"] is not None]
        summary[f"{name}@{steps}"] = dict(
            scheduler=name, steps=steps, reference=is_ref,
            psnr_db_mean=None if is_ref else float(np.mean([r["psnr_db"] for r in rows])),
            psnr_db_min=None if is_ref else float(np.min([r["psnr_db"] for r in rows])),
            mean_abs_diff=float(np.mean([r["mean_abs_diff"] for r in rows])),
            agreement=float(np.mean([r["agrees"] for r in rows])),
            colour_ok=float(np.mean(colour)) if colour else None,
            seconds_per_video=float(np.median([r["seconds"] for r in rows])))
    few = {k: v for k, v in summary.items() if not v["reference"]}
    best = max(few, key=lambda k: few[k]["psnr_db_mean"]) if few else None
    out = dict(
        schema=SCHEMA,
        description=__doc__.split("\n\n")[0],
        settings=dict(prompts=a.prompts, reference=f"ddim@{a.reference_steps}", compared=[f"{n}@{s}" for n, s in a.settings],
                      cfg=a.cfg, dtype="fp32", prompt_seed0=500, weights=str(folder.relative_to(ROOT))
                      if folder.is_relative_to(ROOT) else str(folder), weights_sha256_16=wid),
        summary=summary,
        closest_to_reference=best,
        per_video=per_video,
        device=device_name("cpu"), cpu_threads=torch.get_num_threads(), torch=torch.__version__,
        diffusers=diffusers.__version__, python=platform.python_version(), commit=git_commit(),
        note="PSNR/mean abs diff are to the reference sample of the same prompt and noise (solver error, not quality "
             "against the world); prompt agreement over so few prompts is a sanity check, not the 128-video measure.")
    write_json(a.out, json_clean(out))
    print(f"wrote {a.out}")
    for k, v in summary.items():
        print(f"{k:>10}: PSNR {v['psnr_db_mean'] if v['psnr_db_mean'] is not None else float('nan'):6.2f} dB, "
              f"agreement {v['agreement']:.2f}, {v['seconds_per_video']:.1f} s/video")

    if a.figure and a.figure_prompts > 0:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = prompts[:a.figure_prompts]
        fig, axes = plt.subplots(len(shown), len(runs), figsize=(1.7 * len(runs) + 0.6, 1.9 * len(shown)), squeeze=False)
        for i, p in enumerate(shown):
            for j, (name, steps) in enumerate(runs):
                v = videos[p["index"], name, steps]
                ax = axes[i, j]
                ax.imshow(v[len(v) // 2])
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{name} {steps} steps" + (" (ref)" if j == 0 else ""), fontsize=8)
                if j == 0:
                    ax.set_ylabel(textwrap.fill(p["prompt"], 24), fontsize=6)
        fig.suptitle("Embedded model, middle frame, same noise: few-step solvers vs 50 DDIM steps", fontsize=9)
        fig.tight_layout()
        Path(a.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.figure, dpi=110)
        print(f"wrote {a.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
