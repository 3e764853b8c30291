"""Correspondence analysis over layers and denoising steps (the paper's section 3, reference section 4).

During one denoising run, every (layer, step) self-attention call is turned into small per-point results on the
fly (nothing of size ``N x N`` and no query/key is kept):

* predicted tracks of grid points of frame 0 from query-key matching and from block-feature matching
  (:mod:`difftrack.matching`);
* the head-averaged attention of each point's frame-0 token over the whole sequence, reduced to the maxima and sums
  per part (text, own frame, each other frame) for the confidence and attention scores.

Ground truth comes afterwards: exact tracks for world videos, or pseudo ground truth from an off-the-shelf tracker
(OpenCV pyramidal Lucas-Kanade with a forward-backward check) for generated videos, as the paper used CoTracker.
:func:`score_tables` then gives per-(step, layer) tables.

Two scoring protocols (``protocol=``; every difference is a row of ``docs/conventions.md``):

* ``"difftrack"`` (default, the project's): tracks refined by a soft-argmax around the peak (``Recorder(refine=)``),
  scored per **latent** frame (latent frame ``k`` pinned to video frame ``r k``; frames 1.. only, frame 0 being the
  query itself) against the visibility of the AND rule over the ``r`` video frames a latent frame encodes; the
  confidence and attention scores use the matching temperature ``tau``; features matched by cosine similarity,
  bidirectional.
* ``"published"`` (the published ``analyze_generation.py`` / ``MatchingEvaluator``, shared reference sections 4.3-4.4):
  argmax per source token, then bilinear interpolation of the integer match map at the query; the latent-frame
  tracks linearly interpolated to **every video frame** (``F.interpolate(size=T, mode="linear",
  align_corners=False)``; the identity when latent frames are video frames, as on the embedded model) and all ``T``
  frames scored, **frame 0 included**, against the per-video-frame visibility; the AND rule only in the confidence
  score; scores at ``tau = sqrt(head_dim)`` whatever the matching temperature; features by the raw dot product,
  forward only. Record it with ``Recorder(protocols=("difftrack", "published"))`` (one run, both protocols).

Defects of the published code fixed in both protocols: query tokens indexed (row = y, col = x) [B3]; cell-centre
coordinates and border clamping [B4]; no second softmax before the argmax; the "feature" is the block output
(post-``to_out``, the residual stream) [B12].
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import matching as M
from .capture import FeatureEvent, QKEvent, _normalise_steps, capture

SCORE_PARTS = ("text", "self", "cross")
#: Scoring protocols: the project's own (default) and the published code's (see the module docstring).
PROTOCOLS = ("difftrack", "published")
#: Prefix of the published protocol's tables in :func:`difftrack.experiments.analysis.run_dataset` results.
PUBLISHED_PREFIX = "pub_"
#: The published analysis's query-key matching (section 4.3): sqrt(head_dim), bidirectional, argmax + interpolation.
PUBLISHED_MATCH = dict(tau="dim", bidirectional=True, refine="paper")
#: The published feature matching: softmax of raw dot products (no temperature), forward only, same refinement.
PUBLISHED_FEATURES = dict(tau=1.0, bidirectional=False, refine="paper", similarity="dot")


def check_protocol(protocol) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; allowed: {PROTOCOLS}")
    return protocol


def check_protocols(protocols) -> tuple[str, ...]:
    """A non-empty collection of :data:`PROTOCOLS` names -> the tuple in canonical order (``"difftrack"`` first)."""
    if isinstance(protocols, str) or protocols is None:
        protocols = (protocols,)
    protocols = tuple(protocols)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or "difftrack" not in protocols:
        raise ValueError(f"protocols={protocols!r}; allowed: a collection of {PROTOCOLS} that holds 'difftrack' "
                         f"(the default tables are always recorded)")
    return tuple(p for p in PROTOCOLS if p in protocols)


@dataclass
class AnalysisRecord:
    """Per-(step, layer) raw results of one video. Arrays (``S`` steps, ``L`` layers, ``n`` points, ``F`` frames):

    * ``qk_tracks``, ``feat_tracks``: ``float32 [S, L, n, F, 2]`` pixels;
    * ``max_text``, ``sum_text``: ``[S, L, n]``; ``max_frame``, ``sum_frame``: ``[S, L, n, F]`` (attention of the
      point's frame-0 token, head-averaged);
    * ``qk_tracks_heads``: ``float32 [S, L, K, n, F, 2]`` query-key tracks from the cost averaged over each of the
      ``K`` head sets ``head_sets`` only (recorded when :class:`Recorder` gets ``head_sets``; else ``None``);
    * ``pub_qk_tracks``, ``pub_feat_tracks`` ``[S, L, n, F, 2]`` and ``pub_{max,sum}_{text,frame}``: the same for the
      published protocol (recorded when ``"published"`` is in ``protocols``; the score tables only when the
      default scores were not already at ``sqrt(head_dim)``, ``scores_at_sqrt_dim``).
    """

    queries: np.ndarray  # [n, 2] pixels (x, y) in frame 0
    stride: float
    num_steps: int
    num_layers: int
    frames: int
    timesteps: list = field(default_factory=list)
    qk_tracks: np.ndarray | None = None
    feat_tracks: np.ndarray | None = None
    max_text: np.ndarray | None = None
    sum_text: np.ndarray | None = None
    max_frame: np.ndarray | None = None
    sum_frame: np.ndarray | None = None
    qk_tracks_heads: np.ndarray | None = None
    head_sets: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    protocols: list = field(default_factory=lambda: ["difftrack"])
    scores_at_sqrt_dim: bool | None = None  # the default score tables used tau = sqrt(head_dim)
    pub_qk_tracks: np.ndarray | None = None
    pub_feat_tracks: np.ndarray | None = None
    pub_max_text: np.ndarray | None = None
    pub_sum_text: np.ndarray | None = None
    pub_max_frame: np.ndarray | None = None
    pub_sum_frame: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        """Atomic write (``.npz``): a crash never leaves a half-written result."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in self.__dict__.items() if not isinstance(v, np.ndarray)}
        np.savez_compressed(tmp, _scalars=json.dumps(scalars, default=float), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "AnalysisRecord":
        """Read a record; :class:`difftrack.fileio.CorruptFileError` (a ``ValueError``) names a damaged file."""
        from .fileio import READ_ERRORS, CorruptFileError

        try:
            with np.load(path, allow_pickle=False) as z:
                kw = json.loads(str(z["_scalars"]))
                kw.update({k: z[k] for k in z.files if k != "_scalars"})
            return cls(**kw)
        except FileNotFoundError:
            raise
        except READ_ERRORS + (json.JSONDecodeError,) as err:
            raise CorruptFileError(f"cannot read the analysis record {str(path)!r} (truncated or corrupted?): "
                                   f"{type(err).__name__}: {err}") from err


class Recorder:
    """Capture callbacks filling an :class:`AnalysisRecord`.

    Results stay on the device of the captured tensors until :attr:`rec` is read (one transfer for the whole run,
    no synchronisation per layer and step).

    Args:
        queries_px: ``[n, 2]`` pixel positions (x, y) of the points in frame 0.
        stride: pixels per token.
        num_steps, num_layers: table size.
        tau, bidirectional, refine, radius: matching settings (:mod:`difftrack.matching`).
        feature_tau: temperature of block-feature cosine matching.
        head_sets: also record query-key tracks from single heads or head subsets, e.g. ``[[0], [1], [0, 1]]``
            (``qk_tracks_heads``; head indices of every layer; ``None``: the head average only).
        features: whether block-feature tracks (``feat_tracks``) are expected (``on_features`` is called).
        steps: the steps expected (default: all ``num_steps``); the others stay ``nan`` (not analysed).

    :meth:`record` (and :attr:`rec`) checks that every expected table has every expected (step, layer) and raises
    :class:`difftrack.hooks.IncompleteRunError` naming what is missing otherwise (never a ``nan`` in their place).
        protocols: the scoring protocols to record (:data:`PROTOCOLS`; ``"difftrack"`` always): with
            ``"published"`` the published protocol's tracks (argmax + match-map interpolation from the same cost
            when ``tau`` is ``sqrt(head_dim)``, published feature matching) and, when ``tau`` is not
            ``sqrt(head_dim)``, its score tables are recorded too (``pub_*``).
    """

    TABLES = ("qk_tracks", "feat_tracks", "max_text", "sum_text", "max_frame", "sum_frame")

    def __init__(self, queries_px: np.ndarray, stride: float, num_steps: int, num_layers: int, frames: int,
                 tau=None, bidirectional: bool = True, refine: str = "softargmax", radius: int = 1,
                 feature_tau: float = 0.05, scores: bool = True, head_sets=None, features: bool = True,
                 steps=None, protocols=("difftrack",)):
        for name, v in (("num_steps", num_steps), ("num_layers", num_layers), ("frames", frames)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}; allowed: an integer >= 1")
        M.temperature(tau, 1, 1)  # a bad tau fails here, before any capture
        self.protocols = check_protocols(protocols)
        self.published = "published" in self.protocols
        n = len(queries_px)
        S, L, F = num_steps, num_layers, frames
        self._rec = AnalysisRecord(queries=np.asarray(queries_px, np.float32), stride=float(stride), num_steps=S,
                                   num_layers=L, frames=F, protocols=list(self.protocols),
                                   scores_at_sqrt_dim=tau is None or tau == "dim")
        self._shapes = dict(qk_tracks=(S, L, n, F, 2), feat_tracks=(S, L, n, F, 2), max_text=(S, L, n),
                            sum_text=(S, L, n), max_frame=(S, L, n, F), sum_frame=(S, L, n, F))
        if self.published:
            self._shapes.update(pub_qk_tracks=(S, L, n, F, 2), pub_feat_tracks=(S, L, n, F, 2))
            if scores and not self._rec.scores_at_sqrt_dim:
                self._shapes.update({f"pub_{t}": self._shapes[t] for t in self.TABLES[2:]})
        if head_sets is not None:
            if isinstance(head_sets, (str, bytes)) or not len(head_sets):
                raise ValueError(f"head_sets={head_sets!r}; allowed: None or a non-empty list of head lists, "
                                 f"e.g. [[0], [1], [0, 1]]")
            self.head_sets = [M.check_heads(hs, None) for hs in head_sets]  # range checked per layer
            self._rec.head_sets = self.head_sets
            self._shapes["qk_tracks_heads"] = (S, L, len(self.head_sets), n, F, 2)
        else:
            self.head_sets = None
        self._buf: dict[str, torch.Tensor] = {}  # name -> [S, L, ...] float32 on the capture's device
        self.kw = dict(tau=tau, bidirectional=bidirectional, refine=refine, radius=radius)
        self.feature_kw = dict(tau=feature_tau, bidirectional=bidirectional, refine=refine, radius=radius)
        self.scores = scores
        self._expected = [n for n in self._shapes if features or n not in ("feat_tracks", "pub_feat_tracks")]
        if not scores:
            self._expected = [n for n in self._expected if n not in ("max_text", "sum_text", "max_frame", "sum_frame")]
        self._steps = list(range(S)) if steps is None else sorted({int(s) for s in steps})
        bad = [s for s in self._steps if not 0 <= s < S]
        if bad:
            raise ValueError(f"steps {bad} out of range for num_steps={S}; allowed 0..{S - 1}")
        self._filled: set[tuple[str, int, int]] = set()  # (table, step, layer) written
        self._pts_cpu = torch.from_numpy(self._rec.queries)
        self._dev_cache: dict = {}  # per device / grid: points, score token indices, text mask

    @property
    def rec(self) -> AnalysisRecord:
        """:meth:`record` (checked)."""
        return self.record()

    def record(self, check: bool = True) -> AnalysisRecord:
        """The record, with every table copied to host memory. ``check`` (default): raise
        :class:`difftrack.hooks.IncompleteRunError` when an expected (table, step, layer) was never recorded;
        ``check=False`` returns it with ``nan`` there (an empty record to fill by hand)."""
        if check:
            from .hooks import IncompleteRunError

            L = self._rec.num_layers
            miss = [(n, s, l) for n in self._expected for s in self._steps for l in range(L)
                    if (n, s, l) not in self._filled]
            if miss:
                tables = sorted({n for n, _, _ in miss})
                cells = ", ".join(f"(step {s}, layer {l})" for s, l in sorted({(s, l) for _, s, l in miss})[:8])
                raise IncompleteRunError(
                    f"analysis recorder: {len(miss)} expected (table, step, layer) entries were never recorded "
                    f"(tables {tables} at {cells}{', ...' if len(miss) > 8 else ''}): the capture delivered no "
                    f"event for them; nothing partial is returned")
        for name, shape in self._shapes.items():  # qk_tracks_heads only with head_sets
            b = self._buf.get(name)
            setattr(self._rec, name, b.cpu().numpy() if b is not None else np.full(shape, np.nan, np.float32))
        return self._rec

    def _store(self, name: str, step: int, layer: int, value: torch.Tensor) -> None:
        b = self._buf.get(name)
        if b is None or b.device != value.device:
            b = self._buf[name] = torch.full(self._shapes[name], float("nan"), dtype=torch.float32, device=value.device)
        b[step, layer] = value
        self._filled.add((name, step, layer))

    def _pts(self, device) -> torch.Tensor:
        key = ("pts", str(device))
        if key not in self._dev_cache:
            self._dev_cache[key] = self._pts_cpu.to(device)
        return self._dev_cache[key]

    def _layout(self, rows: int, cols: int, device) -> M.PointLayout:
        """The points' :class:`difftrack.matching.PointLayout` (token units, bilinear corners, ``grid_sample``
        coordinates), made once per (grid, device) for every (layer, step) and both protocols."""
        key = ("layout", rows, cols, str(device))
        if key not in self._dev_cache:
            self._dev_cache[key] = M.point_layout(self._pts(device), self._rec.stride, rows, cols, device)
        return self._dev_cache[key]

    def _check(self, step: int, layer: int):
        if step >= self._rec.num_steps:
            raise ValueError(f"step {step} beyond the {self._rec.num_steps} steps the recorder was sized for")

    def _score_index(self, g, N: int, device):
        """Sequence indices of the points' frame-0 tokens and the text mask, once per (grid, length, device)."""
        key = ("score", g.frames, g.rows, g.cols, N, str(device))
        if key not in self._dev_cache:
            pts, stride = self._pts_cpu, self._rec.stride
            col = (pts[:, 0] / stride).floor().long().clamp(0, g.cols - 1)
            row = (pts[:, 1] / stride).floor().long().clamp(0, g.rows - 1)  # [B3] fixed: row from y
            vs = g.video_slice(N)
            idx = (vs.start + row * g.cols + col).to(device)
            text_mask = torch.ones(N, dtype=torch.bool)
            text_mask[vs] = False
            text_idx = torch.nonzero(text_mask)[:, 0].to(device)
            self._dev_cache[key] = (idx, vs, text_idx)
        return self._dev_cache[key]

    def _qk_tracks(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        """``[qk_tracks]`` (``[qk_tracks, pub_qk_tracks]`` with the published protocol) of one layer, ``[n, F, 2]``
        pixels each; both from one cost when the temperature and direction agree."""
        pts, stride = self._pts(q.device), self._rec.stride
        lay = self._layout(q.shape[2], q.shape[3], q.device)
        if not self.published:
            return [M.match_video(q, k, pts, stride, layout=lay, **self.kw)[0]]
        same = (M.temperature(self.kw["tau"], q.shape[0], q.shape[-1]) == M.temperature("dim", q.shape[0], q.shape[-1])
                and self.kw["bidirectional"] == PUBLISHED_MATCH["bidirectional"])
        if same:
            kw = {k_: v for k_, v in self.kw.items() if k_ != "refine"}
            return [t for t, _ in M.match_video_refines(q, k, pts, stride, (self.kw["refine"], "paper"), layout=lay,
                                                        **kw)]
        return [M.match_video(q, k, pts, stride, layout=lay, **self.kw)[0],
                M.match_video(q, k, pts, stride, radius=self.kw["radius"], layout=lay, **PUBLISHED_MATCH)[0]]

    def _store_scores(self, prefix: str, ev: QKEvent, tau) -> None:
        g = ev.grid
        N = ev.q.shape[2]
        idx, vs, text_idx = self._score_index(g, N, ev.q.device)
        A = M.attention_rows(ev.q[0], ev.k[0], idx, tau=tau)  # [n, N]
        video = A[:, vs].reshape(len(idx), g.frames, g.tokens_per_frame)
        text = A.index_select(1, text_idx)
        self._store(prefix + "max_text", ev.step, ev.layer,
                    text.max(-1).values if text.shape[1] else torch.zeros(len(idx), device=A.device))
        self._store(prefix + "sum_text", ev.step, ev.layer, text.sum(-1))
        self._store(prefix + "max_frame", ev.step, ev.layer, video.max(-1).values)
        self._store(prefix + "sum_frame", ev.step, ev.layer, video.sum(-1))

    @torch.no_grad()
    def on_qk(self, ev: QKEvent) -> None:
        self._check(ev.step, ev.layer)
        q, k = ev.q_video[0], ev.k_video[0]  # [H, F, rows, cols, D]
        for name, tr in zip(("qk_tracks", "pub_qk_tracks"), self._qk_tracks(q, k)):
            self._store(name, ev.step, ev.layer, tr)
        if self.head_sets is not None:
            lay = self._layout(q.shape[2], q.shape[3], q.device)
            self._store("qk_tracks_heads", ev.step, ev.layer, torch.stack(
                [M.match_video(q, k, self._pts(q.device), self._rec.stride, heads=hs, layout=lay, **self.kw)[0]
                 for hs in self.head_sets]))
        if not self.scores:
            return
        self._store_scores("", ev, self.kw["tau"])
        if "pub_max_text" in self._shapes:  # the published scores are at sqrt(head_dim), the default ones are not
            self._store_scores(PUBLISHED_PREFIX, ev, PUBLISHED_MATCH["tau"])

    @torch.no_grad()
    def on_features(self, ev: FeatureEvent) -> None:
        self._check(ev.step, ev.layer)
        f = ev.features[0]  # [F, rows, cols, C]
        lay = self._layout(f.shape[1], f.shape[2], f.device)
        tr, _ = M.match_video_features(f, self._pts(f.device), self._rec.stride, layout=lay, **self.feature_kw)
        self._store("feat_tracks", ev.step, ev.layer, tr)
        if self.published:
            tr, _ = M.match_video_features(f, self._pts(f.device), self._rec.stride, radius=self.kw["radius"],
                                           layout=lay, **PUBLISHED_FEATURES)
            self._store("pub_feat_tracks", ev.step, ev.layer, tr)


def pseudo_ground_truth(video: np.ndarray, queries_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo ground truth for generated videos from OpenCV pyramidal Lucas-Kanade with a forward-backward check
    (:class:`difftrack.baselines.LucasKanadeTracker`), queries at frame 0.

    Returns ``(tracks [n, T, 2], visible [n, T])``."""
    from .baselines import LucasKanadeTracker

    q = np.concatenate([np.zeros((len(queries_px), 1), np.float32), queries_px], 1)
    return LucasKanadeTracker()(video, q)


def pseudo_vs_exact(video: np.ndarray, queries_px: np.ndarray, tracks: np.ndarray, visible: np.ndarray,
                    thresholds=(1, 2, 4, 8)) -> dict:
    """How far the pseudo ground truth (:func:`pseudo_ground_truth`, Lucas-Kanade) is from the exact ground truth
    of one video whose exact tracks are known.

    Args:
        video: ``uint8 [T, H, W, 3]``.
        queries_px: ``float [n, 2]`` pixel ``(x, y)`` at frame 0.
        tracks, visible: exact ground truth, ``float [n, T, 2]`` pixels and ``bool [n, T]``.
        thresholds: pixel thresholds of the TAP-Vid metrics.

    Returns ``{"pts_within_<t>", "average_jaccard", "occlusion_accuracy", "mean_error_px", "median_error_px",
    "pseudo_visible_frac", "exact_visible_frac"}`` (TAP-Vid query mode ``first``; the errors over points visible in
    both after frame 0, ``nan`` when there are none)."""
    from .tapvid import compute_tapvid_metrics

    tracks, visible = np.asarray(tracks, np.float32), np.asarray(visible, bool)
    p_tr, p_vis = pseudo_ground_truth(video, queries_px)
    q = np.concatenate([np.zeros((len(queries_px), 1), np.float32), np.asarray(queries_px, np.float32)[:, ::-1]], 1)
    m = compute_tapvid_metrics(q[None], ~visible[None], tracks[None], ~p_vis[None], p_tr[None], "first",
                               thresholds=thresholds)
    both = visible & p_vis
    both[:, 0] = False
    err = np.linalg.norm(p_tr - tracks, axis=-1)[both]
    return dict({k: float(v[0]) for k, v in m.items()},
                mean_error_px=float(err.mean()) if err.size else float("nan"),
                median_error_px=float(np.median(err)) if err.size else float("nan"),
                pseudo_visible_frac=float(p_vis[:, 1:].mean()), exact_visible_frac=float(visible[:, 1:].mean()))


def interpolate_frames(tracks: np.ndarray, frames: int) -> np.ndarray:
    """Linear interpolation along the frame axis (``-2``) of ``tracks [..., F, 2]`` to ``frames`` frames, as the
    published ``interpolate_trajectory`` (``F.interpolate(size=frames, mode="linear", align_corners=False)``): output
    frame ``t`` reads input position ``(t + 0.5) F / frames - 0.5``, clamped to ``[0, F - 1]``. The identity when
    ``frames == F``."""
    tracks = np.asarray(tracks)
    F = tracks.shape[-2]
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames={frames!r}; allowed: an integer >= 1")
    if frames == F:
        return tracks.copy()
    pos = np.clip((np.arange(frames) + 0.5) * F / frames - 0.5, 0, F - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, F - 1)
    w = (pos - i0).astype(np.float64)[:, None]
    return (tracks[..., i0, :] * (1 - w) + tracks[..., i1, :] * w).astype(tracks.dtype)


def score_parts(max_text, sum_text, max_frame, sum_frame, v_lat: np.ndarray) -> dict[str, np.ndarray]:
    """Confidence and attention score tables ``[S, L]`` from the recorded maxima / sums and the per-latent-frame
    visibility ``v_lat [n, F]`` (frame 0 = the query frame)."""
    vf = v_lat.astype(np.float32).copy()  # [n, F]
    vf[:, 0] = 0
    out = {"conf_text": max_text.mean(-1), "conf_self": max_frame[..., 0].mean(-1)}
    cross = (max_frame * vf[None, None]).sum(-1) / np.maximum(vf.sum(-1), 1e-8)[None, None]
    out["conf_cross"] = cross.mean(-1)
    v0 = v_lat[:, 0]
    out["attn_text"] = sum_text[..., v0].mean(-1)
    out["attn_self"] = sum_frame[..., v0, 0].mean(-1)
    out["attn_cross"] = sum_frame[..., v0, 1:].sum(-1).mean(-1)
    return out


def score_tables(rec: AnalysisRecord, gt_tracks: np.ndarray, gt_visible: np.ndarray,
                 threshold_tokens: float = 0.5, protocol: str = "difftrack") -> dict[str, np.ndarray]:
    """Per-(step, layer) tables ``[S, L]`` from one video's record and its ground truth.

    ``protocol="difftrack"`` (default): ``gt_tracks [n, F, 2]``, ``gt_visible [n, F]`` **per latent frame**
    (:func:`record_ground_truth`: the AND rule over the video frames a latent frame encodes);

    * ``qk_acc`` / ``feat_acc``: PCK at ``threshold_tokens`` tokens (the paper's half token; 8 px at 480x720),
      visible points, frames 1.. only; ``qk_acc_heads`` ``[S, L, K]`` the same per head set when the record has
      ``qk_tracks_heads``;
    * ``conf_{text,self,cross}``: confidence score -- max attention on text keys / on frame-0 keys / mean over
      visible later frames of the max over that frame's keys (all points; never-visible points count 0 for cross);
    * ``attn_{text,self,cross}``: attention score -- summed attention on text / frame 0 / frames 1.., points
      visible at frame 0.

    ``protocol="published"``: ``gt_tracks [n, T, 2]``, ``gt_visible [n, T]`` **per video frame**
    (:func:`video_ground_truth`); the record's ``pub_*`` tracks are interpolated to the ``T`` video frames
    (:func:`interpolate_frames`) and ``qk_acc`` / ``feat_acc`` pool every visible (point, frame) pair, frame 0
    included; the scores as above from the published-temperature tables, the latent visibility by the AND rule
    (:func:`difftrack.runners.latent_visibility`, ``rec.meta["temporal"]`` video frames per latent frame).
    """
    from .runners import latent_visibility

    check_protocol(protocol)
    thr = threshold_tokens * rec.stride
    vis = np.asarray(gt_visible, bool)
    gt_tracks = np.asarray(gt_tracks)
    if gt_tracks.ndim != 3 or vis.shape != gt_tracks.shape[:2] or vis.shape[0] != len(rec.queries):
        raise ValueError(f"ground truth tracks {gt_tracks.shape} / visibility {vis.shape} do not match the record's "
                         f"{len(rec.queries)} points; expected [n, frames, 2] and [n, frames]")
    out = {}
    if protocol == "difftrack":
        if vis.shape[1] != rec.frames:
            raise ValueError(f"protocol 'difftrack' scores per latent frame: ground truth of {vis.shape[1]} frames "
                             f"for a record of {rec.frames} latent frames (record_ground_truth gives them)")
        v_later = vis.copy()
        v_later[:, 0] = False
        for name, tr in (("qk_acc", rec.qk_tracks), ("feat_acc", rec.feat_tracks)):
            d = np.linalg.norm(tr - gt_tracks[None, None], axis=-1)  # [S, L, n, F]
            out[name] = ((d < thr) & v_later[None, None]).sum((-1, -2)) / max(v_later.sum(), 1)
        if rec.qk_tracks_heads is not None:  # [S, L, K]: accuracy of each head set
            d = np.linalg.norm(rec.qk_tracks_heads - gt_tracks[None, None, None], axis=-1)
            out["qk_acc_heads"] = ((d < thr) & v_later).sum((-1, -2)) / max(v_later.sum(), 1)
        out.update(score_parts(rec.max_text, rec.sum_text, rec.max_frame, rec.sum_frame, vis))
        return out
    if "published" not in (rec.protocols or ()) or rec.pub_qk_tracks is None:
        raise ValueError("the record has no published-protocol tracks (recorded with protocols="
                         f"{rec.protocols!r}); record it with Recorder(protocols=('difftrack', 'published'))")
    T = vis.shape[1]
    v_lat = latent_visibility(vis, int(rec.meta.get("temporal", 1)), rec.frames)  # checks T against the frames
    for name, tr in (("qk_acc", rec.pub_qk_tracks), ("feat_acc", rec.pub_feat_tracks)):
        d = np.linalg.norm(interpolate_frames(tr, T) - gt_tracks[None, None], axis=-1)  # [S, L, n, T]
        out[name] = ((d < thr) & vis[None, None]).sum((-1, -2)) / max(vis.sum(), 1)
    if rec.pub_max_text is not None:
        parts = (rec.pub_max_text, rec.pub_sum_text, rec.pub_max_frame, rec.pub_sum_frame)
    elif rec.scores_at_sqrt_dim:
        parts = (rec.max_text, rec.sum_text, rec.max_frame, rec.sum_frame)
    else:
        raise ValueError("the record has no score tables at the published temperature sqrt(head_dim)")
    out.update(score_parts(*parts, v_lat))
    return out


def minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = np.nanmin(x), np.nanmax(x)
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def harmonic_mean(acc: np.ndarray, conf_cross: np.ndarray, attn_cross: np.ndarray) -> np.ndarray:
    """The paper's harmonic mean of min-max-normalised (over the whole step x layer table) accuracy, cross-frame
    confidence and cross-frame attention; 0 where any term is 0."""
    a, c, s = minmax(acc), minmax(conf_cross), minmax(attn_cross)
    with np.errstate(divide="ignore", invalid="ignore"):
        hm = 3.0 / (1.0 / a + 1.0 / c + 1.0 / s)
    return np.nan_to_num(hm, nan=0.0, posinf=0.0, neginf=0.0)


def top_layers(hm: np.ndarray, k: int = 3, step: int | None = -1) -> list[int]:
    """The ``k`` layers with the highest harmonic mean at ``step`` (``None``: mean over steps)."""
    if not 1 <= k <= hm.shape[1]:
        raise ValueError(f"k={k}; allowed 1..{hm.shape[1]}")
    v = hm.mean(0) if step is None else hm[step]
    return [int(i) for i in np.argsort(-v)[:k]]


def mean_tables(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Average per-video tables (equal weight per video, as the paper)."""
    if not tables:
        raise ValueError("no tables to average")
    keys = set(tables[0])
    odd = [i for i, t in enumerate(tables) if set(t) != keys]
    if odd:
        raise ValueError(f"tables {odd[0]} holds {sorted(set(tables[odd[0]]) ^ keys)} where table 0 does not (or the "
                         f"reverse): videos recorded with different protocols / head sets cannot be averaged")
    return {k: np.nanmean(np.stack([t[k] for t in tables]), 0) for k in tables[0]}


# ---------------------------------------------------------------------------------------------- runners
def check_grid(runner, grid_size, size, num_steps, head_sets=None, max_grid_bytes=None) -> int:
    """``grid_size`` checked by the one rule (:func:`difftrack.checks.check_grid_size`: an int >= 1 whose estimated
    memory for this run, ``num_steps`` x every layer of ``runner`` x the latent frames of ``size = (T, H, W)``, stays
    within ``max_grid_bytes``, default 4 GiB or ``DIFFTRACK_MAX_GRID_BYTES``) before any work."""
    from .checks import check_grid_size, check_int

    T, H, W = size
    s = runner.stride
    return check_grid_size(grid_size, num_steps=check_int("num_steps", num_steps, lo=1),
                           num_layers=runner.num_layers, frames=runner.latent_frames(T),
                           tokens_per_frame=(H // s) * (W // s), head_sets=len(head_sets or ()),
                           max_bytes=max_grid_bytes)


@torch.no_grad()
def analyze_generation(pipe, prompt: str, seed: int, num_steps: int = 50, grid_size: int = 10,
                       guidance_scale: float = 6.0, features: bool = True, size=None, max_grid_bytes=None,
                       **match_kw) -> tuple[np.ndarray, AnalysisRecord]:
    """Generate one video with the pipeline's own loop while recording every (layer, step).

    Args:
        pipe: the embedded pipeline, a supported diffusers pipeline or a :class:`difftrack.runners.VideoRunner`.
        size: ``(frames, height, width)`` (default: the pipeline's default size).
        grid_size, guidance_scale: checked before any work by the library's one rule for each
            (:func:`check_grid` with ``max_grid_bytes``; :func:`difftrack.checks.check_guidance_scale`).

    Returns ``(video uint8 [T, H, W, 3], record)``; the record is per latent frame (``rec.frames``, pinned to the
    video frames ``rec.meta["frame_index"]``). Ground truth is added later (:func:`pseudo_ground_truth`)."""
    from .runners import as_runner
    from .world import World

    from .checks import check_guidance_scale

    runner = as_runner(pipe)
    T, H, W = runner.resolve_size(size)
    check_guidance_scale(guidance_scale)
    check_grid(runner, grid_size, (T, H, W), num_steps, match_kw.get("head_sets"), max_grid_bytes)
    q = World(T, H, W).grid_queries(grid_size)[:, 1:]
    rec = Recorder(q, runner.stride, num_steps, runner.num_layers, runner.latent_frames(T), features=features,
                   **match_kw)
    with capture(runner.pipe, layers="all", store=False, on_qk=rec.on_qk,
                 on_features=rec.on_features if features else None, num_steps=num_steps) as cap:
        video = runner.generate(prompt, seed, num_steps, guidance_scale, size=(T, H, W))
    out = rec.rec
    out.timesteps = [int(t) for t in runner.timesteps(num_steps)]
    out.meta = dict(kind="generated", prompt=prompt, seed=seed, guidance_scale=guidance_scale,
                        frame_index=runner.frame_index(T).tolist(), temporal=runner.temporal, size=[T, H, W])
    _step_experts(out, runner, cap, num_steps)
    return video, out


@torch.no_grad()
def analyze_exact(pipe, sample, num_steps: int = 50, steps: list[int] | None = None, grid_size: int = 10,
                  noise_seed: int = 0, features: bool = True, max_grid_bytes=None, **match_kw) -> AnalysisRecord:
    """A world video noised to each denoising step (one conditional forward per step with the video's prompt; a VAE
    backbone encodes the clip as a video), as the paper's real-video analysis, recording every layer.
    ``grid_size`` is checked first (:func:`check_grid`, with ``max_grid_bytes``)."""
    from .runners import as_runner
    from .world import World

    runner = as_runner(pipe)
    if steps is not None:  # the schedule is this function's own: num_steps is the run's length
        steps = sorted(_normalise_steps(steps, num_steps))
    T, H, W = runner.check_size(sample.video.shape[:3])
    check_grid(runner, grid_size, (T, H, W), num_steps, match_kw.get("head_sets"), max_grid_bytes)
    q = World(T, H, W).grid_queries(grid_size)[:, 1:]
    rec = Recorder(q, runner.stride, num_steps, runner.num_layers, runner.latent_frames(T), features=features,
                   steps=steps, **match_kw)
    with capture(runner.pipe, layers="all", store=False, on_qk=rec.on_qk,
                 on_features=rec.on_features if features else None) as cap:
        ts = runner.noised_forwards(sample.video, sample.prompt, num_steps, steps, noise_seed, cap)
    out = rec.rec
    out.timesteps = [int(t) for t in ts]
    out.meta = dict(kind="exact", prompt=sample.prompt, seed=sample.seed, family=sample.family,
                        frame_index=runner.frame_index(T).tolist(), temporal=runner.temporal, size=[T, H, W])
    _step_experts(out, runner, cap, num_steps)
    return out


def _step_experts(rec: AnalysisRecord, runner, cap, num_steps: int) -> None:
    """On a multi-expert pipeline (Wan 2.2), ``rec.meta["experts"]``: the expert that ran each step (``None`` for
    a step not run), checked against the pipeline's rule at the step's timestep; single-transformer records are
    left as they were."""
    if not runner.experts.several:
        return
    ran = [cap.step_experts.get(s) for s in range(num_steps)]
    rule = {s: runner.experts.at(t) for s, t in cap.timesteps.items() if t is not None}
    wrong = [(s, e, rule[s]) for s, e in enumerate(ran) if e is not None and s in rule and e != rule[s]]
    if wrong:  # the loop and the rule disagree: the layer tables would mix experts under one step
        raise RuntimeError(f"steps (step, expert that ran, expert of the rule) {wrong}: the pipeline did not follow "
                           f"its expert rule ({runner.experts.rule})")
    rec.meta["experts"] = ran


def pipe_frames(pipe) -> tuple[int, int, int]:
    """Default ``(frames, height, width)`` of a pipeline (:meth:`difftrack.runners.VideoRunner.default_size`)."""
    from .runners import as_runner

    return as_runner(pipe).default_size()


def token_px(pipe) -> int:
    """Pixels per token side (patching or VAE factor x transformer patch)."""
    from .runners import as_runner

    return as_runner(pipe).stride


def video_ground_truth(rec: AnalysisRecord, item: dict, video: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Ground truth of a record's queries **per video frame** (``[n, T, 2]``, ``[n, T]``) and its source: exact world
    tracks for ``exact`` items, Lucas-Kanade pseudo ground truth on the generated frames otherwise (what the
    published protocol scores, ``score_tables(..., protocol="published")``)."""
    from .world import World

    if item["kind"] == "exact":
        q = np.concatenate([np.zeros((len(rec.queries), 1), np.float32), rec.queries], 1)
        w = World(*video.shape[:3])
        gt, vis = w.tracks(w.sample(item["seed"], item["family"], item.get("split", "heldout")), q)
        return gt, vis, "exact"
    gt, vis = pseudo_ground_truth(video, rec.queries)
    return gt, vis, "pseudo"


def latent_ground_truth(rec: AnalysisRecord, gt: np.ndarray, vis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-video-frame ground truth -> per latent frame (``[n, F, 2]``, ``[n, F]``): video frames picked by
    ``rec.meta["frame_index"]``, visibility by the AND rule (:func:`difftrack.runners.latent_visibility`)."""
    from .runners import latent_visibility

    idx = np.asarray(rec.meta.get("frame_index", range(gt.shape[1])), int)
    return gt[:, idx], latent_visibility(vis, int(rec.meta.get("temporal", 1)), len(idx))


def record_ground_truth(rec: AnalysisRecord, item: dict, video: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Ground truth of a record's queries **per latent frame** (``[n, F, 2]``, ``[n, F]``) and its source:
    exact world tracks for ``exact`` items, Lucas-Kanade pseudo ground truth on the generated frames otherwise;
    video frames are mapped to latent frames by ``rec.meta["frame_index"]`` and the AND visibility rule
    (:func:`latent_ground_truth`)."""
    gt, vis, source = video_ground_truth(rec, item, video)
    return (*latent_ground_truth(rec, gt, vis), source)
