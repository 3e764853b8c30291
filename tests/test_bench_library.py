"""bench/bench_library.py: argument checks and the merge of a run into results/bench_gpu.json (the GPU run itself is
not repeated here; ``--tiny`` is the CPU smoke test, minutes long)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_library  # noqa: E402


def _run(commit, started, **model):
    return {"meta": {"commit": commit, "device": "NVIDIA H200", "started": started, "torch": "2.11",
                     "diffusers": "0.42.1"}, "models": {"cogvideox-2b": model}}


def test_merge_keeps_per_key_provenance_and_recomputes_goals(tmp_path):
    dst = tmp_path / "bench_gpu.json"
    dst.write_text(json.dumps({"meta": {"device": "H100"}, "models": {"cogvideox-2b": {"plain": {"ms": 1}}}}))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run("aaaa", "2026-12-02 08:00:00", analyze_generation_over_plain=1.8,
                                 cag_step_over_cfg_step=1.25)))
    b.write_text(json.dumps(_run("bbbb", "2026-12-02 09:00:00", analyze_generation_over_plain=1.1,
                                 tracking_published_over_ours=4.0)))
    bench_library.merge(a, dst)
    bench_library.merge(b, dst)
    out = json.loads(dst.read_text())
    assert out["meta"] == {"device": "H100"} and out["models"]["cogvideox-2b"]["plain"] == {"ms": 1}  # untouched
    lib = out["models"]["cogvideox-2b"]["library"]
    assert lib["analyze_generation_over_plain"] == 1.1 and lib["measured_by"]["analyze_generation_over_plain"][
        "commit"] == "bbbb"
    assert lib["measured_by"]["cag_step_over_cfg_step"]["commit"] == "aaaa"
    g = lib["goals"]
    assert g["analyze_generation_over_plain"]["met"] is True and g["cag_step_over_cfg_step"]["met"] is True
    assert g["tracking_published_over_ours"]["met"] is False and g["analysis_extra_peak_gib"]["met"] is None


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        bench_library.parse_args(["--models", "cogvideox-9b", "--tiny"])
    assert "unknown ['cogvideox-9b']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_library.parse_args(["--sections", "analysis,bogus", "--tiny"])
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_library.parse_args(["--steps", "0", "--tiny"])
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_tiny_run_of_cag_tracking_and_exactness(tmp_path):
    """The CPU smoke run of three sections on the tiny 2B-shaped pipeline: finite ratios, and the matching path is
    exactly the float32 one off CUDA."""
    out = tmp_path / "bl.json"
    assert bench_library.main(["--tiny", "--steps", "1", "--cag-steps", "1", "--sections", "exactness,cag,tracking",
                               "--out", str(out)]) == 0
    m = json.loads(out.read_text())["models"]["cogvideox-2b"]
    assert m["cag_step_over_cfg_step"] > 0 and m["tracking_published_over_ours"] > 0
    assert m["exactness"]["qk_track_diff_px_max"] == 0.0 and m["exactness"]["features_track_diff_px_max"] == 0.0
