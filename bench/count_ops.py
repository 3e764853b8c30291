"""Count the tensor operations (ATen dispatches) that the analysis path adds to a plain generation, on the CPU.

On a GPU each of these is at least one kernel launch, and device->host reads (``.cpu()``, ``.item()``, ``float(t)``)
stall the launch queue; with a model as small as the embedded one the analysis time is launch-bound, so this count is
the CPU-measurable proxy of its GPU cost. Reads of a CUDA tensor into host memory are counted as the ``_to_copy`` /
``_local_scalar_dense`` ops whose source is not on the CPU, which the CPU cannot show: instead this counts every
``_to_copy`` and ``_local_scalar_dense`` (upper bound).

    python bench/count_ops.py --steps 3 [--out bench/count_ops.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from difftrack import analysis, mini  # noqa: E402
from difftrack.provenance import git_commit  # noqa: E402
from difftrack.runners import VideoRunner  # noqa: E402


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grid", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    runner = VideoRunner(mini.load_default())
    runner.pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle moving left on a still background"
    res = {}
    for mode in ("plain", "analysis"):
        c = Count()
        t0 = time.perf_counter()
        with c:
            if mode == "plain":
                runner.generate(prompt, 0, a.steps)
            else:
                analysis.analyze_generation(runner, prompt, 0, num_steps=a.steps, grid_size=a.grid)
        res[mode] = dict(ops=sum(c.ops.values()), seconds=time.perf_counter() - t0,
                         host_reads=c.ops["aten._local_scalar_dense"], copies=c.ops["aten._to_copy"] + c.ops["aten.copy_"],
                         top=c.ops.most_common(12))
    L = runner.num_layers
    extra = res["analysis"]["ops"] - res["plain"]["ops"]
    out = dict(steps=a.steps, layers=L, grid=a.grid, plain_ops=res["plain"]["ops"], analysis_ops=res["analysis"]["ops"],
               extra_ops_per_layer_step=extra / (a.steps * L),
               extra_host_reads_per_layer_step=(res["analysis"]["host_reads"] - res["plain"]["host_reads"]) / (a.steps * L),
               extra_copies_per_layer_step=(res["analysis"]["copies"] - res["plain"]["copies"]) / (a.steps * L),
               detail=res, torch=torch.__version__, commit=git_commit())
    print(json.dumps({k: v for k, v in out.items() if k != "detail"}, indent=1))
    print("analysis top ops:", res["analysis"]["top"])
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
