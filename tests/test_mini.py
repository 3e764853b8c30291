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


@pytest.mark.parametrize("kind", mini.FEW_STEP_SCHEDULERS)
def test_few_step_scheduler_keeps_the_trained_noise_schedule(kind):
    from diffusers import CogVideoXDDIMScheduler

    ddim = CogVideoXDDIMScheduler(**mini.scheduler_config())
    s = mini.few_step_scheduler(kind, ddim.config)
    assert s.config.prediction_type == "v_prediction"
    ac, ref = s.alphas_cumprod.double(), ddim.alphas_cumprod.double()
    # every training-time alpha_cumprod is kept (float32 rounding) except zero terminal SNR's last, made positive
    assert torch.allclose(ac[:-1], ref[:-1], rtol=1e-5, atol=1e-6) and ref[-1] == 0 and 0 < ac[-1] < ref[-2]
    ddim.set_timesteps(10)
    s.set_timesteps(10)
    assert torch.equal(s.timesteps.long(), ddim.timesteps.long())


def test_few_step_scheduler_bad_input_names_the_value():
    with pytest.raises(ValueError, match=r"kind='euler'.*dpm\+\+, unipc"):
        mini.few_step_scheduler("euler")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        mini.few_step_scheduler("dpm++", {**mini.scheduler_config(), "prediction_type": "epsilon"})


def test_pipeline_runs_with_swapped_schedulers_and_saves_them(tmp_path):
    from diffusers import CogVideoXDPMScheduler, DPMSolverMultistepScheduler

    pipe = mini.load_default()
    kw = dict(num_inference_steps=3, num_frames=3, height=32, width=32, output_type="latent", progress=False)
    prompt = "a red circle moving left on a still background"
    ddim = pipe(prompt, generator=torch.Generator().manual_seed(1), **kw).frames
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)  # CogVideoX-5B's sampler (stochastic)
    a = pipe(prompt, generator=torch.Generator().manual_seed(1), **kw).frames
    b = pipe(prompt, generator=torch.Generator().manual_seed(1), **kw).frames
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, ddim)
    pipe.scheduler = mini.few_step_scheduler("dpm++", pipe.scheduler.config)
    c = pipe(prompt, generator=torch.Generator().manual_seed(1), **kw).frames
    assert torch.isfinite(c).all() and not torch.equal(c, ddim)
    pipe.save_pretrained(str(tmp_path))
    back = mini.MiniVideoPipeline.from_pretrained(str(tmp_path))
    assert isinstance(back.scheduler, DPMSolverMultistepScheduler)
    assert torch.equal(back(prompt, generator=torch.Generator().manual_seed(1), **kw).frames, c)


# ----------------------------------------------------------------------------- image-to-video (issue 30's I2V arm)
def test_image_to_video_conversion_computes_what_the_text_to_video_model_computes():
    """New input weights are zero: whatever the first frame, the converted transformer's output equals the text-to-
    video one's (up to the convolution's summation order), and the pipeline routes the image through."""
    t2v = mini.load_default()
    i2v = mini.to_image_to_video(t2v)
    assert mini.is_image_to_video(i2v.transformer) and not mini.is_image_to_video(t2v.transformer)
    assert i2v.transformer.config.in_channels == 24 and i2v.transformer.config.out_channels == 12
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 12, 32, 32, generator=g)
    first = torch.rand(1, 12, 32, 32, generator=g)
    emb = t2v.text_encoder(t2v.text_encoder.tokenize(["a red circle moving left on a still background"]))
    t = torch.tensor([500])
    with torch.no_grad():
        a = t2v.transformer(hidden_states=x, encoder_hidden_states=emb, timestep=t, return_dict=False)[0]
        b = i2v.transformer(hidden_states=torch.cat([x, mini.image_condition(first, 3)], 2),
                            encoder_hidden_states=emb, timestep=t, return_dict=False)[0]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    frame = np.full((64, 64, 3), 200, np.uint8)
    kw = dict(num_frames=3, num_inference_steps=2, guidance_scale=6.0, progress=False)
    v1 = i2v("a red circle moving left on a still background", image=frame, generator=torch.Generator().manual_seed(1),
             **kw).frames
    v0 = t2v("a red circle moving left on a still background", generator=torch.Generator().manual_seed(1), **kw).frames
    assert v1.shape == v0.shape == (1, 3, 64, 64, 3)
    assert np.abs(v1.astype(int) - v0.astype(int)).max() <= 1  # zero weights: the image changes nothing yet
    with pytest.raises(ValueError, match="already image-to-video"):
        mini.to_image_to_video(i2v)


def test_image_to_video_pipeline_checks_its_image():
    t2v = mini.load_default()
    i2v = mini.to_image_to_video(t2v)
    kw = dict(num_frames=2, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="pass image="):
        i2v("a scene , camera panning left", **kw)
    with pytest.raises(ValueError, match="text-to-video"):
        t2v("a scene , camera panning left", image=np.zeros((64, 64, 3), np.uint8), **kw)
    with pytest.raises(ValueError, match=r"uint8 \[64, 64, 3\]"):
        i2v("a scene , camera panning left", image=np.zeros((32, 32, 3), np.uint8), **kw)
    with pytest.raises(ValueError, match=r"uint8"):
        i2v("a scene , camera panning left", image=np.zeros((64, 64, 3), np.float32), **kw)


def test_image_to_video_model_goes_through_the_library_paths():
    """analyze_exact (the runner's noised forwards) and DiffTracker hand the clean first frame to an image-to-video
    model (the family's model_input); at conversion it computes what the text-to-video model computes."""
    from difftrack import analysis as A
    from difftrack.tracking import DiffTracker
    from difftrack.world import World

    t2v = mini.load_default()
    i2v = mini.to_image_to_video(t2v)
    s = World().sample(5000, "objects", "heldout")
    r0 = A.analyze_exact(t2v, s, num_steps=50, steps=[49], grid_size=4, noise_seed=0)
    r1 = A.analyze_exact(i2v, s, num_steps=50, steps=[49], grid_size=4, noise_seed=0)
    assert np.isfinite(r1.qk_tracks[49]).all()
    np.testing.assert_allclose(r1.qk_tracks[49], r0.qk_tracks[49], atol=0.05)
    q = np.array([[0, 20.0, 30.0], [0, 40.0, 12.0]], np.float32)
    tr0, vis0 = DiffTracker(t2v, layers=[8])(s.video, q)
    tr1, vis1 = DiffTracker(i2v, layers=[8])(s.video, q)
    np.testing.assert_allclose(tr1, tr0, atol=0.05)
    np.testing.assert_array_equal(vis1, vis0)


def test_training_script_image_to_video_smoke(tmp_path):
    out = tmp_path / "w"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_mini.py"), "--smoke", "--max-steps", "1", "--i2v",
                        "--init", str(mini.WEIGHTS_DIR), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["meta"]["i2v"] is True and np.isfinite(log["log"][0]["loss"])
    assert mini.is_image_to_video(mini.MiniVideoPipeline.from_pretrained(str(out)).transformer)


def test_image_to_video_generation_goes_through_the_shared_video_cache(tmp_path):
    """The agreement's I2V path is generate_cached with first frames: videos cached atomically per item; without
    first frames an image-to-video model is refused by the pipeline's own check."""
    from difftrack.experiments import cag as X

    i2v = mini.to_image_to_video(mini.load_default())
    items = [dict(index=i, prompt="a scene , camera panning left", noise_seed=1000 + i) for i in range(2)]
    frames = {0: np.full((64, 64, 3), 40, np.uint8), 1: np.full((64, 64, 3), 200, np.uint8)}
    recs = X.generate_cached(i2v, items, tmp_path / "v", num_inference_steps=1, guidance_scale=6.0, batch_size=2,
                             log=None, first_frame=lambda it: frames[it["index"]])
    assert len(recs) == 1
    vids = X.load_cached(tmp_path / "v", items)
    assert vids[0].shape == (13, 64, 64, 3) and not list((tmp_path / "v").glob("*.tmp"))
    with pytest.raises(ValueError, match="pass image="):
        X.generate_cached(i2v, items, tmp_path / "w", num_inference_steps=1, batch_size=2, log=None)
