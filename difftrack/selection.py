"""Which layers, heads and denoising step to use: measured on a handful of world videos with exact tracks.

:func:`select` runs the paper's analysis (:func:`difftrack.analysis.analyze_exact`: the video forward-noised to a
few denoising steps, one conditional forward each, every layer recorded) on ``num_videos`` procedural world videos
of the pipeline's own size, scores them against the world's exact tracks and returns a :class:`Selection`:

* ``guidance_layers``: the top layers by the paper's harmonic mean (accuracy, cross-frame confidence and attention)
  at the last analysed step, for CAG and for diffusers' PAG / SkipLayer guiders;
* ``track_layer``, ``heads``, ``step``: the layer, head set and step with the best query-key matching accuracy
  (half a token), for :class:`difftrack.tracking.DiffTracker`.

Layer indices are the flat block indices of :mod:`difftrack.backbones` (HunyuanVideo: dual-stream blocks first);
:meth:`Selection.layer_skip_configs` converts them to diffusers' ``LayerSkipConfig`` conventions (a block list name
plus indices within it). In diffusers 0.42 the ``SkipLayerGuidance`` hooks (skip a block's attention) find these
blocks on CogVideoX, Wan and HunyuanVideo; its ``PerturbedAttentionGuidance`` hooks (attention scores) accept the
configuration but know none of these backbones' attention processors, so PAG does not run on them there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["Selection", "select"]


@dataclass
class Selection:
    """The result of :func:`select` (JSON-able with :meth:`to_dict`)."""

    guidance_layers: list[int]
    track_layer: int
    heads: list[int] | None
    step: int
    num_steps: int
    steps_analysed: list[int]
    block_lists: list[tuple[str, int]] = field(default_factory=list)  # (attribute, length) of the block lists
    scores: dict = field(default_factory=dict)

    def tracker_kwargs(self) -> dict:
        """Keyword arguments of :class:`difftrack.tracking.DiffTracker`."""
        return dict(layers=[self.track_layer], heads=self.heads, step=self.step, num_steps=self.num_steps)

    def cag_config(self, scale: float = 1.0, **kw):
        """A :class:`difftrack.guidance.CAGConfig` on :attr:`guidance_layers`."""
        from .guidance import CAGConfig

        return CAGConfig(layers=list(self.guidance_layers), scale=scale, **kw)

    def layer_skip_configs(self, **kw) -> list[dict]:
        """:attr:`guidance_layers` as ``diffusers.hooks.LayerSkipConfig`` keyword dicts (one per block list), e.g.
        ``PerturbedAttentionGuidance(perturbed_guidance_config=[LayerSkipConfig(**d) for d in
        sel.layer_skip_configs(skip_attention=False, skip_attention_scores=True, skip_ff=False)])``."""
        out, start = [], 0
        for name, n in self.block_lists:
            idx = [l - start for l in self.guidance_layers if start <= l < start + n]
            if idx:
                out.append(dict(indices=idx, fqn=name, **kw))
            start += n
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _block_lists(transformer) -> list[tuple[str, int]]:
    from .backbones import adapter_for

    names = [n.rsplit(".", 1)[0] for n, _ in adapter_for(transformer).blocks(transformer)]
    out: list[tuple[str, int]] = []
    for n in names:
        if out and out[-1][0] == n:
            out[-1] = (n, out[-1][1] + 1)
        else:
            out.append((n, 1))
    return out


def select(pipe, num_videos: int = 4, num_steps: int = 50, steps=None, grid_size: int = 8, top_k: int = 3,
           heads: str | None = "singles", seed: int = 0, split: str = "train", progress: bool = True) -> Selection:
    """Measure and choose layers, heads and step (see the module docstring).

    Args:
        pipe: any pipeline :func:`difftrack.runners.as_runner` supports (the embedded one, CogVideoX, Wan,
            HunyuanVideo) or a :class:`~difftrack.runners.VideoRunner`.
        num_videos: world videos (families alternating) of ``split`` (default ``"train"``: never the held-out
            photographs an evaluation reports on).
        num_steps: the schedule length; ``steps``: the loop indices analysed (default: 5 evenly spaced, the last
            included).
        grid_size: query grid side at frame 0.
        top_k: how many guidance layers.
        heads: ``"singles"`` also scores every single head (the tracker gets the best single head when it beats the
            head average); ``None`` keeps the head average.

    Returns:
        a :class:`Selection`; ``scores`` holds the per-(step, layer) accuracy and harmonic mean it was chosen from.
    """
    from tqdm.auto import tqdm

    from .analysis import analyze_exact, harmonic_mean, mean_tables, record_ground_truth, score_tables, top_layers
    from .runners import as_runner
    from .world import World

    for name, v in (("num_videos", num_videos), ("num_steps", num_steps), ("grid_size", grid_size),
                    ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r}; allowed: an integer >= 1")
    if heads not in ("singles", None):
        raise ValueError(f"heads={heads!r}; allowed: 'singles' or None")
    steps = sorted({int(s) % num_steps for s in (steps if steps is not None else
                                                  np.linspace(0, num_steps - 1, 5).round().astype(int))})
    runner = as_runner(pipe)
    n_layers = runner.num_layers
    if top_k > n_layers:
        raise ValueError(f"top_k={top_k}; allowed 1..{n_layers} (the model's blocks)")
    T, H, W = runner.resolve_size(None)
    world = World(T, H, W)
    head_sets = None
    if heads == "singles":
        from .backbones import attention_heads

        head_sets = [[h] for h in range(attention_heads(runner.pipe.transformer))]
    tables = []
    it = range(num_videos)
    for i in (tqdm(it, desc="select") if progress else it):
        s = world.sample(seed + i, ("objects", "scenes")[i % 2], split)
        rec = analyze_exact(runner, s, num_steps=num_steps, steps=steps, grid_size=grid_size, noise_seed=seed + i,
                            head_sets=head_sets)
        gt, vis, _ = record_ground_truth(rec, dict(kind="exact", seed=seed + i, family=s.family, split=split), s.video)
        tab = score_tables(rec, gt, vis)
        tables.append({k: v[steps] for k, v in tab.items()})  # only the analysed steps
    tab = mean_tables(tables)
    hm = harmonic_mean(tab["qk_acc"], tab["conf_cross"], tab["attn_cross"])
    guidance = top_layers(hm, k=top_k, step=-1)
    acc = tab["qk_acc"]  # [S', L]
    si, layer = np.unravel_index(int(np.nanargmax(acc)), acc.shape)
    best_heads, best = None, float(acc[si, layer])
    if head_sets is not None:
        ha = tab["qk_acc_heads"]  # [S', L, K]
        s2, l2, k2 = np.unravel_index(int(np.nanargmax(ha)), ha.shape)
        if ha[s2, l2, k2] > best:
            si, layer, best_heads, best = s2, l2, head_sets[k2], float(ha[s2, l2, k2])
    scores = dict(qk_acc=np.round(acc, 4).tolist(), harmonic_mean=np.round(hm, 4).tolist(), best_acc=best,
                  head_average_best_acc=float(np.nanmax(acc)), videos=num_videos, split=split, grid=grid_size)
    if head_sets is not None:
        scores["qk_acc_heads"] = np.round(tab["qk_acc_heads"], 4).tolist()
    return Selection(guidance_layers=[int(l) for l in guidance], track_layer=int(layer), heads=best_heads,
                     step=int(steps[si]), num_steps=int(num_steps), steps_analysed=steps,
                     block_lists=_block_lists(runner.pipe.transformer), scores=scores)
