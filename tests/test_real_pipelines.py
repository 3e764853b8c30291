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
from difftrack.backbones.skyreels import encode_prompt
from difftrack.testing import KINDS, build_tiny_pipeline, hunyuan_prompt_template, tiny_size

STEPS = 2


def call_kwargs(kind, pipe, **extra):
    T, H, W = tiny_size(kind)
    kw = dict(prompt="a red circle moving left", num_frames=T, height=H, width=W, num_inference_steps=STEPS,
              output_type="pt")
    if kind == "cogvideox":
        kw.update(negative_prompt="", guidance_scale=6.0)
    elif kind in ("wan", "wan22", "wan22_ti2v", "mochi", "hunyuanvideo15"):  # HunyuanVideo 1.5: the family sets its guider's
        kw.update(negative_prompt="a blue square", guidance_scale=5.0)  # scale (run())
    elif kind.startswith("skyreels"):  # their prompt cleaning needs ftfy: embeddings instead (skyreels docstring)
        kw.update(prompt=None, prompt_embeds=encode_prompt(pipe, kw["prompt"]),
                  negative_prompt_embeds=encode_prompt(pipe, "a blue square"), guidance_scale=5.0)
    elif kind == "cosmos":  # Video2World: a conditioning image (its first latent frame), CFG 7 (the default)
        kw.update(image=[np.full((H, W, 3), 100, np.uint8)], negative_prompt="a blue square", guidance_scale=7.0)
    else:
        kw.update(prompt_template=hunyuan_prompt_template(pipe.tokenizer), guidance_scale=6.0)
    kw.update(extra)
    return kw


def run(pipe, kw, seen=None):
    """The pipeline's ``__call__`` through its family (``guidance_scale`` set the family's way); ``seen`` gets
    ``(step, timestep)`` of every step (from the step callback, the largest of per-frame timesteps; for pipelines
    without one from the scheduler's timesteps after the run)."""
    kw = dict(kw)
    gs = kw.pop("guidance_scale")
    takes_cb = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters
    if seen is not None and takes_cb:
        kw["callback_on_step_end"] = lambda p, i, t, d: seen.append((i, float(t.max()))) or {}  # DF: t per frame
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
    # the transformer's own timestep of each step as the family builds it: the scheduler's (per frame / per token:
    # its largest), Cosmos' sigma / (sigma + 1) of its EDM sigma
    family, x = family_for(pipe), torch.zeros(1, 1, 3, 2, 2)  # [B, C, F, h, w] latents: the argument's shape only
    model_t = {i: float(family.timestep_input(pipe, torch.tensor(t), x).max()) for i, t in seen}
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


@pytest.mark.parametrize("kind", ["wan", "hunyuanvideo", "wan22_ti2v", "skyreels_v2", "skyreels_v2_df",
                                  "hunyuanvideo15", "cosmos"])
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


def _timesteps_seen(pipe, kw):
    """The ``timestep`` argument of every transformer call of one run."""
    seen = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].clone()),
                                                   with_kwargs=True)
    try:
        run(pipe, kw)
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", ["wan", "wan22_ti2v", "skyreels_v2", "skyreels_v2_df", "mochi"])
def test_runner_transformer_calls_match_the_pipelines(kind):
    """The runners' bare forwards (analysis on real videos, tracking) pass the timestep in the pipeline's form
    (Wan 2.2 TI2V: [B, N] per token; SkyReels-V2 diffusion forcing: [B, F] per frame) at the pipeline's schedule
    (Mochi: its linear-quadratic sigmas, rising timesteps), with the same extra conditioning."""
    from difftrack.runners import VideoRunner

    pipe = build_tiny_pipeline(kind)
    kw = call_kwargs(kind, pipe, output_type="latent")
    seen = _timesteps_seen(pipe, kw)
    runner = VideoRunner(pipe)
    ts = runner.timesteps(STEPS)
    calls = 2 if kind != "mochi" else 1  # sequential CFG: cond and uncond per step; Mochi: one batched call
    assert len(seen) == calls * STEPS
    x = torch.zeros((1, pipe.transformer.config.in_channels, 3, 4, 4))
    for i, t in enumerate(ts):
        mine = runner.forward_kwargs(x, torch.tensor(t), runner.cond("a red circle"))
        theirs = seen[calls * i][:1]  # the first row (Mochi's batch is [uncond, cond])
        assert mine["timestep"].shape == theirs.shape and torch.equal(mine["timestep"].float(), theirs.float())
    shape = {"wan22_ti2v": (1, 12), "skyreels_v2_df": (1, 3)}.get(kind, (1,))
    assert tuple(seen[0][:1].shape) == shape
    extra = set(runner.cond("a red circle"))
    assert extra == {"encoder_hidden_states"} | {"skyreels_v2_df": {"enable_diffusion_forcing", "fps"},
                                                 "mochi": {"encoder_attention_mask"}}.get(kind, set())


def test_mochi_noising_and_size_conventions():
    """Mochi noises as its inverted flow: t = 0 is pure noise, t = 1000 the clean latent; 6x temporal, 8x spatial
    compression, default size 19 x 480 x 848."""
    from difftrack.runners import VideoRunner

    runner = VideoRunner(build_tiny_pipeline("mochi"))
    assert (runner.temporal, runner.vae_spatial, runner.default_size()) == (6, 8, (19, 480, 848))
    x0, eps = torch.randn(1, 12, 3, 4, 4), torch.randn(1, 12, 3, 4, 4)
    assert torch.equal(runner.add_noise(x0, eps, torch.tensor(0.0)), eps)
    torch.testing.assert_close(runner.add_noise(x0, eps, torch.tensor(1000.0)), x0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="frames=9; MochiPipeline needs at least 2 frames and frames - 1 divisible "
                                         "by its temporal compression 6"):
        runner.check_size((9, 32, 32))


def test_cosmos_bare_forwards_take_the_pipelines_edm_inputs():
    """Cosmos' bare forwards (runner, tracking) noise and time through the family as the pipeline feeds its
    transformer: timestep ``t' = sigma / (sigma + 1)`` of the step's EDM sigma (the pipeline's value for its noisy
    frames; frame 0 is its conditioning frame), input ``(1 - t') x0 + t' eps``, not the scheduler's own rule."""
    from difftrack.runners import VideoRunner

    pipe = build_tiny_pipeline("cosmos")
    seen = _timesteps_seen(pipe, call_kwargs("cosmos", pipe, output_type="latent"))  # [1, 1, F, 1, 1] per call
    runner = VideoRunner(pipe)
    ts = runner.timesteps(STEPS)
    x0, eps = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 3, 4, 4)
    for i, t in enumerate(ts):
        mine = runner.forward_kwargs(x0, torch.tensor(t), runner.cond("a red circle"))["timestep"]
        theirs = seen[2 * i][0, 0, 1:, 0, 0]  # the cond call's noisy frames
        assert mine.shape == (1,) and torch.equal(theirs, mine.expand(2))
        sigma = pipe.scheduler.sigmas[i]
        assert t > 1.0 and float(mine) == pytest.approx(float(sigma / (sigma + 1)), rel=1e-6)
        torch.testing.assert_close(runner.add_noise(x0, eps, torch.tensor(t)), (1 - mine) * x0 + mine * eps,
                                   rtol=0, atol=0)


def test_skyreels_diffusion_forcing_async_steps_are_the_step_matrix_rows():
    """ar_step > 0: frames at different levels in one call and more loop rows than steps. Capture counts one step
    per row of the pipeline's step matrix (its callback index), records the noisiest frame's timestep, and is
    exact; the rows' levels differ across frames."""
    pipe = build_tiny_pipeline("skyreels_v2_df")
    kw = call_kwargs("skyreels_v2_df", pipe, output_type="latent", ar_step=1, causal_block_size=1)
    ref = run(pipe, kw)
    seen = []
    with capture(pipe, layers=[0], branch="uncond") as cache:
        out = run(pipe, kw, seen)
    assert torch.equal(ref, out)
    rows = _timesteps_seen(pipe, kw)[::2]
    assert len(rows) > STEPS and any(len(set(r[0].tolist())) > 1 for r in rows)
    assert sorted(cache.timesteps) == [i for i, _ in seen] == list(range(len(rows)))
    assert [cache.timesteps[i] for i in range(len(rows))] == [float(r.max()) for r in rows]


@pytest.mark.parametrize("kind", ["mochi", "hunyuanvideo"])
def test_tracker_uses_the_pipelines_schedule(kind):
    """DiffTracker on a pipeline sets its timesteps the family's way (Mochi's linear-quadratic sigmas,
    HunyuanVideo's linspace sigmas), the same schedule the analysis runner reads."""
    from difftrack.runners import VideoRunner
    from difftrack.tracking import DiffTracker

    pipe = build_tiny_pipeline(kind)
    tracker = DiffTracker(pipe, layers=[0], step=[0, 1, 2], num_steps=3)
    assert [float(t) for t in tracker.timesteps] == VideoRunner(pipe).timesteps(3)
