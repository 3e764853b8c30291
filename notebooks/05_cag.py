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
# # 05 · Cross-Attention Guidance (CAG) on the embedded model
#
# Reproduces the *protocol* of **DiffTrack §5, Table 2 and Table A.5**: sampling with Cross-Attention Guidance, a
# perturbed-attention guidance whose perturbed model cannot attend across frames in the chosen layers,
#
# `v = v_u + w_cfg (v_c − v_u) + s_cag (v_c − v_p)`,
#
# compared with plain CFG, and CAG on the **3 dominant layers** (those with the strongest temporal matching) against CAG
# on the **3 least-dominant layers** (the paper's control), on the same prompts and noise seeds, across guidance scales.
#
# What the notebook shows:
#
# 1. **Side-by-side videos** without and with CAG (a static figure, then sliders for the CAG scale, the layer set and
#    the prompt over precomputed videos); the ground-truth world render of the same prompt is shown for reference.
# 2. **Measured time per denoising step**, plain CFG vs CAG (3-slot batch `[uncond, cond, perturbed]`), on this machine.
# 3. **A metrics table and metric-vs-scale plot**: our own motion and consistency measures (`difftrack.cag_eval`):
#    prompt agreement (colour + motion direction measured with OpenCV), object integrity (Lucas–Kanade tracks that
#    survive a forward-backward round trip over all frames), warp error under DIS optical flow, motion magnitude, and a
#    per-frame quality proxy (Laplacian variance, so that a guidance cannot win by blurring).
#    When `results/cag.json` from `scripts/run_cag_eval.py` (100 prompts × 7 settings × 50 steps, run on a GPU) exists,
#    the table and plot show it; otherwise they show this notebook's own small run.
#
# What it does **not** do:
#
# * **No VBench and no user study.** The paper reports VBench Subject/Background Consistency, Dynamic Degree and
#   Imaging Quality plus a 2AFC study; those need large pretrained scorers and raters. The measures here are our own,
#   defined for 64×64 world videos, and are not comparable to the paper's numbers.
# * **Not CogVideoX-2B/5B.** The embedded model is a 12-block CogVideoX-class DiT trained on the procedural world
#   (64×64, 13 frames); the dominant layers are its own (`results/analysis_summary.json`, else 8, 11, 5).
# * **The CI-sized defaults are a smoke run** (2 prompts, 2 steps, one scale): their numbers are noise. Paper-scale:
#   `python scripts/run_cag_eval.py --phase all --prompts 100 --steps 50 --scales 0.5 1 2 --device cuda --autocast bf16`.

# %% tags=["parameters"]
n_prompts: int = 2  # prompts of this notebook's own run (world prompts, families alternate: objects, scenes)
num_steps: int = 2  # denoising steps of this notebook's own run (the full evaluation uses 50)
scales: list = [1.0]  # CAG scales of this notebook's own run (the full evaluation: 0.5, 1, 2)
guidance_scale: float = 6.0  # classifier-free guidance weight w_cfg (the paper's CogVideoX runs use 6)
variant: str = "renormalized"  # CAG perturbation: "renormalized" or "zero_after_softmax" (published CFG path)
prompt_index: int = 0  # prompt shown by default in the figures and sliders
scale: float = 1.0  # CAG scale shown by default (one of `scales`)
layer_set: str = "top3"  # layer set shown by default: "top3" (dominant) or "bottom3" (least dominant)
threads: int = 2  # torch CPU threads
device: str = ""  # empty: cuda when available, else cpu

# %%
# every parameter is checked here, before any model load or file write: a bad value fails at once, naming it
from difftrack.params import check_notebook

params_ok = check_notebook("05_cag", globals())  # also reads the model's block count from its config files

# %%
# %matplotlib inline
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

from difftrack import cag_eval as E
from difftrack import mini, viz
from difftrack.experiments import cag as X
from difftrack.experiments import paper_results, read_record, write_record
from difftrack.paths import cache_dir, figures_dir, results_dir
from difftrack.sliders import slider_panel  # slider widgets drawn in the kernel (headless runs never stall)
from difftrack.world import World

FIG, RES = figures_dir(), results_dir()
t_start = time.perf_counter()
torch.set_num_threads(threads)
dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
scales = [float(s) for s in scales]  # scale, layer_set, prompt_index: checked with the parameters above

# %% [markdown]
# ## Layers, prompts and settings
#
# The dominant layers come from the layer analysis (`results/analysis_summary.json`, written by
# `scripts/run_analysis.py`); the least-dominant ones from the same ranking when it is stored, else the colleague's
# ranking of the embedded model (bottom: 0, 6, 9). Prompts are world prompts of the held-out split; each prompt has one
# noise seed, shared by every setting.

# %%
layers = X.layer_sets()
items = E.eval_prompts(n_prompts)
settings = X.cag_settings(layers, scales)
print(f"dominant layers {layers['top3']}, least-dominant {layers['bottom3']}  (source: {layers['source']})")
print(f"{len(items)} prompts x {len(settings)} settings: {list(settings)}")
for it in items:
    print(f"  [{it['index']}] {it['prompt']}  (noise seed {it['noise_seed']})")

# %% [markdown]
# ## Generation, and time per denoising step
#
# One pipeline call per setting generates all prompts (batch `n_prompts`; CAG adds the perturbed slot to the batch).
# Videos are cached under `cache/cag_notebook/`, so a re-run only scores. The time per step is the median wall-clock
# time of the steps after the first.

# %%
pipe = mini.load_default(dev)
pipe.set_progress_bar_config(disable=True)
run_dir = cache_dir("cag_notebook") / f"steps{num_steps}_cfg{guidance_scale:g}_{variant}"
videos, step_seconds = {}, {}
for name, s in settings.items():
    videos[name], sec = X.setting_videos(pipe, items, run_dir, name, s, num_steps, guidance_scale, variant,
                                         batch_size=n_prompts)
    if sec is not None:  # the timing of the run that generated the cached videos, kept for re-runs
        step_seconds[name] = sec
world = World()
world_videos = [world.sample(it["world_seed"], it["family"], "heldout").video for it in items]
timing = pd.DataFrame([dict(setting=k, seconds_per_step=v, videos_per_batch=n_prompts,
                            over_plain=v / step_seconds["none"] if "none" in step_seconds else float("nan"))
                       for k, v in step_seconds.items()]).set_index("setting") if step_seconds else None
print(f"device {dev}, {torch.get_num_threads()} threads" + ("" if timing is not None else "; all videos cached"))
display(timing)


# %% [markdown]
# ## Side by side: without and with CAG
#
# Rows: the ground-truth world render of the prompt, the plain CFG sample, CAG on the dominant layers and CAG on the
# least-dominant layers at the default scale; columns: evenly spaced frames.

# %%
def side_by_side(scale, layer_set, prompt_index, save=None):
    rows = {"world (prompt's ground truth)": world_videos[prompt_index], "no CAG": videos["none"][prompt_index]}
    keys = [layer_set] + [k for k in ("top3", "bottom3") if k != layer_set]
    for k in keys:
        rows[f"CAG {k} {layers[k]} s={scale:g}"] = videos[f"{k}_s{scale:g}"][prompt_index]
    return viz.plot_side_by_side(rows, title=items[prompt_index]["prompt"], save=save)


# live run: displayed; saved only at >= 50 steps (fewer steps give smears, the paper-scale figure is below)
fig = side_by_side(float(scale), layer_set, prompt_index,
                   save=FIG / "05_cag_side_by_side.png" if num_steps >= paper_results.MIN_STEPS else None)
plt.show()

# %% [markdown]
# ### The same at paper scale
#
# `figures/05_cag_side_by_side.png` shows the committed 50-step videos of the paper-scale CAG evaluation
# (`results/paper_videos.npz`, `scripts/paper_scale.py`) for the first prompt at scale 1.

# %%
paper_cag = paper_results.load_videos("cag/")
if not paper_cag:
    print("no committed paper-scale CAG videos (results/paper_videos.npz); run scripts/paper_scale.py on a GPU")
else:
    first = min(int(k.split("/")[-1]) for k in paper_cag)
    pick = {k.split("/")[1]: (v, m) for k, (v, m) in paper_cag.items() if int(k.split("/")[-1]) == first}
    it0 = E.eval_prompts(first + 1)[first]
    prow = {"world (prompt's ground truth)": World().sample(it0["world_seed"], it0["family"], "heldout").video,
            "no CAG": pick["none"][0]}
    for name in ("top3_s1", "bottom3_s1"):
        if name in pick:
            prow[f"CAG {name.split('_')[0]} {pick[name][1]['layers']} s=1"] = pick[name][0]
    fig = viz.plot_side_by_side(prow, title=pick["none"][1]["prompt"])
    m = pick["none"][1]
    fig = viz.captioned(fig, f"paper-scale CAG run: {m['steps']} steps, CFG 6, layers from the measured ranking, on "
                             f"{m['device']} (results/paper_videos.npz, results/cag.json)",
                        save=FIG / "05_cag_side_by_side.png")
    plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
w_scale = widgets.SelectionSlider(options=scales, value=float(scale), description="CAG scale",
                                  continuous_update=False)
w_layers = widgets.Dropdown(options=["top3", "bottom3"], value=layer_set, description="layer set")
w_prompt = widgets.IntSlider(value=prompt_index, min=0, max=n_prompts - 1, description="prompt",
                             continuous_update=False)
display(slider_panel(side_by_side, {"scale": w_scale, "layer_set": w_layers, "prompt_index": w_prompt}))

# %% [markdown]
# ## Measures of this notebook's run
#
# Every video is scored with `difftrack.cag_eval.score_video`; the world renders of the same prompts are scored too,
# as a reference (the measures' ceiling on videos that show exactly the prompt). CAG rows show the paired difference to
# no CAG in brackets.

# %%
scores = {name: [E.score_video(v, it["prompt"]) for v, it in zip(vs, items)] for name, vs in videos.items()}
world_scores = [E.score_video(v, it["prompt"]) for v, it in zip(world_videos, items)]
own = dict(
    source="notebook",
    description="notebooks/05_cag.ipynb, CI-sized run (see results/cag.json from scripts/run_cag_eval.py for the "
                "full evaluation)",
    protocol=dict(n_prompts=n_prompts, n_seeds_per_prompt=1, n_videos_per_setting=n_prompts, steps=num_steps,
                  cfg=guidance_scale, cag_variant=variant, layers=layers, scales=scales, device=dev),
    prompt_agreement_on_world_videos=E.summarize(world_scores, measures=("agree",))["agree"]["mean"],
    world_reference=dict(n_videos=n_prompts, summary=E.summarize(world_scores)),
    settings={name: dict(s, n_videos=n_prompts,
                         summary=E.summarize(scores[name], None if name == "none" else scores["none"]))
              for name, s in settings.items()},
    timing=dict(notebook_cpu_step_seconds={k: dict(seconds_per_step=v, batch=n_prompts)
                                           for k, v in step_seconds.items()}),
)
display(X.metrics_table(own["settings"]))
print(f"prompt agreement of the measure on the world renders of these prompts: "
      f"{own['prompt_agreement_on_world_videos']:.2f}")

# %% [markdown]
# ## Full evaluation: metrics table and metric vs scale
#
# `results/cag.json` holds the full evaluation when `scripts/run_cag_eval.py` has been run (100 prompts, 50 steps, 3
# scales; every measure for every setting, with counts, paired differences to no CAG and their 95% intervals, and the
# measured time per step). Without it, this section shows the notebook's own run.

# %%
full_path = RES / "cag.json"
full = read_record(X.CagResult, full_path).to_json() if full_path.exists() else None
shown = full if (full is not None and full.get("source") != "notebook") else own
label = "full run, scripts/run_cag_eval.py" if shown is full else "this notebook's CI-sized run"
p = shown["protocol"]
print(f"showing: {label}: {p['n_prompts']} prompts x {p['n_seeds_per_prompt']} seed, {p['steps']} steps, "
      f"CFG {p['cfg']:g}, variant {p['cag_variant']}, layers top {p['layers']['top3']} / bottom "
      f"{p['layers']['bottom3']}, scales {p['scales']}")
display(X.metrics_table(shown["settings"]))
print("world renders (reference):")
display(X.metrics_table({"world": dict(layer_set="-", scale=float("nan"), summary=shown["world_reference"]["summary"])}))
if shown.get("conclusion"):
    print(shown["conclusion"])

# %%
fig = viz.plot_metric_vs_scale(shown["settings"], save=FIG / "05_cag_metric_vs_scale.png")
plt.show()

# %% [markdown]
# ## Time per step
#
# Plain CFG runs a batch of 2 slots per video (`[uncond, cond]`), CAG 3 (`[uncond, cond, perturbed]`) plus the
# frame-local attention of the perturbed slot in the chosen layers, so CAG is expected to cost about 1.5× a plain step
# (the paper does not report it; a secondary summary says +77%).

# %%
rows = []
for dev_key, g in shown.get("timing", {}).get("generation", {}).items():
    for name, v in g.items():
        rows.append(dict(source=f"generation, {dev_key}", setting=name, batch=v["batch"],
                         seconds_per_step=v["step_seconds"], over_plain=v.get("over_plain", 1.0)))
for key, v in shown.get("timing", {}).get("per_step", {}).items():
    rows.append(dict(source=f"timed, {key}", setting="plain CFG", batch=v["batch"],
                     seconds_per_step=v["plain_cfg_s_per_step"], over_plain=1.0))
    rows.append(dict(source=f"timed, {key}", setting="CAG top3", batch=v["batch"],
                     seconds_per_step=v["cag_s_per_step"], over_plain=v["cag_over_plain"]))
nb_t = own["timing"]["notebook_cpu_step_seconds"]
plain_t = nb_t.get("none", {}).get("seconds_per_step", float("nan"))
for name, v in nb_t.items():
    rows.append(dict(source=f"this notebook, {dev}", setting=name, batch=v["batch"],
                     seconds_per_step=v["seconds_per_step"], over_plain=v["seconds_per_step"] / plain_t))
display(pd.DataFrame(rows))

# %% [markdown]
# ## Save
#
# This run goes to `results/cag_notebook.json`, without its timings (they depend on the machine and its load, so a
# re-run would change a tracked file; they are shown above and kept with the cached videos under
# `cache/cag_notebook/`). `results/cag.json` is written only when it is absent or was itself written by this
# notebook, so a full script run is never overwritten.

# %%
record = X.CagResult.from_json({k: v for k, v in own.items() if k != "timing"})
write_record(RES / "cag_notebook.json", record)
if full is None or full.get("source") == "notebook":
    write_record(full_path, record)
print(f"wrote {RES / 'cag_notebook.json'}" + (f" and {full_path}" if shown is own else ""))

# checks
assert set(E.MEASURES) <= set(own["settings"]["none"]["summary"])
assert all(v.shape == (mini.FRAMES, mini.HEIGHT, mini.WIDTH, 3) for vs in videos.values() for v in vs)
assert own["prompt_agreement_on_world_videos"] >= 0.5, "the agreement measure should accept the world renders"
if shown is full:
    assert p["n_prompts"] >= 100 and len(shown["settings"]) == 1 + 2 * len(p["scales"]), p
print(f"notebook wall time {time.perf_counter() - t_start:.0f} s")
