"""Capture: exactness, independent recomputation, restoration, lifetimes, errors (tiny random CogVideoX, CPU)."""
import gc
import weakref

import pytest
import torch
from conftest import tiny_cogvideox, tiny_inputs
from diffusers.models.embeddings import apply_rotary_emb

from difftrack.capture import IncompleteRunError, capture, run_until
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
        m(**tiny_inputs(cfg=True))
    assert cache.keys() == [] and events == [(0, (1, 2, 2, 4, 4, 16))]


def test_run_until_stops_after_layer():
    m = tiny_cogvideox(layers=3)
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(m.transformer_blocks)]
    with torch.no_grad(), capture(m, layers=[1]) as cache:
        run_until(m, 1, **tiny_inputs(cfg=True))
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
        m(**tiny_inputs(batch=2, cfg=True))
    with torch.no_grad(), capture(m, layers=[0], branch="uncond") as u:
        m(**tiny_inputs(batch=2, cfg=True))
    assert torch.equal(u.q(0)[0], a.q(0)[0])


# ----------------------------------------------------------------------------------------------- misuse (issue 18)
PROMPTS = ["a red circle moving left on a still background", "a blue square moving right on a still background"]


def _tiny_mini_pipe():
    pipe = build_untrained(0)
    pipe.transformer = tiny_cogvideox_like_mini(pipe)
    return pipe


def _gen(pipe, prompt, guidance_scale, steps=2, **kw):
    return pipe(prompt, num_frames=3, height=16, width=16, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(0), progress=False, output_type="latent", **kw).frames


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0], ids=["no-cfg", "cfg"])
def test_two_prompts_keep_both_videos(guidance_scale):
    """Two prompts without CFG are a batch of two videos, not [uncond, cond]: both are kept (issue 18)."""
    pipe = _tiny_mini_pipe()
    with torch.no_grad(), capture(pipe, layers=[1], steps=[0], num_steps=2) as both:
        _gen(pipe, PROMPTS, guidance_scale)
    q = both.q(1, step=0)
    assert q.shape[0] == 2
    # row i is the cond branch of prompt i: the same tensor as capturing prompt i alone from the same noise
    noise = torch.randn(2, 3, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(PROMPTS):
        with torch.no_grad(), capture(pipe, layers=[1], steps=[0], num_steps=2) as one:
            _gen(pipe, p, guidance_scale, latents=noise[i:i + 1])
        torch.testing.assert_close(q[i:i + 1], one.q(1, step=0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"branch 'uncond' requested, but the batch of 2 has no classifier-free"):
        with torch.no_grad(), capture(pipe, layers=[1], branch="uncond"):
            _gen(pipe, PROMPTS, 1.0)


def test_cfg_ambiguity_raises_and_explicit_cfg_decides():
    """Two videos from the same noise look like a CFG pair at step 0 only: capture refuses to guess."""
    pipe = _tiny_mini_pipe()
    z = torch.randn(1, 3, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    same = torch.cat([z, z])
    with pytest.raises(ValueError, match=r"cannot tell whether the batch of 2 .*pass cfg=True .* or cfg=False"):
        with torch.no_grad(), capture(pipe, layers=[1]):
            _gen(pipe, PROMPTS, 1.0, latents=same)
    with torch.no_grad(), capture(pipe, layers=[1], cfg=False, num_steps=2) as cap:
        _gen(pipe, PROMPTS, 1.0, latents=same)
    assert cap.q(1, step=0).shape[0] == 2 and cap.q(1, step=1).shape[0] == 2


def test_second_generation_in_one_capture_raises():
    pipe = _tiny_mini_pipe()
    with pytest.raises(ValueError, match=r"second generation started inside one capture.*cache\.clear\(\)"):
        with torch.no_grad(), capture(pipe, layers=[1], num_steps=2):
            _gen(pipe, PROMPTS[0], 6.0)
            _gen(pipe, PROMPTS[1], 6.0)
    # allowed: clear between generations, or callbacks only (runs are counted)
    with torch.no_grad(), capture(pipe, layers=[1], num_steps=2) as cap:
        _gen(pipe, PROMPTS[0], 6.0)
        first = cap.q(1, step=1).clone()
        cap.clear()
        _gen(pipe, PROMPTS[1], 6.0)
    assert not torch.equal(first, cap.q(1, step=1))
    seen = []
    with torch.no_grad(), capture(pipe, layers=[1], store=False, on_qk=lambda ev: seen.append(ev.step)) as cap:
        _gen(pipe, PROMPTS[0], 6.0)
        _gen(pipe, PROMPTS[1], 6.0)
    assert seen == [0, 1, 0, 1] and cap.runs == 1
    # the same step captured twice by hand
    m = tiny_cogvideox()
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.q' at step 3 was already captured"):
        with torch.no_grad(), capture(m, layers=[0]) as cap:
            cap.set_step(3)
            m(**tiny_inputs())
            m(**tiny_inputs())


def test_nested_captures_exited_out_of_order_restore_exactly():
    """Exiting an outer capture before an inner one removes only its own wrapper; afterwards plain calls work."""
    m = tiny_cogvideox()
    kw = tiny_inputs(cfg=True)
    before = dict(m.attn_processors)
    with torch.no_grad():
        ref = m(**kw)[0]
        outer, inner = capture(m, layers=[0, 1]), capture(m, layers=[1], what=("q", "k", "features"))
        a = outer.__enter__()
        b = inner.__enter__()
        with pytest.raises(IncompleteRunError, match="never called"):  # nothing ran in it: incomplete, yet removed
            outer.__exit__(None, None, None)  # out of order: the outer one first
        out = m(**kw)[0]  # the inner capture still records
        assert torch.equal(out, ref) and b.q(1).shape[0] == 1 and not a.keys()
        inner.__exit__(None, None, None)
        assert all(m.attn_processors[k] is before[k] for k in before)
        assert torch.equal(m(**kw)[0], ref)
        # capture and CAG nested and exited out of order
        from difftrack.guidance import CAGConfig, apply_cag

        cag, cap = apply_cag(m, CAGConfig(layers=[1])), capture(m, layers=[1])
        cag.__enter__()
        cap.__enter__()
        cag.__exit__(None, None, None)
        assert torch.equal(m(**kw)[0], ref)  # CAG removed, the capture wrapper still passes through
        cap.__exit__(None, None, None)
    assert all(m.attn_processors[k] is before[k] for k in before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=8.5), r"layers=8\.5 \(float\); allowed: a block index"),
    (dict(layers=[1.0]), r"layer 1\.0 \(float\) is not a block index; allowed: ints 0\.\.1"),
    (dict(layers=[0], num_steps=0), r"num_steps=0; allowed: an int >= 1"),
    (dict(layers=[0], steps=[0], num_steps=0), r"num_steps=0; allowed: an int >= 1"),
    (dict(layers=[0], steps=1.5), r"steps=1\.5; allowed"),
])
def test_confusing_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with capture(tiny_cogvideox(), **kwargs):
            pass


def test_numpy_integer_layers_and_steps_accepted():
    import numpy as np

    m = tiny_cogvideox()
    with torch.no_grad(), capture(m, layers=[np.int64(1)], steps=np.int64(0), num_steps=np.int64(1)) as cap:
        m(**tiny_inputs())
    assert cap.keys() == [("blocks.1.attn.q", 0), ("blocks.1.attn.k", 0)]


def test_batch_expanded_by_cag_hooks_is_kept_whole():
    """cag_hooks turn [uncond, cond] into [uncond, cond, perturbed] after capture checked the pair: kept whole."""
    from difftrack.guidance import CAGConfig, cag_hooks

    pipe = _tiny_mini_pipe()
    with torch.no_grad(), capture(pipe, layers=[0], steps=[0], num_steps=2) as cap, \
            cag_hooks(pipe, CAGConfig(layers=[1]), 6.0, 2, shared_prefix=False):
        _gen(pipe, PROMPTS[0], 6.0)
    assert cap.q(0, step=0).shape[0] == 3


def test_shared_prefix_cag_capture_sees_the_pair_before_the_first_cag_layer():
    """With the shared-prefix CAG, blocks before the first CAG layer compute only [uncond, cond]: capture keeps the
    conditional half there, as without CAG."""
    from difftrack.guidance import CAGConfig, cag_hooks

    pipe = _tiny_mini_pipe()
    with torch.no_grad(), capture(pipe, layers=[0], steps=[0], num_steps=2) as cap, \
            cag_hooks(pipe, CAGConfig(layers=[1]), 6.0, 2):
        _gen(pipe, PROMPTS[0], 6.0)
    assert cap.q(0, step=0).shape[0] == 1
