"""CAG as a diffusers guider (difftrack.guiders.CrossAttentionGuidance) in a tiny Wan modular pipeline built offline
(difftrack.testing.build_tiny_modular_pipeline; CPU, fp32).

The modular pipeline with the guider gives bitwise the latents of the library's entry point
(generate_with_cag_diffusers on the standard WanPipeline with the same components, prompt embeddings, seed, steps,
scales and layers); with cag_scale=0 it is bitwise diffusers' ClassifierFreeGuidance; the CAG processors and hooks are
on the transformer only during the conditional forward (restored after a run and after an exception inside a
forward); bad settings raise ValueError naming the value and what is allowed."""
import pytest
import torch
from diffusers import ClassifierFreeGuidance

from difftrack.guidance import CAGConfig, generate_with_cag_diffusers
from difftrack.guiders import CrossAttentionGuidance
from difftrack.testing import FRAMES, HEIGHT, WIDTH, build_tiny_modular_pipeline, build_tiny_pipeline

STEPS = 3
SIZE = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def wan():
    """The tiny WanPipeline, the modular pipeline on the same components, and the prompt embeddings ``[1, 512, 16]``
    (the modular text step needs ftfy, see build_tiny_modular_pipeline)."""
    pipe = build_tiny_pipeline("wan")
    modular = build_tiny_modular_pipeline("wan", pipe=pipe)
    with torch.no_grad():
        pe, npe = pipe.encode_prompt("a red circle moving left", "a blue square", do_classifier_free_guidance=True,
                                     max_sequence_length=512)
    return pipe, modular, dict(prompt_embeds=pe, negative_prompt_embeds=npe)


def modular_latents(modular, guider, embeds, seed=0):
    """``[1, 16, 3, 4, 4]`` final latents of the modular pipeline with ``guider``."""
    modular.update_components(guider=guider)
    return modular(generator=torch.Generator().manual_seed(seed), output="latents", **embeds, **SIZE)


def library_latents(pipe, config, embeds, guidance_scale, shared_prefix, seed=0):
    return generate_with_cag_diffusers(pipe, config, generator=torch.Generator().manual_seed(seed),
                                       guidance_scale=guidance_scale, output_type="latent",
                                       shared_prefix=shared_prefix, **embeds, **SIZE).frames


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


CASES = {  # CAGConfig kwargs, CFG weight, shared prefix
    "cfg-one-layer": (dict(layers=[1], scale=1.5), 5.0, True),
    "cfg-two-layers-no-prefix-zero-after-softmax": (dict(layers=[0, 1], scale=1.0, variant="zero_after_softmax"),
                                                    5.0, False),
    "cfg-linear-decay-window": (dict(layers=[1], scale=2.0, schedule="linear_decay", start_step=1), 4.0, True),
    "no-cfg": (dict(layers=[0], scale=1.5), 1.0, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_modular_wan_with_cag_guider_is_bitwise_the_library_entry_point(wan, case):
    pipe, modular, embeds = wan
    cfg_kwargs, w, share = CASES[case]
    config = CAGConfig(**cfg_kwargs)
    ref = library_latents(pipe, config, embeds, w, share)
    guider = CrossAttentionGuidance.from_cag_config(config, guidance_scale=w, shared_prefix=share)
    out = modular_latents(modular, guider, embeds)
    assert out.shape == (1, 16, 3, 4, 4) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    plain = modular_latents(modular, ClassifierFreeGuidance(guidance_scale=w), embeds)
    assert (out - plain).abs().max() > 1e-3  # CAG changed the video: the equality above is not two plain runs


def test_cag_scale_zero_is_bitwise_classifier_free_guidance(wan):
    pipe, modular, embeds = wan
    transformer = pipe.transformer
    seen = []
    h = transformer.blocks[1].attn1.register_forward_pre_hook(lambda m, a: seen.append(type(m.processor).__name__))
    try:
        out = modular_latents(modular, CrossAttentionGuidance(guidance_scale=5.0, cag_scale=0.0, layers=[1]), embeds)
    finally:
        h.remove()
    ref = modular_latents(modular, ClassifierFreeGuidance(guidance_scale=5.0), embeds)
    assert torch.equal(out, ref)
    assert seen == ["WanAttnProcessor"] * (2 * STEPS)  # two plain forwards per step, no perturbed slot
    # and the guider's combine with s = 0 is the CFG combine itself
    g = CrossAttentionGuidance(guidance_scale=5.0, cag_scale=0.0, layers=[1])
    g.set_state(0, STEPS, torch.tensor(999.0))
    c, u = torch.randn(2, 1, 16, 3, 4, 4).unbind(0)
    assert torch.equal(g.forward(c, u).pred, ClassifierFreeGuidance(guidance_scale=5.0).forward(c, u).pred)


def test_processors_are_on_the_model_only_during_the_conditional_forward(wan):
    pipe, modular, embeds = wan
    transformer = pipe.transformer
    before, hooks = dict(transformer.attn_processors), hook_count(transformer)
    seen = []  # (batch rows, processor class) of block 1's self-attention at each forward
    h = transformer.blocks[1].attn1.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].shape[0], type(m.processor).__name__)))
    try:
        modular_latents(modular, CrossAttentionGuidance(guidance_scale=5.0, cag_scale=1.0, layers=[1]), embeds)
    finally:
        h.remove()
    assert seen == [(2, "CAGWanAttnProcessor"), (1, "WanAttnProcessor")] * STEPS  # [cond, perturbed], then uncond
    after = transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert hook_count(transformer) == hooks


def test_processors_are_restored_when_a_forward_raises(wan):
    pipe, modular, embeds = wan
    transformer = pipe.transformer
    before, hooks = dict(transformer.attn_processors), hook_count(transformer)
    inside = []

    def boom(module, args):  # block 1 runs after the CAG processors went in
        inside.append(type(transformer.blocks[1].attn1.processor).__name__)
        raise RuntimeError("boom inside the conditional forward")

    h = transformer.blocks[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside"):
            modular_latents(modular, CrossAttentionGuidance(guidance_scale=5.0, cag_scale=1.0, layers=[1]), embeds)
    finally:
        h.remove()
    assert inside == ["CAGWanAttnProcessor"]
    after = transformer.attn_processors
    assert all(after[k] is before[k] for k in before) and hook_count(transformer) == hooks
    # prepare_models without a forward: cleanup_models (or the next prepare_models) restores
    g = CrossAttentionGuidance(guidance_scale=5.0, cag_scale=1.0, layers=[0, 1])
    g.set_state(0, STEPS, torch.tensor(999.0))
    g.prepare_models(transformer)
    assert type(transformer.blocks[0].attn1.processor).__name__ == "CAGWanAttnProcessor"
    assert hook_count(transformer) > hooks
    g.cleanup_models(transformer)
    assert all(transformer.attn_processors[k] is before[k] for k in before) and hook_count(transformer) == hooks
    g.set_state(0, STEPS, torch.tensor(999.0))
    g.prepare_models(transformer)
    g.set_state(1, STEPS, torch.tensor(500.0))
    g.prepare_models(transformer)  # a new step's conditional batch: the leftover is removed first
    g.cleanup_models(transformer)
    assert all(transformer.attn_processors[k] is before[k] for k in before) and hook_count(transformer) == hooks


@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"layers=None; .*needs the block indices"),
    (dict(layers=[]), r"layers=\[\] is empty"),
    (dict(layers=[1.0]), r"layers \[1.0\] are not non-negative ints"),
    (dict(layers=[1], cag_scale=-1.0), r"scale=-1.0; allowed: a finite number in \[0, 20\]"),
    (dict(layers=[1], variant="dense"), r"unknown variant 'dense'; allowed: \('renormalized', 'zero_after_softmax'\)"),
    (dict(layers=[1], schedule="cosine"), r"unknown schedule 'cosine'; allowed"),
    (dict(layers=[1], schedule=lambda i: 1.0), r"is a callable; allowed in a guider .*'constant' or 'linear_decay'"),
    (dict(layers=[1], guidance_scale=0.0), r"guidance_scale=0.0; allowed: a finite number > 0"),
    (dict(layers=[1], guidance_scale=float("nan")), r"guidance_scale=nan; allowed"),
    (dict(layers=[1], guidance_scale=True), r"guidance_scale=True; allowed"),
    (dict(layers=[1], shared_prefix="yes"), r"shared_prefix='yes'; allowed: True or False"),
    (dict(layers=[1], cag_start_step=2, cag_stop_step=1), r"stop_step=1 must be None or an int > start_step=2"),
    (dict(layers=[1], stop=1.5), r"Expected `stop` to be between 0.0 and 1.0, but got 1.5"),
    (dict(layers=[1], start="0"), r"start='0'; allowed: a fraction"),
])
def test_bad_settings_are_rejected_with_clear_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossAttentionGuidance(**kwargs)


def test_bad_runs_are_rejected_with_clear_messages(wan):
    pipe, modular, embeds = wan
    transformer = pipe.transformer
    before = dict(transformer.attn_processors)
    with pytest.raises(ValueError, match=r"CAG layer\(s\) \[7\] out of range: .* has 2 blocks, allowed 0..1"):
        modular_latents(modular, CrossAttentionGuidance(layers=[7]), embeds)
    with pytest.raises(ValueError, match=r"start_step=3 is beyond the run of num_inference_steps=3 steps"):
        modular_latents(modular, CrossAttentionGuidance(layers=[1], cag_start_step=3), embeds)
    assert all(transformer.attn_processors[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="config must be a CAGConfig; got dict"):
        CrossAttentionGuidance.from_cag_config({"layers": [1]})
    with pytest.raises(ValueError, match="cannot be serialised"):
        CrossAttentionGuidance.from_cag_config(CAGConfig(layers=[1], schedule=lambda i: 0.5))
    g = CrossAttentionGuidance(layers=[1])
    g.set_state(0, STEPS, torch.tensor(999.0))
    c = torch.zeros(1, 16, 3, 4, 4)
    with pytest.raises(RuntimeError, match="carried no perturbed slot"):
        g.forward(c, c)  # CAG is on, but the conditional forward ran without prepare_models


def test_guider_config_round_trip(tmp_path):
    g = CrossAttentionGuidance(guidance_scale=4.0, cag_scale=0.5, layers=[13, 17, 21], variant="zero_after_softmax",
                               schedule="linear_decay", cag_start_step=2, cag_stop_step=9, shared_prefix=False)
    g.save_pretrained(tmp_path)
    for copy in (g.new(), CrossAttentionGuidance.from_pretrained(tmp_path)):
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert public(copy.config) == public(g.config)
        assert copy.cag_config.to_dict() == dict(layers=[13, 17, 21], scale=0.5, variant="zero_after_softmax",
                                                 schedule="linear_decay", start_step=2, stop_step=9)
        assert copy.guidance_scale == 4.0 and copy.shared_prefix is False


def test_batches_per_step_follow_cfg_and_the_identifiers():
    pe, npe = torch.zeros(1, 4, 16), torch.ones(1, 4, 16)
    g = CrossAttentionGuidance(guidance_scale=5.0, layers=[1], stop=0.5)
    for step, expected in ((0, ["pred_cond", "pred_uncond"]), (1, ["pred_cond"])):  # CFG on for step 0 of 2 only
        g.set_state(step, 2, torch.tensor(999.0))
        batches = g.prepare_inputs({"encoder_hidden_states": (pe, npe)})
        assert [b.__guidance_identifier__ for b in batches] == expected == g._input_predictions[:g.num_conditions]
        assert all(b.encoder_hidden_states is e for b, e in zip(batches, (pe, npe)))
    g1 = CrossAttentionGuidance(guidance_scale=1.0, layers=[1])  # w <= 1: no CFG, as WanPipeline
    g1.set_state(0, 2, torch.tensor(999.0))
    assert g1.num_conditions == 1
