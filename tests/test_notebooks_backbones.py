"""Notebooks 02 and 04 on real diffusers pipelines without weights (issue 8).

For each of CogVideoXPipeline, WanPipeline (Wan 2.1, Wan 2.2 TI2V and Wan 2.2's two experts), HunyuanVideoPipeline,
SkyReelsV2Pipeline, SkyReelsV2DiffusionForcingPipeline and MochiPipeline, a tiny random pipeline of the real classes
(:func:`difftrack.testing.build_tiny_pipeline`: tiny T5 / Llama + CLIP, VAE and transformer built from configs) is
written with ``save_pretrained`` to a temporary folder, and the notebook runs on it through papermill with ``model``
set to that folder -- the same path a user takes with a local CogVideoX-2B checkpoint. Outputs (figures, results,
caches) go to a scratch ``DIFFTRACK_ROOT``, never to the committed ``figures/`` and ``results/``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from difftrack.runners import VideoRunner
from difftrack.testing import EXPERT_KINDS, KINDS, build_tiny_pipeline, tiny_size

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"


@pytest.fixture(scope="module", params=KINDS + EXPERT_KINDS)
def saved_pipeline(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    pipe = build_tiny_pipeline(request.param, path=folder)
    runner = VideoRunner(pipe)
    return request.param, folder, runner.num_layers, runner.family.prompt_to_video


def _run(notebook: str, params: dict, root: Path) -> nbformat.NotebookNode:
    """papermill in a subprocess (as ``bash scripts/lab.sh run`` runs it, through scripts/run_notebooks.py; and
    isolated from event loops other tests leave in this process), outputs under the scratch ``DIFFTRACK_ROOT``.
    A cell that reaches the execution timeout fails the test with the notebook and cell named (no retry)."""
    ptxt = root / "params.yaml"
    ptxt.write_text(json.dumps(params))  # JSON is YAML
    env = dict(os.environ, DIFFTRACK_ROOT=str(root), MPLBACKEND="Agg")
    cmd = [sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), str(NB / f"{notebook}.ipynb"), "--out-dir",
           str(root / "executed"), "--cwd", str(NB), "-f", str(ptxt), "--execution-timeout", "300"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode == 3:  # scripts/run_notebooks.py: a cell reached the execution timeout
        pytest.fail(next((ln for ln in r.stderr.splitlines() if "[lab] FAILED" in ln), r.stderr[-2000:]),
                    pytrace=False)
    assert r.returncode == 0, f"papermill {notebook} failed:\n{r.stderr[-4000:]}"
    return nbformat.read(str(root / "executed" / f"{notebook}.ipynb"), as_version=4)


def _text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") if o.get("output_type") == "stream" else
                         str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_02_layer_analysis_on_saved_tiny_pipeline(saved_pipeline, tmp_path):
    kind, folder, n_layers, generates = saved_pipeline  # Cosmos Video2World: world videos only
    size = list(tiny_size(kind))
    nb = _run("02_layer_analysis", dict(model=str(folder), videos_per_family=int(generates), exact_per_family=1,
                                        num_steps=2, grid_size=4, num_points=2, size=size),
              tmp_path)
    summary = json.loads((tmp_path / "results" / "02_summary.json").read_text())
    assert summary["settings"]["model"] == str(folder) and summary["settings"]["size"] == size
    assert len(summary["timesteps"]) == 2
    cls = json.loads((folder / "model_index.json").read_text())["_class_name"]
    assert f"{cls}, {n_layers} blocks" in _text(nb)
    if kind == "wan22":  # 2 steps at t = 1000 | 24: one per expert, each recorded from its expert
        assert "transformer steps [0], transformer_2 steps [1]" in _text(nb)
    for name in ("generated", "exact", "all") if generates else ("exact", "all"):
        s = summary["summary"][name]
        assert 0.0 <= s["qk_best_acc"] <= 1.0 and 0 <= s["qk_best_layer"] < n_layers
    assert summary["untrained_control"] is None  # the control is the embedded architecture only
    for fig in ("02_fig4a_qk_vs_feat_live.png", "02_fig4b_harmonic_mean_live.png", "02_attention_maps.png",
                "02_qk_pca.png"):  # the live run's figures (the paper-scale ones are the embedded model's)
        assert (tmp_path / "figures" / fig).stat().st_size > 1000, fig
    assert not (ROOT / "results" / "02_summary.json").read_text().count(str(folder))  # committed file untouched


def test_04_tracking_on_saved_tiny_pipeline(saved_pipeline, tmp_path):
    kind, folder, n_layers, _ = saved_pipeline
    last = n_layers - 1
    T, H, W = tiny_size(kind)
    nb = _run("04_tracking", dict(model=str(folder), layer=last, slider_layers=[0, last], slider_steps=[-1, -2],
                                  native_size=[H, W], num_frames=T, grid_size=3, n_videos=1,
                                  scale=2, device="cpu"), tmp_path)
    text = _text(nb)
    assert f"{n_layers} blocks), frames {H}x{W}" in text
    assert f"DiffTracker (layer {last}, step -1)" in text  # the metrics table has the tracker's row
    if kind == "wan22":  # step -1 of the tracker's 50-step schedule is below the boundary
        assert "the tracker at step -1 runs transformer_2" in text
    for fig in ("04_tracks_strip.png", "04_layer_step.png", "04_metrics.png", "04_tracks.mp4"):
        assert (tmp_path / "figures" / fig).stat().st_size > 1000, fig
