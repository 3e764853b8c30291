"""Multi-expert pipelines: Wan 2.2 A14B (``WanPipeline`` with ``transformer_2`` and ``boundary_ratio``), on the tiny
two-expert pipeline of ``difftrack.testing`` (``build_tiny_pipeline("wan22")``; fp32, CPU).

The pipeline calls ``transformer`` at timesteps ``t >= 0.875 * 1000`` and ``transformer_2`` below (4 steps: 1000,
910 | 717, 24), combining the latter's CFG with ``guidance_scale_2``. Capture, analysis, tracking and CAG cover both
experts: each step is recorded / perturbed in the expert that ran it, names carry the expert, the tracker uses the
pipeline's expert at its timestep (or the one named), and what cannot be recorded is an error naming the expert.
"""
import numpy as np
import pytest
import torch

from difftrack.capture import capture
from difftrack.guidance import CAGConfig, apply_cag, cag_combine, cag_hooks, generate_with_cag_diffusers
from difftrack.testing import FRAMES, HEIGHT, WIDTH, build_tiny_modular_pipeline, build_tiny_pipeline
from difftrack.hooks import IncompleteRunError

STEPS = 4
RULE = ["transformer", "transformer", "transformer_2", "transformer_2"]  # timesteps 1000, 910 | 717, 24
NAMES = ("transformer", "transformer_2")
PROMPT, NEGATIVE = "a red circle moving left", "a blue square"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("wan22")


def call_kwargs(**extra):
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_frames=FRAMES, height=HEIGHT,
              width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    kw.update(extra)
    return kw


def run(pipe, **extra):
    return pipe(generator=torch.Generator().manual_seed(0), **call_kwargs(**extra)).frames


class CallCounter:
    """Forward calls (and their timesteps) of each expert, by forward pre-hooks removed on exit."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, {n: [] for n in NAMES}

    def __enter__(self):
        self.handles = [getattr(self.pipe, n).register_forward_pre_hook(
            lambda m, a, kw, n=n: self.calls[n].append(float(kw["timestep"].max())), with_kwargs=True)
            for n in NAMES]
        return self.calls

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def assert_clean(pipe):
    """No difftrack processor or hook left on any expert."""
    for n, t in [(n, getattr(pipe, n, None)) for n in NAMES]:
        if t is None:
            continue
        procs = [type(p).__name__ for p in t.attn_processors.values()]
        assert not [p for p in procs if p.startswith(("Capturing", "CAG"))], (n, procs)
        assert not t._forward_pre_hooks and not t._forward_hooks, n


def test_the_expert_rule_is_the_pipelines(pipe):
    from difftrack.backbones import experts

    ex = experts(pipe)
    assert ex.names == NAMES and ex.several
    assert ex.models["transformer_2"] is pipe.transformer_2
    with CallCounter(pipe) as calls:
        run(pipe)
    pipe.scheduler.set_timesteps(STEPS)
    assert [ex.at(t) for t in pipe.scheduler.timesteps] == RULE
    for n in NAMES:  # two calls a step (cond, uncond) in the expert the rule names, none in the other
        want = [float(t) for t, e in zip(pipe.scheduler.timesteps, RULE) if e == n]
        assert calls[n] == [t for t in want for _ in range(2)]
    assert ex.guidance_scales(5.0, {"guidance_scale_2": 2.0}) == {"transformer": 5.0, "transformer_2": 2.0}
    assert ex.guidance_scales(5.0, {}) == {"transformer": 5.0, "transformer_2": 5.0}
    assert experts(build_tiny_pipeline("wan")).names == ("transformer",)  # Wan 2.1: one expert, as before


def test_capture_records_every_step_from_the_expert_that_ran_it_exactly(pipe):
    ref = run(pipe)
    with capture(pipe, layers="all", what=("q", "k", "features")) as cache, \
            capture(pipe.transformer_2, layers=[1]) as bare:  # the second expert alone: its calls count from 0
        out = run(pipe)
    assert torch.equal(ref, out)  # bit-identical with and without capture
    assert cache.step_experts == dict(enumerate(RULE)) and cache.experts == NAMES
    want = {(f"{e}.blocks.{l}.{kind}", s) for s, e in enumerate(RULE) for l in (0, 1)
            for kind in ("attn.q", "attn.k", "out")}
    assert set(cache.keys()) == want
    # the values are those of the expert that ran the step: transformer_2's step 2 is its own first call
    assert torch.equal(cache[("transformer_2.blocks.1.attn.q", 2)], bare.q(1, step=0))
    assert torch.equal(cache.q(1, step=2), bare.q(1, step=0))  # no expert given: the one that ran step 2
    assert torch.equal(cache.k(1, step=3, expert="transformer_2"), bare.k(1, step=1))
    assert not torch.equal(cache.q(1, step=1), cache.q(1, step=2))
    assert torch.equal(cache.q(0), cache.q(0, step=3))  # latest step
    with pytest.raises(KeyError, match="transformer.blocks.0.attn.q"):
        cache.q(0, step=3, expert="transformer")  # transformer did not run step 3
    assert_clean(pipe)


def test_capture_of_one_expert_refuses_a_step_the_other_runs(pipe):
    with capture(pipe, layers=[0], steps=[-1], num_steps=STEPS, experts="transformer_2") as cache:
        run(pipe)
    assert cache.keys() == [("transformer_2.blocks.0.attn.q", 3), ("transformer_2.blocks.0.attn.k", 3)]
    ran = []  # blocks of transformer_2 that computed
    handle = pipe.transformer_2.blocks[0].register_forward_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(ValueError, match=r"step 2 was requested, but the pipeline runs it with 'transformer_2'"
                                             r".*experts=\['transformer'\]"):
            with capture(pipe, layers=[0], steps=[0, 2], num_steps=STEPS, experts=["transformer"]):
                run(pipe)
    finally:
        handle.remove()
    assert not ran  # refused before the second expert's first forward computed anything
    assert_clean(pipe)
    with pytest.raises(ValueError, match=r"experts='transformer_3'; allowed: None \(every expert\) or names among "
                                         r"\['transformer', 'transformer_2'\]"):
        with capture(pipe, layers=[0], experts="transformer_3"):
            pass
    one_pipe = build_tiny_pipeline("wan")
    with capture(one_pipe, layers=[0]) as one:
        run(one_pipe)
    with pytest.raises(ValueError, match="expert='transformer_2' was not captured"):
        one.q(0, expert="transformer_2")


def test_analysis_records_each_step_from_the_right_expert(pipe):
    from difftrack.analysis import analyze_exact, analyze_generation
    from difftrack.runners import VideoRunner
    from difftrack.world import World

    with CallCounter(pipe) as calls:
        video, rec = analyze_generation(pipe, PROMPT, seed=0, num_steps=STEPS, grid_size=3, guidance_scale=5.0,
                                        size=(FRAMES, HEIGHT, WIDTH))
    for name in ("qk_tracks", "feat_tracks", "max_text", "sum_text", "max_frame", "sum_frame"):
        assert np.isfinite(getattr(rec, name)).all(), name  # no step left NaN by the second expert
    assert rec.meta["experts"] == RULE
    assert len(calls["transformer"]) == 4 and len(calls["transformer_2"]) == 4  # cond + uncond per step
    sample = World(FRAMES, HEIGHT, WIDTH).sample(0, "objects")
    with CallCounter(pipe) as calls:
        ex = analyze_exact(pipe, sample, num_steps=STEPS, grid_size=3)
    assert np.isfinite(ex.qk_tracks).all() and ex.meta["experts"] == RULE
    ts = VideoRunner(pipe).timesteps(STEPS)
    assert calls == {n: [t for t, e in zip(ts, RULE) if e == n] for n in NAMES}  # one forward per step, right expert
    one = build_tiny_pipeline("wan")  # single transformer: the record is as before (no "experts" entry)
    _, r1 = analyze_generation(one, PROMPT, seed=0, num_steps=2, grid_size=3, size=(FRAMES, HEIGHT, WIDTH))
    assert "experts" not in r1.meta and np.isfinite(r1.qk_tracks).all()


def test_tracker_uses_the_pipelines_expert_at_its_timestep(pipe):
    from difftrack.tracking import DiffTracker

    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    queries = np.array([[0, 10.0, 12.0], [2, 20.0, 5.0]])
    out = {}
    for key, kw in {"last": dict(step=-1), "first": dict(step=0), "both": dict(step=[0, -1]),
                    "named": dict(step=-1, expert="transformer"), "named2": dict(step=-1, expert="transformer_2")
                    }.items():
        tracker = DiffTracker(pipe, layers=(1,), num_steps=STEPS, **kw)
        with CallCounter(pipe) as calls:
            out[key] = tracker(video, queries)
        out[key] += (tracker.step_experts, {n: len(c) > 0 for n, c in calls.items()})
    assert out["last"][2:] == (["transformer_2"], {"transformer": False, "transformer_2": True})
    assert out["first"][2:] == (["transformer"], {"transformer": True, "transformer_2": False})
    assert out["both"][2:] == (["transformer", "transformer_2"], {"transformer": True, "transformer_2": True})
    assert out["named"][2:] == (["transformer"], {"transformer": True, "transformer_2": False})
    for i in (0, 1):  # the pipeline's choice at step -1 is transformer_2: the same tracks as naming it
        assert np.array_equal(out["last"][i], out["named2"][i])
    assert not np.array_equal(out["last"][0], out["named"][0])  # the two experts give other tracks
    with pytest.raises(ValueError, match=r"expert='transformer_3'; allowed: None \(the pipeline's choice at each "
                                         r"timestep\) or one of \['transformer', 'transformer_2'\]"):
        DiffTracker(pipe, layers=(1,), expert="transformer_3")
    with pytest.raises(ValueError, match=r"expert='transformer_2'.*one of \['transformer'\]"):
        DiffTracker(build_tiny_pipeline("wan"), layers=(1,), expert="transformer_2")


def reference_cag(pipe, config, w, w2):
    """Wan 2.2 CAG written out step by step: the expert of each timestep by the boundary, ``v_u + w_e (v_c - v_u)
    + s (v_c - v_p)`` with ``v_p`` from that expert under :func:`apply_cag`, the pipeline's scheduler step."""
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, device="cpu",
                                     max_sequence_length=512)  # the pipeline's default length
        pipe.scheduler.set_timesteps(STEPS)
        pipe.scheduler.set_begin_index(0)
        z = pipe.prepare_latents(1, 16, HEIGHT, WIDTH, FRAMES, torch.float32, torch.device("cpu"),
                                 torch.Generator().manual_seed(0))
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        for i, t in enumerate(pipe.scheduler.timesteps):
            model, weight = (pipe.transformer, w) if t >= boundary else (pipe.transformer_2, w2)
            kw = dict(hidden_states=z, timestep=t.expand(1), return_dict=False)
            v_c = model(encoder_hidden_states=pe, **kw)[0]
            v_u = model(encoder_hidden_states=ne, **kw)[0]
            with apply_cag(model, config):
                v_p = model(encoder_hidden_states=pe, **kw)[0]
            v = cag_combine(v_u, v_c, v_p, weight, config.scale_at(i, STEPS))
            z = pipe.scheduler.step(v, t, z, return_dict=False)[0]
    return z


def test_cag_perturbs_in_both_experts_with_each_experts_cfg_weight(pipe):
    config = CAGConfig(layers=[1], scale=1.0)

    def cag(cfg, **extra):
        kw = call_kwargs(**extra)
        gs = kw.pop("guidance_scale")
        return generate_with_cag_diffusers(pipe, cfg, generator=torch.Generator().manual_seed(0),
                                           guidance_scale=gs, shared_prefix=False, **kw).frames

    ref = run(pipe, guidance_scale_2=2.0)
    assert torch.equal(cag(CAGConfig(layers=[1], scale=0.0), guidance_scale_2=2.0), ref)  # scale 0: bitwise
    guided = cag(config, guidance_scale_2=2.0)
    assert (guided - ref).abs().max() > 1e-3
    torch.testing.assert_close(guided, reference_cag(pipe, config, 5.0, 2.0), rtol=0, atol=1e-4)
    with cag_hooks(pipe, CAGConfig(layers=[0, 1], scale=1.0), 5.0, STEPS,
                   expert_guidance_scales={"transformer_2": 2.0}) as state:
        run(pipe, guidance_scale_2=2.0)
    assert state.step_experts == dict(enumerate(RULE))  # each step perturbed in the expert that ran it
    assert state.calls_by_expert == {"transformer": 4, "transformer_2": 4}  # 2 layers x 2 steps each
    # only transformer_2's steps perturbed (window 2..4): its CFG weight is guidance_scale_2
    late = cag(CAGConfig(layers=[1], scale=1.0, start_step=2), guidance_scale_2=2.0)
    torch.testing.assert_close(late, reference_cag(pipe, CAGConfig(layers=[1], scale=1.0, start_step=2), 5.0, 2.0),
                               rtol=0, atol=1e-4)
    assert_clean(pipe)
    with pytest.raises(ValueError, match=r"the CFG weight of transformer_2=0.0; allowed: a finite number > 0"):
        with cag_hooks(pipe, config, 5.0, STEPS, expert_guidance_scales={"transformer_2": 0.0}):
            pass
    with pytest.raises(ValueError, match=r"expert_guidance_scales names \['transformer_3'\]"):
        with cag_hooks(pipe, config, 5.0, STEPS, expert_guidance_scales={"transformer_3": 2.0}):
            pass


@pytest.mark.parametrize("kind", ["wan", "wan22"])
def test_cag_checks_every_layer_was_perturbed(kind, monkeypatch):
    """A block that does not run (as a layer-skip hook would make it) is an error naming the step and expert, not a
    sample guided in fewer layers than asked."""
    p = build_tiny_pipeline(kind)
    expert = "transformer_2" if kind == "wan22" else "transformer"
    block = getattr(p, expert).blocks[1]
    monkeypatch.setattr(block, "forward", lambda hidden_states, *a, **k: hidden_states)
    kw = call_kwargs()
    gs = kw.pop("guidance_scale")
    first = RULE.index(expert)
    by = r" \(run by transformer_2\)" if kind == "wan22" else ""
    with pytest.raises(IncompleteRunError, match=rf"(?s)CAG: the run is incomplete.*\(layer 1, step {first}\).*: the "
                                                 rf"step ran{by} but the block's self-attention was not reached"):
        generate_with_cag_diffusers(p, CAGConfig(layers=[0, 1], scale=1.0), generator=torch.Generator().manual_seed(0),
                                    guidance_scale=gs, **kw)
    assert_clean(p)


def test_modular_wan22_with_a_cag_guider_per_expert_is_bitwise_the_library(pipe):
    from difftrack.guiders import CrossAttentionGuidance

    modular = build_tiny_modular_pipeline("wan22", pipe=pipe)
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=512)
    size = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS)
    cfg = dict(cag_scale=1.5, layers=[1], cag_start_step=1)
    modular.update_components(guider=CrossAttentionGuidance(guidance_scale=5.0, **cfg),
                              guider_2=CrossAttentionGuidance(guidance_scale=3.0, **cfg))
    with CallCounter(pipe) as calls:
        got = modular(generator=torch.Generator().manual_seed(0), output="latents", prompt_embeds=pe,
                      negative_prompt_embeds=npe, **size)
    want = generate_with_cag_diffusers(pipe, CAGConfig(layers=[1], scale=1.5, start_step=1),
                                       generator=torch.Generator().manual_seed(0), guidance_scale=5.0,
                                       guidance_scale_2=3.0, output_type="latent", prompt_embeds=pe,
                                       negative_prompt_embeds=npe, **size).frames
    assert torch.equal(got, want)
    assert len(calls["transformer"]) == len(calls["transformer_2"]) == 4  # cond and uncond, 2 steps each
    assert_clean(pipe)
    # the low-noise guider first runs at step 2: its step window is still checked against the run
    modular.update_components(guider_2=CrossAttentionGuidance(guidance_scale=3.0, cag_scale=1.0, layers=[1],
                                                              cag_stop_step=STEPS + 1))
    with pytest.raises(ValueError, match=rf"stop_step={STEPS + 1} is beyond the run of num_inference_steps={STEPS}"):
        modular(generator=torch.Generator().manual_seed(0), output="latents", prompt_embeds=pe,
                negative_prompt_embeds=npe, **size)
