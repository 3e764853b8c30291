"""Automatic choice of layers, heads and step (issue 19, part 3) on the embedded model, compared with the
paper-scale analysis ranking and the layers the notebooks use.

    python scripts/select_layers.py [--videos 4] [--out results/selection.json]

Runs :func:`difftrack.selection.select` on train-split world videos and records its choice next to the harmonic-mean
ranking of ``results/analysis_summary.json`` (40 + 40 videos, 50 steps) and the tracker's default layer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difftrack import mini  # noqa: E402
from difftrack.provenance import device_name, git_commit  # noqa: E402
from difftrack.selection import select  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "results" / "selection.json"))
    a = ap.parse_args(argv)
    t0 = time.time()
    sel = select(mini.load_default(device=a.device), num_videos=a.videos)
    summary = ROOT / "results" / "analysis_summary.json"
    ref = json.loads(summary.read_text())["combined"] if summary.exists() else {}
    import inspect

    from difftrack.tracking import DiffTracker

    default_layer = inspect.signature(DiffTracker).parameters["layers"].default
    out = dict(selection=sel.to_dict(), tracker_kwargs=sel.tracker_kwargs(),
               layer_skip_configs=sel.layer_skip_configs(),
               reference=dict(analysis_summary_top3=ref.get("best_layers_top3"),
                              analysis_summary_ranking=ref.get("layer_ranking"),
                              tracker_default_layers=list(default_layer)),
               agrees_with_analysis_top3=(sorted(sel.guidance_layers) == sorted(ref.get("best_layers_top3") or [])),
               device=device_name(a.device), commit=git_commit(), seconds=round(time.time() - t0, 1))
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"guidance layers {sel.guidance_layers} (analysis top-3 {ref.get('best_layers_top3')}); tracking: layer "
          f"{sel.track_layer}, heads {sel.heads}, step {sel.step}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
