"""Write the embedded model's card (difftrack/weights/mini-cogvideox/README.md) and its loss curve from the training
logs and the measured results (results/mini_model.json, results/mini_prompt_agreement.json)."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
W = ROOT / "difftrack/weights/mini-cogvideox"
sys.path.insert(0, str(ROOT))
from difftrack import mini  # noqa: E402

# The committed weights' lineage, oldest first: each run resumed from the one before; training_log.json is the last.
LINEAGE = (("run 1", "training_log_run1.json"), ("run 2", "training_log_run2.json"),
           ("round 4", "training_log_round4.json"), ("round 6", "training_log_round6.json"),
           ("round 7", "training_log_round7.json"), ("round 8", "training_log.json"))
named = [(n, json.loads((W / f).read_text())) for n, f in LINEAGE if (W / f).exists()]
names, runs = [n for n, _ in named], [r for _, r in named]
steps0, xs, ys = 0, [], []
for r in runs:
    for rec in r["log"]:
        xs.append(steps0 + rec["step"])
        ys.append(rec["loss"])
    steps0 += r["meta"]["steps"]
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(xs, ys, lw=0.8)
start = 0
for name, r in zip(names[1:], runs):  # a dashed line where each later run resumes
    start += r["meta"]["steps"]
    ax.axvline(start, color="grey", ls="--", lw=0.8)
    ax.text(start, max(ys), f" {name}", fontsize=7, va="top", color="grey")
ax.set(xlabel="optimizer step", ylabel="v-prediction MSE", yscale="log", title="Embedded mini CogVideoX: training loss")
fig.tight_layout()
(ROOT / "figures").mkdir(exist_ok=True)
fig.savefig(ROOT / "figures/mini_loss_curve.png", dpi=120)
fig.savefig(W / "loss_curve.png", dpi=100)

res = json.loads((ROOT / "results/mini_model.json").read_text()) if (ROOT / "results/mini_model.json").exists() else {}
pa = (json.loads((ROOT / "results/mini_prompt_agreement.json").read_text())
      if (ROOT / "results/mini_prompt_agreement.json").exists() else {})
cfg = mini.transformer_config()
meta = [r["meta"] for r in runs]
lines = [
    "# mini-cogvideox: the embedded default model of difftrack", "",
    "A small text-to-video diffusion transformer built from diffusers' own `CogVideoXTransformer3DModel` (the class of "
    "CogVideoX-2B/5B), trained by `scripts/train_mini.py` on the procedural world of `difftrack.world`.", "",
    "## Architecture",
    f"- Transformer: `CogVideoXTransformer3DModel`, {cfg['num_layers']} blocks, {cfg['num_attention_heads']} heads x "
    f"{cfg['attention_head_dim']}, full 3D attention over `[text ({mini.TEXT_LEN} tokens), video]`, 2B-style 3D sin-cos "
    "positions (no RoPE), patch 2.",
    f"- Video: {mini.FRAMES} frames of {mini.HEIGHT}x{mini.WIDTH} px. **No VAE**: a fixed invertible patching "
    "(`pixel_unshuffle` by 2) maps each frame to 32x32x12; with the transformer patch this gives 16x16 = 256 tokens a "
    "frame, each covering 4x4 px; no temporal compression.",
    "- Text encoder: `WorldTextEncoder`, closed vocabulary of the world's prompts (unknown words raise `ValueError`), "
    "2-layer transformer, trained jointly.",
    "- Scheduler: `CogVideoXDDIMScheduler` with CogVideoX-2B's settings (v-prediction, zero terminal SNR, "
    "snr_shift_scale 3, trailing spacing).",
    "- Weights: fp16 safetensors (EMA of the training weights).", "",
    "## Data", "Every batch is rendered fresh by `difftrack.world` (train split): 60% object videos (1-3 colour-tinted "
    "textured shapes moving, rotating, scaling, occluding, entering/leaving over a photo background that may drift) "
    "and 40% scene videos (a photo under camera pan, zoom or rotation). Textures: 12 photographs of scikit-image's "
    "bundled data plus 5 procedural textures; 4 photographs (chelsea, gravel, clock, retina) are held out for "
    "evaluation. Prompts are generated from the parameters (10% dropped for classifier-free guidance).", "",
    "## Training",
]
lines.append(f"The weights are the end of {len(meta)} runs, each resumed from the one before "
             f"({sum(m['steps'] for m in meta)} steps, {sum(m['minutes'] for m in meta):.1f} min in all); "
             "`training_log*.json` and `train_stdout*.log` beside the weights are their logs.")
for i, (name, m) in enumerate(zip(names, meta)):
    lines.append(f"- {name[0].upper() + name[1:]}: {m['steps']} steps, batch {m['batch_size']}, lr {m['lr']} (cosine)"
                 f"{', torch.compile' if m.get('compile') else ''}, seed {m.get('seed')}, {m['minutes']} min on "
                 f"{m.get('device_name')}, torch {m['torch']}, commit {str(m.get('commit'))[:7]}, final logged loss "
                 f"{m.get('final_loss')}" + (f", resumed from {names[i - 1]}" if i else ""))
lines += ["", "![loss](loss_curve.png)", "", "## Results (measured)"]
if res:
    lines += [
        f"Held-out world videos ({res['videos']}, photographs never seen in training), noised to the last of "
        f"{res['num_steps']} steps (t = {res['timestep']}), one forward, frame 0 -> every other frame, 10x10 grid, "
        f"visible points (`scripts/eval_mini.py` on {res.get('eval_device_name', 'cpu')}; the CPU forward on the 2-core CPU):", "",
        "| measure | value |", "|---|---|",
        f"| query-key matching within half a token (2 px), best layer ({res['best_layer']}) | **{res['qk_best_acc']}** |",
        f"| same within one token (4 px) | {res['qk_best_acc_1tok']} |",
        f"| block features, best layer ({res['feat_best_layer']}), half a token | {res['feat_best_acc']} |",
        f"| same architecture, random weights, half a token | {res['untrained_qk_best_acc']} |",
        f"| one forward at CFG batch 2 on the 2-core CPU | {res['cpu_forward_s_cfg2']} s |", "",
        "Per-layer query-key accuracy (half a token): " + ", ".join(f"L{i}: {a}" for i, a in
                                                                   enumerate(res["per_layer_qk_acc"])), ""]
if pa:
    pr = pa.get("protocol", {})
    lines += [f"Prompt agreement: **{pa.get('agreement'):.3f}** over {pa.get('n_videos')} generated videos at "
              f"{pr.get('steps')} steps, CFG {pr.get('cfg')}, on {', '.join(pa.get('devices', [])) or 'unknown'} "
              f"(commit {str(pa.get('commit', '?'))[:7]}); the same measure on the world's own renders of those "
              f"prompts: {pa.get('prompt_agreement_on_world_videos', float('nan')):.3f}; goal >= 0.8 "
              f"({'met' if pa.get('passes_target') else 'not met'}). The measure: results/mini_prompt_agreement.json. "
              f"Samples (first 16, title green = agrees):", "",
              "![samples](../../../figures/mini_samples_grid.png)", ""]
ss_file = ROOT / "results/scheduler_study.json"
if ss_file.exists():  # issue 20: few-step sampling on the CPU
    ss = json.loads(ss_file.read_text())
    lines += ["## Sampling in few steps", "`difftrack.mini.few_step_scheduler('dpm++' | 'unipc', pipe.scheduler.config)` "
              "swaps in a multistep solver on the trained schedule. Against the 50-step DDIM sample of the same "
              f"noise ({ss['settings']['prompts']} held-out prompts, {ss['device']}, `results/scheduler_study.json`):", "",
              "| sampler | mean PSNR to DDIM 50 (dB) | worst (dB) | prompt agreement | seconds a video (CPU) |",
              "|---|---|---|---|---|"]
    for k, v in ss["summary"].items():
        f = (lambda x: "-" if x is None else f"{x:.1f}")  # noqa: E731
        lines.append(f"| {k}{' (reference)' if v['reference'] else ''} | {f(v['psnr_db_mean'])} | {f(v['psnr_db_min'])} "
                     f"| {v['agreement']:.2f} | {v['seconds_per_video']:.1f} |")
    lines.append("")
rounds_file = ROOT / "results/train_rounds/rounds.json"
if rounds_file.exists():  # issue 20: every training round, kept or not, with its held-out evaluation
    rd = json.loads(rounds_file.read_text())
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines += ["## Training rounds (issue 20)", f"Held-out protocol: {rd['protocol']}.", "",
              "| round | what changed | steps | minutes | device | half token | one token | features | prompt agreement "
              "| kept | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rd["rounds"]:
        lines.append(f"| {r['name']} | {r['changed']} | {r['steps']} | {r['minutes']:.1f} | {r['device']} | "
                     f"{fmt(r['qk_half'])} | {fmt(r['qk_one'])} | {fmt(r['features_half'])} | "
                     f"{fmt(r.get('prompt_agreement'))} | {'yes' if r['kept'] else 'no'} | {r.get('note', '')} |")
    lines.append("")
for ab_file in sorted((ROOT / "results/train_rounds").glob("ab*/summary.json")):  # issue 30: recipe A/B rounds
    ab = json.loads(ab_file.read_text())
    f3 = lambda v: "-" if v is None else f"{v:+.3f}" if abs(v) < 0.1 else f"{v:.3f}"  # noqa: E731
    lines += [f"## Recipe A/B round `{ab['name']}` (issue 30)",
              (f"Every arm from the same weights (`{Path(ab['init']).name}`)" if not ab.get("resumed_from") else
               f"Every arm continued from its own weights of round "
               f"`{ab['resumed_from'].get('name') or ab['resumed_from']['dir']}`")
              + f", seed {ab['seed']}, trained side by side for "
              f"{ab['minutes_cap']:g} minutes on one {ab['device']} (commit {ab['commit'][:7]}, recipe "
              f"`{' '.join(ab['recipe'])}` plus the arm's flags); measures: prompt agreement of {ab['agreement_videos']} "
              f"videos at 50 steps, CFG 6, bf16 autocast; the motion words' share of the prompt's effect on object videos "
              f"(`scripts/prompt_probe.py`, mean over train/held-out and t = 900/600/300); held-out query-key matching "
              f"(`scripts/eval_mini.py`). {ab['how_to_read']}. Files: `{ab_file.parent.relative_to(ROOT)}/`.", "",
              "| arm | flags | steps | agreement | object direction | object colour | scenes | motion share | "
              "half token | one token | kept |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in ab["arms"].items():
        m = r["measures"]
        lines.append(f"| {name} | `{' '.join(r.get('flags', [])) or '-'}` | {r.get('steps', '-')} | "
                     f"{m['prompt_agreement']:.3f} | {m['object_direction_ok']:.3f} | {m['object_colour_ok']:.3f} | "
                     f"{m['scene_agreement']:.3f} | {f3(m['motion_share_objects_mean'])} | {m['qk_half_token']:.4f} | "
                     f"{m['qk_one_token']:.4f} | {'yes' if name in ab.get('kept', []) else 'no'} |")
    lines += (["", f"Verdict: {ab['verdict']}", ""] if ab.get("verdict") else [""])  # a blank line ends the table
tb_file = ROOT / "results/train_bench.json"
if tb_file.exists():
    tb = json.loads(tb_file.read_text())
    t, m = tb["results"], tb["meta"]
    lines += [f"Training throughput (`bench/bench_train.py`, {m['device']}, batch {m['batch_size']}, commit "
              f"{m['commit'][:7]}): rendering a batch {t['render_batch']['ms']:.0f} ms, a model step "
              f"{t['model_step']['ms']:.0f} ms ({t['model_step']['per_s']:.1f} steps/s; TF32 makes no difference under "
              f"bf16 autocast), both {t['render_and_step']['per_s']:.1f} steps/s"
              + (f"; under `torch.compile` {t['model_step_compiled']['ms']:.0f} ms ({t['model_step_compiled']['per_s']:.1f}"
                 f" steps/s, compiled in {t['compile_s']:.0f} s): `scripts/train_mini.py --compile`."
                 if "model_step_compiled" in t else "."), ""]
lines += ["## Load", "```python", "from difftrack.mini import load_default", "pipe = load_default()  # offline",
          "video = pipe('a red circle moving left on a still background', num_inference_steps=50).frames[0]", "```"]
(W / "README.md").write_text("\n".join(lines) + "\n")
print("wrote", W / "README.md")
