"""difftrack.selection: layers, heads and step chosen from measured tables, in the conventions of the tracker,
CAG and diffusers' layer-skip guiders (tiny random models, CPU)."""
import numpy as np
import pytest
import torch
from test_guidance import tiny_mini_pipe

from difftrack.analysis import top_layers
from difftrack.selection import Selection, select
from difftrack.testing import build_tiny_pipeline


@pytest.fixture(scope="module")
def sel_and_pipe():
    pipe = tiny_mini_pipe()
    pipe.set_progress_bar_config = lambda **k: None
    return select(pipe, num_videos=2, num_steps=4, steps=[1, 3], grid_size=3, top_k=1, progress=False), pipe


def test_select_returns_the_argmax_of_its_own_tables(sel_and_pipe):
    sel, _ = sel_and_pipe
    acc = np.asarray(sel.scores["qk_acc"])  # [steps analysed, layers]
    heads = np.asarray(sel.scores["qk_acc_heads"])  # [steps analysed, layers, heads]
    assert acc.shape == (2, 2) and heads.shape == (2, 2, 2) and sel.steps_analysed == [1, 3]
    best = max(acc.max(), heads.max())
    assert sel.scores["best_acc"] == pytest.approx(best, abs=1e-4)
    si = sel.steps_analysed.index(sel.step)
    got = acc[si, sel.track_layer] if sel.heads is None else heads[si, sel.track_layer, sel.heads[0]]
    assert got == pytest.approx(best, abs=1e-4)
    hm = np.asarray(sel.scores["harmonic_mean"])
    assert sel.guidance_layers == top_layers(hm, k=1, step=-1)
    assert sel.block_lists == [("transformer_blocks", 2)]


def test_selection_feeds_the_tracker_and_cag(sel_and_pipe):
    from difftrack.guidance import generate_with_cag
    from difftrack.tracking import DiffTracker

    sel, pipe = sel_and_pipe
    kw = sel.tracker_kwargs()
    tracker = DiffTracker(pipe, **kw)
    assert tracker.layers == [sel.track_layer] and tracker.heads == sel.heads
    cfg = sel.cag_config(scale=1.0)
    assert cfg.layers == sel.guidance_layers
    out = generate_with_cag(pipe, "a red circle moving left", cfg, num_inference_steps=2, num_frames=3, height=16,
                            width=16, generator=torch.Generator().manual_seed(0), output_type="latent",
                            progress=False).frames
    assert torch.isfinite(out).all()


def test_layer_skip_configs_follow_diffusers_block_lists():
    """Flat indices (HunyuanVideo: dual-stream blocks first) become one LayerSkipConfig per block list, which
    diffusers' PAG guider accepts and its hooks find in the model."""
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.hooks import HookRegistry, LayerSkipConfig
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook

    from difftrack.selection import _block_lists

    pipe = build_tiny_pipeline("hunyuanvideo")
    lists = _block_lists(pipe.transformer)
    assert [n for n, _ in lists] == ["transformer_blocks", "single_transformer_blocks"]
    n_dual = lists[0][1]
    sel = Selection(guidance_layers=[0, n_dual], track_layer=0, heads=None, step=-1, num_steps=50,
                    steps_analysed=[49], block_lists=lists)
    cfgs = sel.layer_skip_configs(skip_attention=False, skip_attention_scores=True, skip_ff=False)
    assert cfgs == [dict(indices=[0], fqn="transformer_blocks", skip_attention=False, skip_attention_scores=True,
                         skip_ff=False),
                    dict(indices=[0], fqn="single_transformer_blocks", skip_attention=False,
                         skip_attention_scores=True, skip_ff=False)]
    guider = PerturbedAttentionGuidance(perturbed_guidance_config=[LayerSkipConfig(**d) for d in cfgs])
    assert len(guider.skip_layer_config) == 2
    # diffusers' SkipLayer hooks find the chosen blocks on every backbone (its PAG hooks, attention scores, know none
    # of these backbones' processors in diffusers 0.42: a diffusers limitation, so PAG is only configured above)
    for kind, pag in (("cogvideox", False), ("wan", False), ("hunyuanvideo", False)):
        tr = build_tiny_pipeline(kind).transformer
        lists = _block_lists(tr)
        last = sum(n for _, n in lists) - 1
        sel = Selection(guidance_layers=[0, last], track_layer=0, heads=None, step=-1, num_steps=50,
                        steps_analysed=[49], block_lists=lists)
        kw = dict(skip_attention=False, skip_attention_scores=True, skip_ff=False) if pag else {}
        names = []
        for i, d in enumerate(sel.layer_skip_configs(**kw)):
            _apply_layer_skip_hook(tr, LayerSkipConfig(**d), name=f"t{i}")
            names.append(f"t{i}")
            for j in d["indices"]:
                block = getattr(tr, d["fqn"])[j]
                assert HookRegistry.check_if_exists_or_initialize(block).get_hook(f"t{i}") is not None
        reg = HookRegistry.check_if_exists_or_initialize(tr)
        for n in names:
            reg.remove_hook(n, recurse=True)


def test_bad_arguments_are_named():
    pipe = tiny_mini_pipe()
    with pytest.raises(ValueError, match="num_videos=0"):
        select(pipe, num_videos=0)
    with pytest.raises(ValueError, match="top_k=5; allowed 1..2"):
        select(pipe, top_k=5, progress=False)
    with pytest.raises(ValueError, match="heads='pairs'"):
        select(pipe, heads="pairs")
