"""Inspection helpers for the analysis notebooks (01-03) and ``scripts/run_analysis.py``.

Two computational helpers for the paper's visualisations (shared reference section 9), from captured query/key
(:func:`difftrack.capture.capture`, post-norm/post-RoPE, i.e. what SDPA sees):

* :func:`query_attention_maps` -- the cross-frame attention of a query point of the source frame over every frame:
  per head ``softmax_j(q_src . k^f_j / tau)`` over **that frame's** video keys, then the mean over heads;
* :func:`qk_pca` -- a 3-component PCA of the head-averaged video-token queries (or keys), fitted jointly over all
  frames and shown as RGB per frame.

:class:`QKInspector` is a ``capture(on_qk=...)`` callback that fills both for every (step, layer) of one run, so a
notebook slider only indexes precomputed arrays (``float32``; a 13-frame 16x16-token video, 12 layers and 8 steps
take about 20 MB).

The bookkeeping of the notebooks and ``scripts/run_analysis.py`` (analysed items, cached records, summaries) is in
:mod:`difftrack.experiments.analysis`; model loading (:func:`load_pipeline`, :func:`model_tag`) comes from
:mod:`difftrack.runners`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import matching as M
from .runners import load_pipeline, model_tag  # noqa: F401  (the notebooks' `model` parameter)

PARTS = ("text", "self", "cross")


# ---------------------------------------------------------------------------------------------- attention maps
def point_tokens(points_px: np.ndarray | torch.Tensor, stride: float, rows: int, cols: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ``(row, col)`` holding each pixel point: ``row = floor(y / stride)``, ``col = floor(x / stride)``,
    clamped to the grid (row from y, i.e. the published transposition [B3] fixed).

    Args:
        points_px: ``[n, 2]`` pixels ``(x, y)`` (edge convention).

    Returns:
        ``(row long [n], col long [n])``.
    """
    p = torch.as_tensor(np.asarray(points_px, np.float32))
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points_px must be [n, 2] pixels (x, y); got {tuple(p.shape)}")
    col = (p[:, 0] / stride).floor().long().clamp(0, cols - 1)
    row = (p[:, 1] / stride).floor().long().clamp(0, rows - 1)
    return row, col


@torch.no_grad()
def query_attention_maps(q: torch.Tensor, k: torch.Tensor, points_px, stride: float, src_frame: int = 0,
                         tau: float | str | None = None) -> torch.Tensor:
    """Cross-frame attention maps of query points.

    Args:
        q, k: ``[H, F, rows, cols, D]`` one sample's video-token query/key (e.g. ``cache.q(l, s)[0]`` or
            ``QKEvent.q_video[0]``).
        points_px: ``[n, 2]`` pixels ``(x, y)`` in frame ``src_frame``; each uses the token holding it.
        stride: pixels per token.
        src_frame: the frame the points live in.
        tau: softmax temperature (:func:`difftrack.matching.temperature`; default ``sqrt(head_dim)``).

    Returns:
        ``float32 [n, F, rows, cols]``: for every frame ``f``, ``mean_h softmax_j(q_src . k^f_j / tau)`` over the
        ``rows * cols`` keys of frame ``f`` (each map sums to 1). Frame ``src_frame`` is the within-frame map.
    """
    if q.dim() != 5 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [H, F, rows, cols, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    H, Fr, rows, cols, D = q.shape
    if not 0 <= src_frame < Fr:
        raise ValueError(f"src_frame={src_frame} out of range; allowed 0..{Fr - 1}")
    row, col = point_tokens(points_px, stride, rows, cols)
    t = M.temperature(tau, H, D)
    qs = q[:, src_frame, row.to(q.device), col.to(q.device)].float()  # (H, n, D)
    kk = k.float().reshape(H, Fr, rows * cols, D)  # (H, F, M, D)
    logits = torch.einsum("hnd,hfmd->hnfm", qs, kk) / t  # (H, n, F, M)
    maps = logits.softmax(-1).mean(0)  # (n, F, M)
    return maps.reshape(len(row), Fr, rows, cols).cpu()


@torch.no_grad()
def qk_pca(x: torch.Tensor, n_components: int = 3, normalize: str = "joint", clip: float = 1.0) -> np.ndarray:
    """PCA of head-averaged video-token descriptors, fitted jointly over frames, as RGB images.

    Args:
        x: ``[H, F, rows, cols, D]`` query or key of one sample (or ``[F, rows, cols, D]`` already averaged).
        n_components: components kept (3 for RGB).
        normalize: ``"joint"`` scales each component to ``[0, 1]`` with the same range for every frame, so a colour
            means the same descriptor in every frame (what correspondence needs); ``"frame"`` min-max normalises
            each frame separately, as the published code does.
        clip: percentile clipped at each end before scaling (robust to a few outlying tokens).

    Returns:
        ``float32 [F, rows, cols, n_components]`` in ``[0, 1]``. Component signs are fixed so that each
        component's largest loading is positive (deterministic colours).
    """
    if normalize not in ("joint", "frame"):
        raise ValueError(f"normalize={normalize!r}; allowed: 'joint', 'frame'")
    if x.dim() == 5:
        x = x.float().mean(0)  # (F, rows, cols, D)
    if x.dim() != 4:
        raise ValueError(f"x must be [H, F, rows, cols, D] or [F, rows, cols, D]; got {tuple(x.shape)}")
    Fr, rows, cols, D = x.shape
    if not 1 <= n_components <= min(D, Fr * rows * cols):
        raise ValueError(f"n_components={n_components}; allowed 1..{min(D, Fr * rows * cols)}")
    flat = x.reshape(-1, D).double()
    flat = flat - flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    comps = vh[:n_components]  # (C, D)
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * sign
    proj = (flat @ comps.T).reshape(Fr, rows * cols, n_components).numpy()
    if normalize == "joint":
        lo = np.percentile(proj, clip, axis=(0, 1), keepdims=True)
        hi = np.percentile(proj, 100 - clip, axis=(0, 1), keepdims=True)
    else:
        lo = np.percentile(proj, clip, axis=1, keepdims=True)
        hi = np.percentile(proj, 100 - clip, axis=1, keepdims=True)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return rgb.reshape(Fr, rows, cols, n_components).astype(np.float32)


class QKInspector:
    """``capture(on_qk=...)`` callback storing, for every captured (step, layer), the attention maps of a few query
    points and the q/k PCA images.

    Args:
        points_px: ``[P, 2]`` pixels ``(x, y)`` in frame ``src_frame``.
        stride: pixels per token.
        num_steps, num_layers: table size.
        src_frame, tau: as :func:`query_attention_maps`.
        pca: also compute :func:`qk_pca` of q and k.

    Attributes (filled during the run; ``nan`` where nothing was captured):
        attn: ``float32 [S, L, P, F, rows, cols]``;
        pca_q, pca_k: ``float32 [S, L, F, rows, cols, 3]``;
        timesteps: ``float64 [S]`` scheduler timestep of each step.
    """

    def __init__(self, points_px, stride: float, num_steps: int, num_layers: int, src_frame: int = 0,
                 tau: float | str | None = None, pca: bool = True):
        from .runners import check_num_steps

        self.points = np.asarray(points_px, np.float32).reshape(-1, 2)
        self.stride, self.S, self.L = float(stride), check_num_steps(num_steps), int(num_layers)
        self.src_frame, self.tau, self.pca = src_frame, tau, pca
        self.attn = self.pca_q = self.pca_k = None
        self.timesteps = np.full(self.S, np.nan)

    def _alloc(self, frames: int, rows: int, cols: int) -> None:
        S, L, P = self.S, self.L, len(self.points)
        self.attn = np.full((S, L, P, frames, rows, cols), np.nan, np.float32)
        if self.pca:
            self.pca_q = np.full((S, L, frames, rows, cols, 3), np.nan, np.float32)
            self.pca_k = np.full((S, L, frames, rows, cols, 3), np.nan, np.float32)

    def save(self, path) -> None:
        """Write everything to one ``.npz`` (atomic: a crash never leaves a half-written file)."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        arrays = dict(points=self.points, timesteps=self.timesteps,
                      meta=np.array([self.stride, self.S, self.L, self.src_frame], np.float64))
        arrays.update({k: getattr(self, k) for k in ("attn", "pca_q", "pca_k") if getattr(self, k) is not None})
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "QKInspector":
        """Read a file written by :meth:`save` (``tau`` is not stored: the maps are already computed).

        Raises:
            FileNotFoundError: no such file.
            difftrack.fileio.CorruptFileError: (a ``ValueError``) a truncated / corrupted file or one without the
                arrays :meth:`save` writes, naming the file.
        """
        from .fileio import CorruptFileError, load_npz

        z = load_npz(path, "QKInspector file")
        missing = [k for k in ("meta", "points", "timesteps") if k not in z]
        if missing or np.shape(z.get("meta")) != (4,):
            raise CorruptFileError(f"{str(path)!r} is not a QKInspector file (missing {missing or ['meta [4]']}); "
                                   f"expected what QKInspector.save writes")
        stride, S, L, src = z["meta"]
        insp = cls(z["points"], float(stride), int(S), int(L), src_frame=int(src), pca="pca_q" in z)
        insp.timesteps = z["timesteps"]
        for k in ("attn", "pca_q", "pca_k"):
            if k in z:
                setattr(insp, k, z[k])
        return insp

    def on_qk(self, ev) -> None:
        if not 0 <= ev.step < self.S or not 0 <= ev.layer < self.L:
            raise ValueError(f"(step {ev.step}, layer {ev.layer}) outside the inspector's {self.S} steps x "
                             f"{self.L} layers")
        q, k = ev.q_video[0], ev.k_video[0]  # (H, F, rows, cols, D)
        if self.attn is None:
            self._alloc(*q.shape[1:4])
        self.attn[ev.step, ev.layer] = query_attention_maps(q, k, self.points, self.stride, self.src_frame,
                                                            self.tau).numpy()
        if self.pca:
            self.pca_q[ev.step, ev.layer] = qk_pca(q.cpu())
            self.pca_k[ev.step, ev.layer] = qk_pca(k.cpu())
        if ev.timestep is not None:
            self.timesteps[ev.step] = ev.timestep


@torch.no_grad()
def inspect_generation(pipe, prompt: str, seed: int, points_px, num_steps: int, guidance_scale: float = 6.0,
                       layers="all", size=None, **kw) -> tuple[np.ndarray, QKInspector]:
    """Generate one video (same noise as :func:`difftrack.analysis.analyze_generation` for the same seed) while a
    :class:`QKInspector` records every (step, layer). ``pipe``: a pipeline or
    :class:`difftrack.runners.VideoRunner`. Returns ``(video uint8 [T, H, W, 3], inspector)``; the inspector's
    frames are latent frames (pinned to ``runner.frame_index(T)``)."""
    from .capture import capture
    from .runners import as_runner

    runner = as_runner(pipe)
    size = runner.resolve_size(size)
    insp = QKInspector(points_px, runner.stride, num_steps, runner.num_layers, **kw)
    with capture(runner.pipe, layers=layers, store=False, on_qk=insp.on_qk, num_steps=num_steps):
        video = runner.generate(prompt, seed, num_steps, guidance_scale, size=size)
    return video, insp


@torch.no_grad()
def inspect_exact(pipe, sample, points_px, num_steps: int, noise_seed: int = 0, layers="all", **kw) -> QKInspector:
    """A world video noised to every denoising step (one conditional forward per step, the same noise as
    :func:`difftrack.analysis.analyze_exact`) while a :class:`QKInspector` records every (step, layer)."""
    from .capture import capture
    from .runners import as_runner

    runner = as_runner(pipe)
    insp = QKInspector(points_px, runner.stride, num_steps, runner.num_layers, **kw)
    with capture(runner.pipe, layers=layers, store=False, on_qk=insp.on_qk) as cap:
        runner.noised_forwards(sample.video, sample.prompt, num_steps, None, noise_seed, cap)
    return insp
