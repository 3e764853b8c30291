"""The embedded model: loads offline like a diffusers pipeline, tokenizer errors, patching, CPU smoke training."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difftrack import mini

ROOT = Path(__file__).resolve().parents[1]


def test_load_default_and_size():
    pipe = mini.load_default()
    cfg = pipe.transformer.config
    assert type(pipe.transformer).__name__ == "CogVideoXTransformer3DModel"
    assert cfg.sample_frames >= 13 and (cfg.sample_height // cfg.patch_size) * (cfg.sample_width // cfg.patch_size) >= 256
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    size = sum(p.stat().st_size for p in mini.WEIGHTS_DIR.rglob("*.safetensors"))
    assert size <= 50 * 2**20


def test_generation_shape_and_seed_determinism():
    pipe = mini.load_default()
    kw = dict(num_inference_steps=2, num_frames=3, progress=False)
    a = pipe("a red circle moving left on a still background", generator=torch.Generator().manual_seed(1), **kw)
    b = pipe("a red circle moving left on a still background", generator=torch.Generator().manual_seed(1), **kw)
    assert a.frames.shape == (1, 3, 64, 64, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)


def test_tokenizer_errors_and_padding():
    te = mini.load_default().text_encoder
    ids = te.tokenize(["a scene , camera panning left", ""])
    assert ids.shape == (2, mini.TEXT_LEN) and (ids[1] == 0).all()
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['elephant'\]"):
        te.tokenize("a red elephant")
    with pytest.raises(ValueError, match="at most 24 allowed"):
        te.tokenize(" ".join(["a"] * 30))


def test_patching_round_trip():
    v = torch.rand(2, 3, 3, 16, 16)
    lat = mini.pixels_to_latents(v)
    assert lat.shape == (2, 3, 12, 8, 8)
    torch.testing.assert_close(mini.latents_to_pixels(lat), v)
    with pytest.raises(ValueError, match="divisible by 4"):
        mini.pixels_to_latents(torch.rand(1, 2, 3, 18, 16))


def test_training_script_smoke(tmp_path):
    out = tmp_path / "w"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_mini.py"), "--smoke", "--max-steps", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["meta"]["steps"] == 2 and np.isfinite(log["log"][0]["loss"])
    pipe = mini.MiniVideoPipeline.from_pretrained(str(out))
    assert type(pipe.transformer).__name__ == "CogVideoXTransformer3DModel"


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=37, width=53), r"height=37 \(requested 37x53\); allowed: a positive multiple of 4 px.*e\.g\. 36"),
    (dict(height=64, width=53), r"width=53 \(requested 64x53\); allowed: a positive multiple of 4 px"),
    (dict(height=0), r"height=0 .*positive multiple of 4"),
    (dict(guidance_scale=float("nan")), r"guidance_scale=nan; allowed: a finite number in \[0, 50\]"),
    (dict(guidance_scale=1e30), r"guidance_scale=1e\+30; allowed: a finite number in \[0, 50\]"),
    (dict(guidance_scale=-2.0), r"guidance_scale=-2\.0; allowed"),
    (dict(num_inference_steps=0), r"num_inference_steps=0; must be an int >= 1"),
    (dict(num_inference_steps=2.5), r"num_inference_steps=2\.5; must be an int >= 1"),
    (dict(num_frames=1), r"num_frames=1; at least 2 frames"),
])
def test_bad_call_arguments_raise_instead_of_silent_correction(kwargs, match):
    """37x53 used to return 36x52, NaN guidance switched CFG off, 1e30 gave a black video (issue 18)."""
    pipe = mini.build_untrained(0)
    kw = dict(num_inference_steps=1, num_frames=2, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match=match):
        pipe("a red circle moving left on a still background", **{**kw, **kwargs})
