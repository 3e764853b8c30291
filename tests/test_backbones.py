"""Backbone adapters on tiny random configurations of the real diffusers classes (CPU, fp32).

For each adapter: bit-identical outputs under capture, captured q/k equal an independent recomputation from the
module weights (projections, QK norms and RoPE recomputed with diffusers' helpers; RoPE tables rebuilt from a
frame-major (frame, row, col) meshgrid so that the token order is checked too), layer range errors.
"""
import pytest
import torch
from conftest import processors
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed, get_3d_rotary_pos_embed

from difftrack.backbones import adapter_for
from difftrack.capture import capture

F_, R_, C_ = 2, 4, 3  # token grid of every test: 2 frames x 4 rows x 3 cols (non-square: catches row/col swaps)


# ------------------------------------------------------------------------------------------------ builders
def tiny_hunyuan(seed=0, dual=2, single=1):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=dual,
        num_single_layers=single, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True).eval()


def hunyuan_inputs(batch=1, seed=0, text=6, pad=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[:, text - pad:] = 0  # right padding, masked out of the attention as in the pipeline
    return dict(hidden_states=torch.randn(batch, 4, F_, 2 * R_, 2 * C_, generator=g),
                timestep=torch.full((batch,), 700.0), encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8, generator=g),
                guidance=torch.full((batch,), 6000.0), return_dict=False)


def tiny_hunyuan15(seed=0, layers=2):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v").eval()


def hunyuan15_inputs(batch=1, seed=0, text=6, pad=2, glyph=4, image=3):
    """T2V call as HunyuanVideo15Pipeline makes it: packed latents (zero condition latents and mask), right-padded
    Qwen text, ByT5 glyph text with nothing valid (no quoted text in the prompt), zero image embeddings."""
    from difftrack.backbones.hunyuanvideo15 import pack_t2v

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[:, text - pad:] = 0
    return dict(hidden_states=pack_t2v(torch.randn(batch, 4, F_, R_, C_, generator=g)),
                timestep=torch.full((batch,), 700.0), encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
                encoder_attention_mask=mask, encoder_hidden_states_2=torch.zeros(batch, glyph, 8),
                encoder_attention_mask_2=torch.zeros(batch, glyph, dtype=torch.long),
                image_embeds=torch.zeros(batch, image, 8), return_dict=False)


def tiny_cosmos(seed=0, layers=2):
    """Cosmos-Predict2 layout: 16 latent channels + the condition-mask channel (no padding channel: diffusers resizes
    it with torchvision, not installed here)."""
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(seed)
    return CosmosTransformer3DModel(
        in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 8, 8), patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=False, extra_pos_embed_type=None).eval()


def cosmos_inputs(batch=1, seed=0):
    """A Video2World call: latent frame 0 conditioning (mask 1, its own tiny timestep), per-frame timesteps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((batch, 1, F_, 1, 1), 0.7)
    t[:, :, 0] = 1e-4
    cond = torch.zeros(batch, 1, F_, 2 * R_, 2 * C_)
    cond[:, :, 0] = 1.0
    return dict(hidden_states=torch.randn(batch, 16, F_, 2 * R_, 2 * C_, generator=g), timestep=t,
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g), fps=16, condition_mask=cond,
                return_dict=False)


def tiny_ltx2(seed=0, perturbed_attn=False):
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16, audio_in_channels=4, audio_out_channels=4,
        audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, base_height=256,
        base_width=256, perturbed_attn=perturbed_attn).eval()


def ltx2_inputs(batch=2, seed=0, t=700.0, **extra):
    """A CFG call as LTX2Pipeline makes it: video and audio latents duplicated, [uncond, cond] text."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, batch // 2)
    x, a = torch.randn(n, F_ * R_ * C_, 8, generator=g), torch.randn(n, 5, 4, generator=g)
    return dict(hidden_states=torch.cat([x] * (batch // n)), audio_hidden_states=torch.cat([a] * (batch // n)),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                audio_encoder_hidden_states=torch.randn(batch, 5, 16, generator=g), timestep=torch.full((batch,), t),
                sigma=torch.full((batch,), t / 1000), encoder_attention_mask=torch.ones(batch, 5),
                audio_encoder_attention_mask=torch.ones(batch, 5), num_frames=F_, height=R_, width=C_, fps=24.0,
                audio_num_frames=5, return_dict=False, **extra)


def tiny_wan(seed=0, layers=2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers, cross_attn_norm=True, rope_max_seq_len=32).eval()


def wan_inputs(batch=1, seed=0, t=700.0, text_seed=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, F_, 2 * R_, 2 * C_, generator=g)
    e = torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(seed + 1 if text_seed is None else text_seed))
    return dict(hidden_states=x, timestep=torch.full((batch,), t), encoder_hidden_states=e, return_dict=False)


def tiny_cogvideox15(seed=0, i2v=False):
    """CogVideoX 1.5 layout: temporal patch 2, RoPE, no patch bias; ``i2v``: doubled input channels + ofs."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8 if i2v else 4, out_channels=4, time_embed_dim=4,
        ofs_embed_dim=4 if i2v else None, text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=8, patch_size=2, patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=8,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False, patch_bias=False).eval()


def cog15_inputs(batch=2, seed=0, i2v=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2 * F_, 8 if i2v else 4, 2 * R_, 2 * C_, generator=g)  # 4 latent frames -> 2 token frames
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, 8, 8, generator=g),
              timestep=torch.full((batch,), 500, dtype=torch.long), return_dict=False,
              image_rotary_emb=get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (R_, C_)),
                                                       grid_size=(R_, C_), temporal_size=F_))
    if i2v:
        kw["ofs"] = torch.full((batch,), 2.0)
    return kw


def tiny_ltx(seed=0):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16).eval()


def ltx_inputs(batch=2, seed=0):
    """A CFG batch as LTXPipeline builds it: the latents duplicated, [uncond, cond] text embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(1, batch // 2), F_ * R_ * C_, 8, generator=g)
    return dict(hidden_states=torch.cat([x] * (batch // x.shape[0])),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                timestep=torch.full((batch,), 700.0), encoder_attention_mask=torch.ones(batch, 5),
                num_frames=F_, height=R_, width=C_, rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


def tiny_skyreels(seed=0, block=1):
    """SkyReels-V2 diffusion-forcing layout: fps embedding injected, ``block`` frames per causal block."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
        inject_sample_info=True, num_frame_per_block=block).eval()


def skyreels_inputs(batch=1, seed=0, levels=(700.0, 700.0), text_seed=None):
    """A diffusion-forcing call: one timestep per latent frame (``[B, F]``)."""
    kw = wan_inputs(batch=batch, seed=seed, text_seed=text_seed)
    kw.update(timestep=torch.tensor([list(levels)] * batch), enable_diffusion_forcing=True, fps=[1] * batch)
    return kw


def tiny_mochi(seed=0):
    """Mochi layout: a narrower text stream (8) than the video stream (2 heads x 16)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                   pooled_projection_dim=8, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                   max_sequence_length=8).eval()


def mochi_inputs(batch=2, seed=0, valid=(2, 4), t=300.0):
    """A CFG batch as MochiPipeline builds it: duplicated latents, [uncond, cond] text of 8 tokens whose first
    ``valid[i]`` are real (the rest padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, F_, 2 * R_, 2 * C_, generator=g)
    mask = torch.zeros(batch, 8, dtype=torch.long)
    for i in range(batch):
        mask[i, :valid[i % len(valid)]] = 1
    return dict(hidden_states=torch.cat([x] * batch), encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
                timestep=torch.full((batch,), t), encoder_attention_mask=mask, return_dict=False)


CASES = {
    "hunyuan": (tiny_hunyuan, hunyuan_inputs, 3),
    "wan": (tiny_wan, wan_inputs, 2),
    "cogvideox15": (tiny_cogvideox15, cog15_inputs, 2),
    "cogvideox15-i2v": (lambda: tiny_cogvideox15(i2v=True), lambda: cog15_inputs(i2v=True), 2),
    "ltx": (tiny_ltx, ltx_inputs, 2),
    "skyreels-df": (tiny_skyreels, skyreels_inputs, 2),
    "mochi": (tiny_mochi, mochi_inputs, 2),
    "hunyuan15": (tiny_hunyuan15, hunyuan15_inputs, 2),
    "cosmos": (tiny_cosmos, cosmos_inputs, 2),
    "ltx2": (tiny_ltx2, ltx2_inputs, 2),
}


# ------------------------------------------------------------------------------------------- recomputation
def grab_attn_inputs(attn):
    """Forward pre-hook storing the attention module's keyword inputs."""
    got = {}
    return got, attn.register_forward_pre_hook(lambda m, a, k: got.update(k, _args=a), with_kwargs=True)


def captured(m, kw, attn, layer, **capture_kw):
    """``(cache, inputs)``: one forward of ``m`` on ``kw`` under ``capture(m, layers=[layer])`` and the keyword
    inputs (``_args``: positional) that the attention module ``attn`` received."""
    got, h = grab_attn_inputs(attn)
    try:
        with torch.no_grad(), capture(m, layers=[layer], **capture_kw) as cache:
            m(**kw)
    finally:
        h.remove()
    return cache, got


def to_grid(x_bnhd, n_video, video_first=True):
    """[B, N, H, D] -> video tokens as [B, H, F, rows, cols, D]."""
    v = x_bnhd[:, :n_video] if video_first else x_bnhd[:, -n_video:]
    return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], F_, R_, C_, v.shape[-1])


def rope_table(dims, theta, sizes=(F_, R_, C_), dtype=torch.float32):
    """cos/sin ``[F*R*C, sum(dims)]`` for a frame-major token order, per-axis tables of diffusers' 1-D helper."""
    cos, sin = [], []
    for axis, (d, n) in enumerate(zip(dims, sizes)):
        c, s = get_1d_rotary_pos_embed(d, torch.arange(n, dtype=dtype), theta, use_real=True, freqs_dtype=dtype)
        shape = [1, 1, 1, d]
        shape[axis] = n
        cos.append(c.reshape(shape).expand(*sizes, d))
        sin.append(s.reshape(shape).expand(*sizes, d))
    return torch.cat(cos, -1).reshape(-1, sum(dims)), torch.cat(sin, -1).reshape(-1, sum(dims))


def check_close(cache, layer, q, k):
    assert cache.q(layer).shape == q.shape, (cache.q(layer).shape, q.shape)
    torch.testing.assert_close(cache.q(layer), q, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.k(layer), k, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_with_and_without_capture(case):
    build, inputs, n_blocks = CASES[case]
    m, kw = build(), inputs()
    with torch.no_grad():
        ref = m(**kw)[0]
        with capture(m, layers="all", what=("q", "k", "features"), branch="all") as cache:
            out = m(**kw)[0]
        after = m(**kw)[0]
    assert torch.equal(ref, out) and torch.equal(ref, after)
    assert len(cache.keys()) == 3 * n_blocks
    B = kw["hidden_states"].shape[0]
    for l in range(n_blocks):
        assert cache.q(l).shape[:2] == (B, 2) and cache.q(l).shape[2:5] == (F_, R_, C_)
        assert cache.features(l).shape[:4] == (B, F_, R_, C_)
    assert (cache.grid.frames, cache.grid.rows, cache.grid.cols) == (F_, R_, C_)
    assert not any(type(p).__name__.startswith("Capturing") for p in processors(m).values())


def test_hunyuan_layout_and_flat_layers():
    m = tiny_hunyuan()
    a = adapter_for(m)
    assert [n for n, _ in a.blocks(m)] == ["transformer_blocks.0", "transformer_blocks.1",
                                          "single_transformer_blocks.0"]
    with torch.no_grad(), capture(m, layers=[0]) as cache:
        m(**hunyuan_inputs())
    g = cache.grid
    assert g.text_len == 6 and not g.text_first and g.stride == 2 and g.video_slice(24 + 6) == slice(0, 24)
    with pytest.raises(ValueError, match=r"layer 3 out of range: HunyuanVideoTransformer3DModel has 3 blocks, "
                                         r"allowed 0\.\.2"):
        with capture(m, layers=[3]):
            pass
    # names of the flat list work too
    with torch.no_grad(), capture(m, layers="blocks.2") as cache:
        m(**hunyuan_inputs())
    assert cache.keys() == [("blocks.2.attn.q", 0), ("blocks.2.attn.k", 0)]


def test_hunyuan_qk_equal_recomputation_dual_and_single():
    m = tiny_hunyuan()
    kw = hunyuan_inputs()
    dual, single = m.transformer_blocks[1].attn, m.single_transformer_blocks[0].attn
    got_d, h1 = grab_attn_inputs(dual)
    got_s, h2 = grab_attn_inputs(single)
    with torch.no_grad(), capture(m, layers=[1, 2]) as cache:
        m(**kw)
    h1.remove(), h2.remove()
    n = F_ * R_ * C_
    rope = rope_table((4, 6, 6), 256.0)
    with torch.no_grad():
        # dual-stream: video q/k from to_q/to_k -> RMSNorm -> RoPE (text has its own projections, appended after)
        x = got_d["hidden_states"]
        assert x.shape[1] == n
        q = apply_rotary_emb(dual.norm_q(dual.to_q(x).unflatten(2, (2, -1))), rope, sequence_dim=1)
        k = apply_rotary_emb(dual.norm_k(dual.to_k(x).unflatten(2, (2, -1))), rope, sequence_dim=1)
        check_close(cache, 1, to_grid(q, n), to_grid(k, n))
        # single-stream: [video, text] projected jointly, RoPE on the video part
        x = torch.cat([got_s["hidden_states"], got_s["encoder_hidden_states"]], 1)
        assert x.shape[1] == n + 6
        q = single.norm_q(single.to_q(x).unflatten(2, (2, -1)))
        k = single.norm_k(single.to_k(x).unflatten(2, (2, -1)))
        q, k = (apply_rotary_emb(t[:, :n], rope, sequence_dim=1) for t in (q, k))
        check_close(cache, 2, to_grid(q, n), to_grid(k, n))


def test_hunyuan15_layout_and_qk_equal_recomputation():
    """HunyuanVideo 1.5: [video, image, glyph, text] in every block's attention, the video first; the captured q/k
    are the video rows of to_q/to_k -> RMSNorm -> RoPE on a frame-major (frame, row, col) grid."""
    m = tiny_hunyuan15()
    kw = hunyuan15_inputs()
    attn = m.transformer_blocks[1].attn
    cache, got = captured(m, kw, attn, 1)
    g, n = cache.grid, F_ * R_ * C_
    assert (g.text_len, g.text_first, g.stride) == (6 + 4 + 3, False, 1) and g.video_slice(n + 13) == slice(0, n)
    assert got["encoder_hidden_states"].shape[1] == 13  # the three condition streams, reordered, after the video
    rope = rope_table((4, 6, 6), 256.0)
    with torch.no_grad():
        x = got["hidden_states"]
        q = apply_rotary_emb(attn.norm_q(attn.to_q(x).unflatten(2, (2, -1))), rope, sequence_dim=1)
        k = apply_rotary_emb(attn.norm_k(attn.to_k(x).unflatten(2, (2, -1))), rope, sequence_dim=1)
    check_close(cache, 1, to_grid(q, n), to_grid(k, n))
    bad = dict(kw)
    del bad["image_embeds"]
    with pytest.raises(ValueError, match="encoder_hidden_states_2= and image_embeds="):
        with torch.no_grad(), capture(m, layers=[0]):
            m(**bad)


def test_cosmos_qk_equal_recomputation_and_bare_inputs():
    """Cosmos: attn1 is video-only (to_q -> per-head RMSNorm -> Cosmos RoPE); the step's timestep is the largest
    per-frame one (the conditioning frame has its own tiny one); a bare forward with the condition mask packed as
    a zero channel equals the call with ``condition_mask`` zeros."""
    from diffusers.models.embeddings import apply_rotary_emb as rope_apply

    from difftrack.backbones.cosmos import pack_no_condition

    m = tiny_cosmos()
    kw = cosmos_inputs()
    attn = m.transformer_blocks[1].attn1
    cache, got = captured(m, kw, attn, 1)
    n = F_ * R_ * C_
    assert cache.grid.text_len == 0 and cache.timesteps == {0: pytest.approx(0.7)}
    x, rope = got["_args"][0], got["image_rotary_emb"]
    assert x.shape[1] == n
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(x).unflatten(2, (2, -1)).transpose(1, 2))
        k = attn.norm_k(attn.to_k(x).unflatten(2, (2, -1)).transpose(1, 2))
        q, k = (rope_apply(t, rope, use_real=True, use_real_unbind_dim=-2).transpose(1, 2) for t in (q, k))
    check_close(cache, 1, to_grid(q, n), to_grid(k, n))
    with torch.no_grad():
        zero = dict(kw, condition_mask=torch.zeros_like(kw["condition_mask"]))
        packed = {k: v for k, v in zero.items() if k != "condition_mask"}
        packed["hidden_states"] = pack_no_condition(kw["hidden_states"])
        assert torch.equal(m(**zero)[0], m(**packed)[0])


def test_ltx2_video_stream_only():
    """LTX-2: the video self-attention attn1 is captured (q/k = to_q/to_k -> RMSNorm across heads -> interleaved
    RoPE, the cond half of [uncond, cond]); the audio stream's output stays bit-identical and audio_attn1 is never
    wrapped."""
    from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb

    m = tiny_ltx2()
    kw = ltx2_inputs()
    attn = m.transformer_blocks[1].attn1
    got, h = grab_attn_inputs(attn)
    seen = {}
    hook = m.transformer_blocks[1].audio_attn1.register_forward_pre_hook(
        lambda mod, a, k: seen.setdefault("audio", []).append(type(mod.processor).__name__), with_kwargs=True)
    with torch.no_grad():
        ref = m(**kw)
        with capture(m, layers="all", what=("q", "k", "features")) as cache:
            out = m(**kw)
    h.remove(), hook.remove()
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])  # video and audio outputs
    assert seen["audio"] == ["LTX2AudioVideoAttnProcessor"] * 2  # also inside the capture
    n = F_ * R_ * C_
    x, rope = got["hidden_states"], got["query_rotary_emb"]
    with torch.no_grad():
        q = apply_interleaved_rotary_emb(attn.norm_q(attn.to_q(x)), rope).unflatten(2, (2, -1))
        k = apply_interleaved_rotary_emb(attn.norm_k(attn.to_k(x)), rope).unflatten(2, (2, -1))
    torch.testing.assert_close(cache.q(1), to_grid(q, n)[1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.k(1), to_grid(k, n)[1:], rtol=0, atol=1e-5)
    assert cache.features(1).shape == (1, F_, R_, C_, 16)


def test_ltx2_guidance_calls_of_a_step_are_not_captured():
    """LTX2Pipeline's loop: per step a CFG call [uncond, cond], then an STG call (LTX-2.3's perturbed attention
    skips the SDPA of the STG blocks) at the same timestep. Only the first call of each step is captured: without
    that rule the STG call would fail capture (no SDPA in the skipped block)."""
    m = tiny_ltx2(perturbed_attn=True)
    with torch.no_grad():
        refs = {}
        for t in (900.0, 500.0):
            with capture(m, layers=[1]) as c:
                m(**ltx2_inputs(t=t))
            refs[t] = c.q(1)
        with capture(m, layers=[1], num_steps=2) as cache:
            for t in (900.0, 500.0):
                m(**ltx2_inputs(t=t))  # CFG
                m(**ltx2_inputs(batch=1, t=t, spatio_temporal_guidance_blocks=[1]))  # STG: attn1 skipped
    assert cache.timesteps == {0: 900.0, 1: 500.0}
    assert torch.equal(cache.q(1, step=0), refs[900.0]) and torch.equal(cache.q(1, step=1), refs[500.0])
    import dataclasses

    from difftrack.backbones import register

    adapter = cache.adapter
    register(dataclasses.replace(adapter, first_call_only=False))  # every call captured (restored below)
    try:
        with pytest.raises(RuntimeError, match="no scaled_dot_product_attention call was seen in layer 1"):
            with torch.no_grad(), capture(m, layers=[1]):
                m(**ltx2_inputs(t=900.0))
                m(**ltx2_inputs(batch=1, t=900.0, spatio_temporal_guidance_blocks=[1]))
    finally:
        register(adapter)


def test_wan_qk_equal_recomputation():
    m = tiny_wan()
    kw = wan_inputs()
    attn = m.blocks[1].attn1
    cache, got = captured(m, kw, attn, 1)
    x, n = got["_args"][0], F_ * R_ * C_  # WanTransformerBlock calls attn1(norm_hidden_states, None, None, rope)
    assert x.shape[1] == n and cache.grid.text_len == 0
    # Wan RoPE: head_dim 16 -> t 8, h 4, w 4 (h = w = 2 * (16 // 6)), pairs interleaved
    rope = rope_table((8, 4, 4), 10000.0, dtype=torch.float64)
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (2, -1))  # RMSNorm across heads, then split
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (2, -1))
        q, k = (apply_rotary_emb(t, rope, sequence_dim=1) for t in (q, k))
    check_close(cache, 1, to_grid(q, n), to_grid(k, n))


def test_cogvideox15_temporal_patch_qk_equal_recomputation():
    m = tiny_cogvideox15()
    kw = cog15_inputs()
    attn = m.transformer_blocks[1].attn1
    cache, got = captured(m, kw, attn, 1, branch="all")
    assert (cache.grid.frames, cache.grid.text_len, cache.grid.text_first) == (F_, 8, True)
    x = torch.cat([got["encoder_hidden_states"], got["hidden_states"]], 1)
    n = F_ * R_ * C_
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(x).unflatten(2, (2, -1)).transpose(1, 2))
        k = attn.norm_k(attn.to_k(x).unflatten(2, (2, -1)).transpose(1, 2))
        q, k = (apply_rotary_emb(t[:, :, 8:], kw["image_rotary_emb"]).transpose(1, 2) for t in (q, k))
    check_close(cache, 1, to_grid(q, n), to_grid(k, n))


def test_ltx_qk_equal_recomputation():
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rope

    m = tiny_ltx()
    kw = ltx_inputs()
    attn = m.transformer_blocks[0].attn1
    cache, got = captured(m, kw, attn, 0)
    x, n = got["hidden_states"], F_ * R_ * C_
    with torch.no_grad():
        q = ltx_rope(attn.norm_q(attn.to_q(x)), got["image_rotary_emb"]).unflatten(2, (2, -1))
        k = ltx_rope(attn.norm_k(attn.to_k(x)), got["image_rotary_emb"]).unflatten(2, (2, -1))
    check_close(cache, 0, to_grid(q, n)[1:], to_grid(k, n)[1:])  # default branch: cond half of [uncond, cond]
    bad = dict(kw)
    del bad["num_frames"]
    with pytest.raises(ValueError, match="num_frames="):
        with torch.no_grad(), capture(m, layers=[0]):
            m(**bad)


def _wan_loop(m, timesteps=(900.0, 500.0)):
    """The Wan pipeline's loop: per step, cond call then uncond call with the same timestep."""
    for t in timesteps:
        m(**wan_inputs(t=t, text_seed=11))  # cond
        m(**wan_inputs(t=t, text_seed=22))  # uncond


def test_wan_sequential_cfg_branches():
    m = tiny_wan()
    with torch.no_grad():
        refs = {}
        for name, seed in (("cond", 11), ("uncond", 22)):
            for t in (900.0, 500.0):
                with capture(m, layers=[1]) as c:
                    m(**wan_inputs(t=t, text_seed=seed))
                refs[name, t] = c.q(1)
        assert not torch.equal(refs["cond", 900.0], refs["uncond", 900.0])  # layer 1 sees the text
        for branch in ("cond", "uncond"):
            with capture(m, layers=[1], branch=branch, num_steps=2) as cache:
                _wan_loop(m)
            assert cache.timesteps == {0: 900.0, 1: 500.0}
            assert torch.equal(cache.q(1, step=0), refs[branch, 900.0])
            assert torch.equal(cache.q(1, step=1), refs[branch, 500.0])
        with pytest.raises(ValueError, match=r"branch 'uncond' requested, but step 0 had a single transformer call"):
            with capture(m, layers=[1], branch="uncond"):
                for t in (900.0, 500.0):
                    m(**wan_inputs(t=t))


@pytest.mark.parametrize("case", list(CASES))
def test_layer_out_of_range_names_flat_count(case):
    build, _, n_blocks = CASES[case]
    m = build()
    with pytest.raises(ValueError, match=rf"layer {n_blocks} out of range: {type(m).__name__} has {n_blocks} "
                                         rf"blocks, allowed 0\.\.{n_blocks - 1}"):
        with capture(m, layers=[n_blocks]):
            pass


def test_adapter_defaults_and_bad_fields():
    from types import SimpleNamespace

    from difftrack.backbones import BackboneAdapter, TokenGrid, block_list, latent_grid, patch_sizes

    a = BackboneAdapter(name="toy", class_names=("Toy",), grid=lambda m, args, kw: None)
    blocks = [SimpleNamespace(attn1=f"attn{i}") for i in range(3)]
    model = SimpleNamespace(transformer_blocks=blocks, blocks=blocks[:2])
    assert a.blocks(model) == [(f"transformer_blocks.{i}", b) for i, b in enumerate(blocks)]
    assert block_list("blocks")(model) == [("blocks.0", blocks[0]), ("blocks.1", blocks[1])]
    assert a.self_attention(blocks[2]) == "attn2"
    out = object()
    assert a.block_video_output(out, None) is out
    with pytest.raises(ValueError, match=r"cfg='both'; allowed: 'batched', 'sequential'"):
        BackboneAdapter(name="toy", class_names=("Toy",), grid=None, cfg="both")
    with pytest.raises(ValueError, match=r"cag_attention='qk'"):
        BackboneAdapter(name="toy", class_names=("Toy",), grid=None, cag_attention="qk")

    # latent_grid: frames on the given axis under the temporal patch, rows/cols the last two axes
    cfg = SimpleNamespace(config=SimpleNamespace(patch_size=(2, 2, 2)))
    g = latent_grid(cfg, torch.zeros(1, 4, 6, 8, 10), frame_axis=2, text_len=5, text_first=True)
    assert g == TokenGrid(frames=3, rows=4, cols=5, text_len=5, text_first=True, stride=2)
    assert patch_sizes(SimpleNamespace(config=SimpleNamespace(patch_size=2, patch_size_t=None))) == (1, 2)
    with pytest.raises(ValueError, match=r"patch_size \(1, 2, 4\): expected \(t, s, s\)"):
        patch_sizes(SimpleNamespace(config=SimpleNamespace(patch_size=(1, 2, 4))))


def test_mochi_per_row_attention_capture_and_recomputation():
    """Mochi attends per batch row over [video, that row's valid text]: capture joins the rows of the chosen CFG
    branch, with the text when the lengths agree; the video q/k equal to_q/k -> RMSNorm -> Mochi's RoPE."""
    m, kw = tiny_mochi(), mochi_inputs(valid=(2, 5))
    attn = m.transformer_blocks[1].attn1
    got, h = grab_attn_inputs(attn)
    seen = {}
    with torch.no_grad():
        for branch in ("cond", "uncond", "all"):
            with capture(m, layers=[1], branch=branch,
                         on_qk=lambda ev, b=branch: seen.setdefault(b, (ev.grid.text_len, ev.q.shape))) as c:
                m(**kw)
            seen[branch + "_q"], seen[branch + "_k"] = c.q(1), c.k(1)
    h.remove()
    n = F_ * R_ * C_
    assert seen["cond"] == (5, (1, 2, n + 5, 16)) and seen["uncond"] == (2, (1, 2, n + 2, 16))
    assert seen["all"] == (0, (2, 2, n, 16))  # different prompt lengths: video tokens only
    assert torch.equal(seen["all_q"][1], seen["cond_q"][0]) and torch.equal(seen["all_q"][0], seen["uncond_q"][0])
    x, (cos, sin) = got["hidden_states"], got["image_rotary_emb"]

    def rope(t):  # MochiAttnProcessor2_0's rotation of interleaved pairs
        e, o = t[..., 0::2].float(), t[..., 1::2].float()
        return torch.stack([e * cos - o * sin, e * sin + o * cos], -1).flatten(-2)

    with torch.no_grad():
        q = rope(attn.norm_q(attn.to_q(x).unflatten(2, (2, -1))))
        k = rope(attn.norm_k(attn.to_k(x).unflatten(2, (2, -1))))
    torch.testing.assert_close(seen["all_q"], to_grid(q, n), rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["all_k"], to_grid(k, n), rtol=0, atol=1e-5)


def test_step_keys_of_the_new_families():
    """Mochi's timestep rises along the loop (0 -> 1000): each rise is a step, a fall a new generation.
    SkyReels-V2 diffusion forcing: the per-frame levels are the step key (asynchronous rows keep the noisiest frame
    at 999 while others move on: still one step per row). Wan 2.2 TI2V: per-token timesteps, 0 for a clean first
    frame, count by their maximum."""
    with torch.no_grad():
        m = tiny_mochi()
        with capture(m, layers=[0], num_steps=3) as c:
            for t in (0.0, 25.0, 60.0):
                m(**mochi_inputs(t=t))
        assert c.timesteps == {0: 0.0, 1: 25.0, 2: 60.0} and sorted(s for _, s in c.keys()) == [0, 0, 1, 1, 2, 2]
        with pytest.raises(ValueError, match="a second generation started inside one capture"):
            with capture(m, layers=[0]):
                for t in (0.0, 25.0, 0.0):
                    m(**mochi_inputs(t=t))

        m = tiny_skyreels()
        rows = [(500.0, 999.0), (300.0, 999.0), (0.0, 500.0), (0.0, 300.0)]  # ar_step > 0: frame 0 runs ahead
        with capture(m, layers=[0], branch="uncond") as c:
            for levels in rows:
                m(**skyreels_inputs(levels=levels, text_seed=11))  # cond
                m(**skyreels_inputs(levels=levels, text_seed=22))  # uncond
        assert c.timesteps == {0: 999.0, 1: 999.0, 2: 500.0, 3: 300.0}
        with capture(m, layers=[0]) as ref:
            m(**skyreels_inputs(levels=rows[1], text_seed=22))
        assert torch.equal(c.q(0, step=1), ref.q(0))

        m = tiny_wan()
        n = F_ * R_ * C_
        with capture(m, layers=[0], branch="uncond") as c:
            for t in (900.0, 500.0):
                ts = torch.full((1, n), t)
                ts[:, :R_ * C_] = 0.0  # the clean conditioning frame
                m(**dict(wan_inputs(text_seed=11), timestep=ts))
                m(**dict(wan_inputs(text_seed=22), timestep=ts))
        assert c.timesteps == {0: 900.0, 1: 500.0}


def test_ltx2_tracking_and_cag_are_refused():
    from difftrack.guidance import CAGConfig, apply_cag
    from difftrack.tracking import DiffTracker

    m = tiny_ltx2()
    with pytest.raises(ValueError, match=r"backbone 'ltx2' is not supported for tracking; allowed: .*wan"):
        DiffTracker(m, layers=(1,))
    with pytest.raises(ValueError, match=r"CAG is implemented for .*; got LTX2VideoTransformer3DModel \(ltx2\)"):
        with apply_cag(m, CAGConfig(layers=[1])):
            pass
