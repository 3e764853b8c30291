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
# # 04 · Zero-shot point tracking with DiffTrack
#
# Reproduces the protocol of **DiffTrack Table 1** (zero-shot point tracking from a video diffusion transformer's
# query–key attention): queries in the **"first"** mode (each point queried at its first visible frame, here a grid at
# frame 0), tracks rescaled to **256×256** before scoring, and **δ_avg** (`average_pts_within_thresh`, the mean of
# `pts_within_{1,2,4,8,16}`) as the headline number. The paper's tracker has no occlusion output; ours predicts
# occlusion (cycle consistency + cost-peak confidence, calibrated on train-split videos), so we also report
# **AJ** (`average_jaccard`) and **OA** (`occlusion_accuracy`).
#
# What the notebook shows:
#
# 1. **Tracks over the video** with trails (prediction | exact ground truth), saved as `figures/04_tracks.mp4` and as a
#    strip `figures/04_tracks_strip.png`; a static figure at the default layer/step, then **layer and timestep
#    sliders** over precomputed runs, and the layer × step error map `figures/04_layer_step.png`.
#    **Click to track**: click points on any frame in JupyterLab and see their tracks over the video.
# 2. **A metrics table against the baselines** (pyramidal Lucas–Kanade, dense optical flow, raw-pixel patch matching,
#    the same model with untrained weights and, with `include_features=True`, the same tracker on block-output
#    features) on held-out world videos
#    computed here at CI size, plus the full benchmark table `results/tracking_benchmark.json` when a colleague's
#    `scripts/run_tracking_benchmark.py` run has produced it.
# 3. **TAP-Vid** and **your own video**, when you point `tapvid_path` / `video_path` at a local file.
#
# What it does **not** do:
#
# * **No real TAP-Vid numbers here**: nothing is downloaded. Point `tapvid_path` at your own copy of
#   `tapvid_davis.pkl` (or the Kinetics shard directory) to run the TAP-Vid cell; it is skipped otherwise.
# * **The embedded model works at 64×64** (13-frame chunks, a 16×16 token grid of 4-pixel tokens), so the world
#   videos, your `video_path` and TAP-Vid frames are resized to 64×64 for it; the numbers are those of a small model
#   trained on the procedural world, not CogVideoX-2B's. A real backbone is used by setting `model` to a local diffusers
#   folder (`CogVideoXPipeline`); it then runs at its native resolution (`native_size`, 480×720 for CogVideoX).
# * Ground truth is the exact world tracks (not CoTracker pseudo-labels as in the paper).
#
# Paper-scale run: `papermill notebooks/04_tracking.ipynb build/notebooks/04_tracking.ipynb -f notebooks/params/04_full.yaml --cwd notebooks`.

# %% tags=["parameters"]
model: str = "embedded"  # "embedded" (the 64x64 model in difftrack/weights) or a local diffusers pipeline folder
video_path: str = ""  # your own mp4; empty: a held-out world video
tapvid_path: str = ""  # TAP-Vid pickle (DAVIS) or Kinetics shard dir; empty: skip
layer: int = 8  # transformer block (0-based) of the default tracker (8: best single layer on train-split videos)
step: int = -1  # denoising-loop index into the 50-step schedule (-1: the last step, t 19, as published)
slider_layers: list = [2, 5, 8]  # layers precomputed for the "layer" slider (full run: all 12)
slider_steps: list = [-1, -25]  # steps precomputed for the "step" slider (of the 50-step schedule)
family: str = "objects"  # world family of the demo video: "objects" or "scenes"
seed: int = 0  # held-out world video shown (and the first of each family in the metrics table)
n_videos: int = 1  # held-out world videos per family in this notebook's metrics table
grid_size: int = 8  # queries: a grid_size x grid_size grid at frame 0
num_frames: int = 13  # frames of the world videos / frames read from video_path
native_size: list = [480, 720]  # (H, W) frames for a `model` folder; the embedded model always uses 64x64
include_features: bool = False  # add FeatureTracker (block-output features, the paper's control) to the table
trail: int = 5  # past positions joined by the drawn trail
scale: int = 4  # enlargement of the drawn frames
tapvid_max_videos: int = 3  # TAP-Vid videos evaluated (in name order)
tapvid_max_frames: int = 24  # frames kept of each TAP-Vid video
tapvid_max_points: int = 64  # query points kept per TAP-Vid video (evenly subsampled)
benchmark: str = ""  # results table to show; empty: results/tracking_benchmark.json (or .csv) when present
device: str = ""  # empty: cuda when available, else cpu
expert: str = ""  # Wan 2.2 A14B: "" the pipeline's expert at each timestep, or "transformer" / "transformer_2"

# %%
# every parameter is checked here, before any model load or file write: a bad value fails at once, naming it
from difftrack.params import check_notebook

params_ok = check_notebook("04_tracking", globals())  # also reads the model's block count from its config files

# %%
# %matplotlib inline
import json
import time
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Image, Video, display

from difftrack import mini
from difftrack.baselines import DenseFlowTracker, LucasKanadeTracker, PatchMatchTracker
from difftrack.click_track import ClickTrack, click_track_panel, moving_points  # click points, see tracks
from difftrack.paths import figures_dir, repo_root, results_dir
from difftrack.sliders import slider_panel  # slider widgets drawn in the kernel (headless runs never stall)
from difftrack.tapvid import load_tapvid, summary_table
from difftrack.tracking import DiffTracker, FeatureTracker
from difftrack.experiments.tracking import load_benchmark_table, prepare_tapvid_video, score_tracks
from difftrack.viz_tracks import draw_tracks, mean_error_per_frame, side_by_side, track_strip
from difftrack.world import World

FIG = figures_dir()
t_start = time.perf_counter()
torch.set_grad_enabled(False)
dev = device or ("cuda" if torch.cuda.is_available() else "cpu")

# %% [markdown]
# ## Model
#
# `model="embedded"` loads the 64×64 world model shipped with the package. A folder is loaded with
# `difftrack.runners.load_pipeline` (offline): a `MiniVideoPipeline`, `CogVideoXPipeline`, `WanPipeline` or
# `HunyuanVideoPipeline` folder, passed to `DiffTracker` as is; a VAE pipeline encodes each frame with its own VAE and
# its own text encoder gives the (empty-prompt) conditioning. Set `layer`, `slider_layers` and `native_size` for it.
# A Wan 2.2 A14B folder has two experts (`transformer` for the high-noise timesteps, `transformer_2` below the
# boundary): the tracker runs the one the pipeline runs at its timestep, or the one `expert` names.

# %%
from difftrack.runners import VideoRunner, load_pipeline

dtype = "bfloat16" if dev == "cuda" and model != "embedded" else "float32"
pipe = load_pipeline(model, dev, dtype)  # "embedded" or a local MiniVideoPipeline / CogVideoX / Wan / HunyuanVideo folder
is_mini = type(pipe).__name__ == "MiniVideoPipeline"
size = (mini.HEIGHT, mini.WIDTH) if is_mini else (int(native_size[0]), int(native_size[1]))
H, W = size
n_blocks = VideoRunner(pipe).num_layers  # HunyuanVideo: dual-stream blocks first, then single-stream, one list
slider_layers = sorted({int(l) for l in slider_layers} | {int(layer)})
slider_steps = list(dict.fromkeys([int(step)] + [int(s) for s in slider_steps]))
print(f"model: {model} ({type(pipe).__name__}, {n_blocks} blocks), frames {H}x{W}, device {dev}, {dtype}")
experts = VideoRunner(pipe).experts
track_kw = dict(expert=expert or None)  # every DiffTracker below: the pipeline's expert at its timestep, or this one
if experts.several:  # Wan 2.2 A14B: the tracker runs the expert the pipeline runs at its timestep
    print(f"experts: {experts.rule}; the tracker at step {step} runs "
          f"{DiffTracker(pipe, layers=(layer,), step=step, **track_kw).step_experts[0]}")

# %% [markdown]
# ## The video and its queries
#
# A held-out world video (textures never seen in training) with exact ground-truth tracks, or your own video
# (`video_path`, read with `difftrack.video_io.read_video`, first `num_frames` frames, resized to the model's frame size;
# then there is no ground truth and only drawings are shown). Queries: a `grid_size`² grid at frame 0.

# %%
world = World(frames=num_frames, height=H, width=W)
queries = world.grid_queries(grid_size)  # float32 [N, 3] (t, x, y) pixels at frame 0
if video_path:
    from difftrack.video_io import read_video

    video = read_video(video_path, max_frames=num_frames, resize=size)
    gt_tracks = gt_visible = None
    source = f"{video_path} (first {len(video)} frames, resized to {H}x{W})"
else:
    sample = world.sample(seed, family, "heldout")
    video = sample.video
    gt_tracks, gt_visible = world.tracks(sample, queries)  # [N, T, 2], [N, T]
    source = f"held-out world video {family} #{seed}: {sample.prompt!r}"
print(source, "| video", video.shape, "| queries", queries.shape)

# %% [markdown]
# ## Tracks at every (layer, step) of the sliders
#
# One `DiffTracker` per (layer, timestep) on the same video, precomputed so that the sliders below only index. The
# mean error is in pixels of the tracked frames (64×64 for the embedded model: 4 px = one token); δ_avg is on the
# 256×256 rescaled tracks, as in TAP-Vid.

# %%
runs = {}
t0 = time.perf_counter()
for L in slider_layers:
    for s in slider_steps:
        tracker = DiffTracker(pipe, layers=(L,), step=s, **track_kw)
        tr, vis = tracker(video, queries)
        r = dict(tracks=tr, visible=vis, timestep=int(tracker.timesteps[0]))
        if gt_tracks is not None:
            m = score_tracks(queries, tr, vis, gt_tracks, gt_visible, size)
            r.update(error=float(np.nanmean(mean_error_per_frame(tr, gt_tracks, gt_visible)[1:])),
                     delta_avg=100 * float(m["average_pts_within_thresh"][0]),
                     aj=100 * float(m["average_jaccard"][0]))
        runs[(L, s)] = r
print(f"{len(runs)} runs in {time.perf_counter() - t0:.1f} s")
if gt_tracks is not None:
    grid = pd.DataFrame({f"step {s} (t={runs[(slider_layers[0], s)]['timestep']})":
                         [runs[(L, s)]["delta_avg"] for L in slider_layers] for s in slider_steps},
                        index=pd.Index(slider_layers, name="layer"))
    display(grid.round(1).rename_axis(columns="δ_avg (%)"))

# %%
if gt_tracks is not None:
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(slider_steps), 0.6 + 0.45 * len(slider_layers)))
    im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid.values[i, j]:.1f}", ha="center", va="center", color="w", fontsize=9)
    ax.set_xticks(range(len(slider_steps)), [f"step {s}\nt={runs[(slider_layers[0], s)]['timestep']}"
                                             for s in slider_steps])
    ax.set_yticks(range(len(slider_layers)), [f"layer {L}" for L in slider_layers])
    ax.set_title("δ_avg (%) of single-layer DiffTracker\n(one video, 256x256 scale)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(FIG / "04_layer_step.png", dpi=120)
    plt.show()


# %% [markdown]
# ### Tracks at the default layer and step
#
# Rainbow colours keyed on each query's row (CoTracker's visualiser), filled discs = predicted visible, hollow rings =
# predicted occluded; white crosses = ground truth where visible. The last panel is the mean error per frame.

# %%
def show_run(layer, step):
    """Strip of the precomputed run (layer, step) with its error; only indexes and plots."""
    r = runs[(layer, step)]
    title = f"DiffTracker layer {layer}, step {step} (t={r['timestep']})"
    if "error" in r:
        title += f": mean error {r['error']:.2f} px, δ_avg {r['delta_avg']:.1f}%, AJ {r['aj']:.1f}%"
    fig = track_strip(video, r["tracks"], r["visible"], gt_tracks=gt_tracks, gt_visible=gt_visible, trail=trail,
                      scale=scale, title=title)
    plt.show()
    return fig


fig = show_run(layer, step)
fig.savefig(FIG / "04_tracks_strip.png", dpi=110)

# %%
# NBVAL_IGNORE_OUTPUT
layer_slider = widgets.SelectionSlider(options=slider_layers, value=layer, description="layer",
                                       continuous_update=False)
step_slider = widgets.SelectionSlider(options=slider_steps, value=step, description="step", continuous_update=False)
display(slider_panel(show_run, {"layer": layer_slider, "step": step_slider}))

# %% [markdown]
# ### The tracks as a video
#
# Left: DiffTracker at the default layer/step; right: the exact ground truth (world videos only). Saved as
# `figures/04_tracks.mp4` (H.264, 4 fps); on a machine without an mp4 writer (no `imageio-ffmpeg`) as a GIF under
# `cache/` instead, with a printed note.

# %%
from difftrack.paths import cache_dir
from difftrack.video_io import write_movie

d = runs[(layer, step)]
frames = draw_tracks(video, d["tracks"], d["visible"], trail=trail, scale=scale)
if gt_tracks is not None:
    frames = side_by_side(frames, draw_tracks(video, gt_tracks, gt_visible, trail=trail, scale=scale))
movie, note = write_movie(FIG / "04_tracks.mp4", frames, fps=4, fallback_dir=cache_dir("videos"))
print(f"{movie.name}: {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}, "
      f"{movie.stat().st_size / 1e3:.0f} kB" + (f"\nnote: {note}" if note else ""))
if note is None:
    assert movie.stat().st_size < 1e6, "the committed mp4 must stay below 1 MB"
display(Video(str(movie), embed=True, width=min(frames.shape[2], 640)) if note is None else
        Image(filename=str(movie), width=min(frames.shape[2], 640)))

# %% [markdown]
# ### Click to track
#
# Pick your own points: move the **frame** slider to any frame and click the frame. Each click adds the query
# `(t, x, y)` at that frame and tracks it with DiffTracker at the default layer/step, forwards and backwards, so a
# point may start after frame 0; the tracks are drawn over the video (scrub with the slider) and over a strip of
# frames, a white ring marks where a point was clicked. `clear` forgets the points. The widget is
# `difftrack.click_track.click_track_panel` (the clicks reach the kernel through `ipyevents`, a JupyterLab widget
# extension: no extra server); it draws in the kernel, so a headless run shows the two points below, clicked in
# advance on the middle frame.

# %%
click_frame = len(video) // 2  # two points "clicked" in advance on this later frame:
if gt_tracks is not None:  # a world video: the ground-truth points that move most, where they are at click_frame
    start_points = moving_points(gt_tracks, gt_visible, click_frame, n=2)
else:  # your video: two fixed places of the frame
    start_points = [(0.3 * W, 0.35 * H), (0.65 * W, 0.6 * H)]
clicked = ClickTrack(video, DiffTracker(pipe, layers=(layer,), step=step, **track_kw), scale=max(1, 256 // max(H, W)),
                     trail=trail)  # frames drawn about 256 px wide (4x for the embedded model)
for x, y in start_points:
    clicked.add(click_frame, x, y)
clicked.track()
fig = clicked.figure(title=f"DiffTracker layer {layer}, step {step}: {len(clicked.tracks)} points clicked on frame "
                           f"{click_frame}")
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
display(click_track_panel(clicked, frame=click_frame))  # in JupyterLab: pick a frame with the slider, click points

# %% [markdown]
# ## Metrics against the baselines (this notebook's videos)
#
# All methods get the same queries and videos (held-out world, both families, `n_videos` each), at the tracked frame
# size, and are scored by `difftrack.tapvid.compute_tapvid_metrics` on tracks rescaled to 256×256 ("first" mode).
# Percentages; `s/video` is wall time on this machine (noisy on a shared CPU).

# %%
methods = {f"DiffTracker (layer {layer}, step {step})": DiffTracker(pipe, layers=(layer,), step=step, **track_kw)}
MAIN = next(iter(methods))
if is_mini:
    methods["DiffTracker, untrained weights"] = DiffTracker(mini.build_untrained().to(dev), layers=(layer,), step=step)
if include_features:
    methods[f"FeatureTracker (block {layer} output)"] = FeatureTracker(pipe, layers=(layer,), step=step)
methods.update({"Lucas-Kanade (pyramidal, OpenCV)": LucasKanadeTracker(), "Dense optical flow (DIS)": DenseFlowTracker(),
                "Patch matching (NCC)": PatchMatchTracker()})

per_method = {name: {} for name in methods}
seconds = {name: 0.0 for name in methods}
eval_videos = [(fam, seed + i) for fam in ("objects", "scenes") for i in range(n_videos)]
for fam, sd in eval_videos:
    s_ = world.sample(sd, fam, "heldout")
    gt, gv = world.tracks(s_, queries)
    for name, tracker in methods.items():
        t0 = time.perf_counter()
        if name == MAIN and not video_path and (fam, sd) == (family, seed):
            tr, vis = runs[(layer, step)]["tracks"], runs[(layer, step)]["visible"]  # already computed above
        else:
            tr, vis = tracker(s_.video, queries)
        seconds[name] += time.perf_counter() - t0
        m = score_tracks(queries, tr, vis, gt, gv, size)
        for k, v in m.items():
            per_method[name][k] = np.concatenate([per_method[name].get(k, np.zeros(0)), v])
table = summary_table(per_method)
table["s/video"] = [seconds[n] / len(eval_videos) for n in table.index]
COLS = ["average_pts_within_thresh", "average_jaccard", "occlusion_accuracy", "pts_within_1", "pts_within_2",
        "pts_within_4", "pts_within_8", "pts_within_16", "n_videos", "s/video"]
fam_of = [fam for fam, _ in eval_videos]
by_family = pd.DataFrame({f"δ_avg {fam}": [100 * np.mean([v for v, f in zip(per_method[n]["average_pts_within_thresh"],
                                                                            fam_of) if f == fam])
                                           for n in table.index] for fam in ("objects", "scenes")}, index=table.index)
shown = table[COLS].rename(columns={"average_pts_within_thresh": "δ_avg", "average_jaccard": "AJ",
                                    "occlusion_accuracy": "OA"})
display(shown.round(1))
display(by_family.round(1))

# %%
fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(shown)))
yy = np.arange(len(shown))
ax.barh(yy + 0.2, shown["δ_avg"], height=0.4, label="δ_avg")
ax.barh(yy - 0.2, shown["AJ"], height=0.4, label="AJ")
ax.set_yticks(yy, shown.index)
ax.invert_yaxis()
ax.set_xlabel("% (256x256 scale, query-first)")
ax.set_title(f"held-out world videos (n={len(eval_videos)}, {grid_size}x{grid_size} queries each)", fontsize=9)
ax.legend(loc="lower right")
fig.tight_layout()
fig.savefig(FIG / "04_metrics.png", dpi=120)
plt.show()

# %% [markdown]
# Checked claims (on this notebook's videos): the trained model's query–key matches are far better than the same
# architecture with untrained weights, which is DiffTrack's point that the correspondence is *learned* by video
# generation training. The per-family table shows where the embedded model falls short: on `scenes` videos (a
# photo under camera pan, zoom or rotation) its matches tend to stay near the query position, so the error grows with
# the camera motion, while chained optical flow follows it; on `objects` videos it does much better.

# %%
main = table.loc[MAIN]
print(f"{MAIN}: δ_avg {main.average_pts_within_thresh:.1f}%, pts_within_4 {main.pts_within_4:.1f}%, "
      f"AJ {main.average_jaccard:.1f}%, OA {main.occlusion_accuracy:.1f}%")
if is_mini:
    untrained = table.loc["DiffTracker, untrained weights"]
    assert main.pts_within_4 > untrained.pts_within_4 + 20, (main.pts_within_4, untrained.pts_within_4)
    assert main.average_pts_within_thresh > untrained.average_pts_within_thresh + 15
    assert main.average_jaccard > untrained.average_jaccard
if model == "embedded":  # measured bands of the committed model (other weights: reported, not checked)
    assert main.average_pts_within_thresh > 30, "DiffTracker δ_avg on world videos fell below 30%"
    assert main.occlusion_accuracy > 60, "occlusion prediction barely better than guessing"

# %% [markdown]
# ## The full benchmark table (when present)
#
# `scripts/run_tracking_benchmark.py` evaluates the same methods on 50+ held-out world videos and writes
# `results/tracking_benchmark.json` (+ `.csv`). This cell shows that table as stored, naming the file it came from; it
# is not recomputed here.

# %%
cands = [Path(benchmark)] if benchmark else [results_dir() / "tracking_benchmark.json",
                                             results_dir() / "tracking_benchmark.csv"]
found = next((p for p in cands if p.is_file()), None)
if found is None:
    print("no benchmark table at", ", ".join(str(p) for p in cands),
          "-- run `python scripts/run_tracking_benchmark.py`; the table above is this notebook's own.")
else:
    try:
        bench = load_benchmark_table(found)
    except ValueError as err:  # a layout this reader does not know: show the raw file instead
        print(f"could not parse {found}: {err}")
        print(found.read_text()[:3000])
    else:
        try:
            rel = found.resolve().relative_to(repo_root().resolve())
        except ValueError:
            rel = found
        print(f"source: {rel} (modified {time.strftime('%Y-%m-%d %H:%M', time.localtime(found.stat().st_mtime))})")
        meta = bench.attrs.get("meta") or {}
        if meta:
            print("run:", json.dumps(meta, default=str)[:600])
        display(bench.round(2) if hasattr(bench, "round") else bench)

# %% [markdown]
# ## TAP-Vid (your file)
#
# Set `tapvid_path` to `tapvid_davis.pkl` (a dict of videos) or to the TAP-Vid Kinetics directory of
# `*_of_0010.pkl` shards. The first `tapvid_max_videos` videos (name order) are cut to `tapvid_max_frames` frames,
# resized to the model's frame size, queried in the "first" mode (at most `tapvid_max_points` points, evenly
# subsampled) and scored at 256×256. With the embedded 64×64 model these are **not** comparable to the paper's
# CogVideoX numbers; use `model=<CogVideoX folder>` for that.

# %%
if not tapvid_path:
    print("tapvid_path is empty: TAP-Vid cell skipped (nothing is downloaded; point tapvid_path at your copy)")
else:
    tv_methods = {MAIN: methods[MAIN], "Lucas-Kanade (pyramidal, OpenCV)": methods["Lucas-Kanade (pyramidal, OpenCV)"]}
    tv_metrics = {n: {} for n in tv_methods}
    first = None
    for i, (name, ex) in enumerate(load_tapvid(tapvid_path)):
        if i >= tapvid_max_videos:
            break
        prep = prepare_tapvid_video(ex, size, tapvid_max_frames, tapvid_max_points)  # resized, "first" queries
        v, tq, gt, gv = prep["video"], prep["queries"], prep["gt"], prep["gt_visible"]
        for n, tracker in tv_methods.items():
            tr, vis = tracker(v, tq)
            for k, val in score_tracks(tq, tr, vis, gt, gv, size).items():
                tv_metrics[n][k] = np.concatenate([tv_metrics[n].get(k, np.zeros(0)), val])
            if first is None and n == MAIN:
                first = (name, v, tr, vis, gt, gv, tq[:, 0])
        print(f"{name}: {len(v)} frames, {len(tq)} queries")
    display(summary_table(tv_metrics)[COLS[:-1]].round(1))
    name, v, tr, vis, gt, gv, qf = first
    fig = track_strip(v, tr, vis, gt_tracks=gt, gt_visible=gv, query_frames=qf.astype(int), trail=trail,
                      scale=max(1, 256 // max(H, W)), title=f"TAP-Vid {name}: DiffTracker layer {layer}, step {step}")
    fig.savefig(FIG / "04_tapvid.png", dpi=110)
    plt.show()

# %%
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s; figures in {FIG}")
