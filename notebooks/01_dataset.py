# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # 01 · The analysis data set
#
# Builds and shows the videos the layer/timestep analysis (notebooks 02 and 03) runs on -- the counterpart of the
# paper's **Fig. 3** (object-centric and scene videos with tracks of a query grid from frame 0):
#
# * **world videos** of both families (`objects`: moving textured shapes; `scenes`: a static photo under camera
#   motion) with **exact** ground-truth tracks from the procedural world;
# * **generated videos** from the embedded model, prompted with the world's held-out prompts, with **pseudo ground
#   truth** from an off-the-shelf tracker (OpenCV pyramidal Lucas-Kanade, where the paper used CoTracker);
# * **how far pseudo GT is from exact GT**, measured by running the same Lucas-Kanade tracker on world videos where
#   both exist (TAP-Vid point accuracy, Jaccard, occlusion accuracy, mean error).
#
# Generation goes through `experiments.analysis.run_dataset`, which records every (layer, step) of the 3D attention on the fly
# and caches each video, so notebooks 02 and 03 with the same parameters reuse this work.
#
# **What it does not do:** it uses no CoTracker and no foreground (SAM) mask -- `objects` points on the background
# are kept, unlike the paper's fg set; it does not use real videos (TAP-Vid is notebook 04's); generated videos have
# no exact ground truth, so their pseudo GT is only as good as the last section says; the defaults are a CI-sized run
# (run the paper scale with `papermill -f notebooks/params/full.yaml`).

# %% tags=["parameters"]
model: str = "embedded"  # "embedded" or a local diffusers folder (02, 03: also CogVideoX, Wan, HunyuanVideo)
videos_per_family: int = 1  # generated videos per family (objects, scenes), pseudo ground truth (Lucas-Kanade)
exact_per_family: int = 1  # world videos per family analysed with exact ground truth (noised to each step)
num_steps: int = 4  # denoising steps (the paper: 50)
grid_size: int = 8  # query grid side in frame 0 (grid_size**2 points; the paper: 10 or 20)
device: str = "cpu"  # "cpu" or "cuda"
dtype: str = "float32"  # "float32", "float16" or "bfloat16"
seed: int = 0  # first world-video / noise seed
size: list = []  # [frames, height, width] of generated and world videos; empty: the model's default
pseudo_check_per_family: int = 8  # world videos per family for the pseudo-vs-exact comparison (cheap: no model)
show_per_family: int = 1  # videos per family drawn in the figures

# %%
# every parameter is checked here, before any model load or file write: a bad value fails at once, naming it
from difftrack.params import check_notebook

params_ok = check_notebook("01_dataset", globals())  # also reads the model's block count from its config files

# %%
# %matplotlib inline
import json
import time

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from tqdm.auto import tqdm

from difftrack import analysis, paths, viz
from difftrack.experiments import analysis as xa
from difftrack.experiments import paper_results
from difftrack.sliders import slider_panel  # slider widgets drawn in the kernel (headless runs never stall)
from difftrack.world import FAMILIES, World
from difftrack import tapvid
from difftrack.analysis import pseudo_ground_truth

# %% [markdown]
# ## World videos with exact tracks
#
# A regular `grid_size x grid_size` grid of query points in frame 0; the world gives each point's exact position and
# visibility (hidden = occluded by a nearer layer or outside the frame) in every frame.

# %%
torch.manual_seed(seed)
FIG, RES = paths.figures_dir(), paths.results_dir()
world = World(*size) if size else World()
queries = world.grid_queries(grid_size)  # [N, 3] (t, x, y) pixels, t = 0
world_set = {}  # (family, seed) -> (sample, exact tracks [N, T, 2], visible [N, T])
for fam in FAMILIES:
    for s in tqdm(range(seed, seed + max(pseudo_check_per_family, exact_per_family, show_per_family)),
                  desc=f"world {fam}"):
        smp = world.sample(s, fam, "heldout")
        world_set[fam, s] = (smp, *world.tracks(smp, queries))
T, H, W = next(iter(world_set.values()))[0].video.shape[:3]
print(f"{len(world_set)} world videos of {T} frames at {W}x{H} px, {len(queries)} query points each")
for (fam, s), (smp, tr, vis) in list(world_set.items())[:: max(1, len(world_set) // 4)]:
    print(f"  {fam:7s} seed {s}: {smp.prompt}")
assert all(np.allclose(tr[:, 0], queries[:, 1:]) and vis[:, 0].all() for _, tr, vis in world_set.values())

# %%
show = [(f, s) for f in FAMILIES for s in range(seed, seed + show_per_family)]
fig = viz.video_grid([world_set[k][0].video for k in show], [f"{k[0]}: {world_set[k][0].prompt}" for k in show],
                     title="World videos (held-out textures)", save=FIG / "01_world_frames.png")
fig

# %%
fig = viz.video_grid([world_set[k][0].video for k in show], [f"{k[0]} (exact GT)" for k in show],
                     tracks=[world_set[k][1] for k in show], visible=[world_set[k][2] for k in show],
                     title="Exact tracks (filled: visible, hollow: hidden)", save=FIG / "01_world_tracks.png")
fig

# %% [markdown]
# ## Generated videos with pseudo ground truth
#
# The embedded model generates from the prompt of world video `seed + i` of each family (noise seed `seed + i`,
# classifier-free guidance 6 as the paper). `run_dataset` records the analysis during generation and caches the video
# and its record; pseudo ground truth is Lucas-Kanade with a forward-backward check from the frame-0 grid.

# %%
# one latent frame per video frame: checked with the parameters; the per-video cache is shared with notebooks 02-03
run = xa.run_notebook_analysis(model, device, dtype, (T, H, W), videos_per_family, exact_per_family, seed, num_steps,
                               grid_size)
pipe, items, cache = run.pipe, run.items, run.cache
generated = []  # (item, video, pseudo tracks, pseudo visible, record)
for it in items:
    if it["kind"] == "generated":
        rec, video = xa.load_cached(cache, it, num_steps, grid_size)
        generated.append((it, video, *pseudo_ground_truth(video, rec.queries), rec))
for it, video, *_ in generated:
    print(f"  {it['family']:7s} seed {it['seed']}: {it['prompt']}")
assert all(v.shape == (T, H, W, 3) and v.dtype == np.uint8 for _, v, *_ in generated)

# %%
gshow = [g for g in generated if g[0]["seed"] < seed + show_per_family] or generated[:1]
fig = None if not gshow else viz.video_grid(
    [g[1] for g in gshow], [f"{g[0]['family']}: {g[0]['prompt']}" for g in gshow],
    tracks=[g[2] for g in gshow], visible=[g[3] for g in gshow],
    title=f"Live run: generated with {num_steps} steps, pseudo GT (Lucas-Kanade)",
    save=FIG / "01_generated_tracks.png" if num_steps >= paper_results.MIN_STEPS else None)
fig

# %% [markdown]
# ### The same at paper scale
#
# `figures/01_generated_tracks.png` shows 50-step generations of the committed paper-scale run
# (`results/paper_videos.npz`, written by `scripts/paper_scale.py`) with their Lucas-Kanade pseudo ground truth; a
# live run with fewer steps is only displayed above, never saved.

# %%
paper_videos = paper_results.load_videos("analysis/") if model == "embedded" else {}  # the embedded model's run
fig = None
if not paper_videos:
    print("no committed paper-scale videos of this model (results/paper_videos.npz holds the embedded model's); run "
          "scripts/paper_scale.py on a GPU")
else:
    pv = list(paper_videos.values())
    pq = World(*pv[0][0].shape[:3]).grid_queries(grid_size)[:, 1:]
    pgt = [pseudo_ground_truth(v, pq) for v, _ in pv]
    fig = viz.video_grid([v for v, _ in pv], [f"{m['family']}: {m['prompt']}" for _, m in pv],
                         tracks=[g[0] for g in pgt], visible=[g[1] for g in pgt],
                         title=f"Generated with {pv[0][1]['steps']} steps (paper-scale run), pseudo GT (Lucas-Kanade)")
    fig = viz.captioned(fig, f"{pv[0][1]['steps']}-step generations of the paper-scale run on {pv[0][1]['device']} "
                             f"(results/paper_videos.npz); queries: {grid_size}x{grid_size} grid at frame 0",
                        save=FIG / "01_generated_tracks.png")
fig


# %% [markdown]
# ## Statistics
#
# Per video: how many query points stay visible, how far visible points move from frame 0 to the last frame, and
# (for analysed videos) the recording time. `results/01_dataset_stats.csv` keeps every column but the time (it depends
# on the machine and its load, so a re-run would change a tracked file); the time is shown here only.

# %%
def stats_row(kind, family, s, prompt, tracks, visible, seconds=np.nan):
    last = visible[:, -1]
    disp = np.linalg.norm(tracks[last, -1] - tracks[last, 0], axis=-1)
    return dict(kind=kind, family=family, seed=s, prompt=prompt, points=len(tracks),
                visible_frac=float(visible.mean()), visible_last_frac=float(last.mean()),
                motion_px=float(disp.mean()) if disp.size else np.nan, seconds=seconds)

rows = [stats_row("world (exact GT)", f, s, smp.prompt, tr, vis) for (f, s), (smp, tr, vis) in world_set.items()]
rows += [stats_row("generated (pseudo GT)", it["family"], it["seed"], it["prompt"], tr, vis, rec.meta.get("seconds"))
         for it, _, tr, vis, rec in generated]
stats = pd.DataFrame(rows)
stats.drop(columns=["seconds"]).to_csv(RES / "01_dataset_stats.csv", index=False)  # no timings in tracked files
display(stats[["kind", "family", "seed", "seconds"]].dropna())
summary_stats = stats.groupby(["kind", "family"])[["visible_frac", "visible_last_frac", "motion_px"]].mean()
summary_stats.round(3)

# %% [markdown]
# ## Pseudo GT vs exact GT
#
# The same Lucas-Kanade tracker that gives the generated videos their pseudo ground truth runs on world videos, whose
# exact tracks are known. TAP-Vid metrics (query mode `first`) at thresholds of 1, 2, 4, 8 px; 2 px is half a token,
# the analysis' accuracy threshold.

# %%
THRESHOLDS = (1, 2, 4, 8)
HALF_TOKEN = analysis.token_px(pipe) / 2
rows, errors = [], {f: [] for f in FAMILIES}
for (fam, s), (smp, tr, vis) in tqdm(world_set.items(), desc="LK on world videos"):
    if s >= seed + pseudo_check_per_family:
        continue
    p_tr, p_vis = pseudo_ground_truth(smp.video, queries[:, 1:])
    m = tapvid.compute_tapvid_metrics(queries[None][..., [0, 2, 1]], ~vis[None], tr[None], ~p_vis[None], p_tr[None],
                                      "first", thresholds=THRESHOLDS)
    both = vis & p_vis
    both[:, 0] = False
    err = np.linalg.norm(p_tr - tr, axis=-1)[both]
    errors[fam].append(err)
    rows.append(dict(family=fam, seed=s, **{k: float(v[0]) for k, v in m.items()},
                     mean_error_px=float(err.mean()) if err.size else np.nan,
                     median_error_px=float(np.median(err)) if err.size else np.nan,
                     pseudo_visible_frac=float(p_vis[:, 1:].mean()), exact_visible_frac=float(vis[:, 1:].mean())))
pve = pd.DataFrame(rows)
pve.to_csv(RES / "01_pseudo_vs_exact.csv", index=False)
cols = [f"pts_within_{t}" for t in THRESHOLDS] + ["average_jaccard", "occlusion_accuracy", "mean_error_px",
                                                   "median_error_px"]
per_family = pve.groupby("family")[cols].mean()
per_family.loc["all"] = pve[cols].mean()
(RES / "01_pseudo_vs_exact.json").write_text(json.dumps(
    dict(videos_per_family=pseudo_check_per_family, grid_size=grid_size, thresholds_px=THRESHOLDS,
         half_token_px=HALF_TOKEN, per_family=per_family.round(4).to_dict(orient="index")), indent=2))
per_family.round(3)

# %%
fig = viz.threshold_curves(THRESHOLDS, {f: [per_family.loc[f, f"pts_within_{t}"] for t in THRESHOLDS]
                                        for f in per_family.index},
                           ylabel="pseudo GT within threshold of exact GT", marker_x=HALF_TOKEN,
                           marker_label="half token (accuracy threshold)",
                           title="Lucas-Kanade pseudo GT vs exact GT (world videos)",
                           save=FIG / "01_pseudo_vs_exact.png")
fig

# %%
fig = viz.histogram({f: np.concatenate(e) if e else np.zeros(0) for f, e in errors.items()},
                    bins=np.linspace(0, 8, 33), xlabel="pseudo GT error (px, points visible in both)",
                    title="Pseudo GT error on world videos", save=FIG / "01_pseudo_error_hist.png")
fig

# %%
# Numeric claims (loose bands: CI-sized runs are noisy)
half = per_family.loc["all", f"pts_within_{int(HALF_TOKEN)}"]
print(f"pseudo GT within half a token ({HALF_TOKEN:g} px) of exact GT: {100 * half:.1f} %; "
      f"mean error {per_family.loc['all', 'mean_error_px']:.2f} px")
assert half > 0.5, "LK pseudo GT should mostly agree with exact GT within half a token"
assert per_family.loc["all", "occlusion_accuracy"] > 0.6

# %% [markdown]
# ## Browse the data set
#
# Every video above with its ground truth (exact for world videos, Lucas-Kanade for generated ones); the static cell
# shows the defaults, the sliders below redraw.

# %%
browse = [(f"world {f} seed {s} (exact)", smp.video, tr, vis) for (f, s), (smp, tr, vis) in world_set.items()
          if s < seed + show_per_family]
browse += [(f"generated {it['family']} seed {it['seed']} (pseudo)", v, tr, vis) for it, v, tr, vis, _ in generated]

def show_video(video_index: int, frame: int):
    name, v, tr, vis = browse[video_index]
    return viz.track_frame(v[frame], tr, vis, frame, title=f"{name}, frame {frame}")

show_video(0, T - 1)

# %%
# NBVAL_IGNORE_OUTPUT
s_video = widgets.IntSlider(value=0, min=0, max=len(browse) - 1, description="video", continuous_update=False)
s_frame = widgets.IntSlider(value=T - 1, min=0, max=T - 1, description="frame", continuous_update=False)
display(slider_panel(show_video, {"video_index": s_video, "frame": s_frame}))
