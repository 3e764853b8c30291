"""Capture inside the real diffusers pipelines (tiny random components built offline by difftrack.testing).

Checks the calling conventions the adapters assume: CogVideoX's batched [uncond, cond] CFG, Wan's two calls per step
(cond first), HunyuanVideo's embedded guidance (one call) and true CFG (two calls, cond first), step indices and
timesteps, bit-identical outputs, and save_pretrained / from_pretrained round trips.
"""
import inspect

import numpy as np
import pytest
import torch
from conftest import processors

from difftrack.backbones import family_for
from difftrack.capture import capture
from difftrack.testing import FRAMES, HEIGHT, KINDS, WIDTH, build_tiny_pipeline, hunyuan_prompt_template

STEPS = 2


def call_kwargs(kind, pipe, **extra):
    kw = dict(prompt="a red circle moving left", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
              num_inference_steps=STEPS, output_type="pt")
    if kind == "cogvideox":
        kw.update(negative_prompt="", guidance_scale=6.0)
    elif kind in ("wan", "hunyuanvideo15"):  # HunyuanVideo 1.5: the family sets its guider's scale (run())
        kw.update(negative_prompt="a blue square", guidance_scale=5.0)
    elif kind == "cosmos":  # Video2World: a conditioning image (its first latent frame), CFG 7 (the default)
        kw.update(image=[np.full((HEIGHT, WIDTH, 3), 100, np.uint8)], negative_prompt="a blue square",
                  guidance_scale=7.0)
    else:
        kw.update(prompt_template=hunyuan_prompt_template(pipe.tokenizer), guidance_scale=6.0)
    kw.update(extra)
    return kw


def run(pipe, kw, seen=None):
    """The pipeline's ``__call__`` through its family (``guidance_scale`` set the family's way); ``seen`` gets
    ``(step, timestep)`` of every step (from the step callback, or for pipelines without one from the scheduler's
    timesteps after the run)."""
    kw = dict(kw)
    gs = kw.pop("guidance_scale")
    takes_cb = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters
    if seen is not None and takes_cb:
        kw["callback_on_step_end"] = lambda p, i, t, d: seen.append((i, float(t))) or {}
    out = family_for(pipe).call(pipe, gs, generator=torch.Generator().manual_seed(0), **kw).frames
    if seen is not None and not takes_cb:  # HunyuanVideo15Pipeline has no step callback
        seen.extend((i, float(t)) for i, t in enumerate(pipe.scheduler.timesteps))
    return out


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build_tiny_pipeline(request.param, path=path), path


def test_capture_in_pipeline_is_exact_and_tags_steps(saved):
    kind, pipe, _ = saved
    kw = call_kwargs(kind, pipe)
    ref = run(pipe, kw)
    seen = []
    with capture(pipe, layers=[0], steps=[1], num_steps=STEPS, what=("q", "k", "features")) as cache:
        out = run(pipe, kw, seen)
    assert torch.equal(ref, out)
    assert sorted(cache.keys()) == [("blocks.0.attn.k", 1), ("blocks.0.attn.q", 1), ("blocks.0.out", 1)]
    # the transformer's own timestep of each step: the scheduler's (Cosmos: sigma / (sigma + 1) of its EDM sigma)
    z = torch.zeros(1)
    ts = pipe.scheduler.timesteps
    assert [float(ts[i]) for i, _ in seen] == [t for _, t in seen]
    model_t = {i: float(cache.adapter.noised(pipe.scheduler, z, z, ts[i])[1].max()) for i, _ in seen}
    assert cache.timesteps == model_t and len(seen) == STEPS
    heads = pipe.transformer.config.num_attention_heads
    assert cache.q(0, step=1).shape == (1, heads, 3, 2, 2, 16)  # cond branch only, 3 latent frames x 2 x 2 tokens
    assert cache.features(0, step=1).shape[:4] == (1, 3, 2, 2)
    assert all(not type(p).__name__.startswith("Capturing") for p in processors(pipe.transformer).values())


def test_save_and_reload_gives_the_same_output(saved):
    kind, pipe, path = saved
    reloaded = family_for(pipe).load(str(path), torch.float32)  # as runners.load_pipeline loads a folder
    if getattr(reloaded, "safety_checker", None) is not None:  # Cosmos: the tiny pipeline's test pass-through
        reloaded.safety_checker = pipe.safety_checker
    assert type(reloaded.tokenizer).__name__ == type(pipe.tokenizer).__name__
    kw = call_kwargs(kind, pipe)
    # equal weights, but safetensors-loaded parameters can sit at other memory alignments, which changes the CPU
    # kernels' summation order: outputs agree to float rounding, not always bit for bit
    torch.testing.assert_close(run(reloaded, kw), run(pipe, kw), rtol=0, atol=1e-5)
    with capture(reloaded, layers="all", steps=[0]) as cache:
        run(reloaded, kw)
    assert len(cache.keys()) == 2 * len(cache.adapter.blocks(reloaded.transformer))


def _qk_events(pipe, kw, branch):
    events = []
    with capture(pipe, layers=[1], branch=branch, store=False,
                 on_qk=lambda ev: events.append((ev.step, ev.q_video.clone()))):
        run(pipe, kw)
    return events


@pytest.mark.parametrize("kind", ["wan", "hunyuanvideo", "hunyuanvideo15", "cosmos"])
def test_sequential_cfg_branches_in_pipeline(kind):
    pipe = build_tiny_pipeline(kind)
    extra = {"true_cfg_scale": 3.0, "negative_prompt": "a blue square"} if kind == "hunyuanvideo" else {}
    kw = call_kwargs(kind, pipe, output_type="latent", **extra)
    allq = _qk_events(pipe, kw, "all")
    cond = _qk_events(pipe, kw, "cond")
    uncond = _qk_events(pipe, kw, "uncond")
    # two transformer calls per step: cond first, then uncond
    assert [s for s, _ in allq] == [0, 0, 1, 1]
    assert [s for s, _ in cond] == [0, 1] and [s for s, _ in uncond] == [0, 1]
    for i in range(STEPS):
        assert torch.equal(cond[i][1], allq[2 * i][1]) and torch.equal(uncond[i][1], allq[2 * i + 1][1])
        assert not torch.equal(cond[i][1], uncond[i][1])


def test_hunyuan_single_call_has_no_uncond_branch():
    pipe = build_tiny_pipeline("hunyuanvideo")
    kw = call_kwargs("hunyuanvideo", pipe, output_type="latent")
    with pytest.raises(ValueError, match="branch 'uncond' requested, but step 0 had a single transformer call"):
        with capture(pipe, layers=[0], branch="uncond"):
            run(pipe, kw)


def test_cogvideox_batched_cfg_in_pipeline():
    pipe = build_tiny_pipeline("cogvideox")
    kw = call_kwargs("cogvideox", pipe, output_type="latent")
    with capture(pipe, layers=[1], branch="all") as a, torch.no_grad():
        run(pipe, kw)
    with capture(pipe, layers=[1], branch="cond") as c, torch.no_grad():
        run(pipe, kw)
    assert a.q(1).shape[0] == 2 and torch.equal(c.q(1)[0], a.q(1)[1])  # [uncond, cond]
    assert a.grid.text_len == 226 and a.grid.text_first
