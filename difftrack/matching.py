"""Memory-bounded frame-to-frame matching from captured query/key (or block features).

For a source frame ``s`` and a target frame ``k`` (shared reference section 4.3, defects fixed):

    S_fwd[i, j] = mean_h softmax_j(q^s_i . k^k_j / tau)      # source token i -> target tokens j
    S_bwd[i, j] = mean_h softmax_i(q^k_j . k^s_i / tau)      # target token j -> source tokens i
    C[i, j]     = (S_fwd[i, j] + S_bwd[i, j]) / 2            # the paper's bidirectional cost (optional)

``tau = sqrt(head_dim)`` by default (the analysis code); the published tracking code used ``sqrt(num_heads)`` [B2],
available as ``tau="heads"``. Only one frame pair is materialised at a time (``[M_s, M_k]`` with ``M`` tokens per
frame, heads reduced in chunks), never an attention map over the whole sequence.

From cost to position (all in **token units** ``u = x / stride - 0.5``, i.e. token centres at integers, fixing the
corner convention and border hack [B4]):

* the source row of a query point is the bilinear blend of the cost rows of its 4 neighbouring source tokens
  (border-clamped, so no zero padding);
* ``refine="argmax"``: the best target token;
* ``refine="softargmax"`` (default): probability-weighted mean position in a ``(2r+1)^2`` window around the argmax,
  with the window's values raised to ``1 / sharpen`` (``sharpen > 1`` flattens, ``< 1`` sharpens);
* ``refine="paper"``: the published recipe -- argmax per source token, then bilinear interpolation of the integer
  match map at the query location.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused

REFINE = ("argmax", "softargmax", "parabola", "paper")
_HALF = (torch.bfloat16, torch.float16)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``float32 (a @ b) / t`` for ``a [h, m, d]``, ``b [h, d, n]``.

    On a CUDA device with half-precision inputs (captured bf16/fp16 query/key) the product runs on the tensor cores
    from the half inputs with float32 accumulation and float32 output (``torch.bmm(..., out_dtype=float32)``): the
    inputs are exact in either form, so this equals the float32 product up to accumulation order, without the
    float32 copies of ``a`` and ``b`` and the slow non-tensor-core float32 GEMM. Everywhere else (CPU, float32
    inputs): ``a.float() @ b.float()``, bit for bit as before."""
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32).div_(t)
        except (RuntimeError, TypeError):  # a torch without bmm(out_dtype=...)
            pass
    return a.float() @ b.float() / t


def temperature(tau: float | str | None, heads: int, head_dim: int) -> float:
    """Resolve ``tau``: a number, ``None``/``"dim"`` = sqrt(head_dim), ``"heads"`` = sqrt(num_heads) [B2]."""
    if tau is None or tau == "dim":
        return math.sqrt(head_dim)
    if tau == "heads":
        return math.sqrt(heads)
    if isinstance(tau, (int, float)) and tau > 0:
        return float(tau)
    raise ValueError(f"tau={tau!r}; allowed: a positive number, 'dim' (sqrt(head_dim)) or 'heads' (sqrt(heads))")


def qk_cost(q_src: torch.Tensor, k_src: torch.Tensor, q_tgt: torch.Tensor, k_tgt: torch.Tensor,
            tau: float | str | None = None, bidirectional: bool = True, head_chunk: int = 8) -> torch.Tensor:
    """Head-averaged matching probabilities between two frames.

    Args:
        q_src, k_src: ``[H, M_s, D]`` query/key of the source frame's tokens.
        q_tgt, k_tgt: ``[H, M_k, D]`` of the target frame.
        tau: softmax temperature (see :func:`temperature`).
        bidirectional: average with the target->source direction (the paper's cost).
        head_chunk: heads processed at once (bounds memory to ``head_chunk * M_s * M_k`` floats).

    Returns:
        ``float32 [M_s, M_k]``; each row sums to 1 when ``bidirectional=False``.
    """
    H, Ms, D = q_src.shape
    if k_tgt.shape[0] != H or k_tgt.shape[-1] != D:
        raise ValueError(f"source {tuple(q_src.shape)} and target {tuple(k_tgt.shape)} descriptors disagree")
    t = temperature(tau, H, D)
    out = torch.zeros(Ms, k_tgt.shape[1], dtype=torch.float32, device=q_src.device)
    for h0 in range(0, H, head_chunk):
        hs = slice(h0, h0 + head_chunk)
        fwd = torch.softmax(_mm_f32(q_src[hs], k_tgt[hs].transpose(-1, -2), t), dim=-1)
        if bidirectional:
            bwd = torch.softmax(_mm_f32(q_tgt[hs], k_src[hs].transpose(-1, -2), t), dim=-1)
            out += 0.5 * (fwd.sum(0) + bwd.sum(0).T)
        else:
            out += fwd.sum(0)
    return out / H


def feature_cost(f_src: torch.Tensor, f_tgt: torch.Tensor, tau: float = 0.05, bidirectional: bool = True
                 ) -> torch.Tensor:
    """Matching probabilities from block features by cosine similarity.

    Args:
        f_src: ``[M_s, C]``; f_tgt: ``[M_k, C]``.
        tau: temperature on the cosine similarity.

    Returns:
        ``float32 [M_s, M_k]``.
    """
    a = F.normalize(f_src.float(), dim=-1)
    b = F.normalize(f_tgt.float(), dim=-1)
    sim = a @ b.T / tau
    fwd = torch.softmax(sim, -1)
    return 0.5 * (fwd + torch.softmax(sim, 0)) if bidirectional else fwd


def px_to_tokens(points_px: torch.Tensor, stride: float) -> torch.Tensor:
    """Pixels (edge convention) -> token units (token centres at integers): ``u = x / stride - 0.5``."""
    return points_px / stride - 0.5


def tokens_to_px(points_tok: torch.Tensor, stride: float) -> torch.Tensor:
    return (points_tok + 0.5) * stride


def _corners(pts: torch.Tensor, rows: int, cols: int):
    """The 4 source tokens around each point (border-clamped) and the blend fractions: ``(index [4, n] long flat
    token indices in the order (v0, u0), (v0, u1), (v1, u0), (v1, u1); fu [n, 1]; fv [n, 1])``."""
    u = pts[:, 0].clamp(0, cols - 1)
    v = pts[:, 1].clamp(0, rows - 1)
    u0, v0 = u.floor().long().clamp(max=cols - 2 if cols > 1 else 0), v.floor().long().clamp(
        max=rows - 2 if rows > 1 else 0)
    u1, v1 = (u0 + 1).clamp(max=cols - 1), (v0 + 1).clamp(max=rows - 1)
    fu, fv = (u - u0).unsqueeze(1), (v - v0).unsqueeze(1)
    index = torch.stack([v0 * cols + u0, v0 * cols + u1, v1 * cols + u0, v1 * cols + u1])
    return index, fu, fv


def _blend(r, fu: torch.Tensor, fv: torch.Tensor, gu: torch.Tensor | None = None,
           gv: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear blend of the 4 corner rows ``r(c)`` (``c`` in the order of :func:`_corners`); ``gu``, ``gv``: the
    complements ``1 - fu``, ``1 - fv`` when already computed (the same values, so the same result bit for bit)."""
    gu = 1 - fu if gu is None else gu
    gv = 1 - fv if gv is None else gv
    return r(0) * gu * gv + r(1) * fu * gv + r(2) * gu * fv + r(3) * fu * fv


def _bilinear_rows(cost: torch.Tensor, rows: int, cols: int, pts: torch.Tensor,
                   layout: "PointLayout | None" = None) -> torch.Tensor:
    """Blend the cost rows of the 4 source tokens around each point. cost ``[..., M_s, M_k]`` (any leading frame
    dimensions), pts ``[n, 2]`` token units -> ``[..., n, M_k]``. ``layout``: the corners of ``pts`` computed
    once (:func:`point_layout`); the 4 n rows are then gathered in one indexing call."""
    if layout is None:
        index, fu, fv = _corners(pts, rows, cols)
        return _blend(lambda c: cost[..., index[c], :], fu, fv)
    return _bilinear_subset(cost.index_select(-2, layout.index), pts, rows, cols, layout)


def _bilinear_subset(cost: torch.Tensor, pts: torch.Tensor, rows: int, cols: int,
                     layout: "PointLayout | None" = None) -> torch.Tensor:
    """As :func:`_bilinear_rows` for a cost computed for the source rows ``_corners(...)[0].flatten()`` only
    (``[..., 4 n, M_k]``, corner-major) -> ``[..., n, M_k]``."""
    n = pts.shape[0]
    if layout is None:
        _, fu, fv = _corners(pts, rows, cols)
        return _blend(lambda c: cost[..., c * n:(c + 1) * n, :], fu, fv)
    return _blend(lambda c: cost[..., c * n:(c + 1) * n, :], layout.fu, layout.fv, layout.gu, layout.gv)


@dataclass(frozen=True)
class PointLayout:
    """Query points of one frame grid on one device, with everything about them that does not depend on the cost,
    computed once by :func:`point_layout` and reused by every match of the same points (e.g. every (layer, step)
    of :class:`difftrack.analysis.Recorder`): the per-call results are bit-identical to recomputing them.

    Attributes:
        points_px: the caller's ``[n, 2]`` pixel tensor (the layout is valid for this very tensor, unmodified).
        version: ``points_px._version`` when the layout was made (an in-place edit invalidates it).
        stride, rows, cols: pixels per token and the frame's token grid.
        pts: ``float32 [n, 2]`` token units (:func:`px_to_tokens`) on the device.
        index: ``long [4 n]`` corner tokens, corner-major (:func:`_corners`).
        fu, fv, gu, gv: ``[n, 1]`` bilinear fractions and their complements ``1 - fu``, ``1 - fv``.
        grid: ``[1, 1, n, 2]`` ``grid_sample`` coordinates of ``refine="paper"``.
        ones: ``[n, 1]`` ones (the source frame's confidence).
    """

    points_px: torch.Tensor
    version: int
    stride: float
    rows: int
    cols: int
    pts: torch.Tensor
    index: torch.Tensor
    fu: torch.Tensor
    fv: torch.Tensor
    gu: torch.Tensor
    gv: torch.Tensor
    grid: torch.Tensor
    ones: torch.Tensor

    def check(self, points_px: torch.Tensor, stride: float, rows: int, cols: int, device) -> None:
        """Raise ``ValueError`` unless this layout was made for ``points_px`` (the same tensor, unmodified),
        ``stride`` and a ``rows x cols`` grid on ``device``."""
        want = (points_px, points_px._version, float(stride), rows, cols, torch.device(device))
        have = (self.points_px, self.version, self.stride, self.rows, self.cols, self.pts.device)
        if not (want[0] is have[0] and want[1:] == have[1:]):
            raise ValueError(f"layout= was made for other points or another grid (version, stride, rows, cols, "
                             f"device {have[1:]} vs {want[1:]}, same tensor: {want[0] is have[0]}); make it with "
                             f"point_layout() for these points")


def point_layout(points_px: torch.Tensor, stride: float, rows: int, cols: int, device=None) -> PointLayout:
    """The :class:`PointLayout` of ``points_px [n, 2]`` (pixels ``(x, y)``) on a ``rows x cols`` token grid with
    ``stride`` pixels per token, on ``device`` (default: that of ``points_px``)."""
    if points_px.dim() != 2 or points_px.shape[-1] != 2:
        raise ValueError(f"points_px must be [n, 2] pixels (x, y); got {tuple(points_px.shape)}")
    device = points_px.device if device is None else torch.device(device)
    pts = px_to_tokens(points_px.to(device).float(), stride)
    index, fu, fv = _corners(pts, rows, cols)
    grid = torch.stack([pts[:, 0] / max(cols - 1, 1) * 2 - 1, pts[:, 1] / max(rows - 1, 1) * 2 - 1],
                       -1).view(1, 1, -1, 2)
    return PointLayout(points_px, points_px._version, float(stride), rows, cols, pts, index.reshape(-1), fu, fv,
                       1 - fu, 1 - fv, grid, torch.ones(pts.shape[0], 1, device=device))


def _layout(layout: PointLayout | None, points_px: torch.Tensor, stride: float, rows: int, cols: int, device
            ) -> PointLayout:
    """``layout`` checked against the call's points and grid, or a fresh one."""
    if layout is None:
        return point_layout(points_px, stride, rows, cols, device)
    layout.check(points_px, stride, rows, cols, device)
    return layout


def _others(x: torch.Tensor, dim: int, src: int) -> torch.Tensor:
    """``x`` without index ``src`` along ``dim``, by slicing (no index tensor: nothing is copied to a device)."""
    n = x.shape[dim]
    if src == 0:
        return x.narrow(dim, 1, n - 1)
    if src == n - 1:
        return x.narrow(dim, 0, n - 1)
    return torch.cat([x.narrow(dim, 0, src), x.narrow(dim, src + 1, n - src - 1)], dim)


def refine_peak(prob: torch.Tensor, rows: int, cols: int, method: str = "softargmax", radius: int = 1,
                sharpen: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of the match in each row of ``prob [n, rows*cols]`` (non-negative weights over the target grid).

    Methods: ``"argmax"`` (the integer peak); ``"softargmax"`` (the weighted mean of the offsets in the
    ``(2 radius + 1)^2`` window around the peak, weights ``w^(1/sharpen)``, window cells outside the frame count 0);
    ``"parabola"`` (per axis, the vertex of the parabola through the log-weights at the peak and its two
    neighbours -- the classic sub-pixel peak fit, unbiased for a Gaussian-shaped peak; offset clipped to half a token,
    0 at the frame border or where the log-weights are not concave).

    The window is gathered around the peak only (never unfolded over the whole map).

    Returns:
        ``(positions [n, 2] token units (u, v), confidence [n])`` where confidence is the peak value.
    """
    if method not in ("argmax", "softargmax", "parabola"):
        raise ValueError(f"unknown refine {method!r}; allowed: {REFINE}")
    n = prob.shape[0]
    peak, idx = prob.max(-1)
    pv, pu = idx // cols, idx % cols
    if method == "argmax" or (method == "softargmax" and radius == 0):
        return torch.stack([pu.float(), pv.float()], -1), peak
    if method == "parabola":
        def at(dv, du):
            vv, uu = pv + dv, pu + du
            ok = (vv >= 0) & (vv < rows) & (uu >= 0) & (uu < cols)
            val = prob.gather(1, (vv.clamp(0, rows - 1) * cols + uu.clamp(0, cols - 1)).view(n, 1))[:, 0]
            return torch.log(val.clamp_min(1e-30)), ok

        c = torch.log(peak.clamp_min(1e-30))
        offs = []
        for dv, du in ((0, 1), (1, 0)):  # u (columns), then v (rows)
            (lo, ok_lo), (hi, ok_hi) = at(-dv, -du), at(dv, du)
            denom = lo - 2 * c + hi
            off = torch.where(denom < 0, 0.5 * (lo - hi) / denom.clamp(max=-1e-12), torch.zeros_like(c))
            offs.append(torch.where(ok_lo & ok_hi, off.clamp(-0.5, 0.5), torch.zeros_like(c)))
        return torch.stack([pu.float() + offs[0], pv.float() + offs[1]], -1), peak
    off = torch.arange(-radius, radius + 1, device=prob.device)
    vv = pv.view(n, 1, 1) + off.view(1, -1, 1)
    uu = pu.view(n, 1, 1) + off.view(1, 1, -1)
    valid = ((vv >= 0) & (vv < rows) & (uu >= 0) & (uu < cols)).reshape(n, -1)
    flat = (vv.clamp(0, rows - 1) * cols + uu.clamp(0, cols - 1)).reshape(n, -1)
    w = prob.gather(1, flat) * valid
    if sharpen != 1.0:
        w = w.clamp_min(0) ** (1.0 / sharpen)
    k = off.numel()
    du = off.view(1, 1, k).expand(1, k, k).reshape(1, -1).float()
    dv = off.view(1, k, 1).expand(1, k, k).reshape(1, -1).float()
    s = w.sum(-1).clamp_min(1e-12)
    return torch.stack([pu.float() + (w * du).sum(-1) / s, pv.float() + (w * dv).sum(-1) / s], -1), peak


def match_from_cost(cost: torch.Tensor, rows: int, cols: int, points_tok: torch.Tensor, refine: str = "softargmax",
                    radius: int = 1, sharpen: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Match query points through one frame pair's cost.

    Args:
        cost: ``[M_s, M_k]`` from :func:`qk_cost` / :func:`feature_cost` (``M = rows * cols``).
        points_tok: ``[n, 2]`` source positions in token units.

    Returns:
        ``(positions [n, 2] token units in the target frame, confidence [n])``.
    """
    if refine == "paper":
        pos, conf = _paper_frames(cost.unsqueeze(0), rows, cols, points_tok)
        return pos[:, 0], conf[:, 0]
    rows_prob = _bilinear_rows(cost, rows, cols, points_tok)
    return refine_peak(rows_prob, rows, cols, refine, radius, sharpen)


def _paper_frames(costs: torch.Tensor, rows: int, cols: int, points_tok: torch.Tensor,
                  grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``refine="paper"`` for several frame pairs at once: the argmax target token of every source token of each
    cost ``[F, M_s, M_k]`` (the integer match map (u, v) and its peak value), bilinearly sampled at the query points
    ``[n, 2]`` (token units) with border clamping. The match maps and peaks of all frames go through one
    ``grid_sample`` call (batch ``F``, channels ``(u, v, peak)``): each output is the same per-channel bilinear
    blend as one call per frame and quantity, bit for bit. ``grid``: the sampling coordinates of ``points_tok``
    (:attr:`PointLayout.grid`) when already computed. Returns ``(positions [n, F, 2], peak [n, F])``."""
    Fr = costs.shape[0]
    peak, idx = costs.max(-1)  # [F, M_s]: per source token
    maps = torch.stack([(idx % cols).float(), (idx // cols).float(), peak], 1).view(Fr, 3, rows, cols)
    if grid is None:
        grid = torch.stack([points_tok[:, 0] / max(cols - 1, 1) * 2 - 1, points_tok[:, 1] / max(rows - 1, 1) * 2 - 1],
                           -1).view(1, 1, -1, 2)
    out = F.grid_sample(maps, grid.expand(Fr, 1, -1, 2), mode="bilinear", padding_mode="border",
                        align_corners=True)[:, :, 0]  # [F, 3, n]
    return out[:, :2].permute(2, 0, 1), out[:, 2].T


def _lse(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """``logsumexp_j (q_i . k_j) / t`` for ``q [h, m, D]``, ``k [h, n, D]`` -> ``float32 [h, m]``.

    On CUDA with half-precision inputs this is the log-sum-exp that the flash-attention kernel returns with its
    output (float32 softmax statistics over tensor-core products), so the ``[m, n]`` logits are never written to
    memory; the kernel's value is checked once per device against the float32 formula and not used if it
    disagrees. Elsewhere: ``torch.logsumexp`` over :func:`_mm_f32`."""
    if q.is_cuda and q.dtype in _HALF and k.dtype == q.dtype and _flash_lse_ok(q.device, q.dtype):
        return _flash_lse(q, k, t)
    return torch.logsumexp(_mm_f32(q, k.transpose(-1, -2), t), -1)


def _flash_lse(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    out = torch.ops.aten._scaled_dot_product_flash_attention(q.unsqueeze(0), k.unsqueeze(0), k.unsqueeze(0), 0.0,
                                                             False, False, scale=1.0 / t)
    return out[1][0, :, :q.shape[1]].float()


_FLASH_LSE: dict = {}


def _flash_lse_ok(device, dtype) -> bool:
    key = (str(device), dtype)
    if key not in _FLASH_LSE:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(2, 77, 64, device=device, generator=g).to(dtype)
            k = torch.randn(2, 300, 64, device=device, generator=g).to(dtype)
            ref = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) / 8.0, -1)
            _FLASH_LSE[key] = bool((_flash_lse(q, k, 8.0) - ref).abs().max() < 1e-3)
        except (RuntimeError, TypeError, AttributeError, IndexError):
            _FLASH_LSE[key] = False
    return _FLASH_LSE[key]


def qk_cost_frames(q_src: torch.Tensor, k_src: torch.Tensor, q_tgt: torch.Tensor, k_tgt: torch.Tensor,
                   tau: float | str | None = None, bidirectional: bool = True, head_chunk: int = 8,
                   src_rows: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`qk_cost` for several target frames at once (one matmul per head chunk instead of one per pair).

    Args:
        q_src, k_src: ``[H, M_s, D]``; q_tgt, k_tgt: ``[H, F, M_k, D]``.
        src_rows: ``long [R]`` source tokens whose cost rows are wanted (``None``: all ``M_s``). The
            target->source softmax still normalises over every source token (its log-sum-exp comes from
            :func:`_lse`), so the rows equal those of the full cost up to rounding.

    Returns:
        ``float32 [F, M_s, M_k]`` (``[F, R, M_k]`` with ``src_rows``; memory: ``head_chunk * F * M_s * M_k``
        floats at a time, ``head_chunk * F * R * M_k`` with ``src_rows``).
    """
    H, Ms, D = q_src.shape
    _, Fr, Mk, _ = k_tgt.shape
    t = temperature(tau, H, D)
    if src_rows is not None and fused.triton_ok(q_src, k_tgt):
        return _qk_rows_fused(q_src, k_src, q_tgt, k_tgt, t, bidirectional, src_rows)
    R = Ms if src_rows is None else src_rows.numel()
    out = torch.zeros(Fr, R, Mk, dtype=torch.float32, device=q_src.device)
    for h0 in range(0, H, head_chunk):
        hs = slice(h0, h0 + head_chunk)
        kt = k_tgt[hs].reshape(-1, Fr * Mk, D)
        qs = q_src[hs] if src_rows is None else q_src[hs].index_select(1, src_rows)
        fwd = _mm_f32(qs, kt.transpose(-1, -2), t).view(-1, R, Fr, Mk).softmax(-1)  # [h, R, F, Mk]
        if bidirectional:
            qt = q_tgt[hs].reshape(-1, Fr * Mk, D)
            if src_rows is None:
                bwd = _mm_f32(qt, k_src[hs].transpose(-1, -2), t).view(-1, Fr, Mk, Ms).softmax(-1)  # [h, F, Mk, Ms]
            else:
                ks = k_src[hs].index_select(1, src_rows)
                bwd = _mm_f32(qt, ks.transpose(-1, -2), t).sub_(_lse(qt, k_src[hs], t).unsqueeze(-1)).exp_()
                bwd = bwd.view(-1, Fr, Mk, R)
            out += 0.5 * (fwd.sum(0).permute(1, 0, 2) + bwd.sum(0).transpose(-1, -2))
        else:
            out += fwd.sum(0).permute(1, 0, 2)
    return out / H


def _qk_rows_fused(q_src, k_src, q_tgt, k_tgt, t: float, bidirectional: bool, src_rows) -> torch.Tensor:
    """The ``src_rows`` cost of :func:`qk_cost_frames` through :func:`difftrack.fused.headsum_exp`: the per-head
    softmax normalisers come from :func:`_lse` (source rows against each target frame; every target token against
    all source tokens), the head sums of the probabilities from one kernel per direction. ``float32 [F, R, M_k]``."""
    H, Ms, D = q_src.shape
    _, Fr, Mk, _ = k_tgt.shape
    R = src_rows.numel()
    qs = q_src.index_select(1, src_rows)  # [H, R, D]
    lse_f = _lse(qs.unsqueeze(1).expand(H, Fr, R, D).reshape(H * Fr, R, D), k_tgt.reshape(H * Fr, Mk, D), t)
    fwd = fused.headsum_exp(qs.unsqueeze(0).expand(Fr, H, R, D), k_tgt.transpose(0, 1),
                            lse_f.view(H, Fr, R).transpose(0, 1), 1.0 / t)  # [F, R, Mk]
    if not bidirectional:
        return fwd / H
    qt = q_tgt.reshape(H, Fr * Mk, D)
    bwd = fused.headsum_exp(qt.unsqueeze(0), k_src.index_select(1, src_rows).unsqueeze(0),
                            _lse(qt, k_src, t).unsqueeze(0), 1.0 / t)[0]  # [F * Mk, R]
    return 0.5 * (fwd + bwd.view(Fr, Mk, R).transpose(-1, -2)) / H


SIMILARITY = ("cosine", "dot")


def feature_cost_frames(f_src: torch.Tensor, f_tgt: torch.Tensor, tau: float = 0.05, bidirectional: bool = True,
                        src_rows: torch.Tensor | None = None, similarity: str = "cosine") -> torch.Tensor:
    """:func:`feature_cost` for several target frames: ``f_src [M_s, C]``, ``f_tgt [F, M_k, C]`` -> ``[F, M_s, M_k]``
    (``[F, R, M_k]`` for the source tokens ``src_rows [R]``; the target->source softmax still normalises over
    every source token). ``similarity="dot"``: the raw dot product ``f_s . f_k / tau`` instead of the cosine (the
    published feature matching: ``softmax_j(f^0_i . f^k_j)``, ``tau = 1``, forward only)."""
    if similarity not in SIMILARITY:
        raise ValueError(f"similarity={similarity!r}; allowed: {SIMILARITY}")
    if similarity == "dot":
        sim = torch.einsum("sc,fkc->fsk", f_src.float(), f_tgt.float()) / tau
    elif f_src.is_cuda and f_src.dtype in _HALF and f_tgt.dtype == f_src.dtype:
        # half-precision features on CUDA: the raw dot products on the tensor cores (exact inputs, float32
        # accumulation), then divided by the norms -- the cosine of the float32 path up to rounding
        Fr, Mk, C = f_tgt.shape
        dots = _mm_f32(f_src.unsqueeze(0), f_tgt.reshape(1, Fr * Mk, C).transpose(-1, -2), 1.0)[0]  # [Ms, F*Mk]
        na = f_src.float().norm(dim=-1).clamp_min(1e-12)
        nb = f_tgt.float().norm(dim=-1).clamp_min(1e-12).reshape(1, Fr * Mk)
        sim = (dots.div_(na[:, None]).div_(nb).div_(tau)).view(-1, Fr, Mk).permute(1, 0, 2)  # [F, Ms, Mk]
    else:
        a = F.normalize(f_src.float(), dim=-1)
        b = F.normalize(f_tgt.float(), dim=-1)
        sim = torch.einsum("sc,fkc->fsk", a, b) / tau
    if src_rows is None:
        fwd = sim.softmax(-1)
        return 0.5 * (fwd + sim.softmax(-2)) if bidirectional else fwd
    rows = sim.index_select(1, src_rows)  # [F, R, Mk]
    fwd = rows.softmax(-1)
    return 0.5 * (fwd + (rows - sim.logsumexp(-2, keepdim=True)).exp()) if bidirectional else fwd


def _match_frames(costs: torch.Tensor, rows: int, cols: int, pts: torch.Tensor, refine: str, radius: int,
                  sharpen: float, subset: bool = False, layout: PointLayout | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """costs ``[F, M_s, M_k]`` (``subset``: ``[F, 4 n, M_k]``, the rows of :func:`_point_rows`) -> positions
    ``[n, F, 2]`` token units and confidence ``[n, F]``; ``layout``: that of ``pts`` (:func:`point_layout`)."""
    Fr = costs.shape[0]
    if refine == "paper":
        return _paper_frames(costs, rows, cols, pts, None if layout is None else layout.grid)
    blend = (_bilinear_subset(costs, pts, rows, cols, layout) if subset
             else _bilinear_rows(costs, rows, cols, pts, layout))
    rows_prob = blend.transpose(0, 1)  # [n, F, Mk]
    n = pts.shape[0]
    pos, conf = refine_peak(rows_prob.reshape(n * Fr, -1), rows, cols, refine, radius, sharpen)
    return pos.view(n, Fr, 2), conf.view(n, Fr)


def check_heads(heads, num_heads: int | None) -> list[int] | None:
    """``None`` (every head) or a non-empty list of distinct head indices in ``[0, num_heads - 1]`` (any
    non-negative index when ``num_heads`` is ``None``: the range is then checked where the layer is known)."""
    if heads is None:
        return None
    span = f"0..{num_heads - 1}" if num_heads is not None else ">= 0"
    if isinstance(heads, (int, bool)) or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        raise ValueError(f"heads={heads!r}; allowed: None (every head) or a list of head indices {span}")
    heads = [int(h) for h in heads]
    if (not heads or len(set(heads)) != len(heads)
            or not all(0 <= h and (num_heads is None or h < num_heads) for h in heads)):
        raise ValueError(f"heads={heads!r}; allowed: None or a non-empty list of distinct head indices {span}")
    return heads


def select_heads(q: torch.Tensor, k: torch.Tensor, heads, tau: float | str | None = None):
    """``(q, k, tau)`` restricted to ``heads`` along dim 0 (``[H, ...]``, head size last), with ``tau`` resolved
    for the whole layer (:func:`temperature` of its ``H`` heads and head size): matching a head subset keeps the
    layer's temperature. ``heads=None`` returns the inputs unchanged."""
    heads = check_heads(heads, q.shape[0])
    if heads is None:
        return q, k, tau
    tau = temperature(tau, q.shape[0], q.shape[-1])
    idx = torch.tensor(heads, device=q.device)
    return q.index_select(0, idx), k.index_select(0, idx), tau


def match_video(q: torch.Tensor, k: torch.Tensor, points_px: torch.Tensor, stride: float, src_frame: int = 0,
                tau: float | str | None = None, bidirectional: bool = True, refine: str = "softargmax",
                radius: int = 1, sharpen: float = 1.0, heads=None, layout: PointLayout | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Match points of one frame to every frame of a clip from one layer's query/key.

    Args:
        q, k: ``[H, F, rows, cols, D]`` (one sample of :meth:`difftrack.capture.Capture.q`).
        points_px: ``[n, 2]`` pixel positions ``(x, y)`` in frame ``src_frame``.
        stride: pixels per token.
        heads: average the cost over these heads only (``None``: every head, the paper's head average); the
            temperature stays that of the layer (``tau`` resolved with the layer's head count and head size).
        layout: :func:`point_layout` of ``points_px`` on this grid and device, made once for many calls (the
            same results; ``None``: made here).

    Returns:
        ``(tracks [n, F, 2] pixels, confidence [n, F])``; the source frame holds the points themselves.
    """
    return match_video_refines(q, k, points_px, stride, (refine,), src_frame, tau, bidirectional, radius, sharpen,
                               heads, layout)[0]


def match_video_refines(q: torch.Tensor, k: torch.Tensor, points_px: torch.Tensor, stride: float, refines,
                        src_frame: int = 0, tau: float | str | None = None, bidirectional: bool = True,
                        radius: int = 1, sharpen: float = 1.0, heads=None, layout: PointLayout | None = None
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`match_video` with several refinements from **one** cost (e.g. the project's soft-argmax and the
    published argmax + match-map interpolation, recorded side by side): ``[(tracks, confidence)]``, one per entry of
    ``refines``. With ``"paper"`` among them the cost of every source token is computed (also on CUDA)."""
    if q.dim() != 5:
        raise ValueError(f"q must be [H, F, rows, cols, D]; got {tuple(q.shape)}")
    H, Fr, rows, cols, D = q.shape
    if not 0 <= src_frame < Fr:
        raise ValueError(f"src_frame {src_frame} out of range for {Fr} frames")
    refines = tuple(refines)
    bad = [r for r in refines if r not in REFINE]
    if bad or not refines:
        raise ValueError(f"unknown refine {bad[0] if bad else refines!r}; allowed: {REFINE}")
    lay = _layout(layout, points_px, stride, rows, cols, q.device)
    q, k, tau = select_heads(q, k, heads, tau)  # the layer's temperature, not that of the subset
    H = q.shape[0]
    qf, kf = q.reshape(H, Fr, rows * cols, D), k.reshape(H, Fr, rows * cols, D)
    src_rows = _point_rows(lay.pts, rows, cols, refines, lay)
    costs = qk_cost_frames(qf[:, src_frame], kf[:, src_frame], _others(qf, 1, src_frame), _others(kf, 1, src_frame),
                           tau, bidirectional, src_rows=src_rows)
    return [_place_tracks(costs, lay.pts, src_frame, rows, cols, stride, r, radius, sharpen, src_rows, lay)
            for r in refines]


def _point_rows(pts: torch.Tensor, rows: int, cols: int, refine, layout: PointLayout | None = None
                ) -> torch.Tensor | None:
    """The source rows a match needs: on CUDA, the 4 tokens around each point (``[4 n]``, corner-major) when they
    are fewer than the frame's tokens; ``None`` (every row) on the CPU, where the full cost keeps results
    bit-identical to earlier versions, and for ``refine="paper"`` (one refine or any of a tuple), which takes the
    argmax of every source token."""
    paper = refine == "paper" if isinstance(refine, str) else "paper" in refine
    if not pts.is_cuda or paper or 4 * pts.shape[0] >= rows * cols:
        return None
    return _corners(pts, rows, cols)[0].reshape(-1) if layout is None else layout.index


def _place_tracks(costs, pts, src_frame, rows, cols, stride, refine, radius, sharpen, src_rows=None,
                  layout: PointLayout | None = None):
    """Tracks ``[n, F, 2]`` pixels and confidence ``[n, F]`` from the costs of every frame but ``src_frame``
    (costs ``[F - 1, M_s, M_k]``, or ``[F - 1, 4 n, M_k]`` for the rows of :func:`_point_rows`); the source frame
    holds the points themselves, confidence 1."""
    pos, c = _match_frames(costs, rows, cols, pts, refine, radius, sharpen, subset=src_rows is not None,
                           layout=layout)
    ones = torch.ones(pts.shape[0], 1, device=pts.device) if layout is None else layout.ones
    tracks = torch.cat([pos[:, :src_frame], pts.unsqueeze(1), pos[:, src_frame:]], 1)
    conf = torch.cat([c[:, :src_frame], ones, c[:, src_frame:]], 1)
    return tokens_to_px(tracks, stride), conf


def match_video_features(feat: torch.Tensor, points_px: torch.Tensor, stride: float, src_frame: int = 0,
                         tau: float = 0.05, bidirectional: bool = True, refine: str = "softargmax", radius: int = 1,
                         sharpen: float = 1.0, similarity: str = "cosine", layout: PointLayout | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`match_video` from block features ``feat [F, rows, cols, C]`` (cosine similarity, or the raw dot
    product with ``similarity="dot"``, see :func:`feature_cost_frames`); ``layout`` as there."""
    Fr, rows, cols, C = feat.shape
    lay = _layout(layout, points_px, stride, rows, cols, feat.device)
    ff = feat.reshape(Fr, rows * cols, C)
    src_rows = _point_rows(lay.pts, rows, cols, refine, lay)
    costs = feature_cost_frames(ff[src_frame], _others(ff, 0, src_frame), tau, bidirectional, src_rows=src_rows,
                                similarity=similarity)
    return _place_tracks(costs, lay.pts, src_frame, rows, cols, stride, refine, radius, sharpen, src_rows, lay)


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows_idx: torch.Tensor, tau: float | str | None = None,
                   head_chunk: int = 8) -> torch.Tensor:
    """Head-averaged attention of selected query tokens over the whole sequence (for confidence/attention scores).

    Args:
        q, k: ``[H, N, D]`` full sequence of one sample.
        rows_idx: ``long [n]`` sequence indices of the query tokens.

    Returns:
        ``float32 [n, N]`` rows summing to 1 (never a full ``N x N`` map).
    """
    H, N, D = q.shape
    t = temperature(tau, H, D)
    out = torch.zeros(rows_idx.numel(), N, device=q.device)
    for h0 in range(0, H, head_chunk):
        hs = slice(h0, h0 + head_chunk)
        out += torch.softmax(_mm_f32(q[hs][:, rows_idx], k[hs].transpose(-1, -2), t), -1).sum(0)
    return out / H
