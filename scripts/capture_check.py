"""results/capture_check.json: capture never changes what the model computes.

For every backbone adapter (tiny random configs of the real diffusers classes) and for pipeline loops, the max abs
difference of outputs with and without `capture(layers="all", what=q/k/features)`, in fp32 on the CPU (must be 0.0),
plus the seconds of the CPU test suite (`--suite` runs the README test command's pytest call and times it).
`--only TEXT ...` measures the rows whose name contains one of the TEXTs and merges them into the existing file
(other rows and fields kept; `row_commits` records the commit each merged row was measured at).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import tiny_cogvideox, tiny_inputs  # noqa: E402
from test_backbones import CASES  # noqa: E402

from difftrack.capture import capture  # noqa: E402
from difftrack.provenance import git_commit  # noqa: E402
from difftrack.testing import EXPERT_KINDS, KINDS, build_tiny_pipeline  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--suite", action="store_true", help="also time the CPU test suite")
p.add_argument("--out", default=str(ROOT / "results/capture_check.json"))
p.add_argument("--only", nargs="+", metavar="TEXT",
               help="measure only the rows whose name contains one of these texts and merge them into --out (the "
                    "other rows and fields are kept; the merged rows' commit goes to row_commits)")
args = p.parse_args()


def wanted(name: str) -> bool:
    return not args.only or any(t in name for t in args.only)


def bare(m, kw) -> float:
    """Max abs difference of every output of a bare forward (LTX-2: the video and the audio stream)."""
    ref = m(**kw)
    with capture(m, layers="all", what=("q", "k", "features"), branch="all"):
        out = m(**kw)
    return max(float((o - r).abs().max()) for o, r in zip(out, ref))


rows = {}
with torch.no_grad():
    for name, rope in (("CogVideoX-2B-style (sin-cos)", False), ("CogVideoX-5B-style (RoPE)", True)):
        if wanted(name + " bare forward"):
            rows[name + " bare forward"] = bare(tiny_cogvideox(rope=rope), tiny_inputs(rope=rope))
    for case, (build, inputs, _) in CASES.items():
        if wanted(f"{case} bare forward"):
            rows[f"{case} bare forward"] = bare(build(), inputs())


from test_real_pipelines import call_kwargs, run  # noqa: E402

for kind in KINDS + EXPERT_KINDS:  # wan22: Wan 2.2 A14B's two experts, one step on each
    name = f"{kind} tiny pipeline loop (2 steps)" + (", both experts" if kind in EXPERT_KINDS else "")
    if not wanted(name):
        continue
    pipe = build_tiny_pipeline(kind)
    kw = call_kwargs(kind, pipe, output_type="latent")
    ref = run(pipe, kw)
    with capture(pipe, layers="all", what=("q", "k", "features"), branch="all"):
        out = run(pipe, kw)
    rows[name] = float((out - ref).abs().max())

from difftrack import mini  # noqa: E402

name = "embedded MiniVideoPipeline loop (CFG 6, 3 steps)"
if wanted(name):
    pipe = mini.load_default()
    kw = dict(prompt="a red circle moving left on a still background", num_inference_steps=3, num_frames=5,
              progress=False, output_type="latent")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    with capture(pipe, layers="all", what=("q", "k", "features")):
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    rows[name] = float((out - ref).abs().max())

if args.only:
    if not rows:
        sys.exit(f"--only {args.only}: no row matches")
    res = json.loads(Path(args.out).read_text())
    res["max_abs_diff"].update(rows)
    res["all_zero"] = all(v == 0.0 for v in res["max_abs_diff"].values())
    res["backbones_tested"] = sorted({k.split(" ")[0] for k in res["max_abs_diff"]})
    res.setdefault("row_commits", {}).update({k: git_commit() for k in rows})
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res["max_abs_diff"][k] for k in rows}, indent=1))
    sys.exit(0 if all(v == 0.0 for v in rows.values()) else 1)

res = dict(max_abs_diff=rows, all_zero=all(v == 0.0 for v in rows.values()), dtype="float32", device="cpu",
           backbones_tested=sorted({k.split(" ")[0] for k in rows}), torch=torch.__version__)
if args.suite:
    t0 = time.time()
    # the README test command's pytest run: tests/ (browser test included) + nbval of notebooks/
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "notebooks",
                        "--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout=1200", "-rf"],
                       cwd=ROOT, capture_output=True, text=True)
    res["cpu_test_suite_command"] = "pytest tests notebooks --nbval-lax (bash scripts/lab.sh test without set-up)"
    res["cpu_test_suite_machine"] = f"{os.cpu_count()} CPU cores, no GPU"
    res["cpu_test_suite_seconds"] = round(time.time() - t0, 1)
    res["cpu_test_suite_summary"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    res["cpu_test_suite_failed"] = [l.split(" - ")[0] for l in r.stdout.splitlines() if l.startswith("FAILED")]
res["commit"] = git_commit()
Path(args.out).write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
