"""Write notebooks/01_dataset.ipynb, 02_layer_analysis.ipynb and 03_timestep.ipynb (stripped, reproducible).

    .venv/bin/python scripts/make_notebooks_01_03.py            # write all three
    .venv/bin/python scripts/make_notebooks_01_03.py --check    # fail if the committed notebooks differ

Anatomy (shared reference, style section 12-14): cell 1 markdown (title, paper figure, what it does not do); cell 2
tagged ``parameters`` (typed globals with inline comments; defaults = the CI-sized run); cell 3 checks every
parameter (``difftrack.params.check_notebook``) before any model load or file write; cell 4 imports and
``%matplotlib inline``; each section a static figure cell (saved under ``figures/``) right before a widget cell that
starts with ``# NBVAL_IGNORE_OUTPUT``. Paper scale: ``papermill -f notebooks/params/full.yaml``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"

# The analysis parameters every notebook shares (same names, so one params/full.yaml serves all three, and the same
# defaults, so 02 and 03 reuse the per-video cache that 01 fills).
COMMON_PARAMS = '''\
model: str = "embedded"  # "embedded" or a local diffusers folder (02, 03: also CogVideoX, Wan, HunyuanVideo)
videos_per_family: int = 1  # generated videos per family (objects, scenes), pseudo ground truth (Lucas-Kanade)
exact_per_family: int = 1  # world videos per family analysed with exact ground truth (noised to each step)
num_steps: int = 4  # denoising steps (the paper: 50)
grid_size: int = 8  # query grid side in frame 0 (grid_size**2 points; the paper: 10 or 20)
device: str = "cpu"  # "cpu" or "cuda"
dtype: str = "float32"  # "float32", "float16" or "bfloat16"
seed: int = 0  # first world-video / noise seed
size: list = []  # [frames, height, width] of generated and world videos; empty: the model's default'''

IMPORTS = '''\
%matplotlib inline
import json
import time

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from tqdm.auto import tqdm

from difftrack import analysis, paper_results, paths, viz
from difftrack import inspect_attn as ia
from difftrack.runners import VideoRunner
from difftrack.sliders import slider_panel  # slider widgets drawn in the kernel (headless runs never stall)
from difftrack.world import FAMILIES, World'''

# The committed paper-scale tables (notebooks 02 and 03 draw the paper's figures from them)
PAPER_ANALYSIS = '''\
paper = paper_results.load_analysis() if model == "embedded" else None  # the committed run is the embedded model's
if paper is None:
    print("no paper-scale analysis of this model committed (results/analysis_summary.json holds the embedded "
          "model's; run scripts/paper_scale.py on a GPU)")
else:
    P, ptop3 = paper.tables, paper.summary["all"]["best_layers_top3"]'''

SETUP_ANALYSIS = '''\
torch.manual_seed(seed)
FIG, RES = paths.figures_dir(), paths.results_dir()
pipe = ia.load_pipeline(model, device, dtype)
runner = VideoRunner(pipe)  # the backbone's conventions: token stride, latent frames, VAE, text conditioning
size = runner.resolve_size(size)  # empty: the model's default
print(f"model {model}: {type(pipe).__name__}, {runner.num_layers} blocks, videos of {size[0]} frames at "
      f"{size[2]}x{size[1]} px, {runner.stride} px per token, {runner.latent_frames(size[0])} latent frames")
items = ia.analysis_items(videos_per_family, exact_per_family, seed)
cache = paths.cache_dir(f"analysis_nb/{ia.model_tag(model, dtype)}")
timesteps = [int(t) for t in runner.timesteps(num_steps)]
t0 = time.time()
results = analysis.run_dataset(runner, items, cache, num_steps=num_steps, grid_size=grid_size, size=size)
print(f"{len(results)} videos analysed in {time.time() - t0:.1f} s (per-video cache: {cache})")
grouped = ia.group_tables(results)
L = grouped["all"]["qk_acc"].shape[1]
S = num_steps
print("subsets:", {k: sum(1 for it, _ in results if k == "all" or it["kind"] == k) for k in grouped})'''


def check_cell(notebook: str):
    """The cell right after the parameters cell: every parameter checked before any model load or file write."""
    return code(f'''
# every parameter is checked here, before any model load or file write: a bad value fails at once, naming it
from difftrack.params import check_notebook

params_ok = check_notebook("{notebook}", globals())  # also reads the model's block count from its config files
''')


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, tags: list[str] | None = None):
    c = new_code_cell(text.strip("\n"))
    if tags:
        c.metadata["tags"] = tags
    return c


# ------------------------------------------------------------------------------------------------ 01
NB01 = [
    md('''
# 01 · The analysis data set

Builds and shows the videos the layer/timestep analysis (notebooks 02 and 03) runs on -- the counterpart of the
paper's **Fig. 3** (object-centric and scene videos with tracks of a query grid from frame 0):

* **world videos** of both families (`objects`: moving textured shapes; `scenes`: a static photo under camera
  motion) with **exact** ground-truth tracks from the procedural world;
* **generated videos** from the embedded model, prompted with the world's held-out prompts, with **pseudo ground
  truth** from an off-the-shelf tracker (OpenCV pyramidal Lucas-Kanade, where the paper used CoTracker);
* **how far pseudo GT is from exact GT**, measured by running the same Lucas-Kanade tracker on world videos where
  both exist (TAP-Vid point accuracy, Jaccard, occlusion accuracy, mean error).

Generation goes through `analysis.run_dataset`, which records every (layer, step) of the 3D attention on the fly
and caches each video, so notebooks 02 and 03 with the same parameters reuse this work.

**What it does not do:** it uses no CoTracker and no foreground (SAM) mask -- `objects` points on the background
are kept, unlike the paper's fg set; it does not use real videos (TAP-Vid is notebook 04's); generated videos have
no exact ground truth, so their pseudo GT is only as good as the last section says; the defaults are a CI-sized run
(run the paper scale with `papermill -f notebooks/params/full.yaml`).
'''),
    code(COMMON_PARAMS + '''
pseudo_check_per_family: int = 8  # world videos per family for the pseudo-vs-exact comparison (cheap: no model)
show_per_family: int = 1  # videos per family drawn in the figures
''', tags=["parameters"]),
    check_cell("01_dataset"),
    code(IMPORTS + '''
from difftrack import tapvid
from difftrack.analysis import pseudo_ground_truth'''),
    md('''
## World videos with exact tracks

A regular `grid_size x grid_size` grid of query points in frame 0; the world gives each point's exact position and
visibility (hidden = occluded by a nearer layer or outside the frame) in every frame.
'''),
    code('''
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
'''),
    code('''
show = [(f, s) for f in FAMILIES for s in range(seed, seed + show_per_family)]
fig = viz.video_grid([world_set[k][0].video for k in show], [f"{k[0]}: {world_set[k][0].prompt}" for k in show],
                     title="World videos (held-out textures)", save=FIG / "01_world_frames.png")
fig
'''),
    code('''
fig = viz.video_grid([world_set[k][0].video for k in show], [f"{k[0]} (exact GT)" for k in show],
                     tracks=[world_set[k][1] for k in show], visible=[world_set[k][2] for k in show],
                     title="Exact tracks (filled: visible, hollow: hidden)", save=FIG / "01_world_tracks.png")
fig
'''),
    md('''
## Generated videos with pseudo ground truth

The embedded model generates from the prompt of world video `seed + i` of each family (noise seed `seed + i`,
classifier-free guidance 6 as the paper). `run_dataset` records the analysis during generation and caches the video
and its record; pseudo ground truth is Lucas-Kanade with a forward-backward check from the frame-0 grid.
'''),
    code('''
pipe = ia.load_pipeline(model, device, dtype)  # one latent frame per video frame: checked with the parameters
items = ia.analysis_items(videos_per_family, exact_per_family, seed)
cache = paths.cache_dir(f"analysis_nb/{ia.model_tag(model, dtype)}")
t0 = time.time()
results = analysis.run_dataset(pipe, items, cache, num_steps=num_steps, grid_size=grid_size, size=(T, H, W))
print(f"{len(items)} videos analysed in {time.time() - t0:.1f} s (cache: {cache})")
generated = []  # (item, video, pseudo tracks, pseudo visible, record)
for it in items:
    if it["kind"] == "generated":
        rec, video = ia.load_cached(cache, it, num_steps, grid_size)
        generated.append((it, video, *pseudo_ground_truth(video, rec.queries), rec))
for it, video, *_ in generated:
    print(f"  {it['family']:7s} seed {it['seed']}: {it['prompt']}")
assert all(v.shape == (T, H, W, 3) and v.dtype == np.uint8 for _, v, *_ in generated)
'''),
    code('''
gshow = [g for g in generated if g[0]["seed"] < seed + show_per_family] or generated[:1]
fig = None if not gshow else viz.video_grid(
    [g[1] for g in gshow], [f"{g[0]['family']}: {g[0]['prompt']}" for g in gshow],
    tracks=[g[2] for g in gshow], visible=[g[3] for g in gshow],
    title=f"Live run: generated with {num_steps} steps, pseudo GT (Lucas-Kanade)",
    save=FIG / "01_generated_tracks.png" if num_steps >= paper_results.MIN_STEPS else None)
fig
'''),
    md('''
### The same at paper scale

`figures/01_generated_tracks.png` shows 50-step generations of the committed paper-scale run
(`results/paper_videos.npz`, written by `scripts/paper_scale.py`) with their Lucas-Kanade pseudo ground truth; a
live run with fewer steps is only displayed above, never saved.
'''),
    code('''
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
'''),
    md('''
## Statistics

Per video: how many query points stay visible, how far visible points move from frame 0 to the last frame, and
(for analysed videos) the recording time.
'''),
    code('''
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
stats.to_csv(RES / "01_dataset_stats.csv", index=False)
summary_stats = stats.groupby(["kind", "family"])[["visible_frac", "visible_last_frac", "motion_px"]].mean()
summary_stats.round(3)
'''),
    md('''
## Pseudo GT vs exact GT

The same Lucas-Kanade tracker that gives the generated videos their pseudo ground truth runs on world videos, whose
exact tracks are known. TAP-Vid metrics (query mode `first`) at thresholds of 1, 2, 4, 8 px; 2 px is half a token,
the analysis' accuracy threshold.
'''),
    code('''
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
'''),
    code('''
fig = viz.threshold_curves(THRESHOLDS, {f: [per_family.loc[f, f"pts_within_{t}"] for t in THRESHOLDS]
                                        for f in per_family.index},
                           ylabel="pseudo GT within threshold of exact GT", marker_x=HALF_TOKEN,
                           marker_label="half token (accuracy threshold)",
                           title="Lucas-Kanade pseudo GT vs exact GT (world videos)",
                           save=FIG / "01_pseudo_vs_exact.png")
fig
'''),
    code('''
fig = viz.histogram({f: np.concatenate(e) if e else np.zeros(0) for f, e in errors.items()},
                    bins=np.linspace(0, 8, 33), xlabel="pseudo GT error (px, points visible in both)",
                    title="Pseudo GT error on world videos", save=FIG / "01_pseudo_error_hist.png")
fig
'''),
    code('''
# Numeric claims (loose bands: CI-sized runs are noisy)
half = per_family.loc["all", f"pts_within_{int(HALF_TOKEN)}"]
print(f"pseudo GT within half a token ({HALF_TOKEN:g} px) of exact GT: {100 * half:.1f} %; "
      f"mean error {per_family.loc['all', 'mean_error_px']:.2f} px")
assert half > 0.5, "LK pseudo GT should mostly agree with exact GT within half a token"
assert per_family.loc["all", "occlusion_accuracy"] > 0.6
'''),
    md('''
## Browse the data set

Every video above with its ground truth (exact for world videos, Lucas-Kanade for generated ones); the static cell
shows the defaults, the sliders below redraw.
'''),
    code('''
browse = [(f"world {f} seed {s} (exact)", smp.video, tr, vis) for (f, s), (smp, tr, vis) in world_set.items()
          if s < seed + show_per_family]
browse += [(f"generated {it['family']} seed {it['seed']} (pseudo)", v, tr, vis) for it, v, tr, vis, _ in generated]

def show_video(video_index: int, frame: int):
    name, v, tr, vis = browse[video_index]
    return viz.track_frame(v[frame], tr, vis, frame, title=f"{name}, frame {frame}")

show_video(0, T - 1)
'''),
    code('''
# NBVAL_IGNORE_OUTPUT
s_video = widgets.IntSlider(value=0, min=0, max=len(browse) - 1, description="video", continuous_update=False)
s_frame = widgets.IntSlider(value=T - 1, min=0, max=T - 1, description="frame", continuous_update=False)
display(slider_panel(show_video, {"video_index": s_video, "frame": s_frame}))
'''),
]

# ------------------------------------------------------------------------------------------------ 02
NB02 = [
    md('''
# 02 · Layer analysis: where does temporal matching happen?

Reproduces the paper's **Fig. 4a** (query-key vs intermediate-feature matching accuracy per layer), **Fig. 4b**
(harmonic mean of accuracy, cross-frame confidence and cross-frame attention per layer), the confidence and
attention scores (self / cross / text), the **top layers**, and the qualitative views: the **cross-frame attention
map of a query point** over frames and a **PCA of queries and keys** (3 components of the head-averaged video-token
q/k, fitted jointly over frames, shown as RGB per frame). Sliders pick layer, timestep and query point.

Accuracy = fraction of visible (point, frame >= 1) pairs predicted within half a token of the ground truth (exact GT
for world videos, Lucas-Kanade pseudo GT for generated ones; see notebook 01).

**What it does not do:** by default it analyses the 12-layer embedded model, not CogVideoX-2B (set `model` to a
local CogVideoX / Wan / HunyuanVideo folder for those; see the README); the defaults are a CI-sized run with few videos and steps, so layer rankings are noisy (paper scale:
`papermill -f notebooks/params/full.yaml`); "features" are block outputs (the residual stream) as the fixed [B12]
reading, not the published pre-`to_out` tensor; no foreground mask.
'''),
    code(COMMON_PARAMS + '''
layer: int = -1  # layer shown first in the maps and PCA (-1: the best by harmonic mean)
step: int = -1  # denoising step shown first (-1: the last)
inspect_video: int = 0  # index of the generated video whose attention maps / PCA are shown
num_points: int = 4  # query points offered in the attention-map view
untrained_control: bool = True  # also analyse one world video with random weights (the control)
''', tags=["parameters"]),
    check_cell("02_layer_analysis"),
    code(IMPORTS),
    md('''
## Per-video analysis (cached)

`analysis.run_dataset` runs one generation per generated video (and one noised forward per step per world video),
recording every (layer, step) on the fly, and scores it against the ground truth; videos are cached per file, so a
rerun with the same parameters (or notebook 01 before this one) skips the model.
'''),
    code(SETUP_ANALYSIS + '''
assert all(t["qk_acc"].shape == (S, L) for _, t in results)'''),
    code('''
top3 = analysis.top_layers(grouped["all"]["hm"], k=min(3, L), step=-1)
layer = top3[0] if layer < 0 else int(layer)  # resolve the "-1" defaults
step = int(step) % S
summary = {name: ia.summarize_tables(tabs).to_dict() for name, tabs in grouped.items()}
frame = ia.tables_frame(grouped, timesteps)
frame.to_csv(RES / "02_layer_tables.csv", index=False)
pd.DataFrame(summary).T
'''),
    md('''
## Fig. 4a -- query-key vs feature matching per layer (last step)
'''),
    code('''
series = {}
for name, label in (("generated", "pseudo GT"), ("exact", "exact GT")):
    if name in grouped:
        series[f"query-key ({label})"] = grouped[name]["qk_acc"][-1]
        series[f"feature ({label})"] = grouped[name]["feat_acc"][-1]
fig = viz.layer_lines(series, "matching accuracy (%)", highlight=top3,
                      styles={k: ("o-" if k.startswith("query") else "s--") for k in series},
                      title=f"Live run ({len(items)} videos, {S} steps): matching accuracy per layer (last step; "
                            f"shaded: top-3 by HM)", save=FIG / "02_fig4a_qk_vs_feat_live.png")
fig
'''),
    md('''
## Fig. 4b -- harmonic mean per layer

Harmonic mean of min-max-normalised (over the whole step x layer table) query-key accuracy, cross-frame confidence
and cross-frame attention score; a few layers dominate.
'''),
    code('''
fig = viz.layer_bars(grouped["all"]["hm"][-1], "harmonic mean", highlight=top3,
                     title=f"Live run ({len(items)} videos, {S} steps): harmonic mean per layer (last step); "
                           f"top-3 = {top3}", save=FIG / "02_fig4b_harmonic_mean_live.png")
fig
'''),
    md('''
## Fig. 4a and 4b at paper scale

The same two figures from the committed paper-scale run (`results/analysis_summary.json`, `scripts/paper_scale.py`:
20 + 20 generated and 20 + 20 exact-GT videos, 50 steps, every layer and step). These are the paper's figures; the
live run above is CI-sized.
'''),
    code(PAPER_ANALYSIS + '''
    pseries = {}
    for name, label in (("generated", "pseudo GT"), ("exact", "exact GT")):
        pseries[f"query-key ({label})"] = P[name]["qk_acc"][-1]
        pseries[f"feature ({label})"] = P[name]["feat_acc"][-1]
    fig = viz.layer_lines(pseries, "matching accuracy (%)", highlight=ptop3,
                          styles={k: ("o-" if k.startswith("query") else "s--") for k in pseries},
                          title="Fig. 4a: matching accuracy per layer (last step; shaded: top-3 by HM)")
    display(viz.captioned(fig, paper.caption, save=FIG / "02_fig4a_qk_vs_feat.png"))
    fig = viz.layer_bars(P["all"]["hm"][-1], "harmonic mean", highlight=ptop3,
                         title=f"Fig. 4b: harmonic mean per layer (all videos, last step); top-3 = {ptop3}")
    display(viz.captioned(fig, paper.caption, save=FIG / "02_fig4b_harmonic_mean.png"))
'''),
    md('''
## Single heads vs the head average

The paper matches with the cost averaged over all attention heads of a layer. `scripts/head_study.py` measured
every single head and head pair of the embedded model on held-out world videos (the protocol of
`scripts/eval_mini.py`; the choice made on train videos, outlined in red): a single head can match better than the
average. The tracker takes it as `DiffTracker(layers=[8], heads=[2])`; `difftrack.selection.select` chooses layers,
heads and step for any supported backbone.
'''),
    code('''
heads = paper_results.load_heads() if model == "embedded" else None  # the committed study is the embedded model's
if heads is None:
    print("no head study of this model committed (results/heads.json holds the embedded model's; "
          "python scripts/head_study.py)")
else:
    c = heads.choice["single_head"]
    mark = [(c["layer"], heads.head_sets.index(c["heads"]))]
    fig = viz.head_heatmap(heads.acc_half, heads.names, mark=mark,
                           title="matching accuracy per layer and head set (held-out, half a token)")
    display(viz.captioned(fig, heads.caption, save=FIG / "02_heads_heatmap.png"))
    avg = heads.choice["head_average"]
    print(f"chosen on train videos: layer {c['layer']} head {c['heads'][0]}: {100 * c['heldout_half']:.1f} % held-out "
          f"vs the head average's best layer {avg['layer']}: {100 * avg['heldout_half']:.1f} %")
'''),
    code('''
# NBVAL_IGNORE_OUTPUT
def show_heads(heads_shown: str):
    k = heads.names.index(heads_shown)
    return viz.layer_lines({f"heads {heads_shown}": heads.acc_half[:, k], "head average": heads.acc_half[:, -1]},
                           "matching accuracy (%)", title=f"heads {heads_shown} vs the head average per layer")


if heads is not None:
    s_heads = widgets.SelectionSlider(options=heads.names, value=heads.names[0], description="heads",
                                      continuous_update=False)
    display(slider_panel(show_heads, {"heads_shown": s_heads}))
'''),
    code('''
fig = viz.table_heatmap(grouped["all"]["hm"], cbar_label="harmonic mean", step_labels=timesteps, highlight=top3,
                        title="Harmonic mean over steps x layers (all videos)", save=FIG / "02_hm_steps_layers.png")
fig
'''),
    md('''
## Confidence and attention scores (last step)

*Confidence*: the max attention of a point's frame-0 token on text keys, on its own frame, and (averaged over the
frames where the point is visible) on each other frame. *Attention score*: the summed attention on text / own frame /
all other frames (points visible at frame 0).
'''),
    code('''
g = grouped["all"]
fig = viz.score_bars({p: g[f"conf_{p}"][-1] for p in ia.PARTS}, "confidence score",
                     title="Confidence score per layer (all videos, last step)", save=FIG / "02_confidence_score.png")
fig
'''),
    code('''
fig = viz.score_bars({p: g[f"attn_{p}"][-1] for p in ia.PARTS}, "attention score",
                     title="Attention score per layer (all videos, last step)", save=FIG / "02_attention_score.png")
fig
'''),
    md('''
## Top layers and numeric claims

The paper's claims, checked as loose bands at CI size: query-key matching beats feature matching, a few layers
carry most of the harmonic mean, and the trained model matches far better than the same architecture with random
weights.
'''),
    code('''
control = None
first_exact = [it for it in items if it["kind"] == "exact"][:1]
if untrained_control and first_exact and runner.kind == "embedded":  # the control is the embedded architecture
    from difftrack.mini import build_untrained

    untrained = build_untrained(seed).to(device)
    if pipe.transformer.dtype != torch.float32:
        untrained.transformer.to(dtype=pipe.transformer.dtype)
    res_u = analysis.run_dataset(untrained, first_exact, paths.cache_dir(f"analysis_nb/untrained-{dtype}"),
                                 num_steps=num_steps, grid_size=grid_size, progress=False)
    trained_tabs = results[items.index(first_exact[0])][1]
    control = dict(video=first_exact[0], trained=float(np.nanmax(trained_tabs["qk_acc"][-1])),
                   untrained=float(np.nanmax(res_u[0][1]["qk_acc"][-1])))
    print(f"world video {first_exact[0]['family']} seed {first_exact[0]['seed']}: best query-key accuracy at the "
          f"last step: trained {100 * control['trained']:.1f} % vs untrained {100 * control['untrained']:.1f} %")
s_all = summary["all"]
print(f"top-3 layers by harmonic mean: {top3}; best query-key accuracy {100 * s_all['qk_best_acc']:.1f} % "
      f"(layer {s_all['qk_best_layer']}), best feature accuracy {100 * s_all['feat_best_acc']:.1f} %; "
      f"HM of top-3 / median layer: {s_all['hm_top3_over_median']:.2f}")
(RES / "02_summary.json").write_text(json.dumps(dict(
    settings=dict(model=model, videos_per_family=videos_per_family, exact_per_family=exact_per_family,
                  num_steps=num_steps, grid_size=grid_size, device=device, dtype=dtype, seed=seed, size=list(size)),
    timesteps=timesteps, top3=top3, summary=summary, untrained_control=control), indent=2, default=float))
if runner.kind == "embedded":  # the paper's claims, checked on the trained embedded model (not on other weights)
    assert s_all["qk_best_acc"] > s_all["feat_best_acc"], "query-key matching should beat feature matching"
    assert s_all["qk_best_acc"] > 0.5
    assert s_all["hm_top3_over_median"] > 1.5, "a few layers should dominate the harmonic mean"
if control is not None:
    assert control["trained"] > control["untrained"] + 0.1
'''),
    md('''
## Attention map of a query point over frames

For a few query points of frame 0, the head-averaged softmax of the point's query over **each frame's** keys (one
map per frame, each summing to 1), from `capture(...)` during a regeneration of a generated video (same seed, same
video; a world video noised to each step when `videos_per_family` is 0). The white circle is the pseudo-GT position. Every (layer, step) is precomputed so the sliders only index.
'''),
    code('''
# a generated video only at >= 50 steps (fewer steps give smears): world videos otherwise or without generated ones
pool = [it for it in items if it["kind"] == "generated" and num_steps >= paper_results.MIN_STEPS] or \
    [it for it in items if it["kind"] == "exact"] or items
insp_item = pool[inspect_video % len(pool)]
rec, cached_video = ia.load_cached(cache, insp_item, num_steps, grid_size)
gt_tr, gt_vis, _ = ia.item_ground_truth(insp_item, rec, cached_video)
# query points visible in every frame of the pseudo GT, spread over the grid
always = np.flatnonzero(gt_vis.all(1))
pick = always[np.linspace(0, len(always) - 1, min(num_points, len(always))).round().astype(int)] if len(always) \\
    else np.arange(min(num_points, len(rec.queries)))
points = rec.queries[pick]
insp_file = cache / f"inspect_{ia.cache_key(insp_item, num_steps, grid_size)}_p{len(points)}.npz"
t0 = time.time()
if insp_file.exists() and np.allclose(ia.QKInspector.load(insp_file).points, points):
    video, insp = cached_video, ia.QKInspector.load(insp_file)
else:
    if insp_item["kind"] == "generated":
        video, insp = ia.inspect_generation(runner, insp_item["prompt"], insp_item["seed"], points, num_steps,
                                            size=size)
    else:
        smp = World(*size).sample(insp_item["seed"], insp_item["family"], insp_item["split"])
        video, insp = smp.video, ia.inspect_exact(runner, smp, points, num_steps)
    diff = np.abs(video.astype(int) - cached_video.astype(int)).mean()
    assert diff < 1.0, f"regeneration should give the cached video (mean abs difference {diff:.2f})"
    insp.save(insp_file)
print(f"{insp_item['kind']} {insp_item['family']} seed {insp_item['seed']}: q/k maps and PCA for {S} steps x {L} "
      f"layers in {time.time() - t0:.1f} s (cached in {insp_file.name})")
assert np.allclose(insp.attn[step, layer].sum((-1, -2)), 1, atol=1e-3)
shown = ia.latent_video(rec, video)  # the frame each latent frame stands for (all frames for the embedded model)
'''),
    code('''
def show_attention(layer: int, step: int, point: int, save=None):
    return viz.attention_maps(shown, insp.attn[step, layer, point], points[point], track=gt_tr[pick[point]],
                              title=f"layer {layer}, step {step} (t={timesteps[step]}), point {point} "
                                    f"at ({points[point][0]:.0f}, {points[point][1]:.0f}) px", save=save)

show_attention(layer, step, 0, save=FIG / "02_attention_maps.png")
'''),
    code('''
# NBVAL_IGNORE_OUTPUT
s_layer = widgets.IntSlider(value=layer, min=0, max=L - 1, description="layer", continuous_update=False)
s_step = widgets.IntSlider(value=step, min=0, max=S - 1, description="step", continuous_update=False)
s_point = widgets.IntSlider(value=0, min=0, max=len(points) - 1, description="point", continuous_update=False)
display(slider_panel(show_attention, {"layer": s_layer, "step": s_step, "point": s_point}))
'''),
    md('''
## PCA of queries and keys

Three principal components of the head-averaged video-token queries (and, separately, keys) of one (layer, step),
fitted jointly over all frames and scaled with one range for all frames, so the same colour means the same
descriptor in every frame: where colours move with the content, q/k carry correspondence.
'''),
    code('''
def show_pca(layer: int, step: int, save=None):
    return viz.pca_frames({"video": shown, "query PCA": insp.pca_q[step, layer], "key PCA": insp.pca_k[step, layer]},
                          title=f"q/k PCA, layer {layer}, step {step} (t={timesteps[step]})", save=save)

show_pca(layer, step, save=FIG / "02_qk_pca.png")
'''),
    code('''
# NBVAL_IGNORE_OUTPUT
p_layer = widgets.IntSlider(value=layer, min=0, max=L - 1, description="layer", continuous_update=False)
p_step = widgets.IntSlider(value=step, min=0, max=S - 1, description="step", continuous_update=False)
display(slider_panel(show_pca, {"layer": p_layer, "step": p_step}))
'''),
]

# ------------------------------------------------------------------------------------------------ 03
NB03 = [
    md('''
# 03 · Timesteps: how matching and attention evolve during denoising

Reproduces the paper's **Fig. 4c** (query-key matching accuracy over denoising steps for the top layers) and
**Fig. 5** (share of attention a point's frame-0 token puts on its own frame / other frames / text over steps).
A slider picks the layer (-1 = mean over layers).

**What it does not do:** it analyses the embedded 12-layer model with a CI-sized number of steps (4 by default,
50 in the paper: `papermill -f notebooks/params/full.yaml`); "steps" are denoising-loop indices (0 = noisiest);
world videos are analysed by noising the clean video to each step (one forward per step), generated videos along
their own sampling trajectory, as the paper does for real and generated videos.
'''),
    code(COMMON_PARAMS + '''
layer: int = -1  # layer shown first in the per-layer view (-1: mean over layers)
''', tags=["parameters"]),
    check_cell("03_timestep"),
    code(IMPORTS),
    md('''
## Per-video analysis (cached)
'''),
    code(SETUP_ANALYSIS + '''
top3 = analysis.top_layers(grouped["all"]["hm"], k=min(3, L), step=-1)
print("top-3 layers by harmonic mean at the last step:", top3)'''),
    md('''
## Fig. 4c -- matching accuracy over denoising steps
'''),
    code('''
def acc_series(name: str, layers) -> dict:
    g = grouped[name]
    out = {f"layer {l}": g["qk_acc"][:, l] for l in layers}
    out["mean over layers"] = g["qk_acc"].mean(1)
    return out

fig = viz.step_lines(acc_series("all", top3), "query-key matching accuracy (%)", timesteps,
                     title=f"Live run ({len(items)} videos, {S} steps): accuracy over steps, top-3 layers",
                     save=FIG / "03_fig4c_acc_over_steps_live.png")
fig
'''),
    code('''
rows = []
for name, g in grouped.items():
    for l in range(L):
        for s in range(S):
            rows.append(dict(subset=name, layer=l, step=s, timestep=timesteps[s], qk_acc=float(g["qk_acc"][s, l]),
                             feat_acc=float(g["feat_acc"][s, l]), conf_cross=float(g["conf_cross"][s, l]),
                             **{f"share_{p}": float(g[f"attn_{p}"][s, l]) for p in ia.PARTS}))
steps_frame = pd.DataFrame(rows)
steps_frame.to_csv(RES / "03_acc_over_steps.csv", index=False)
share_mean = {p: grouped["all"][f"attn_{p}"].mean(1) for p in ia.PARTS}
pd.DataFrame({"step": range(S), "timestep": timesteps, **{f"share_{p}": v for p, v in share_mean.items()}}) \\
    .to_csv(RES / "03_attention_share.csv", index=False)
best = int(np.argmax(grouped["all"]["qk_acc"][-1]))
acc_best = grouped["all"]["qk_acc"][:, best]
claims = dict(best_layer=best, acc_best_first=float(acc_best[0]), acc_best_last=float(acc_best[-1]),
              acc_best_peak_step=int(np.argmax(acc_best)), top3=top3,
              cross_share_first=float(share_mean["cross"][0]), cross_share_last=float(share_mean["cross"][-1]),
              text_share_first=float(share_mean["text"][0]), text_share_last=float(share_mean["text"][-1]),
              per_subset={n: ia.summarize_tables(g).to_dict() for n, g in grouped.items()})
(RES / "03_summary.json").write_text(json.dumps(dict(
    settings=dict(model=model, videos_per_family=videos_per_family, exact_per_family=exact_per_family,
                  num_steps=num_steps, grid_size=grid_size, device=device, dtype=dtype, seed=seed),
    timesteps=timesteps, **claims), indent=2, default=float))
print(f"best layer {best}: accuracy {100 * acc_best[0]:.1f} % at step 0 -> {100 * acc_best[-1]:.1f} % at step {S - 1}"
      f" (peak at step {claims['acc_best_peak_step']})")
# Numeric claims: matching emerges during denoising (the paper's Fig. 4c), loose at CI size
if runner.kind == "embedded":  # the paper's finding, checked on the trained embedded model
    assert acc_best[-1] > acc_best[0], "matching accuracy should improve from the noisiest to the last step"
assert np.allclose(sum(share_mean.values()), 1, atol=1e-3), "self + cross + text attention shares sum to 1"
'''),
    md('''
## Fig. 5 -- where the attention goes over denoising steps

The summed attention of a frame-0 point's query on its own frame (self), on the other frames (cross) and on the
text tokens, for points visible at frame 0 -- mean over layers here; the slider below shows single layers.
'''),
    code('''
fig = viz.attention_share(share_mean, timesteps,
                          title=f"Live run ({len(items)} videos, {S} steps): attention share (mean over layers)",
                          save=FIG / "03_fig5_attention_share_live.png")
fig
'''),
    md('''
## Fig. 4c and Fig. 5 at paper scale

From the committed paper-scale run (`results/analysis_summary.json`, `scripts/paper_scale.py`: 80 videos, 50 steps);
the live run above is CI-sized.
'''),
    code(PAPER_ANALYSIS + '''
    pser = {f"layer {l}": P["all"]["qk_acc"][:, l] for l in ptop3}
    pser["mean over layers"] = P["all"]["qk_acc"].mean(1)
    fig = viz.step_lines(pser, "query-key matching accuracy (%)", paper.timesteps,
                         title="Fig. 4c: accuracy over steps, top-3 layers (all videos)")
    display(viz.captioned(fig, paper.caption, save=FIG / "03_fig4c_acc_over_steps.png"))
    pshare = {p: P["all"][f"attn_{p}"].mean(1) for p in ia.PARTS}
    fig = viz.attention_share(pshare, paper.timesteps, title="Fig. 5: attention share over steps (mean over layers)")
    display(viz.captioned(fig, paper.caption, save=FIG / "03_fig5_attention_share.png"))
'''),
    md('''
## Per-layer view

The matching accuracy (query-key and feature, per subset) and the attention share of one layer over the steps;
`-1` is the mean over layers.
'''),
    code('''
def show_layer(layer: int, save=None):
    pick = (lambda x: x.mean(1)) if layer < 0 else (lambda x: x[:, layer])
    name = "mean over layers" if layer < 0 else f"layer {layer}"
    series = {}
    for sub, label in (("generated", "pseudo GT"), ("exact", "exact GT")):
        if sub in grouped:
            series[f"query-key ({label})"] = pick(grouped[sub]["qk_acc"])
            series[f"feature ({label})"] = pick(grouped[sub]["feat_acc"])
    f1 = viz.step_lines(series, "matching accuracy (%)", timesteps, title=f"Accuracy over steps, {name}", save=save)
    f2 = viz.attention_share({p: pick(grouped["all"][f"attn_{p}"]) for p in ia.PARTS}, timesteps,
                             title=f"Attention share, {name}")
    return f1, f2

display(*show_layer(layer, save=FIG / "03_layer_acc_over_steps.png"))
'''),
    code('''
# NBVAL_IGNORE_OUTPUT
s_layer = widgets.IntSlider(value=layer, min=-1, max=L - 1, description="layer", continuous_update=False)
display(slider_panel(show_layer, {"layer": s_layer}))  # show_layer returns two figures: both are shown
'''),
]

NOTEBOOKS = {"01_dataset.ipynb": NB01, "02_layer_analysis.ipynb": NB02, "03_timestep.ipynb": NB03}


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, c in enumerate(nb.cells):
        c.id = str(i)  # what nbstripout writes, so a stripped notebook equals the generated one
    nbformat.validate(nb)
    return nb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the notebooks on disk")
    args = ap.parse_args()
    NB_DIR.mkdir(exist_ok=True)
    bad = []
    for name, cells in NOTEBOOKS.items():
        text = nbformat.writes(build(cells)) + "\n"
        path = NB_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                bad.append(name)
            continue
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    if args.check:
        if bad:
            print(f"out of date: {bad}; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    paths = [str(NB_DIR / n) for n in NOTEBOOKS]
    subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *paths], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
