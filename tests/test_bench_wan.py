"""bench/bench_wan.py: the ``--tiny`` run (tiny Wan 2.1 and Wan 2.2 two-expert pipelines on the CPU, the same code
paths as the full-size GPU run) writes every measurement, merges into an existing results file without touching its
other entries, and bad arguments are refused by name."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_wan  # noqa: E402

KEYS = ("wan2.1-t2v-14b", "wan2.2-t2v-a14b")


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_tiny_run_merges_every_measurement(tmp_path):
    out = tmp_path / "bench_gpu.json"
    earlier = {"meta": {"device": "NVIDIA H100 80GB HBM3", "commit": "cog"},
               "models": {"cogvideox-2b": {"plain": {"forward_b2": {"ms": 635}}},
                          KEYS[0]: {"by_device": {"NVIDIA H200": {"commit": "old", "goals": None}}, "stale": 1}}}
    out.write_text(json.dumps(earlier))
    bench_wan.main(["--tiny", "--wan22", "--out", str(out), "--strict", "--commit", "test"])
    d = json.loads(out.read_text())
    # the other entries stay as they were; this run's entries replace the earlier ones, by_device accumulates
    assert d["meta"] == earlier["meta"] and d["models"]["cogvideox-2b"] == earlier["models"]["cogvideox-2b"]
    assert set(d["models"]) == {"cogvideox-2b", *KEYS}
    assert "stale" not in d["models"][KEYS[0]] and "NVIDIA H200" in d["models"][KEYS[0]]["by_device"]
    for key in KEYS:
        m = d["models"][key]
        assert "skipped" not in m, m.get("error")
        assert m["meta"]["tiny"] and m["meta"]["finished"] and m["meta"]["commit"] == "test"
        assert m["by_device"][m["meta"]["device"]]["goals"] == m["goals"]
        experts = ["transformer"] + (["transformer_2"] if key == KEYS[1] else [])
        assert m["settings"]["experts"] == experts and sorted(m["exactness"]) == experts
        for e in experts:
            ex = m["exactness"][e]
            assert ex["capture_max_abs_diff"] == 0.0 and ex["plain_vs_plain_max_abs_diff"] == 0.0, ex
            assert ex["qk_shapes_ok"] and ex["output_finite"] and ex["transformer_dtype"] == "torch.bfloat16"
            assert sorted(ex["qk_shapes"]) == ["0", "2", "3"] and ex["expected_qk_shape"] == [1, 2, 3, 4, 4, 16]
        a = m["analysis"]
        assert a["steps"] == 4 and a["decode_included"] and a["videos_equal"] and a["videos_max_abs_diff"] == 0
        for k in ("analysis_over_plain", "analysis_over_plain_per_step", "analysis_over_plain_50_steps"):
            assert _finite(a[k]) and a[k] > 0, (key, k, a[k])
        p, g = a["plain_generation"], a["analyze_generation"]
        assert p["transformer_calls"] == g["transformer_calls"] == 8  # 4 steps x (cond, uncond)
        assert p["s"] > p["loop_s"] > 0 and g["s"] > g["loop_s"] > 0
        assert g["qk_tracks_finite"] == 1.0 and g["record_qk_tracks_shape"][:2] == [4, 4]
        # Wan 2.2 (shift 12, boundary 875): both experts run (timesteps 999, 973, 923 | 800)
        assert g["experts"] == (["transformer"] * 3 + ["transformer_2"] if key == KEYS[1] else None)
        c = m["cag"]
        assert c["layers"] == [1, 2] and c["cfg_step"]["transformer_calls"] == c["cag_step"]["transformer_calls"] == 4
        assert c["cfg_step"]["latents_finite"] and c["cag_step"]["latents_finite"]
        assert _finite(c["cag_step_over_cfg_step"]) and c["cag_step_over_cfg_step"] > 0
        assert m["goals"]["capture_max_abs_diff"] == {"value": 0.0, "target": "<= 0.0", "met": True}
        for goal in m["goals"].values():
            assert set(goal) == {"value", "target", "met"} and goal["met"] in (True, False)


def test_tiny_never_writes_into_results(capsys):
    with pytest.raises(SystemExit):
        bench_wan.parse_args(["--tiny", "--out", str(ROOT / "results" / "bench_gpu.json")])
    assert "never go into" in capsys.readouterr().err
    a = bench_wan.parse_args(["--tiny"])
    assert (ROOT / "results").resolve() not in Path(a.out).resolve().parents


@pytest.mark.parametrize("argv, message", [
    (["--models", "wan2.1-t2v-1.3b"], "unknown ['wan2.1-t2v-1.3b']"),
    (["--sections", "analysis,bogus"], "bogus"),
    (["--steps", "0"], "--steps 0"),
    (["--cag-layers", "14,40"], "block indices 0..39"),
    (["--cag-layers", "a,b"], "comma list of block indices"),
    (["--budget-s", "0"], "--budget-s 0.0"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_wan.parse_args(["--tiny"] + argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_full_size_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        bench_wan.parse_args([])
    assert "needs one GPU" in capsys.readouterr().err


def test_full_config_is_wan21_14b():
    """The transformer config is Wan2.1-T2V-14B's: 40 heads x 128 = 5120, 40 blocks, FFN 13824 (14.29 B parameters,
    counted on the meta device), and diffusers' WanTransformer3DModel defaults."""
    tr = bench_wan.build_transformer(bench_wan.WAN14B, torch.device("meta"), torch.bfloat16, seed=0)
    assert round(sum(p.numel() for p in tr.parameters()) / 1e7) == 1429
    assert tr.dtype == torch.bfloat16 and next(tr.parameters()).dtype == torch.float32  # scale_shift_table kept
    fp32 = {n for n, p in tr.named_parameters() if p.dtype == torch.float32}
    assert {"blocks.0.norm2.weight", "blocks.39.scale_shift_table",
            "condition_embedder.time_embedder.linear_1.weight"} <= fp32
    assert sum(p.numel() for n, p in tr.named_parameters() if n in fp32) < 0.01 * 14.3e9
    assert max(bench_wan.CAG_LAYERS + bench_wan.CAPTURE_LAYERS) < tr.config.num_layers


def test_a_run_of_some_sections_keeps_the_others_of_the_same_device(tmp_path):
    """``--sections cag`` replaces the entry but keeps its exactness and analysis when they were measured on the
    same device (named in ``sections_from_earlier_run``); another device's sections are not mixed in."""
    from difftrack.provenance import device_name

    here = device_name("cpu")
    analysis = {"analysis_over_plain_50_steps": 1.1}
    exact = {"transformer": {"capture_max_abs_diff": 0.0}}
    out = tmp_path / "bench_gpu.json"
    out.write_text(json.dumps({"models": {
        KEYS[0]: {"meta": {"device": here, "commit": "aaa", "started": "t1"}, "analysis": analysis,
                  "exactness": exact, "cag": {"cag_step_over_cfg_step": 1.5}, "by_device": {"H200": {"goals": 1}}},
        KEYS[1]: {"meta": {"device": "NVIDIA H200", "commit": "bbb", "started": "t0"}, "analysis": analysis}}}))
    B = bench_wan.Bench(bench_wan.parse_args(["--tiny", "--wan22", "--sections", "cag", "--out", str(out)]))
    for key in KEYS:
        B.entries[key] = {"meta": dict(B.meta), "cag": {"cag_step_over_cfg_step": 1.2}}
    B.write()
    m = json.loads(out.read_text())["models"]
    assert m[KEYS[0]]["analysis"] == analysis and m[KEYS[0]]["exactness"] == exact
    assert m[KEYS[0]]["cag"] == {"cag_step_over_cfg_step": 1.2}
    assert m[KEYS[0]]["sections_from_earlier_run"] == {"exactness": {"commit": "aaa", "started": "t1"},
                                                       "analysis": {"commit": "aaa", "started": "t1"}}
    g = m[KEYS[0]]["goals"]
    assert g["analysis_over_plain_50_steps"]["met"] and g["cag_step_over_cfg_step"]["met"]
    assert g["capture_max_abs_diff"]["met"] and set(m[KEYS[0]]["by_device"]) == {"H200", here}
    assert "analysis" not in m[KEYS[1]] and "sections_from_earlier_run" not in m[KEYS[1]]  # other device
    assert m[KEYS[1]]["goals"]["analysis_over_plain_50_steps"]["value"] is None
