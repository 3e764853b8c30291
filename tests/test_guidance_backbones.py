"""Cross-Attention Guidance on Wan and HunyuanVideo (tiny random configs of the real diffusers classes, CPU fp32):
the perturbed attention equals a dense-mask reference inside the real processors, the hooks fold the CAG term into
the pipelines' own (sequential) CFG combine, and scale 0 is bitwise the unguided pipeline."""
import inspect
import math

import pytest
import torch
from conftest import processors
import torch.nn.functional as F
from test_backbones import (cosmos_inputs, hunyuan15_inputs, hunyuan_inputs, skyreels_inputs, tiny_cosmos, tiny_hunyuan,
                            tiny_hunyuan15, tiny_mochi, tiny_skyreels, tiny_wan, wan_inputs)
from test_guidance import dense_mask
from test_real_pipelines import call_kwargs
from torch.overrides import TorchFunctionMode

from difftrack.backbones import family_for
from difftrack.guidance import CAGConfig, apply_cag, cag_hooks, frame_local_attention, generate_with_cag_diffusers
from difftrack.testing import build_tiny_pipeline

VARIANTS = ["renormalized", "zero_after_softmax"]
F_, R_, C_ = 2, 4, 3  # the token grid of test_backbones' inputs


def dense_masked(q, k, v, allowed, variant):
    """Reference: ``allowed`` bool [B, N, N] (frame rule AND key padding)."""
    if variant == "renormalized":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    valid = allowed.any(1, keepdim=True)  # keys some query may see = the non-padded ones
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~valid[:, None], float("-inf"))
    return (torch.softmax(s, -1) * allowed[:, None]) @ v  # full softmax over valid keys, cross-frame zeroed


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("text_first", [True, False])
def test_frame_local_attention_with_key_padding_equals_dense(variant, text_first):
    g = torch.Generator().manual_seed(3)
    frames, P, L = 3, 5, 4
    n = L + frames * P
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) * 2 for _ in range(3))
    key_mask = torch.ones(2, n, dtype=torch.bool)
    text = slice(0, L) if text_first else slice(n - L, n)
    key_mask[1, text.stop - 2:text.stop] = False  # the second sample's last two text tokens are padding
    allowed = dense_mask(L, frames, P, text_first)[None] & key_mask[:, None, :]
    ref = dense_masked(q, k, v, allowed, variant)
    out = frame_local_attention(q, k, v, frames=frames, text_len=L, variant=variant, text_first=text_first,
                                query_chunk=4, key_chunk=6, key_mask=key_mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        frame_local_attention(q, k, v, frames=frames, text_len=L, key_mask=key_mask[:, :-1])


class DenseSDPA(TorchFunctionMode):
    """Test-only reference: the self-attention SDPA call replaced by a dense N x N masked attention."""

    def __init__(self, frames, text_len, text_first, variant):
        super().__init__()
        self.args, self.variant, self.n = (text_len, frames, R_ * C_, text_first), variant, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            a = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
            q, k, v, m = a["query"], a["key"], a["value"], a.get("attn_mask")
            allowed = dense_mask(*self.args)[None].expand(q.shape[0], -1, -1)
            if m is not None:  # key padding [B, 1, 1, N] (HunyuanVideo) or a full [B, 1, N, N] mask (SkyReels-V2)
                allowed = allowed & (m[:, 0, 0][:, None, :] if m.shape[2] == 1 else m[:, 0])
            self.n += 1
            return dense_masked(q, k, v, allowed, self.variant)
        return func(*args, **kwargs)


def _dense_processor(original, mode):
    """The original processor run under ``mode``, with its ``__call__`` signature (diffusers' Attention drops keyword
    arguments a processor's signature lacks)."""
    def __call__(self, *args, **kwargs):
        with mode:
            return original(*args, **kwargs)

    __call__.__signature__ = inspect.signature(type(original).__call__)
    return type(f"Dense{type(original).__name__}", (), {"__call__": __call__})()


def _dense_run(m, kw, attn, mode):
    """``m(**kw)[0]`` with ``attn``'s processor run under the dense reference ``mode`` (restored after)."""
    original = attn.processor
    attn.set_processor(_dense_processor(original, mode))
    try:
        return m(**kw)[0]
    finally:
        attn.set_processor(original)


CASES = {  # name: (builder, inputs, text tokens in the self-attention, layer -> block)
    "wan": (lambda: tiny_wan(), lambda: wan_inputs(batch=1), 0, lambda m, l: m.blocks[l]),
    "hunyuan-dual": (lambda: tiny_hunyuan(), lambda: hunyuan_inputs(batch=2), 6, lambda m, l: m.transformer_blocks[l]),
    "hunyuan-single": (lambda: tiny_hunyuan(), lambda: hunyuan_inputs(batch=2), 6,
                       lambda m, l: m.single_transformer_blocks[l - len(m.transformer_blocks)]),
    # [video, image, glyph, text] with a [B, 1, N, N] mask masking padding as keys and as queries
    "hunyuan15": (lambda: tiny_hunyuan15(), lambda: hunyuan15_inputs(batch=2), 13,
                  lambda m, l: m.transformer_blocks[l]),
    "cosmos": (lambda: tiny_cosmos(), lambda: cosmos_inputs(batch=2), 0, lambda m, l: m.transformer_blocks[l]),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case,layer", [("wan", 1), ("hunyuan-dual", 1), ("hunyuan-single", 2), ("hunyuan15", 1),
                                        ("cosmos", 1)])
def test_perturbed_attention_in_real_processors_equals_dense_reference(case, layer, variant):
    build, inputs, text_len, block_of = CASES[case]
    m, kw = build(), inputs()
    with torch.no_grad():
        plain = m(**kw)[0]
        with apply_cag(m, CAGConfig(layers=[layer], variant=variant)) as state:  # whole batch perturbed
            out = m(**kw)[0]
        assert state.calls == 1
        mode = DenseSDPA(F_, text_len, text_first=False, variant=variant)
        block = block_of(m, layer)
        ref = _dense_run(m, kw, block.attn1 if hasattr(block, "attn1") else block.attn, mode)
    assert mode.n == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - plain).abs().max() > 1e-4
    assert all(not type(p).__name__.startswith("CAG") for p in processors(m).values())


def test_only_perturbed_slot_changes_in_wan():
    m, kw = tiny_wan(), wan_inputs(batch=1)
    kw2 = dict(kw, hidden_states=kw["hidden_states"].repeat(2, 1, 1, 1, 1), timestep=kw["timestep"].repeat(2),
               encoder_hidden_states=kw["encoder_hidden_states"].repeat(2, 1, 1))
    cfg = CAGConfig(layers=[0, 1])
    with torch.no_grad():
        plain = m(**kw)[0]
        with apply_cag(m, cfg) as state:
            state.set_slots(2, [1])
            out2 = m(**kw2)[0]
            state.set_slots(1, [0])
            pert = m(**kw)[0]
    torch.testing.assert_close(out2[:1], plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(out2[1:], pert, rtol=0, atol=1e-5)
    assert (pert - plain).abs().max() > 1e-4


@pytest.mark.parametrize("do_cfg", [True, False])
def test_sequential_hooks_fold_cag_into_the_cond_call(do_cfg):
    m = tiny_wan()
    cond, uncond = wan_inputs(batch=1, text_seed=5), wan_inputs(batch=1, text_seed=9)
    cfg, w = CAGConfig(layers=[1], scale=0.7), 5.0
    with torch.no_grad():
        v_c, v_u = m(**cond)[0], m(**uncond)[0]
        with apply_cag(m, cfg):
            v_p = m(**cond)[0]
        with cag_hooks(m, cfg, w if do_cfg else 1.0, num_inference_steps=1, do_cfg=do_cfg) as state:
            h_c = m(**cond)[0]
            if do_cfg:
                h_u = m(**uncond)[0]  # same timestep: the step's unconditional call passes through
    expected = v_c + (0.7 / w) * (v_c - v_p) if do_cfg else v_c + 0.7 * (v_c - v_p)
    torch.testing.assert_close(h_c, expected, rtol=0, atol=1e-5)
    if do_cfg:
        assert torch.equal(h_u, v_u)
        torch.testing.assert_close(v_u + w * (h_c - v_u), v_u + w * (v_c - v_u) + 0.7 * (v_c - v_p),
                                   rtol=0, atol=1e-4)
    assert state.step == 1 and not m._forward_pre_hooks and not m._forward_hooks


@pytest.mark.parametrize("kind,extra", [("wan", {}), ("hunyuanvideo", {}),
                                        ("hunyuanvideo", {"true_cfg_scale": 3.0, "negative_prompt": "a blue square"}),
                                        ("wan22_ti2v", {}), ("skyreels_v2", {}),
                                        ("skyreels_v2_df", {"causal_block_size": 2, "num_frames": 13}),
                                        ("hunyuanvideo15", {}), ("cosmos", {})],
                         ids=["wan-cfg", "hunyuan-embedded-guidance", "hunyuan-true-cfg", "wan22-ti2v",
                              "skyreels-v2", "skyreels-v2-df-block-causal", "hunyuan15-guider-cfg", "cosmos-cfg"])
def test_unmodified_diffusers_pipelines_with_cag(kind, extra):
    pipe = build_tiny_pipeline(kind)
    kw = call_kwargs(kind, pipe, output_type="latent", **extra)
    gs = kw.pop("guidance_scale")
    before = {k: type(p) for k, p in processors(pipe.transformer).items()}

    def run(config):
        return generate_with_cag_diffusers(pipe, config, generator=torch.Generator().manual_seed(0),
                                           guidance_scale=gs, **kw).frames

    ref = family_for(pipe).call(pipe, gs, generator=torch.Generator().manual_seed(0), **kw).frames
    guider = getattr(pipe, "guider", None)
    assert torch.equal(run(CAGConfig(layers=[1], scale=0.0)), ref)
    assert torch.equal(run(None), ref)
    guided = run(CAGConfig(layers=[0, 1], scale=1.0))
    assert guided.shape == ref.shape and torch.isfinite(guided).all()
    assert (guided - ref).abs().max() > 1e-4
    assert {k: type(p) for k, p in processors(pipe.transformer).items()} == before
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    assert getattr(pipe, "guider", None) is guider  # HunyuanVideo 1.5: its own guider is back


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_causal_skyreels_perturbed_attention_equals_dense_reference(variant):
    """SkyReels-V2 with 2-frame causal blocks passes a [1, 1, N, N] mask; a frame always sees its own block, so the
    perturbed rows are the plain frame-local attention, and unperturbed rows keep the causal mask."""
    frames = 4
    m = tiny_skyreels(block=2)
    kw = skyreels_inputs(levels=(300.0,) * frames)
    kw["hidden_states"] = torch.randn(1, 4, frames, 2 * R_, 2 * C_, generator=torch.Generator().manual_seed(4))
    two = dict(kw, hidden_states=kw["hidden_states"].repeat(2, 1, 1, 1, 1), timestep=kw["timestep"].repeat(2, 1),
               encoder_hidden_states=kw["encoder_hidden_states"].repeat(2, 1, 1))  # fps [1] broadcasts (as CAG)
    with torch.no_grad():
        plain = m(**kw)[0]
        with apply_cag(m, CAGConfig(layers=[1], variant=variant)) as state:
            out = m(**kw)[0]
            state.set_slots(2, [1])
            both = m(**two)[0]
        mode = DenseSDPA(frames, 0, text_first=False, variant=variant)
        ref = _dense_run(m, kw, m.blocks[1].attn1, mode)
    assert mode.n == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[:1], plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:], out, rtol=0, atol=1e-5)
    assert (out - plain).abs().max() > 1e-4


def test_cag_refuses_what_its_hooks_cannot_follow():
    """Mochi attends per batch row over sequences of different lengths (no CAG processor); asynchronous diffusion
    forcing and multi-window long videos run more loop rows than steps. Refused before any work."""
    with pytest.raises(ValueError, match=r"CAG is implemented for .* got MochiTransformer3DModel \(mochi\)"):
        with apply_cag(tiny_mochi(), CAGConfig(layers=[0])):
            pass
    pipe = build_tiny_pipeline("skyreels_v2_df")
    kw = call_kwargs("skyreels_v2_df", pipe, output_type="latent")
    gs = kw.pop("guidance_scale")
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"ar_step=2: asynchronous diffusion forcing .* allowed: ar_step=0"):
            generate_with_cag_diffusers(pipe, CAGConfig(layers=[1]), guidance_scale=gs, ar_step=2, **kw)
        with pytest.raises(ValueError, match=r"num_frames=13 > base_num_frames=9 with overlap_history"):
            generate_with_cag_diffusers(pipe, CAGConfig(layers=[1]), guidance_scale=gs,
                                        **dict(kw, num_frames=13, base_num_frames=9, overlap_history=5))
    finally:
        h.remove()
    assert not calls


def test_cag_errors_name_the_allowed_values():
    from difftrack.backbones import adapter_for

    m = tiny_hunyuan()
    n = len(adapter_for(m).blocks(m))
    with pytest.raises(ValueError, match=rf"out of range.*allowed 0\.\.{n - 1}"):
        with apply_cag(m, CAGConfig(layers=[n])):
            pass


@pytest.mark.parametrize("kind,extra", [("cogvideox", {}), ("wan", {}), ("hunyuanvideo", {}),
                                        ("hunyuanvideo", {"true_cfg_scale": 3.0, "negative_prompt": "a blue square"}),
                                        ("wan22_ti2v", {}), ("skyreels_v2_df", {})],
                         ids=["cogvideox", "wan-cfg", "hunyuan-embedded-guidance", "hunyuan-true-cfg", "wan22-ti2v",
                              "skyreels-v2-df"])
def test_shared_prefix_cag_equals_the_three_slot_cag_up_to_rounding(kind, extra):
    """On every pipeline CAG supports, the shared-prefix CAG (blocks before the first CAG layer computed once for the
    conditional and perturbed slots) gives the 3-slot sample up to float rounding in fp32 on the CPU (not bitwise:
    see test_guidance's batch-position test), for a layer set starting after block 0, and the first block really
    runs without the perturbed slot."""
    from difftrack.backbones import adapter_for

    pipe = build_tiny_pipeline(kind)
    kw = call_kwargs(kind, pipe, output_type="latent", **extra)
    gs = kw.pop("guidance_scale")
    blocks = adapter_for(pipe.transformer).blocks(pipe.transformer)
    cfg = CAGConfig(layers=[len(blocks) - 1], scale=1.0)
    batches = {}
    # a forward hook registered before the run's own hooks sees the batch block 0 really computed
    h = blocks[0][1].register_forward_hook(
        lambda m, a, o: batches.setdefault("now", []).append((o[0] if isinstance(o, tuple) else o).shape[0]))
    try:
        out = {}
        for share in (False, True):
            batches["now"] = []
            out[share] = generate_with_cag_diffusers(pipe, cfg, generator=torch.Generator().manual_seed(0),
                                                     guidance_scale=gs, shared_prefix=share, **kw).frames
            batches[share] = max(batches["now"])
    finally:
        h.remove()
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=2e-5)
    assert batches[True] < batches[False]
    assert all(not b._forward_pre_hooks and not b._forward_hooks for _, b in blocks)


def test_key_padding_mask_forms():
    """CAG reads a key-padding mask from [B, 1, 1, N] (HunyuanVideo) or from its outer AND [B, 1, N, N]
    (HunyuanVideo 1.5); any other boolean mask is refused with the shapes named."""
    from difftrack.guidance import _key_padding

    km = torch.tensor([[True, True, False, True], [True, False, False, False]])
    assert torch.equal(_key_padding(km[:, None, None, :], 0), km)
    outer = (km[:, :, None] & km[:, None, :])[:, None]
    assert torch.equal(_key_padding(outer, 0), km)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None].expand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"outer AND \[B, 1, N, N\].*got torch.bool \(2, 1, 4, 4\)"):
        _key_padding(causal, 3)


def test_cosmos_combine_weight_is_w_plus_one():
    """Cosmos2VideoToWorldPipeline combines c + w (c - u) (on its x0 predictions): a change d of the conditional
    transformer output moves the step's latents by -(w + 1)/w times what the same change of the unconditional output
    does. That weight is what the CAG hooks fold through (CosmosFamily.cfg_weight: s / (w + 1))."""
    from test_real_pipelines import run

    pipe = build_tiny_pipeline("cosmos")
    kw = call_kwargs("cosmos", pipe, output_type="latent")
    w = kw["guidance_scale"]
    assert family_for(pipe).cfg_weight(w, {}) == (w + 1.0, True)
    d = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))  # latents are ~80 at step 0

    def step0(which):
        calls, out = [], {}

        def post(m, a, k, o):
            calls.append(1)
            if len(calls) == which:  # 1: the conditional call of step 0, 2: the unconditional one
                return (o[0] + d,) + tuple(o[1:])

        h = pipe.transformer.register_forward_hook(post, with_kwargs=True)
        try:
            keep = lambda p, i, t, c: (out.setdefault(i, c["latents"].clone()), {})[1]  # noqa: E731
            run(pipe, dict(kw, callback_on_step_end=keep))
        finally:
            h.remove()
        return out[0]

    plain, dc, du = step0(0), step0(1), step0(2)
    noisy = slice(1, None)  # latent frame 0 is the conditioning frame, put back by the pipeline
    torch.testing.assert_close((dc - plain)[:, :, noisy], -(w + 1) / w * (du - plain)[:, :, noisy], rtol=1e-3,
                               atol=1e-4)
    assert (dc - plain)[:, :, noisy].abs().max() > 1e-6 and torch.equal(dc[:, :, 0], plain[:, :, 0])
