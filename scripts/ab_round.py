"""A/B arms of the embedded model's training recipe (issue 30): every arm from the same weights, for the same steps,
on the same seed, trained side by side on one GPU, then measured the same way. Read top to bottom; arms at the top.

    python scripts/ab_round.py --name ab1 --out-dir cache/ab1            # on a CUDA GPU (about 7 minutes)
    python scripts/ab_round.py --name smoke --out-dir /tmp/ab --smoke    # a few CPU steps (plumbing check)
    # a round too short to decide, continued: every arm from its own weights of that round, a new data seed
    python scripts/ab_round.py --name ab3 --resume cache/ab2 --arms control,i2v --seed 9010 --out-dir cache/ab3

Each arm runs ``scripts/train_mini.py --init INIT`` with the round recipe (compile, lr 2e-4, batch 48) plus its own
flags, all for the same minutes side by side; the measures, for the starting weights ("base") and every arm:

* ``scripts/prompt_probe.py``: the share of the prompt's effect carried by the motion words (object videos, train and
  held-out textures, t = 900 / 600 / 300) -- does the network read the motion words at all;
* ``scripts/run_prompt_agreement.py``: prompt agreement of 32 generated videos at 50 steps, CFG 6 (object motion
  direction, colour, camera motion) -- does sampling follow them;
* ``scripts/eval_mini.py``: held-out query-key matching within half a token / one token -- the paper's subject must
  not get worse.

``summary.json`` in the out dir holds every arm's settings, training minutes and steps, final loss and measures, with
the device and commit; ``--pack K`` also splits the K best arms' weights (by prompt agreement, then motion share)
into parts under 16 MB for the device's return limit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ----------------------------------------------------------------------------- arms
RECIPE = ["--compile", "--lr", "2e-4", "--batch-size", "48", "--warmup", "50"]  # rounds 4-8's recipe; a short warm-up
# (round ab1 kept train_mini's 300 steps: its 4-minute arms of 365 steps spent most of their time warming up)
ARMS = {
    "control": [],  # the recipe as it is: how much the same minutes move the measures on their own
    "high_noise": ["--high-noise-frac", "0.5"],  # half of each batch at t >= 600, where only the text says the motion
    "change_weight": ["--change-weight", "4"],  # loss weighted towards pixels that change between frames
    "data": ["--p-uncond", "0.3", "--single-object-frac", "0.8"],  # more single-object videos, more CFG drop-out
    # image-to-video (CogVideoX-I2V's layout, difftrack.mini.to_image_to_video): with the first frame given, the
    # motion is the only thing left for the text to say; measured with the world's first frame of each prompt
    "i2v": ["--i2v"],
}
AGREEMENT_VIDEOS = 32
# -----------------------------------------------------------------------------


def run(cmd: list[str], log: Path, env=None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(c) for c in cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def wait_all(procs: dict[str, subprocess.Popen], what: str) -> None:
    bad = {k: p.wait() for k, p in procs.items()}
    bad = {k: rc for k, rc in bad.items() if rc}
    if bad:
        raise SystemExit(f"{what} failed for {sorted(bad)} (exit codes {bad}); see the logs in the out dir")


def measures(d: Path) -> dict:
    """The three measures of one arm's folder, read back."""
    ev = json.loads((d / "eval.json").read_text())
    probe = json.loads((d / "probe.json").read_text())["summary"]
    agr = json.loads((d / "agreement.json").read_text())
    gen = agr["generated"]
    obj_motion = {k.split("/", 1)[0] + "/" + k.rsplit("/", 1)[1]: v["motion_share"]
                  for k, v in probe.items() if "/objects/" in k}
    cam_motion = {k.split("/", 1)[0] + "/" + k.rsplit("/", 1)[1]: v["motion_share"]
                  for k, v in probe.items() if "/scenes/" in k}
    shares = [v for v in obj_motion.values() if v is not None]
    return dict(
        prompt_agreement=agr["agreement"], n_videos=agr["n_videos"],
        object_direction_ok=gen["objects"]["direction_ok"], object_colour_ok=gen["objects"]["colour_ok"],
        scene_agreement=gen["scenes"]["agreement"],
        motion_share_objects=obj_motion, motion_share_objects_mean=sum(shares) / len(shares) if shares else None,
        motion_share_scenes=cam_motion,
        qk_half_token=ev["qk_best_acc"], qk_one_token=ev["qk_best_acc_1tok"], qk_best_layer=ev["best_layer"],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="round name (recorded)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--init", default=str(ROOT / "difftrack" / "weights" / "mini-cogvideox"))
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--steps", type=int, default=100_000, help="training steps cap of every arm")
    ap.add_argument("--minutes", type=float, default=4.5, help="training minutes of every arm (side by side, so the "
                    "same GPU share for each)")
    ap.add_argument("--seed", type=int, default=9009)
    ap.add_argument("--device", default=None, help="default: cuda")
    ap.add_argument("--pack", type=int, default=0, help="split the K best arms' weights into parts under 16 MB")
    ap.add_argument("--smoke", action="store_true", help="train_mini --smoke and tiny measures (CPU plumbing check)")
    ap.add_argument("--resume", help="the out dir of an earlier round: every arm starts from its own weights there "
                    "(DIR/<arm>/weights) instead of --init, and the starting weights are not measured again (the "
                    "earlier round's summary has them); pass a new --seed so the arms do not replay its batches")
    a = ap.parse_args(argv)
    arms = [s for s in a.arms.split(",") if s]
    bad = [s for s in arms if s not in ARMS]
    if bad or not arms:
        ap.error(f"--arms {a.arms!r}: unknown {bad}; allowed: {', '.join(ARMS)}")
    if a.steps < 1 or a.minutes <= 0:
        ap.error(f"--steps {a.steps} (>= 1) / --minutes {a.minutes} (> 0)")
    inits = {arm: Path(a.init) for arm in arms}
    previous = None
    if a.resume:
        prev_dir = Path(a.resume)
        inits = {arm: prev_dir / arm / "weights" for arm in arms}
        missing = [f"{arm} ({w})" for arm, w in inits.items() if not (w / "model_index.json").is_file()]
        if missing:
            have = sorted(f.parent.parent.name for f in prev_dir.glob("*/weights/model_index.json"))
            ap.error(f"--resume {a.resume}: no saved weights for arm(s) {', '.join(missing)}; arms there: {have or 'none'}")
        if (prev_dir / "summary.json").is_file():
            prev = json.loads((prev_dir / "summary.json").read_text())
            if prev.get("seed") == a.seed:
                ap.error(f"--seed {a.seed} is the seed of the round in --resume {a.resume}: the arms would replay "
                         "its batches; pass another")
            previous = dict(dir=str(a.resume), name=prev.get("name"), seed=prev.get("seed"),
                            arms={arm: dict(steps=prev["arms"].get(arm, {}).get("steps"),
                                            minutes=prev["arms"].get(arm, {}).get("minutes"))
                                  for arm in arms})
        else:
            previous = dict(dir=str(a.resume), name=None, note="no summary.json there")
    import torch

    from difftrack.provenance import device_name, git_commit

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not a.smoke:
        ap.error("no CUDA device: the A/B round needs a GPU (or --smoke for the plumbing check)")
    out = Path(a.out_dir).resolve()
    py = sys.executable
    t0 = time.time()

    # 1. train every arm side by side (the same GPU: the same minutes for each)
    procs = {}
    for arm in arms:
        d = out / arm
        cmd = [py, "scripts/train_mini.py", "--init", inits[arm], "--out", d / "weights", "--seed", a.seed, "--arm", arm]
        cmd += ["--smoke"] if a.smoke else RECIPE + ["--max-steps", a.steps, "--minutes", a.minutes]
        procs[arm] = run(cmd + ARMS[arm], d / "train.log")
    wait_all(procs, "training")
    train_s = time.time() - t0

    # 2. measure the starting weights and every arm (all folders at once: the measures are small next to the GPU)
    small = a.smoke
    folders = {**({} if a.resume else {"base": a.init}), **{arm: out / arm / "weights" for arm in arms}}
    procs = {}
    for name, w in folders.items():
        d = out / name
        procs[f"{name}/eval"] = run([py, "scripts/eval_mini.py", "--weights", w, "--device", device, "--cpu-forward",
                                     "skip", "--out", d / "eval.json"] + (["--videos", "2", "--steps", "2"] if small
                                                                           else []), d / "eval.log")
        procs[f"{name}/probe"] = run([py, "scripts/prompt_probe.py", "--weights", w, "--device", device, "--out",
                                      d / "probe.json"] + (["--videos", "1", "--timesteps", "900"] if small else []),
                                     d / "probe.log")
        procs[f"{name}/agreement"] = run(
            [py, "scripts/run_prompt_agreement.py", "--weights", w, "--device", device, "--videos",
             2 if small else AGREEMENT_VIDEOS, "--steps", 2 if small else 50, "--world-extra", 0, "--cache",
             d / "agreement_cache", "--out", d / "agreement.json", "--grid", d / "grid.png"]
            + ([] if small else ["--autocast", "bf16"]), d / "agreement.log")
    wait_all(procs, "measures")

    rows = {}
    for name in folders:
        r = dict(measures=measures(out / name))
        if name != "base":
            log = json.loads((out / name / "weights" / "training_log.json").read_text())
            r.update(flags=ARMS[name], init=str(inits[name]), steps=log["meta"]["steps"], minutes=log["meta"]["minutes"],
                     final_loss=log["meta"]["final_loss"], training_meta=log["meta"])
        rows[name] = r
    rank = sorted(arms, key=lambda k: (-rows[k]["measures"]["prompt_agreement"],
                                       -(rows[k]["measures"]["motion_share_objects_mean"] or 0)))
    summary = dict(schema="ab_round/1", name=a.name, init=str(a.init) if not a.resume else None,
                   resumed_from=previous, recipe=RECIPE, seed=a.seed, steps=a.steps,
                   minutes_cap=a.minutes, agreement_videos=AGREEMENT_VIDEOS, device=device_name(device),
                   commit=git_commit(), torch=torch.__version__, smoke=a.smoke, train_wall_s=round(train_s, 1),
                   total_wall_s=round(time.time() - t0, 1), ranking_by_agreement=rank, arms=rows,
                   how_to_read="base = the starting weights; control = the recipe unchanged for the same steps, so "
                               "an arm's effect is its difference to control, not to base"
                               + ("; a resumed round (resumed_from) has no base: each arm continued from its own "
                                  "weights of that round, whose summary holds the base" if a.resume else ""))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, r in rows.items():
        m = r["measures"]
        print(f"{name:>14}: agreement {m['prompt_agreement']:.3f} direction {m['object_direction_ok']:.3f} "
              f"motion share {m['motion_share_objects_mean'] if m['motion_share_objects_mean'] is not None else float('nan'):+.3f} "
              f"qk {m['qk_half_token']} / {m['qk_one_token']}", flush=True)
    for arm in rank[:a.pack]:  # weights back through the device's 16 MB file limit
        tar = out / f"weights_{arm}.tar"
        subprocess.run(["tar", "cf", str(tar), "-C", str(out / arm), "weights"], check=True)
        subprocess.run(["split", "-b", "15M", "-d", str(tar), str(tar) + ".part"], check=True)
        os.remove(tar)
    print("wrote", out / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
