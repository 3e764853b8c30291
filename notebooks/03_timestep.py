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
# # 03 · Timesteps: how matching and attention evolve during denoising
#
# Reproduces the paper's **Fig. 4c** (query-key matching accuracy over denoising steps for the top layers) and
# **Fig. 5** (share of attention a point's frame-0 token puts on its own frame / other frames / text over steps).
# A slider picks the layer (-1 = mean over layers).
#
# **What it does not do:** it analyses the embedded 12-layer model with a CI-sized number of steps (4 by default,
# 50 in the paper: `papermill -f notebooks/params/full.yaml`); "steps" are denoising-loop indices (0 = noisiest);
# world videos are analysed by noising the clean video to each step (one forward per step), generated videos along
# their own sampling trajectory, as the paper does for real and generated videos. Accuracy is the project's scoring
# protocol; the headline numbers are also given under the published protocol (argmax + interpolation, every frame
# scored with frame 0; on the embedded model latent frames are video frames, so the published 13 -> 49 frame
# interpolation is the identity; `docs/conventions.md`).

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
layer: int = -1  # layer shown first in the per-layer view (-1: mean over layers)

# %%
# every parameter is checked here, before any model load or file write: a bad value fails at once, naming it
from difftrack.params import check_notebook

params_ok = check_notebook("03_timestep", globals())  # also reads the model's block count from its config files

# %%
# %matplotlib inline
import json

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from tqdm.auto import tqdm

from difftrack import analysis, paths, viz
from difftrack import inspect_attn as ia
from difftrack.experiments import analysis as xa
from difftrack.experiments import paper_results
from difftrack.sliders import slider_panel  # slider widgets drawn in the kernel (headless runs never stall)
from difftrack.world import FAMILIES, World

# %% [markdown]
# ## Per-video analysis (cached)

# %%
torch.manual_seed(seed)
FIG, RES = paths.figures_dir(), paths.results_dir()
run = xa.run_notebook_analysis(model, device, dtype, size, videos_per_family, exact_per_family, seed, num_steps,
                               grid_size)  # per-video cache: a rerun with the same parameters skips the model
pipe, runner, size, items, timesteps = run.pipe, run.runner, run.size, run.items, run.timesteps
results, grouped = run.results, run.grouped
L = grouped["all"]["qk_acc"].shape[1]
S = num_steps
top3 = analysis.top_layers(grouped["all"]["hm"], k=min(3, L), step=-1)
print("top-3 layers by harmonic mean at the last step:", top3)


# %% [markdown]
# ## Fig. 4c -- matching accuracy over denoising steps

# %%
def acc_series(name: str, layers) -> dict:
    g = grouped[name]
    out = {f"layer {l}": g["qk_acc"][:, l] for l in layers}
    out["mean over layers"] = g["qk_acc"].mean(1)
    return out

fig = viz.step_lines(acc_series("all", top3), "query-key matching accuracy (%)", timesteps,
                     title=f"Live run ({len(items)} videos, {S} steps): accuracy over steps, top-3 layers",
                     save=FIG / "03_fig4c_acc_over_steps_live.png")
fig

# %%
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
pd.DataFrame({"step": range(S), "timestep": timesteps, **{f"share_{p}": v for p, v in share_mean.items()}}) \
    .to_csv(RES / "03_attention_share.csv", index=False)
best = int(np.argmax(grouped["all"]["qk_acc"][-1]))
acc_best = grouped["all"]["qk_acc"][:, best]
by_protocol = xa.protocol_summaries(grouped)  # both scoring protocols, recorded in the same run
claims = dict(best_layer=best, acc_best_first=float(acc_best[0]), acc_best_last=float(acc_best[-1]),
              acc_best_peak_step=int(np.argmax(acc_best)), top3=top3,
              cross_share_first=float(share_mean["cross"][0]), cross_share_last=float(share_mean["cross"][-1]),
              text_share_first=float(share_mean["text"][0]), text_share_last=float(share_mean["text"][-1]),
              per_subset=by_protocol["difftrack"], per_subset_published=by_protocol["published"])
(RES / "03_summary.json").write_text(json.dumps(dict(
    settings=dict(model=model, videos_per_family=videos_per_family, exact_per_family=exact_per_family,
                  num_steps=num_steps, grid_size=grid_size, device=device, dtype=dtype, seed=seed),
    timesteps=timesteps, **claims), indent=2, default=float))
print(f"best layer {best}: accuracy {100 * acc_best[0]:.1f} % at step 0 -> {100 * acc_best[-1]:.1f} % at step {S - 1}"
      f" (peak at step {claims['acc_best_peak_step']})")
display(xa.headline_frame(by_protocol))
# Numeric claims: matching emerges during denoising (the paper's Fig. 4c), loose at CI size
if runner.kind == "embedded":  # the paper's finding, checked on the trained embedded model
    assert acc_best[-1] > acc_best[0], "matching accuracy should improve from the noisiest to the last step"
assert np.allclose(sum(share_mean.values()), 1, atol=1e-3), "self + cross + text attention shares sum to 1"

# %% [markdown]
# ## Fig. 5 -- where the attention goes over denoising steps
#
# The summed attention of a frame-0 point's query on its own frame (self), on the other frames (cross) and on the
# text tokens, for points visible at frame 0 -- mean over layers here; the slider below shows single layers.

# %%
fig = viz.attention_share(share_mean, timesteps,
                          title=f"Live run ({len(items)} videos, {S} steps): attention share (mean over layers)",
                          save=FIG / "03_fig5_attention_share_live.png")
fig

# %% [markdown]
# ## Fig. 4c and Fig. 5 at paper scale
#
# From the committed paper-scale run (`results/analysis_summary.json`, `scripts/paper_scale.py`: 80 videos, 50 steps);
# the live run above is CI-sized.

# %%
paper = paper_results.load_analysis() if model == "embedded" else None  # the committed run is the embedded model's
if paper is None:
    print("no paper-scale analysis of this model committed (results/analysis_summary.json holds the embedded "
          "model's; run scripts/paper_scale.py on a GPU)")
else:
    P, ptop3 = paper.tables, paper.summary["all"]["best_layers_top3"]
    pser = {f"layer {l}": P["all"]["qk_acc"][:, l] for l in ptop3}
    pser["mean over layers"] = P["all"]["qk_acc"].mean(1)
    fig = viz.step_lines(pser, "query-key matching accuracy (%)", paper.timesteps,
                         title="Fig. 4c: accuracy over steps, top-3 layers (all videos)")
    display(viz.captioned(fig, paper.caption, save=FIG / "03_fig4c_acc_over_steps.png"))
    pshare = {p: P["all"][f"attn_{p}"].mean(1) for p in ia.PARTS}
    fig = viz.attention_share(pshare, paper.timesteps, title="Fig. 5: attention share over steps (mean over layers)")
    display(viz.captioned(fig, paper.caption, save=FIG / "03_fig5_attention_share.png"))
    display(xa.headline_frame({paper.protocol: paper.summary, "published": paper.published_summary}))
    if paper.published_summary is None:
        print("published protocol: not recorded in this summary (re-run the analysis stage of scripts/paper_scale.py)")


# %% [markdown]
# ## Per-layer view
#
# The matching accuracy (query-key and feature, per subset) and the attention share of one layer over the steps;
# `-1` is the mean over layers.

# %%
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

# %%
# NBVAL_IGNORE_OUTPUT
s_layer = widgets.IntSlider(value=layer, min=-1, max=L - 1, description="layer", continuous_update=False)
display(slider_panel(show_layer, {"layer": s_layer}))  # show_layer returns two figures: both are shown
