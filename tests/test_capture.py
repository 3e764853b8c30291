"""Capture: exactness, independent recomputation, restoration, lifetimes, errors (tiny random CogVideoX, CPU)."""
import gc
import weakref

import pytest
import torch
from conftest import tiny_cogvideox, tiny_inputs
from diffusers.models.embeddings import apply_rotary_emb

from difftrack.capture import capture, run_until
from difftrack.mini import build_untrained


@pytest.mark.parametrize("rope", [False, True], ids=["sincos-2B", "rope-5B"])
def test_bit_identical_bare_forward(rope):
    m = tiny_cogvideox(rope=rope)
    kw = tiny_inputs(rope=rope)
    with torch.no_grad():
        ref = m(**kw)[0]
        with capture(m, layers="all", what=("q", "k", "features")) as cache:
            out = m(**kw)[0]
        after = m(**kw)[0]
    assert torch.equal(ref, out) and torch.equal(ref, after)
    assert (out - ref).abs().max().item() == 0.0
    assert len(cache.keys()) == 6


def test_bit_identical_in_pipeline_loop_and_step_tags():
    pipe = build_untrained(0)
    pipe.transformer = tiny_cogvideox_like_mini(pipe)
    kwargs = dict(prompt="a red circle moving left on a still background", num_frames=3, height=16, width=16,
                  num_inference_steps=3, guidance_scale=6.0, progress=False, output_type="latent")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    seen = []
    with capture(pipe, layers=[1], steps=[0, 2], num_steps=3, what=("q", "k")) as cache:
        out = pipe(generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=lambda p, i, t, d: seen.append((i, float(t))), **kwargs).frames
    assert torch.equal(ref, out)
    assert sorted({s for _, s in cache.keys()}) == [0, 2]
    # step index and scheduler timestep agree with the pipeline's own loop
    assert cache.timesteps == {i: t for i, t in seen}
    # cond branch of the [uncond, cond] batch: batch 1
    assert cache.q(1, step=2).shape[0] == 1


def tiny_cogvideox_like_mini(pipe):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=12, out_channels=12,
                                       time_embed_dim=8, text_embed_dim=128, num_layers=2, sample_width=8,
                                       sample_height=8, sample_frames=3, patch_size=2, temporal_compression_ratio=1,
                                       max_text_seq_length=24).eval()


@pytest.mark.parametrize("rope", [False, True], ids=["sincos-2B", "rope-5B"])
def test_captured_qk_equal_independent_recomputation(rope):
    m = tiny_cogvideox(rope=rope)
    kw = tiny_inputs(rope=rope)
    attn = m.transformer_blocks[1].attn1
    inputs = {}
    h = attn.register_forward_pre_hook(lambda mod, a, k: inputs.update(k), with_kwargs=True)
    with torch.no_grad(), capture(m, layers=[1], branch="all") as cache:
        m(**kw)
    h.remove()
    x = torch.cat([inputs["encoder_hidden_states"], inputs["hidden_states"]], 1)  # [B, text+video, C]
    B, N, _ = x.shape
    H = attn.heads
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(x).view(B, N, H, -1).transpose(1, 2))
        k = attn.norm_k(attn.to_k(x).view(B, N, H, -1).transpose(1, 2))
        if rope:
            q[:, :, 8:] = apply_rotary_emb(q[:, :, 8:], kw["image_rotary_emb"])
            k[:, :, 8:] = apply_rotary_emb(k[:, :, 8:], kw["image_rotary_emb"])
    qv = q[:, :, 8:].reshape(B, H, 2, 4, 4, -1)
    kv = k[:, :, 8:].reshape(B, H, 2, 4, 4, -1)
    torch.testing.assert_close(cache.q(1), qv, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.k(1), kv, rtol=0, atol=1e-6)
    assert cache.grid.frames == 2 and cache.grid.rows == 4 and cache.grid.text_len == 8


def test_processors_restored_and_nothing_referenced_even_on_error():
    m = tiny_cogvideox()
    before = {k: v for k, v in m.attn_processors.items()}
    kw = tiny_inputs()
    refs = []
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), capture(m, layers=[0, 1], what=("q", "k", "features")) as cache:
            m(**kw)
            refs = [weakref.ref(t) for t in cache.data.values()]
            assert type(m.transformer_blocks[0].attn1.processor).__name__.startswith("Capturing")
            raise RuntimeError("boom")
    after = m.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not m._forward_pre_hooks and all(not b._forward_hooks for b in m.transformer_blocks)
    del cache
    gc.collect()
    assert refs and all(r() is None for r in refs), "captured tensors still referenced after the context"


def test_store_false_keeps_nothing_and_callbacks_fire():
    m = tiny_cogvideox()
    events = []
    with torch.no_grad(), capture(m, layers=[0], store=False,
                                  on_qk=lambda ev: events.append((ev.layer, tuple(ev.q_video.shape)))) as cache:
        m(**tiny_inputs())
    assert cache.keys() == [] and events == [(0, (1, 2, 2, 4, 4, 16))]


def test_run_until_stops_after_layer():
    m = tiny_cogvideox(layers=3)
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(m.transformer_blocks)]
    with torch.no_grad(), capture(m, layers=[1]) as cache:
        run_until(m, 1, **tiny_inputs())
    for h in hooks:
        h.remove()
    assert calls == [0, 1] and cache.q(1).shape[0] == 1


def test_errors_name_the_allowed_range():
    m = tiny_cogvideox()
    with pytest.raises(ValueError, match=r"layer 2 out of range.*allowed 0\.\.1"):
        with capture(m, layers=[2]):
            pass
    with pytest.raises(ValueError, match=r"step 5 out of range for 3 denoising steps; allowed 0\.\.2"):
        with capture(m, layers=[0], steps=[5], num_steps=3):
            pass
    with pytest.raises(ValueError, match="negative steps"):
        with capture(m, layers=[0], steps=[-1]):
            pass
    with pytest.raises(ValueError, match=r"unsupported backbone 'Linear'.*CogVideoXTransformer3DModel"):
        with capture(torch.nn.Linear(2, 2), layers=[0]):
            pass
    with pytest.raises(ValueError, match=r"branch 'uncond' requested, but the batch of 1 has no"):
        with torch.no_grad(), capture(m, layers=[0], branch="uncond"):
            m(**tiny_inputs(batch=1))
    with pytest.raises(ValueError, match="unknown branch"):
        with capture(m, layers=[0], branch="positive"):
            pass
    with pytest.raises(KeyError, match="not captured"):
        with torch.no_grad(), capture(m, layers=[0]) as cache:
            m(**tiny_inputs())
        cache.q(0, step=7)
    # processors are back after every failure
    assert all(type(p).__name__ == "CogVideoXAttnProcessor2_0" for p in m.attn_processors.values())


def test_uncond_branch_is_first_half():
    m = tiny_cogvideox()
    with torch.no_grad(), capture(m, layers=[0], branch="all") as a:
        m(**tiny_inputs(batch=2))
    with torch.no_grad(), capture(m, layers=[0], branch="uncond") as u:
        m(**tiny_inputs(batch=2))
    assert torch.equal(u.q(0)[0], a.q(0)[0])
