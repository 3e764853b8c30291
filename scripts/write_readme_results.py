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
    if mm.get("cpu_forward_s_cfg2") is not None:
        out += [f"One transformer forward at CFG batch 2 on the CPU: **{mm['cpu_forward_s_cfg2']:.2f} s** (best of 3; "
                f"median {mm.get('cpu_forward_s_cfg2_median', float('nan')):.2f} s; {mm.get('cpu', 'cpu')}, "
                f"{mm.get('cpu_threads')} threads; goal <= 3 s).", ""]
st = load("subtoken_refinement.json")
if st:
    tr, ho = st["train"]["rules"], st["heldout"]["rules"]
    base = "softargmax r1"
    ch = st["chosen_on_train"]
    out += ["Sub-token refinement (`scripts/subtoken_study.py`, CPU, "
            f"{st['videos_per_split']} videos per split, same protocol): the rule chosen on **train-split** videos is "
            f"`{ch}`; on held-out videos it gives {st['heldout_at_chosen']['half']:.3f} within half a token and "
            f"{st['heldout_at_chosen']['one']:.3f} within one token, against {max(ho[base]['half']):.3f} / "
            f"{max(ho[base]['one']):.3f} for the 3x3 soft-argmax above (argmax alone: {max(ho['argmax']['half']):.3f}; "
            f"parabola fit {max(ho['parabola']['half']):.3f}; published match-map interpolation "
            f"{max(ho['paper']['half']):.3f}). Train-split videos reach {max(tr[ch]['half']):.3f}: the gap to the goal "
            "is the model's generalisation to unseen textures, not the refinement rule.", ""]
cc = load("capture_check.json")
if cc:
    out += ["### Capture is exact (issue 3)",
            f"Max abs output difference with and without capture, fp32 CPU, over {len(cc['max_abs_diff'])} "
            f"backbone/pipeline cases ({', '.join(cc['backbones_tested'])}): "
            f"**{max(cc['max_abs_diff'].values())}** (`results/capture_check.json`)."
            + (f" The test suite (`{cc.get('cpu_test_suite_command', 'pytest')}`) took "
               f"**{cc['cpu_test_suite_seconds']:.0f} s** on {cc.get('cpu_test_suite_machine', 'the CPU')} "
               f"({cc.get('cpu_test_suite_summary', '')})." if cc.get("cpu_test_suite_seconds") else ""), ""]
an = load("analysis_summary.json")
if an:
    out += ["### Correspondence analysis (issue 5)"]
    if "combined" in an:
        c = an["combined"]
        out += [f"{an['counts']['generated']} generated + {an['counts']['exact']} exact-GT videos, {an['settings']['steps']} "
                f"steps, on {an.get('device')}: query-key best {c['qk_best_acc']:.3f} vs features {c['feat_best_acc']:.3f}; "
                f"top-3 layers {c['best_layers_top3']}; HM top-3 / median {c['hm_top3_over_median']:.2f}; accuracy "
                f"last / first step {c['acc_last_over_first_step']:.2f}."]
    else:
        out += ["The full-scale record (20 + 20 generated, 20 exact-GT videos, 50 steps) **has not been run**: it needs "
                "the GPU (the first session spent its device time on training and benchmarks, the second had none; on the 2-core CPU one 50-step CFG generation takes "
                "about 3 minutes). The notebooks' CI-sized numbers are in `results/02_summary.json` and "
                "`results/03_summary.json`."]
    t = an.get("timing")
    if t:
        out += ["", f"Cost of the analysis (all {t.get('grid', 10) ** 2} grid points, every layer and step recorded "
                f"on the fly) for one {t['timing_steps']}-step generation on {t.get('device')}: "
                f"**{t['analysis_time_ratio']:.2f}x** the time of the plain generation ({t['analysis_seconds']:.0f} s vs "
                f"{t['plain_seconds']:.0f} s; goal <= 1.5x) and **{t['analysis_extra_peak_mib']:.0f} MiB** extra peak "
                f"resident memory (goal <= 1 GiB), separate processes (`scripts/run_analysis.py --timing-only`)."]
    out += [""]
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
