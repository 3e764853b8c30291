"""Capture, analysis, tracking and CAG with the features diffusers users turn on (issue 28), on the tiny random
``WanPipeline`` of ``difftrack.testing`` (fp32, CPU).

* every diffusers 0.42.1 hook that skips blocks or steps, reuses or predicts earlier outputs, or alters the attention
  (the caches, LayerSkip, smoothed energy guidance, context parallelism, any unknown hook) is refused before the first
  transformer forward, naming the feature and how to remove it;
* layerwise casting, group offloading, TextKVCache (a no-op on these blocks), model CPU offloading, VAE tiling and
  slicing and the SDPA attention backends run exactly: capture leaves the outputs bit-identical and records every
  requested (layer, step); group offloading gives bitwise the captured tensors and CAG latents of the plain model;
* other attention backends (flex, flash, sage, ...) are refused before the first forward;
* completeness is checked (hooks.Coverage): a requested (layer, step) not recorded or perturbed is an error naming
  it and why, and negative steps resolve against the run's own length (its scheduler);
* ``torch.compile(transformer)`` and ``transformer.compile()`` are captured exactly: the wrapper is unwrapped and the
  compiled code runs eagerly while capture or CAG is active (a counting backend shows it), compiled again after.
"""
import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from difftrack.analysis import analyze_generation
from difftrack.capture import capture, run_until
from difftrack.guidance import CAGConfig, cag_hooks, generate_with_cag_diffusers
from difftrack.hooks import EXACT_HOOKS, REFUSED_HOOKS, IncompleteRunError, UnsupportedHookError
from difftrack.testing import FRAMES, HEIGHT, WIDTH, build_tiny_pipeline

STEPS = 3
PROMPT = dict(prompt="a red circle moving left", negative_prompt="a blue square", guidance_scale=5.0)
SIZE = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="module")
def wan():
    return build_tiny_pipeline("wan")


def latents(pipe, steps=STEPS, seed=0, **kw):
    return pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="latent",
                **PROMPT, **SIZE, **kw).frames


def cag_latents(pipe, layers=(1,), scale=1.0, steps=STEPS):
    return generate_with_cag_diffusers(pipe, CAGConfig(layers=list(layers), scale=scale),
                                       generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                                       output_type="latent", **PROMPT, **SIZE).frames


class CallCounter:
    """Counts transformer forwards (a plain torch pre-hook, removed on exit)."""

    def __init__(self, module):
        self.n, self.module = 0, module

    def __enter__(self):
        self.h = self.module.register_forward_pre_hook(lambda m, a: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.h.remove()


# ----------------------------------------------------------------------------------------- refused hooks
def _registry(pipe):
    return HookRegistry.check_if_exists_or_initialize(pipe.transformer)


def _enable_cache(config_fn):
    def install(pipe):
        pipe.transformer.enable_cache(config_fn(pipe))
        return pipe.transformer.disable_cache
    return install


def _apply(fn, name):
    def install(pipe):
        fn(pipe)
        return lambda: _registry(pipe).remove_hook(name, recurse=True)
    return install


def _layer_skip(pipe):
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[1], fqn="blocks"))


def _seg(pipe):
    from diffusers.hooks import SmoothedEnergyGuidanceConfig
    from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook

    _apply_smoothed_energy_guidance_hook(pipe.transformer, SmoothedEnergyGuidanceConfig(indices=[1], fqn="blocks"),
                                         1.0, name="smoothed_energy_guidance_hook")


class UnknownHook(ModelHook):
    """A user's own diffusers hook (it changes nothing, but difftrack cannot know that)."""


def _context_parallel(pipe):
    """Context parallelism needs several processes: its split hook is put in the registry (detection only)."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    reg = _registry(pipe)
    reg.hooks["cp_input---"] = ContextParallelSplitHook.__new__(ContextParallelSplitHook)
    return lambda: reg.hooks.pop("cp_input---")


def _caches():
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, SeaCacheConfig, TaylorSeerCacheConfig)

    return {
        "FirstBlockCache": _enable_cache(lambda p: FirstBlockCacheConfig(threshold=0.2)),
        "PyramidAttentionBroadcast": _enable_cache(lambda p: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: p.current_timestep)),
        "FasterCache": _enable_cache(lambda p: FasterCacheConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: p.current_timestep,
            tensor_format="BCFHW")),
        "TaylorSeerCache": _enable_cache(lambda p: TaylorSeerCacheConfig(use_lite_mode=True)),  # default: no Wan match
        "MagCache": _enable_cache(lambda p: MagCacheConfig(calibrate=True, num_inference_steps=STEPS)),
        "SeaCache": _enable_cache(lambda p: SeaCacheConfig()),
    }


REFUSED = dict(_caches(), **{
    "LayerSkip": _apply(_layer_skip, "layer_skip_hook"),
    "SmoothedEnergyGuidance": _apply(_seg, "smoothed_energy_guidance_hook"),
    "an unknown diffusers hook": _apply(lambda p: _registry(p).register_hook(UnknownHook(), "my_hook"), "my_hook"),
    "context parallelism": _context_parallel,
})


def test_every_diffusers_hook_class_is_classified():
    """Each ModelHook subclass diffusers 0.42.1 ships is either exact or refused with a reason (a new diffusers hook
    fails this test until it is classified)."""
    import importlib
    import pkgutil

    import diffusers.hooks as dh

    shipped = set()
    for mod in pkgutil.iter_modules(dh.__path__):
        m = importlib.import_module(f"diffusers.hooks.{mod.name}")
        shipped |= {n for n, c in vars(m).items() if isinstance(c, type) and issubclass(c, ModelHook)
                    and c is not ModelHook and c.__module__ == m.__name__}
    assert shipped == set(EXACT_HOOKS) | set(REFUSED_HOOKS)


@pytest.mark.parametrize("feature", list(REFUSED))
def test_hook_is_refused_before_the_first_forward(wan, feature):
    """capture and CAG refuse, before any transformer forward, naming the feature and how to remove it; nothing is
    left installed. (Before issue 28: FirstBlockCache captured 10 of 16 tensors, LayerSkip left its layer empty, CAG
    perturbed fewer steps than asked, PyramidAttentionBroadcast crashed CAG inside the pipeline.)"""
    before = dict(wan.transformer.attn_processors)
    remove = REFUSED[feature](wan)
    try:
        with CallCounter(wan.transformer) as calls:
            with pytest.raises(UnsupportedHookError, match=f"(?s)capture refused before the first forward.*{feature}"
                                                           r".*remove it: "):
                with capture(wan, layers="all", num_steps=STEPS):
                    latents(wan)
            with pytest.raises(UnsupportedHookError, match=f"(?s)CAG refused before the first forward.*{feature}"):
                cag_latents(wan)
        assert calls.n == 0
    finally:
        remove()
    assert dict(wan.transformer.attn_processors) == before
    assert not [h for m in wan.transformer.modules() for h in getattr(getattr(m, "_diffusers_hook", None), "hooks",
                                                                          {})]


def test_analysis_tracking_and_the_guider_refuse_a_cache(wan):
    """analyze_generation (it returned a third of its tracks as nan), DiffTracker and the CAG guider refuse
    FirstBlockCache before the first forward."""
    from diffusers.hooks import FirstBlockCacheConfig

    from difftrack.guiders import CrossAttentionGuidance
    from difftrack.testing import build_tiny_modular_pipeline
    from difftrack.tracking import DiffTracker

    wan.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with CallCounter(wan.transformer) as calls:
            with pytest.raises(UnsupportedHookError, match="(?s)FirstBlockCache.*disable_cache"):
                analyze_generation(wan, "a red circle", seed=0, num_steps=STEPS, grid_size=2,
                                   size=(FRAMES, HEIGHT, WIDTH))
            video = np.zeros((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
            with pytest.raises(UnsupportedHookError, match="FirstBlockCache"):
                DiffTracker(wan, layers=(1,))(video, np.array([[0, 8.0, 8.0]]))
            modular = build_tiny_modular_pipeline("wan", pipe=wan,
                                                  guider=CrossAttentionGuidance(guidance_scale=5.0, layers=[1]))
            with torch.no_grad():
                pe, npe = wan.encode_prompt("a red circle", "a blue square", max_sequence_length=512)
            with pytest.raises(UnsupportedHookError, match="(?s)CAG refused.*FirstBlockCache"):
                modular(generator=torch.Generator().manual_seed(0), output="latents", prompt_embeds=pe,
                        negative_prompt_embeds=npe, num_inference_steps=STEPS, **SIZE)
        assert calls.n == 0
    finally:
        wan.transformer.disable_cache()


def test_layer_skip_added_during_the_run_is_refused_at_that_call(wan):
    """A hook a guider adds for its own forwards (here LayerSkip, from a step-end callback) is refused at the next
    transformer call, naming it, instead of leaving its layer empty."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    def add_skip(pipe, i, t, kw):
        if i == 0:
            apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[1], fqn="blocks"))
        return {}

    try:
        with pytest.raises(UnsupportedHookError, match="(?s)capture refused at a transformer call.*LayerSkip"):
            with capture(wan, layers="all"):
                latents(wan, callback_on_step_end=add_skip)
    finally:
        _registry(wan).remove_hook("layer_skip_hook", recurse=True)


# ------------------------------------------------------------------------------------------- exact features
def _layerwise_casting(pipe):
    """Cannot be undone (diffusers refuses to deinitialise it): run on a pipeline of its own."""
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    return lambda: None


def _group_offload(kind):
    def install(pipe):
        pipe.transformer.enable_group_offload(onload_device="cpu", offload_device="cpu", offload_type=kind,
                                              num_blocks_per_group=1 if kind == "block_level" else None)
        return lambda: [_registry(pipe).remove_hook(n, recurse=True) for n in
                        ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")]
    return install


def _text_kv_cache(pipe):
    from diffusers.hooks import TextKVCacheConfig

    pipe.transformer.enable_cache(TextKVCacheConfig())
    return pipe.transformer.disable_cache


def _model_cpu_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    return pipe.remove_all_hooks


def _vae_tiling(pipe):
    pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                           tile_sample_stride_width=8)
    pipe.vae.enable_slicing()

    def undo():
        pipe.vae.disable_tiling()
        pipe.vae.disable_slicing()
    return undo


def _attention_backend(name):
    def install(pipe):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        active = _AttentionBackendRegistry.get_active_backend()[0]
        pipe.transformer.set_attention_backend(name)

        def undo():
            pipe.transformer.reset_attention_backend()
            _AttentionBackendRegistry.set_active_backend(active)  # set_attention_backend changes it globally
        return undo
    return install


EXACT = {  # feature -> (installer, whether the plain model's numbers are unchanged by the feature itself)
    "layerwise casting": (_layerwise_casting, False),
    "group offloading (block level)": (_group_offload("block_level"), True),
    "group offloading (leaf level)": (_group_offload("leaf_level"), True),
    "TextKVCache": (_text_kv_cache, True),
    "model CPU offloading": (_model_cpu_offload, True),
    "attention backend _native_math": (_attention_backend("_native_math"), False),
}


@pytest.mark.parametrize("feature", list(EXACT))
def test_feature_runs_capture_and_cag_exactly(wan, feature):
    """Under the feature: capture is complete and leaves the output bit-identical; where the feature does not change
    the model's numbers (offloading, TextKVCache) the captured q/k and the CAG latents are bitwise the plain
    model's; CAG with scale 0 is bitwise the plain run and with scale 1 perturbs every (layer, step)."""
    install, same_numbers = EXACT[feature]
    if feature == "layerwise casting":
        wan = build_tiny_pipeline("wan")
    with capture(wan, layers="all") as plain_cap:
        plain = latents(wan)
    plain_cag = cag_latents(wan)
    undo = install(wan)
    try:
        ref = latents(wan)
        with capture(wan, layers="all", steps=[-1], what=("q", "k", "features")) as cap:
            out = latents(wan)
        assert torch.equal(out, ref)
        assert sorted(cap.keys()) == sorted((f"blocks.{l}.{w}", STEPS - 1) for l in (0, 1)
                                            for w in ("attn.q", "attn.k", "out"))
        assert torch.equal(cag_latents(wan, scale=0.0), ref)
        guided = cag_latents(wan)
        assert not torch.equal(guided, ref)
        if same_numbers:
            assert torch.equal(ref, plain) and torch.equal(guided, plain_cag)
            for l in (0, 1):
                assert torch.equal(cap.q(l, STEPS - 1), plain_cap.q(l, STEPS - 1))
    finally:
        undo()


def test_vae_tiling_and_slicing_leave_capture_exact(wan):
    """VAE tiling / slicing only change the decode: capture of a decoded run stays bit-identical and complete."""
    kw = dict(num_inference_steps=1, output_type="pt", **PROMPT, **SIZE)
    undo = _vae_tiling(wan)
    try:
        ref = wan(generator=torch.Generator().manual_seed(0), **kw).frames
        with capture(wan, layers=[1], steps=[-1]) as cap:
            out = wan(generator=torch.Generator().manual_seed(0), **kw).frames
        assert torch.equal(out, ref) and sorted(cap.keys()) == [("blocks.1.attn.k", 0), ("blocks.1.attn.q", 0)]
    finally:
        undo()


def test_other_attention_backends_are_refused_before_the_first_forward(wan):
    undo = _attention_backend("flex")(wan)
    try:
        with CallCounter(wan.transformer) as calls:
            with pytest.raises(ValueError, match="capture refused before the first forward: attention backend "
                                                 "'flex'.*set_attention_backend\\('native'\\)"):
                with capture(wan, layers=[0]):
                    latents(wan)
            with pytest.raises(ValueError, match="CAG refused before the first forward: attention backend 'flex'"):
                cag_latents(wan)
        assert calls.n == 0
    finally:
        undo()


# --------------------------------------------------------------------------------------------- completeness
def test_negative_steps_resolve_against_the_run_and_a_shorter_run_is_an_error(wan):
    """steps=[-1] with the pipeline: the last step of the run, read from its scheduler (no num_steps needed). A
    num_steps the run contradicts is an error -- at the first call when the scheduler says so, at exit otherwise
    (before issue 28: capture(steps=[-1], num_steps=50) around a shorter run exited holding nothing)."""
    with capture(wan, layers=[1], steps=[-1]) as cap:
        latents(wan)
    assert sorted(cap.keys()) == [("blocks.1.attn.k", STEPS - 1), ("blocks.1.attn.q", STEPS - 1)]
    with pytest.raises(ValueError, match=f"num_steps=50, but the pipeline's scheduler runs {STEPS} step"):
        with capture(wan, layers=[1], steps=[-1], num_steps=50):
            latents(wan)
    with pytest.raises(IncompleteRunError, match=rf"num_steps=50 was given but the run had {STEPS} step\(s\)"
                                                 rf"(.|\n)*\(layer 1, step 49\): the run had {STEPS} step"):
        with capture(wan.transformer, layers=[1], steps=[-1], num_steps=50):  # no scheduler: checked at exit
            latents(wan)


def test_a_layer_that_did_not_run_is_named():
    """A requested block that never reached its self-attention (here the forward stops before it) is an error
    naming the layer, the step and why, not a missing key."""
    from test_backbones import tiny_wan, wan_inputs

    m = tiny_wan()
    with pytest.raises(IncompleteRunError, match=r"q/k \(cond\) not recorded at 1 \(layer, step\): \(layer 1, step "
                                                 r"0\): the step ran but the block's self-attention was not reached"):
        with torch.no_grad(), capture(m, layers=[0, 1]):
            run_until(m, 0, **wan_inputs())


def test_cag_run_shorter_than_asked_is_an_error(wan):
    """CAG told 4 steps around a 3-step run: the missing step is named (before: fewer steps perturbed, no word)."""
    with pytest.raises(IncompleteRunError, match=r"(?s)CAG: .*perturbed attention \(cond\) not perturbed at 1 "
                                                 r"\(layer, step\): \(layer 1, step 3\): the run had 3 step"):
        with cag_hooks(wan, CAGConfig(layers=[1]), 5.0, num_inference_steps=4):
            latents(wan)


# ----------------------------------------------------------------------------------------- torch.compile
def test_compiled_transformer_is_captured_exactly(wan):
    """``pipe.transformer = torch.compile(pipe.transformer)`` (refused before issue 28 as an unsupported backbone)
    and in-place ``transformer.compile()``: the wrapper is unwrapped and the compiled code runs eagerly while capture
    or CAG is active (a counting backend sees no compiled call there), compiled again afterwards. Verified with the
    "eager" backend on the CPU: captured tensors and outputs bitwise those of the uncompiled model."""
    torch._dynamo.reset()
    compiled_calls = []

    def backend(gm, example_inputs):
        return lambda *args: compiled_calls.append(1) or gm(*args)

    original = wan.transformer
    with capture(wan, layers=[1], steps=[-1]) as ref_cap:
        ref = latents(wan, steps=2)
    ref_cag = cag_latents(wan, steps=2)
    try:
        wan.transformer = torch.compile(original, backend=backend)
        latents(wan, steps=2)  # compiles
        assert compiled_calls
        n = len(compiled_calls)
        with capture(wan, layers=[1], steps=[-1]) as cap:
            out = latents(wan, steps=2)
        assert len(compiled_calls) == n and torch.equal(out, ref)
        assert torch.equal(cap.q(1, 1), ref_cap.q(1, 1)) and torch.equal(cap.k(1, 1), ref_cap.k(1, 1))
        assert torch.equal(cag_latents(wan, steps=2), ref_cag) and len(compiled_calls) == n
        latents(wan, steps=2)
        assert len(compiled_calls) > n  # compiled again after the contexts
        wan.transformer = original
        original.compile(backend=backend)  # in place
        with capture(wan, layers=[1], steps=[-1]) as cap:
            out = latents(wan, steps=2)
        assert torch.equal(out, ref) and torch.equal(cap.q(1, 1), ref_cap.q(1, 1))
    finally:
        wan.transformer = original
        original._compiled_call_impl = None
        torch._dynamo.reset()


def test_cag_and_the_guider_name_a_layer_that_was_not_perturbed(wan):
    """Block 1 bypassed by code outside difftrack (its forward replaced by the identity): CAG on layer 1 perturbed
    nothing. generate_with_cag_diffusers and CrossAttentionGuidance raise, naming layer and step, instead of
    returning an unguided video as a guided one."""
    from difftrack.guiders import CrossAttentionGuidance
    from difftrack.testing import build_tiny_modular_pipeline

    block = wan.transformer.blocks[1]
    block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        with pytest.raises(IncompleteRunError, match=r"(?s)CAG: .*\(layer 1, step 0\), \(layer 1, step 1\), "
                                                     r"\(layer 1, step 2\): the step ran but the block's "
                                                     r"self-attention was not reached"):
            cag_latents(wan)
        modular = build_tiny_modular_pipeline("wan", pipe=wan,
                                              guider=CrossAttentionGuidance(guidance_scale=5.0, layers=[1]))
        with torch.no_grad():
            pe, npe = wan.encode_prompt("a red circle", "a blue square", max_sequence_length=512)
        with pytest.raises(IncompleteRunError, match=r"(?s)CrossAttentionGuidance: .*\(layer 1, step 0\)"):
            modular(generator=torch.Generator().manual_seed(0), output="latents", prompt_embeds=pe,
                    negative_prompt_embeds=npe, num_inference_steps=STEPS, **SIZE)
    finally:
        del block.forward
