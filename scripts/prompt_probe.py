"""Which prompt words does the embedded model use? (issue 20: prompt agreement is held back by motion direction)

For world videos (exact prompts), noised to a timestep with a fixed noise, the model's v-prediction error is measured
under the true prompt, under the prompt with every motion word swapped (left<->right, up<->down,
clockwise<->counterclockwise, in<->out), under the prompt with every colour swapped for another colour, and under the
empty prompt. A model that reads a word does worse when that word is wrong: the excess error of a swapped prompt over
the true one, relative to the excess of the empty prompt, is how much of the prompt's effect that word carries.
No sampling, so it isolates what the network learned from how sampling uses it.

    python scripts/prompt_probe.py [--videos 8] [--out results/prompt_probe.json]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = "prompt_probe/1"
MOTION_SWAP = {"left": "right", "right": "left", "up": "down", "down": "up", "clockwise": "counterclockwise",
               "counterclockwise": "clockwise", "in": "out", "out": "in"}


def swap_words(prompt: str, table: dict) -> str:
    return " ".join(table.get(w, w) for w in prompt.split(" "))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8, help="world videos per family and split")
    ap.add_argument("--timesteps", default="900,600,300", help="comma-separated training timesteps (0..999)")
    ap.add_argument("--out", default=str(ROOT / "results" / "prompt_probe.json"))
    ap.add_argument("--weights", default=None, help="a saved pipeline folder (default: the committed weights)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    ts = [int(x) for x in a.timesteps.split(",")]
    if a.videos < 1 or any(not 0 <= t <= 999 for t in ts):
        ap.error(f"--videos {a.videos} (>= 1) / --timesteps {a.timesteps} (each in 0..999)")
    import torch
    from tqdm.auto import tqdm

    from difftrack import mini
    from difftrack import world as W
    from difftrack.experiments import json_clean, write_json
    from difftrack.provenance import device_name, git_commit

    pipe = mini.load_default(a.device, weights=a.weights)
    tr, te = pipe.transformer, pipe.text_encoder
    ac = pipe.scheduler.alphas_cumprod.float()
    colours = list(W.COLOURS)
    colour_swap = {c: colours[(i + 1) % len(colours)] for i, c in enumerate(colours)}
    world = W.World(mini.FRAMES, mini.HEIGHT, mini.WIDTH)
    variants = ("true", "motion_swapped", "colour_swapped", "empty")
    rows = []
    jobs = [(split, fam, i) for split in ("train", "heldout") for fam in W.FAMILIES for i in range(a.videos)]
    for split, fam, i in tqdm(jobs, desc="videos", unit="video"):
        s = world.sample(9000 + i, fam, split)
        prompts = dict(true=s.prompt, motion_swapped=swap_words(s.prompt, MOTION_SWAP),
                       colour_swapped=swap_words(s.prompt, colour_swap), empty="")
        video = s.video if isinstance(s.video, np.ndarray) else s.video.cpu().numpy()
        x0 = mini.video_uint8_to_latents(video, device=a.device)
        with torch.no_grad():
            emb = te(te.tokenize([prompts[v] for v in variants]))
        for t in ts:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 * i + t)).to(a.device)
            al = ac[t].to(a.device)
            xt = al.sqrt() * x0 + (1 - al).sqrt() * noise
            target = al.sqrt() * noise - (1 - al).sqrt() * x0
            with torch.no_grad():
                out = tr(hidden_states=xt.repeat(len(variants), 1, 1, 1, 1), encoder_hidden_states=emb,
                         timestep=torch.full((len(variants),), t, device=a.device), return_dict=False)[0]
            mse = ((out - target) ** 2).mean(dim=(1, 2, 3, 4)).tolist()
            rows.append(dict(split=split, family=fam, seed=9000 + i, timestep=t, prompt=s.prompt,
                             **{f"mse_{v}": m for v, m in zip(variants, mse)}))

    summary = {}
    for split in ("train", "heldout"):
        for fam in W.FAMILIES:
            for t in ts:
                r = [x for x in rows if x["split"] == split and x["family"] == fam and x["timestep"] == t]
                m = {v: float(np.mean([x[f"mse_{v}"] for x in r])) for v in variants}
                empty_excess = m["empty"] - m["true"]
                entry = dict(n=len(r), **{f"mse_{v}": m[v] for v in variants},
                             motion_share=(m["motion_swapped"] - m["true"]) / empty_excess if empty_excess > 0 else None,
                             motion_worse_in=int(sum(x["mse_motion_swapped"] > x["mse_true"] for x in r)))
                if fam == "objects":
                    entry.update(colour_share=(m["colour_swapped"] - m["true"]) / empty_excess if empty_excess > 0 else None,
                                 colour_worse_in=int(sum(x["mse_colour_swapped"] > x["mse_true"] for x in r)))
                summary[f"{split}/{fam}/t{t}"] = entry
    out = dict(schema=SCHEMA, description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "),
               settings=dict(videos_per_family_and_split=a.videos, timesteps=ts, world_seed0=9000, dtype="fp32",
                             weights=a.weights or "committed"),
               summary=summary, per_video=rows, device=device_name(a.device), torch=torch.__version__,
               python=platform.python_version(), commit=git_commit(),
               how_to_read="motion_share / colour_share: the swapped prompt's extra error over the true prompt as a "
                           "fraction of the empty prompt's extra error (0: the word is ignored; about 1: a wrong word "
                           "costs as much as no prompt); *_worse_in: videos where the swap raised the error")
    write_json(a.out, json_clean(out))
    for k, v in summary.items():
        print(f"{k:>24}: motion share {v['motion_share'] if v['motion_share'] is not None else float('nan'):+.3f}"
              f" ({v['motion_worse_in']}/{v['n']})" + (f", colour share {v['colour_share']:+.3f} ({v['colour_worse_in']}/{v['n']})"
                                                      if v.get("colour_share") is not None else ""))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
