"""What recording the published protocol costs on top of the project's (issue 32), on the embedded model.

    python bench/protocol_cost.py --label after --out bench/protocol_cost.json
    python bench/protocol_cost.py --label before --code /path/to/older/checkout --out bench/protocol_cost.json
    python bench/protocol_cost.py --device cuda --parts generation --label h100 --out /tmp/pc.json   # a GPU

Three parts, each for ``protocols=("difftrack",)`` and ``("difftrack", "published")``:

* ``ops``: ATen operations dispatched per (layer, step) by the recorder's callbacks (``on_qk`` + ``on_features``) on
  synthetic events of the embedded model's shapes (3 heads x 64, 13 frames of 16 x 16 tokens, 192 channels,
  10 x 10 query grid), in the steady state (second step); ``launching`` leaves out the view-type operations, which
  launch no kernel on a GPU. With a model this small the analysis is launch-bound on a GPU, so this count is the
  CPU-measurable proxy of its GPU cost (see ``count_ops.py``).
* ``callbacks``: ms per (layer, step) of the same callbacks (12 layers x 2 steps, best of ``--reps``).
* ``generation``: seconds of ``analyze_generation`` (``--steps`` steps, 10 x 10 grid, every layer) against plain
  generation, the three interleaved, best of ``--reps``.

Times are wall clock and, on the CPU, also the process's CPU time (``cpu_*``, ``time.process_time``): on a shared
machine the CPU time of a single-threaded run (``--threads 1``) is the steadier of the two.

``--code DIR`` imports ``difftrack`` from another checkout (e.g. the commit before a change); the run is stored
under ``runs[--label]`` of ``--out`` (other labels kept), with the commit, device and thread count.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"difftrack": ("difftrack",), "both": ("difftrack", "published")}
VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "narrow", "permute", "expand",
         "unsqueeze", "squeeze", "transpose", "t", "alias", "detach", "lift_fresh", "as_strided", "split", "unbind"}
PROMPT = "a red circle moving left on a still background"


def _events(device):
    import torch
    from difftrack.backbones import TokenGrid

    H, D, F, R, C, text, ch = 3, 64, 13, 16, 16, 16, 192
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, text + F * R * C, D, generator=g)
    k = q + 0.5 * torch.randn(q.shape, generator=g)
    feat = torch.randn(1, F, R, C, ch, generator=g)
    return [t.to(device) for t in (q, k, feat)], TokenGrid(F, R, C, text_len=text, text_first=True, stride=4)


def _recorder(protocols, steps, layers):
    from difftrack import analysis
    from difftrack.world import World

    return analysis.Recorder(World(13, 64, 64).grid_queries(10)[:, 1:], 4, steps, layers, 13, protocols=protocols)


def _feed(rec, tensors, grid, steps, layers):
    from difftrack.capture import FeatureEvent, QKEvent

    q, k, feat = tensors
    for s in steps:
        for layer in range(layers):
            rec.on_qk(QKEvent(layer, s, None, q, k, grid))
            rec.on_features(FeatureEvent(layer, s, None, feat, grid))


def count_ops(device) -> dict:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    tensors, grid = _events(device)
    out = {}
    for name, prot in PROTOCOLS.items():
        rec = _recorder(prot, 2, 1)
        _feed(rec, tensors, grid, [0], 1)  # first step: buffers, point layout, score indices
        with Count() as c:
            _feed(rec, tensors, grid, [1], 1)
        out[name] = dict(all=sum(c.ops.values()), launching=sum(v for k, v in c.ops.items() if k not in VIEWS),
                         top=c.ops.most_common(10))
    return out


def time_callbacks(device, reps) -> dict:
    import torch

    tensors, grid = _events(device)
    best = {name: dict(ms_per_layer_step=float("inf"), cpu_ms_per_layer_step=float("inf")) for name in PROTOCOLS}
    for _ in range(reps):
        for name, prot in PROTOCOLS.items():
            rec = _recorder(prot, 2, 12)
            t0, c0 = time.perf_counter(), time.process_time()
            _feed(rec, tensors, grid, [0, 1], 12)
            rec.record()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            b = best[name]
            b["ms_per_layer_step"] = min(b["ms_per_layer_step"], (time.perf_counter() - t0) / 24 * 1e3)
            b["cpu_ms_per_layer_step"] = min(b["cpu_ms_per_layer_step"], (time.process_time() - c0) / 24 * 1e3)
    return best


def time_generation(device, steps, reps) -> dict:
    import torch
    from difftrack import analysis, mini
    from difftrack.runners import VideoRunner

    runner = VideoRunner(mini.load_default(device))
    runner.pipe.set_progress_bar_config(disable=True)

    def once(mode, n):
        if mode == "plain":
            runner.generate(PROMPT, 0, n)
        else:
            analysis.analyze_generation(runner, PROMPT, 0, num_steps=n, grid_size=10, protocols=PROTOCOLS[mode])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    modes = ("plain", *PROTOCOLS)
    for m in modes:
        once(m, 1)  # warm-up
    runs = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    for _ in range(reps):
        for m in modes:
            t0, c0 = time.perf_counter(), time.process_time()
            once(m, steps)
            runs[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    out = {m: dict(seconds=min(v), all_seconds=v, cpu_seconds=min(cpu[m]), all_cpu_seconds=cpu[m])
           for m, v in runs.items()}
    for m in PROTOCOLS:
        out[m]["extra_over_plain_s"] = out[m]["seconds"] - out["plain"]["seconds"]
        out[m]["cpu_extra_over_plain_s"] = out[m]["cpu_seconds"] - out["plain"]["cpu_seconds"]
    out["steps"] = steps
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="key of this run under 'runs' in --out (e.g. before / after)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--code", default=str(ROOT), help="checkout whose difftrack is measured (default: this one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", default="ops,callbacks,generation")
    ap.add_argument("--steps", type=int, default=5, help="denoising steps of the generation part")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("ops", "callbacks", "generation")]
    if bad:
        raise SystemExit(f"--parts {bad}: allowed ops, callbacks, generation")
    sys.path.insert(0, str(Path(a.code).resolve()))
    import torch
    from difftrack.provenance import device_name, git_commit

    if a.threads:
        torch.set_num_threads(a.threads)
    run = dict(code=str(Path(a.code).resolve()), commit=git_commit(root=Path(a.code).resolve()), device=a.device,
               device_name=device_name(a.device), threads=torch.get_num_threads(), torch=torch.__version__,
               started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if "ops" in parts:
        run["ops_per_layer_step"] = count_ops(a.device)
    if "callbacks" in parts:
        run["callbacks"] = time_callbacks(a.device, a.reps)
    if "generation" in parts:
        run["generation"] = time_generation(a.device, a.steps, a.reps)
    print(json.dumps(run, indent=1))
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("runs", {})[a.label] = run
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
