"""results/capture_check.json: capture never changes what the model computes.

For every backbone adapter (tiny random configs of the real diffusers classes) and for pipeline loops, the max abs
difference of outputs with and without `capture(layers="all", what=q/k/features)`, in fp32 on the CPU (must be 0.0),
plus the seconds of the CPU test suite (`--suite` runs the README test command's pytest call and times it).
`--only NAME ...` measures only the rows whose name contains one of the NAMEs and merges them into the existing
file (other rows and fields kept; `row_commits` records the commit each merged row was measured at).
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
from difftrack.testing import KINDS, build_tiny_pipeline  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--suite", action="store_true", help="also time the CPU test suite")
p.add_argument("--out", default=str(ROOT / "results/capture_check.json"))
p.add_argument("--only", nargs="+", default=None, metavar="NAME",
               help="measure only rows whose name contains one of these and merge them into --out")
args = p.parse_args()


def wanted(row: str) -> bool:
    return args.only is None or any(n in row for n in args.only)


rows = {}
with torch.no_grad():
    for name, rope in (("CogVideoX-2B-style (sin-cos)", False), ("CogVideoX-5B-style (RoPE)", True)):
        if not wanted(name + " bare forward"):
            continue
        m, kw = tiny_cogvideox(rope=rope), tiny_inputs(rope=rope)
        ref = m(**kw)[0]
        with capture(m, layers="all", what=("q", "k", "features"), branch="all"):
            out = m(**kw)[0]
        rows[name + " bare forward"] = float((out - ref).abs().max())
    for case, (build, inputs, _) in CASES.items():
        if not wanted(f"{case} bare forward"):
            continue
        m, kw = build(), inputs()
        ref = m(**kw)
        with capture(m, layers="all", what=("q", "k", "features"), branch="all"):
            out = m(**kw)
        # every output (LTX-2: the video and the audio stream)
        rows[f"{case} bare forward"] = max(float((o - r).abs().max()) for o, r in zip(out, ref))


from test_real_pipelines import call_kwargs, run  # noqa: E402

for kind in KINDS:
    if not wanted(f"{kind} tiny pipeline loop (2 steps)"):
        continue
    pipe = build_tiny_pipeline(kind)
    kw = call_kwargs(kind, pipe, output_type="latent")
    ref = run(pipe, kw)
    with capture(pipe, layers="all", what=("q", "k", "features"), branch="all"):
        out = run(pipe, kw)
    rows[f"{kind} tiny pipeline loop (2 steps)"] = float((out - ref).abs().max())

from difftrack import mini  # noqa: E402

if wanted("embedded MiniVideoPipeline loop (CFG 6, 3 steps)"):
    pipe = mini.load_default()
    kw = dict(prompt="a red circle moving left on a still background", num_inference_steps=3, num_frames=5,
              progress=False, output_type="latent")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    with capture(pipe, layers="all", what=("q", "k", "features")):
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    rows["embedded MiniVideoPipeline loop (CFG 6, 3 steps)"] = float((out - ref).abs().max())
if not rows:
    raise SystemExit(f"--only {args.only}: no row matches; nothing measured")

if args.only is not None and Path(args.out).is_file():  # merge the measured rows into the existing file
    res = json.loads(Path(args.out).read_text())
    res["max_abs_diff"].update(rows)
    row_commits = res.setdefault("row_commits", {})
    row_commits.update({k: git_commit() for k in rows})
    rows = res["max_abs_diff"]
    res.update(all_zero=all(v == 0.0 for v in rows.values()), backbones_tested=sorted({k.split(" ")[0] for k in rows}))
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: rows[k] for k in row_commits}, indent=1))
    raise SystemExit(0 if res["all_zero"] else 1)

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
