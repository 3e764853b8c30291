"""Smoke test of bench/bench_gpu.py: the --tiny run (tiny CogVideoX-2B/5B-shaped configs on CPU, same code paths as
the full-size GPU run) completes and writes the JSON with every measurement and finite ratios."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"

PLAIN = ("forward_b2", "forward_b1", "run_until_17_b1")
CALLBACK = ("naive", "batched_fp32", "batched_bf16", "batched_bf16_T")
CAPTURE = ("one_layer_naive_b2", "one_layer_fast_b2", "one_layer_fast_b1", "all_layers_fast_b2",
           "all_layers_fast_b1")
TRACKING = ("ours", "published", "ours_no_vae", "published_no_vae")
CAG = ("cfg_step_b2", "cag_renormalized", "cag_zero_after_softmax", "cag_renormalized_shared_prefix",
       "cag_dense_mask")


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_bench_tiny_writes_complete_json(tmp_path):
    out = tmp_path / "bench.json"
    res = _load().main(["--tiny", "--out", str(out), "--strict", "--commit", "test"])
    d = json.loads(out.read_text())
    assert d == json.loads(json.dumps(res, default=str))
    meta = d["meta"]
    for k in ("device", "torch", "diffusers", "commit", "tiny", "reps", "elapsed_s"):
        assert k in meta
    assert meta["commit"] == "test" and meta["tiny"] and meta["finished"]
    assert set(d["models"]) == {"cogvideox-2b", "cogvideox-5b"}
    for name, m in d["models"].items():
        assert "skipped" not in m, (name, m.get("error"))
        for sec, keys in (("plain", PLAIN), ("callback", CALLBACK), ("capture", CAPTURE), ("tracking", TRACKING),
                          ("cag", CAG)):
            for k in keys:
                r = m[sec][k]
                assert _finite(r["ms"]) and r["ms"] > 0, (name, sec, k, r)
        for k in CAPTURE:
            assert _finite(m["capture"][k]["ratio_vs_plain"]) and m["capture"][k]["outputs_ok"], (name, k)
        assert m["capture"]["one_layer_fast_b2"]["match_shape"] == [12, 6]
        for k in CAG[1:]:
            assert _finite(m["cag"][k]["ratio_vs_cfg"]), (name, k)
        for k in ("speedup_published_over_ours", "speedup_published_over_ours_no_vae"):
            assert _finite(m["tracking"][k]), (name, k)
        # the batched matchers and both tracking recipes give the naive matches (fp32 on CPU)
        for v in CALLBACK[1:]:
            assert m["callback"][v]["agree_with_naive"] == 1.0, (name, v)
        assert m["tracking"]["ours_vs_published_argmax_agree"] == 1.0
        # the dense-mask reference and the shared-prefix prototype compute the same perturbation as apply_cag
        for k, c in m["cag"]["checks"].items():
            assert c["max_abs_diff_all"] <= 1e-4 * max(1.0, c["ref_abs_max"]), (name, k, c)
        for g in m["goals"].values():
            assert set(g) == {"value", "target", "met"}
    assert "vae_decode_13" in d["models"]["cogvideox-2b"]["tracking"]
