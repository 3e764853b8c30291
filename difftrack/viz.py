"""Plotting only. Every function takes arrays and returns a :class:`matplotlib.figure.Figure`; it writes a PNG only
when the caller passes ``save=`` (co-tracker's ``Visualizer(save_dir=...)`` rule).

Figures are built with :class:`~matplotlib.figure.Figure` directly, not through ``pyplot``: nothing accumulates in
pyplot's figure manager, and a notebook shows a figure exactly once when it is the cell's last expression or is
passed to ``display``. The CAG evaluation's plots (:func:`plot_side_by_side`, :func:`plot_metric_vs_scale`,
:func:`plot_sample_grid`) are pyplot figures, as notebook 05 shows them with ``plt.show()``. No widget code lives here
(notebooks own the sliders).

Array conventions follow ``docs/conventions.md``: videos ``uint8 [T, H, W, 3]``, tracks ``float32 [N, T, 2]`` pixels
``(x, y)`` with the edge convention, ``visible bool [N, T]``; tables are ``[S, L]`` (steps x layers).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

PART_COLOURS = {"self": "#4C72B0", "cross": "#DD8452", "text": "#55A868"}
DPI = 120


def _lines(series: Mapping[str, np.ndarray], figsize, percent: bool, styles: Mapping[str, str] | None = None):
    """A figure with one line per series (x = index); returns ``(fig, ax, longest series length)``."""
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    n = 0
    for name, v in series.items():
        v = np.asarray(v, float) * (100 if percent else 1)
        n = max(n, len(v))
        ax.plot(np.arange(len(v)), v, (styles or {}).get(name, "o-"), label=name, ms=4)
    return fig, ax, n


def _finish(fig: Figure, ax, save, ylabel: str, title: str | None, xlabel: str | None = None) -> Figure:
    """The line plots' common ending: axis labels, light grid, legend, title, optional save."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


def _save(fig: Figure, save: str | Path | None) -> Figure:
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=DPI, bbox_inches="tight")
    return fig


def captioned(fig: Figure, caption: str, save: str | Path | None = None, width: int = 110) -> Figure:
    """Write ``caption`` (where the figure's numbers come from) under ``fig``, then save it when asked."""
    fig.text(0.01, -0.01, _wrap(caption, width), ha="left", va="top", fontsize=7.5, color="0.25",
             transform=fig.transFigure)
    return _save(fig, save)


def _frames(T: int, frames: Sequence[int] | None, n: int = 5) -> list[int]:
    if frames is None:
        return sorted(set(np.linspace(0, T - 1, min(n, T)).round().astype(int).tolist()))
    bad = [f for f in frames if not 0 <= f < T]
    if bad:
        raise ValueError(f"frames {bad} out of range; allowed 0..{T - 1}")
    return list(frames)


def track_colours(queries_xy: np.ndarray, cmap: str = "gist_rainbow") -> np.ndarray:
    """RGBA colour per track keyed on the query's y, then x (CoTracker's rainbow)."""
    q = np.asarray(queries_xy, np.float64)
    if len(q) == 0:
        return np.zeros((0, 4))
    key = q[:, 1] * 1e3 + q[:, 0]
    order = np.argsort(np.argsort(key))
    return colormaps[cmap](order / max(len(q) - 1, 1))


# the colour rule for points added one at a time (click-to-track): colour i is fixed by the order the points came in,
# so adding a point never recolours the others (the rainbow of :func:`track_colours` is keyed on all the queries);
# bright colours that stay apart on the world's textures
POINT_PALETTE = np.array([(0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 0, 255), (255, 140, 0), (0, 120, 255),
                          (255, 255, 255), (150, 255, 150), (255, 80, 80), (170, 110, 255)], np.uint8)


def point_colours(n: int) -> np.ndarray:
    """``uint8 [n, 3]`` RGB of the first ``n`` points in the order they were added (:data:`POINT_PALETTE`,
    repeated)."""
    return POINT_PALETTE[np.arange(n) % len(POINT_PALETTE)]


def draw_tracks(ax, frame: np.ndarray, tracks: np.ndarray, visible: np.ndarray, t: int, trail: int = 4,
                colours: np.ndarray | None = None, size: float = 18.0) -> None:
    """Draw ``frame`` and the tracks at time ``t`` on ``ax``: filled dots for visible points, hollow ones for
    hidden points, and a trail of the last ``trail`` frames."""
    H, W = frame.shape[:2]
    ax.imshow(frame, extent=(0, W, H, 0), interpolation="nearest")
    colours = track_colours(tracks[:, 0]) if colours is None else colours
    t0 = max(0, t - trail)
    for n in range(len(tracks)):
        seg = tracks[n, t0:t + 1]
        v = visible[n, t0:t + 1]
        if v.sum() >= 2:
            ax.plot(seg[v, 0], seg[v, 1], "-", color=colours[n], lw=1.0, alpha=0.8)
    vis = visible[:, t]
    ax.scatter(tracks[vis, t, 0], tracks[vis, t, 1], s=size, c=colours[vis], edgecolors="black", linewidths=0.4)
    ax.scatter(tracks[~vis, t, 0], tracks[~vis, t, 1], s=size * 0.7, facecolors="none", edgecolors=colours[~vis],
               linewidths=0.8)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def video_grid(videos: Sequence[np.ndarray], titles: Sequence[str] | None = None, frames: Sequence[int] | None = None,
               tracks: Sequence[np.ndarray] | None = None, visible: Sequence[np.ndarray] | None = None,
               trail: int = 4, panel: float = 1.7, title: str | None = None, save=None) -> Figure:
    """Rows of videos, columns of frames; with ``tracks``/``visible`` (one ``[N, T, 2]`` / ``[N, T]`` per video,
    ``None`` entries allowed) the tracks are drawn on the frames.

    Args:
        videos: ``uint8 [T, H, W, 3]`` each (same ``T``).
        titles: one row label per video.
        frames: frame indices shown (default: 5 spread over the clip).
    """
    if not len(videos):
        raise ValueError("no videos to show")
    T = videos[0].shape[0]
    fr = _frames(T, frames)
    fig = Figure(figsize=(panel * len(fr) + 0.3, panel * len(videos) + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(videos), len(fr), squeeze=False))
    for i, v in enumerate(videos):
        tr = None if tracks is None else tracks[i]
        vi = None if visible is None else visible[i]
        for j, f in enumerate(fr):
            ax = axes[i, j]
            if tr is not None:
                draw_tracks(ax, v[f], tr, vi if vi is not None else np.ones(tr.shape[:2], bool), f, trail)
            else:
                ax.imshow(v[f], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            if i == 0:
                ax.set_title(f"frame {f}", fontsize=9)
        if titles is not None:
            axes[i, 0].set_ylabel(_wrap(titles[i], 24), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, save)


def _wrap(s: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(s, width)) if s else s


def track_frame(frame: np.ndarray, tracks: np.ndarray, visible: np.ndarray, t: int, trail: int = 4,
                title: str | None = None, size: float = 3.2, gt: tuple[np.ndarray, np.ndarray] | None = None,
                save=None) -> Figure:
    """One frame with its tracks (e.g. a slider view). ``gt=(tracks, visible)`` adds a second panel with them."""
    n = 1 if gt is None else 2
    fig = Figure(figsize=(size * n, size + 0.3), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    draw_tracks(axes[0], frame, tracks, visible, t, trail)
    axes[0].set_title(title or f"frame {t}", fontsize=9)
    if gt is not None:
        draw_tracks(axes[1], frame, gt[0], gt[1], t, trail)
        axes[1].set_title("reference", fontsize=9)
    return _save(fig, save)


def threshold_curves(thresholds: Sequence[float], curves: Mapping[str, Sequence[float]], xlabel: str = "threshold (px)",
                     ylabel: str = "fraction within threshold", title: str | None = None, marker_x: float | None = None,
                     marker_label: str | None = None, save=None) -> Figure:
    """Curves of a fraction over thresholds (e.g. PCK of pseudo vs exact ground truth per family)."""
    fig = Figure(figsize=(4.6, 3.4), layout="constrained")
    ax = fig.subplots()
    for name, ys in curves.items():
        ax.plot(thresholds, ys, "o-", label=name)
    if marker_x is not None:
        ax.axvline(marker_x, color="grey", ls="--", lw=1, label=marker_label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(thresholds), [f"{t:g}" for t in thresholds])
    ax.set_ylim(0, 1.02)
    return _finish(fig, ax, save, ylabel, title, xlabel=xlabel)


def histogram(values: Mapping[str, np.ndarray], bins=30, xlabel: str = "", title: str | None = None,
              save=None) -> Figure:
    """Overlaid histograms (density) of several value sets."""
    fig = Figure(figsize=(4.6, 3.2), layout="constrained")
    ax = fig.subplots()
    allv = np.concatenate([np.asarray(v, float).ravel() for v in values.values()]) if values else np.zeros(1)
    allv = allv[np.isfinite(allv)]
    edges = np.histogram_bin_edges(allv if allv.size else np.zeros(1), bins=bins)
    for name, v in values.items():
        v = np.asarray(v, float).ravel()
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=edges, alpha=0.55, label=name, density=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


def layer_lines(series: Mapping[str, np.ndarray], ylabel: str, title: str | None = None,
                highlight: Sequence[int] = (), percent: bool = True, styles: Mapping[str, str] | None = None,
                save=None) -> Figure:
    """Values per layer, one line per series (the paper's Fig. 4a: query-key vs feature matching accuracy).

    Args:
        series: name -> ``[L]``.
        highlight: layers marked with a shaded band (e.g. the top layers).
        percent: plot ``100 * value``.
    """
    fig, ax, L = _lines(series, (6.0, 3.4), percent, styles)
    for l in highlight:
        ax.axvspan(l - 0.4, l + 0.4, color="gold", alpha=0.25, lw=0)
    ax.set_xticks(np.arange(L))
    return _finish(fig, ax, save, ylabel, title, xlabel="layer")


def layer_bars(values: np.ndarray, ylabel: str, title: str | None = None, highlight: Sequence[int] = (),
               save=None) -> Figure:
    """One bar per layer, highlighted layers in orange with their value printed (the paper's Fig. 4b)."""
    v = np.asarray(values, float)
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    ax = fig.subplots()
    cols = ["#DD8452" if l in set(highlight) else "#8C8C8C" for l in range(len(v))]
    ax.bar(np.arange(len(v)), v, color=cols)
    for l in highlight:
        ax.text(l, v[l], f"{v[l]:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(v)))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, np.nanmax(v) * 1.12) if v.size else 1)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


def table_heatmap(table: np.ndarray, title: str | None = None, cbar_label: str = "", step_labels=None,
                  percent: bool = False, highlight: Sequence[int] = (), save=None) -> Figure:
    """A ``[S, L]`` (steps x layers) table as a heat map, steps from noisiest (top) to cleanest (bottom)."""
    t = np.asarray(table, float) * (100 if percent else 1)
    S, L = t.shape
    fig = Figure(figsize=(0.42 * L + 2.0, 0.3 * S + 1.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(t, aspect="auto", cmap="viridis")
    ax.set_xticks(np.arange(L))
    ax.set_yticks(np.arange(S), [f"{i} (t={int(t)})" for i, t in enumerate(step_labels)] if step_labels is not None
                  else np.arange(S))
    for l in highlight:
        ax.add_patch(Rectangle((l - 0.5, -0.5), 1, S, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("layer")
    ax.set_ylabel("denoising step (noisy -> clean)")
    fig.colorbar(im, ax=ax, label=cbar_label)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


def head_heatmap(acc: np.ndarray, names: Sequence[str], title: str | None = None, mark: Sequence[tuple[int, int]] = (),
                 save=None) -> Figure:
    """Matching accuracy per layer (rows) and head set (columns, e.g. single heads, pairs, ``"all"`` = the head
    average) as a heat map in percent, each cell labelled; ``mark``: ``(layer, column)`` cells outlined."""
    t = np.asarray(acc, float) * 100
    L, K = t.shape
    if len(names) != K:
        raise ValueError(f"{len(names)} head-set names for {K} columns")
    fig = Figure(figsize=(0.75 * K + 2.2, 0.32 * L + 1.4), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(t, aspect="auto", cmap="viridis")
    for l in range(L):
        for k in range(K):
            ax.text(k, l, f"{t[l, k]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if t[l, k] < np.nanmax(t) * 0.6 else "black")
    for l, k in mark:
        ax.add_patch(Rectangle((k - 0.5, l - 0.5), 1, 1, fill=False, ec="red", lw=1.8))
    ax.set_xticks(np.arange(K), list(names))
    ax.set_yticks(np.arange(L))
    ax.set_xlabel("heads")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="matching accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


def score_bars(scores: Mapping[str, np.ndarray], ylabel: str, title: str | None = None, save=None) -> Figure:
    """Grouped bars per layer of the self / cross / text scores (confidence or attention score)."""
    names = list(scores)
    L = len(next(iter(scores.values())))
    w = 0.8 / len(names)
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.subplots()
    for i, n in enumerate(names):
        ax.bar(np.arange(L) + (i - (len(names) - 1) / 2) * w, scores[n], w, label=n, color=PART_COLOURS.get(n))
    ax.set_xticks(np.arange(L))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(names))
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


def step_lines(series: Mapping[str, np.ndarray], ylabel: str, timesteps: Sequence[float] | None = None,
               title: str | None = None, percent: bool = True, save=None) -> Figure:
    """Values over denoising steps, one line per series (the paper's Fig. 4c). The x axis is the step index
    (noisiest first); with ``timesteps`` the scheduler timestep is written under each step."""
    fig, ax, S = _lines(series, (5.6, 3.4), percent)
    _step_axis(ax, S, timesteps)
    return _finish(fig, ax, save, ylabel, title)


def _step_axis(ax, S: int, timesteps) -> None:
    ticks = np.arange(S) if S <= 12 else np.linspace(0, S - 1, 11).round().astype(int)
    if timesteps is not None and len(timesteps) == S:
        ax.set_xticks(ticks, [f"{i}\n(t={int(timesteps[i])})" for i in ticks], fontsize=7)
    else:
        ax.set_xticks(ticks)
    ax.set_xlabel("denoising step (noisy -> clean)")


def attention_share(shares: Mapping[str, np.ndarray], timesteps: Sequence[float] | None = None,
                    title: str | None = None, save=None) -> Figure:
    """Stacked share of attention on self (own frame) / cross (other frames) / text keys over steps (the paper's
    Fig. 5). ``shares``: part -> ``[S]`` fractions (they sum to about 1 per step)."""
    names = [n for n in ("self", "cross", "text") if n in shares] + [n for n in shares if n not in PART_COLOURS]
    S = len(next(iter(shares.values())))
    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.stackplot(np.arange(S), *[np.asarray(shares[n], float) * 100 for n in names], labels=names,
                 colors=[PART_COLOURS.get(n, None) for n in names], alpha=0.85)
    _step_axis(ax, S, timesteps)
    ax.set_ylabel("attention share (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, max(S - 1, 1))
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


def attention_maps(video: np.ndarray, maps: np.ndarray, point_px: Sequence[float], frames: Sequence[int] | None = None,
                   track: np.ndarray | None = None, alpha: float = 0.6, title: str | None = None,
                   panel: float = 1.7, save=None) -> Figure:
    """Cross-frame attention of one query point, overlaid on the frames (the paper's attention-map figure).

    Args:
        video: ``uint8 [T, H, W, 3]``.
        maps: ``[F, rows, cols]`` attention of the point over each frame's keys (F = T here).
        point_px: the query ``(x, y)`` in frame 0 (marked with a white cross there).
        track: optional ``[T, 2]`` reference track, marked as a white circle in each frame.
        alpha: weight of the heat map (each map min-max normalised, viridis).
    """
    T, H, W = video.shape[:3]
    fr = _frames(T, frames)
    fig = Figure(figsize=(panel * len(fr), panel + 0.45), layout="constrained")
    axes = fig.subplots(1, len(fr), squeeze=False)[0]
    for ax, f in zip(axes, fr):
        m = np.asarray(maps[f], float)
        m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
        ax.imshow(video[f], extent=(0, W, H, 0), interpolation="nearest")
        ax.imshow(m, extent=(0, W, H, 0), cmap="viridis", alpha=alpha, interpolation="bilinear")
        if f == fr[0]:
            ax.plot(point_px[0], point_px[1], "x", color="white", ms=8, mew=2)
        if track is not None:
            ax.plot(track[f, 0], track[f, 1], "o", mfc="none", mec="white", ms=9, mew=1.5)
        ax.set_title(f"frame {f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, save)


def pca_frames(rows: Mapping[str, np.ndarray], frames: Sequence[int] | None = None, title: str | None = None,
               panel: float = 1.5, save=None) -> Figure:
    """Rows of per-frame RGB images, e.g. ``{"video": uint8 [T,H,W,3], "query PCA": [T,h,w,3] in [0,1],
    "key PCA": ...}``; low-resolution maps are shown with nearest interpolation (one square per token)."""
    names = list(rows)
    T = len(next(iter(rows.values())))
    fr = _frames(T, frames)
    fig = Figure(figsize=(panel * len(fr) + 0.4, panel * len(names) + 0.5), layout="constrained")
    axes = fig.subplots(len(names), len(fr), squeeze=False)
    for i, n in enumerate(names):
        for j, f in enumerate(fr):
            ax = axes[i, j]
            ax.imshow(rows[n][f], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"frame {f}", fontsize=9)
        axes[i, 0].set_ylabel(n, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, save)


def bar_table(values: Mapping[str, float], ylabel: str, title: str | None = None, percent: bool = False,
              save=None) -> Figure:
    """Simple labelled bars (e.g. a metric per group)."""
    names = list(values)
    v = np.array([values[n] for n in names], float) * (100 if percent else 1)
    fig = Figure(figsize=(0.9 * len(names) + 2.0, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(len(v)), v, color=[colors.to_hex(colormaps["tab10"](i % 10)) for i in range(len(v))])
    for i, x in enumerate(v):
        ax.text(i, x, f"{x:.1f}" if percent else f"{x:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(v)), names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, save)


# --------------------------------------------------------------------------------------------- CAG evaluation
# (pyplot figures, so that notebook 05's plt.show() displays them)
def _strip(video: np.ndarray, frames: Sequence[int]) -> np.ndarray:
    return np.concatenate([video[f] for f in frames], axis=1)


def plot_side_by_side(videos: dict, frames: Sequence[int] | None = None, title: str | None = None,
                      save: str | Path | None = None):
    """One row per named video (``name -> uint8 [T, H, W, 3]``), the chosen ``frames`` side by side (default: 5
    evenly spaced). Returns the Figure; saves it when ``save`` is given."""
    import matplotlib.pyplot as plt

    names = list(videos)
    T = len(next(iter(videos.values())))
    frames = list(np.linspace(0, T - 1, 5).round().astype(int)) if frames is None else list(frames)
    fig, axes = plt.subplots(len(names), 1, figsize=(1.3 * len(frames) + 0.6, 1.45 * len(names) + 0.4),
                             squeeze=False)
    for ax, n in zip(axes[:, 0], names):
        ax.imshow(_strip(videos[n], frames))
        ax.set_yticks([])
        ax.set_ylabel(n, rotation=0, ha="right", va="center", fontsize=8)
        W = videos[n].shape[2]
        ax.set_xticks([W * (k + 0.5) for k in range(len(frames))])
        ax.set_xticklabels([f"t={f}" for f in frames], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, save)


def plot_metric_vs_scale(settings: dict, measures: Sequence[str] = ("agree", "object_integrity", "warp_error",
                                                                     "motion_magnitude", "sharpness"),
                         save: str | Path | None = None):
    """Each measure (mean ± sem) against the CAG scale, one line per layer set, the no-CAG value at scale 0 and as a
    dashed line. ``settings``: name -> ``{"layer_set", "scale", "summary"}`` (as in ``results/cag.json``)."""
    import matplotlib.pyplot as plt

    from .cag_eval import MEASURE_LABELS, nan_if_none as _num

    fig, axes = plt.subplots(1, len(measures), figsize=(3.0 * len(measures), 2.8), squeeze=False)
    base = settings.get("none")
    sets = sorted({s["layer_set"] for s in settings.values() if s["layer_set"] != "none"})
    colours = {"top3": "tab:blue", "bottom3": "tab:orange"}
    for ax, m in zip(axes[0], measures):
        for ls in sets:
            rows = sorted(((s["scale"], s["summary"][m]) for s in settings.values() if s["layer_set"] == ls),
                          key=lambda r: r[0])
            xs = [0.0] + [r[0] for r in rows] if base else [r[0] for r in rows]
            ys = [_num(v) for v in ([base["summary"][m]["mean"]] if base else []) + [r[1]["mean"] for r in rows]]
            es = [_num(v) for v in ([base["summary"][m]["sem"]] if base else []) + [r[1]["sem"] for r in rows]]
            lab = f"{ls} {settings[next(k for k in settings if settings[k]['layer_set'] == ls)].get('layers', '')}"
            ax.errorbar(xs, ys, yerr=np.nan_to_num(es), marker="o", capsize=3, label=lab, color=colours.get(ls))
        if base:
            ax.axhline(_num(base["summary"][m]["mean"]), color="gray", ls="--", lw=1, label="no CAG")
        ax.set_xlabel("CAG scale")
        ax.set_title(MEASURE_LABELS.get(m, m), fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, save)


def plot_sample_grid(videos: Sequence[np.ndarray], prompts: Sequence[str], flags: Sequence[bool] | None = None,
                     nrow: int = 4, ncol: int = 4, frames: Sequence[int] | None = None,
                     save: str | Path | None = None):
    """A ``nrow x ncol`` grid; each cell is one video's frames (default first, middle, last) side by side, titled
    with its prompt (green when ``flags`` says it agrees, red otherwise)."""
    import matplotlib.pyplot as plt

    n = min(len(videos), nrow * ncol)
    T = len(videos[0])
    frames = [0, T // 2, T - 1] if frames is None else list(frames)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 1.55 * nrow + 0.2), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(_strip(videos[k], frames))
        colour = "black" if flags is None else ("tab:green" if flags[k] else "tab:red")
        ax.set_title(_wrap(prompts[k], 44), fontsize=6, color=colour)
    fig.tight_layout()
    return _save(fig, save)
