"""Fill the README's results section from results/*.json (re-run after any measurement)."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
R = ROOT / "results"


def load(name):
    p = R / name
    return json.loads(p.read_text()) if p.exists() else None


out = []
mm = load("mini_model.json")
if mm:
    out += ["### Embedded model (issue 4): matching inside its attention",
            f"Held-out world videos ({mm['videos']}, photographs never seen in training), noised to the last of "
            f"{mm['num_steps']} steps (t = {mm['timestep']}), one forward, frame 0 to every other frame, visible "
            f"points; measured on {mm.get('eval_device_name', 'cpu')} with `scripts/eval_mini.py`.", "",
            "| measure | value | goal |", "|---|---|---|",
            f"| query-key, best layer ({mm['best_layer']}), within half a token (2 px) | {mm['qk_best_acc']:.3f} | >= 0.65 |",
            f"| query-key, best layer, within one token (4 px) | {mm['qk_best_acc_1tok']:.3f} | >= 0.90 |",
            f"| block features, best layer ({mm['feat_best_layer']}), half a token | {mm['feat_best_acc']:.3f} | below QK |",
            f"| same architecture with random weights, half a token | {mm['untrained_qk_best_acc']:.3f} | |", "",
            "Per layer (half a token): " + " ".join(f"{a:.2f}" for a in mm["per_layer_qk_acc"]) +
            ". Two layers (8 and 11) dominate, as the paper finds for CogVideoX. **The goals are not met**: "
            "0.58 / 0.77 on 40 videos (an 8-video check had given 0.66 / 0.83); the model trained for 36 minutes "
            "of H100 time in all and its loss was still falling. See the model card "
            "(`difftrack/weights/mini-cogvideox/README.md`).", ""]
cc = load("capture_check.json")
if cc:
    out += ["### Capture is exact (issue 3)",
            f"Max abs output difference with and without capture, fp32 CPU, over {len(cc['max_abs_diff'])} "
            f"backbone/pipeline cases ({', '.join(cc['backbones_tested'])}): "
            f"**{max(cc['max_abs_diff'].values())}** (`results/capture_check.json`).", ""]
tb = load("tracking_benchmark.json")
if tb:
    out += ["### Zero-shot tracking (issue 6)", "", f"Source: `results/tracking_benchmark.json`.", ""]
    methods = tb.get("methods") or tb.get("results") or {}
    if isinstance(methods, dict) and methods:
        out += ["| method | δ_avg | AJ | OA | s / video (2-core CPU, loaded while measured) |", "|---|---|---|---|---|"]
        for name, m in methods.items():
            g = lambda k: m.get(k, m.get("metrics", {}).get(k))  # noqa: E731
            f = lambda v: "-" if v is None else (f"{v:.1f}" if v > 1.5 else f"{100 * v:.1f}")  # noqa: E731
            out.append(f"| {name} | {f(g('average_pts_within_thresh'))} | {f(g('average_jaccard'))} | "
                       f"{f(g('occlusion_accuracy'))} | {round(m['seconds_per_video'], 2) if m.get('seconds_per_video') else '-'} |")
        out.append("")
    out += ["**The embedded DiffTrack does not have the best δ_avg or AJ**: chained DIS optical flow and patch "
            "matching beat it on these 64x64 world videos. It does well on object videos but its matches barely "
            "follow camera motion on scene videos (see `per_family` and `error_breakdown_at_64px` in the JSON), where "
            "the 13-frame, 16x16-token model is weakest; NCC sub-pixel refinement on top of its matches "
            "(`difftrack+ncc`) narrows the gap.", "", "![tracks](figures/04_tracks_strip.png)", ""]
bg = load("bench_gpu.json")
if bg:
    meta = bg["meta"]
    out += ["### Performance at real scale (issue 8)",
            f"Full-size CogVideoX transformers with random weights, bf16, 480x720x49 (13 latent frames of 60x90), on "
            f"**{meta.get('device')}**, torch {meta.get('torch')}, diffusers {meta.get('diffusers')} "
            f"(`bench/bench_gpu.py`, `results/bench_gpu.json`).", "",
            "| measure | CogVideoX-2B | CogVideoX-5B | goal |", "|---|---|---|---|"]
    g2 = bg["models"].get("cogvideox-2b", {}).get("goals", {})
    g5 = bg["models"].get("cogvideox-5b", {}).get("goals", {})
    for key, label in (("one_layer_capture_overhead_b2", "capture + on-the-fly matching of 1 layer, extra time"),
                       ("all_layers_capture_ratio_b2", "same for all layers, ratio to a plain CFG step"),
                       ("capture_extra_peak_gib_max", "extra peak memory, GiB"),
                       ("tracking_speedup_with_vae", "tracking one 13-frame chunk: published recipe / ours (with VAE encode)"),
                       ("tracking_speedup_no_vae", "same without the VAE"),
                       ("cag_step_ratio_renormalized", "CAG step / CFG step (3-slot batch)"),
                       ("cag_step_ratio_shared_prefix_prototype", "CAG step / CFG step, shared-prefix prototype"),
                       ("cag_step_ratio_zero_after_softmax", "CAG step / CFG step, published zero-after-softmax variant")):
        a, b = g2.get(key, {}), g5.get(key, {})
        fmt = lambda d: "-" if not d else (f"{d['value']:.3f}" + (" ✓" if d.get("met") else " ✗"))  # noqa: E731
        out.append(f"| {label} | {fmt(a)} | {fmt(b)} | {(a or b).get('target', '')} |")
    out += ["", "Misses are reported as measured: the all-layer analysis costs 1.38-1.46x a CFG step (goal 1.2x); "
            "CAG in a plain 3-slot batch costs 1.48x (goal 1.3x), the shared-prefix prototype reaches 1.27x on 2B.",
            ""]
readme = (ROOT / "README.md").read_text()
start = readme.index("## Results")
readme = readme[:start] + "## Results\n\nFilled in from `results/*.json` by `scripts/write_readme_results.py`; every number says where " \
    "it was measured.\n\n" + "\n".join(out) + "\n" + (readme[readme.index("\n## ", start + 5):] if "\n## " in readme[start + 5:] else "")
(ROOT / "README.md").write_text(readme)
print("\n".join(out))
