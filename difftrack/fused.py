"""One fused GPU kernel for the analysis's matching: the head sum of exponentiated, normalised query-key scores.

    headsum_exp(q, k, lse, scale)[b, m, n] = sum_h exp(scale * q[b, h, m] . k[b, h, n] - lse[b, h, m])

With ``lse`` the log-sum-exp of the same scores over a key set, each term is a softmax probability, so this is the
head-summed attention of the queries ``m`` at the keys ``n`` -- what :func:`difftrack.matching.qk_cost_frames`
needs for the rows around the query points -- without writing the ``[heads, M, N]`` float32 scores to memory and
reading them back three times (product, exp, head sum). On CUDA with half-precision inputs it runs as a Triton kernel
(tensor-core products with float32 accumulation, float32 exp and sum); everywhere else, and when Triton is missing,
as the reference below in plain torch. Both agree up to float32 rounding (tested on the GPU).
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none and use the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_HALF = (torch.bfloat16, torch.float16)


def headsum_exp_reference(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch :func:`headsum_exp` (the contract): q ``[B, H, M, D]``, k ``[B, H, N, D]``, lse ``float32 [B, H,
    M]`` -> ``float32 [B, M, N]``."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return (s - lse.float().unsqueeze(-1)).exp_().sum(1)


def triton_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`headsum_exp` takes the Triton kernel for these inputs."""
    D = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in _HALF and k.dtype == q.dtype and D in (16, 32, 64, 128)
            and k.shape[-1] == D)


def headsum_exp(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """``sum_h exp(scale * q_h . k_h - lse_h)``.

    Args:
        q: ``[B, H, M, D]`` queries (any strides but a contiguous last dimension; a batch stride of 0 is fine).
        k: ``[B, H, N, D]`` keys.
        lse: ``float32 [B, H, M]`` per-query normaliser.
        scale: multiplies the dot products (``1 / tau``).

    Returns:
        ``float32 [B, M, N]``.
    """
    if q.dim() != 4 or k.dim() != 4 or lse.dim() != 3 or q.shape[:2] != k.shape[:2] or lse.shape != q.shape[:3]:
        raise ValueError(f"headsum_exp: q {tuple(q.shape)}, k {tuple(k.shape)}, lse {tuple(lse.shape)}; expected "
                         f"[B, H, M, D], [B, H, N, D], [B, H, M]")
    if not triton_ok(q, k):
        return headsum_exp_reference(q, k, lse, scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    lse = lse.float()
    B, H, M, D = q.shape
    N = k.shape[2]
    out = torch.empty(B, M, N, dtype=torch.float32, device=q.device)
    BM, BN = 64, 64
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), B)
    with torch.cuda.device(q.device):
        _headsum_exp_kernel[grid](q, k, lse, out, M, N, H, float(scale),
                                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                  lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1),
                                  out.stride(2), D=D, BM=BM, BN=BN, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _headsum_exp_kernel(Q, K, L, O, M, N, H, scale, sqb, sqh, sqm, skb, skh, skn, slb, slh, slm, sob, som, son,
                            D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        m_ok, n_ok = offs_m < M, offs_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for h in range(0, H):
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))  # float32 accumulation
            lse = tl.load(L + b * slb + h * slh + offs_m * slm, mask=m_ok, other=0.0)
            acc += tl.exp(s * scale - lse[:, None])
        tl.store(O + b * sob + offs_m[:, None] * som + offs_n[None, :] * son, acc, mask=m_ok[:, None] & n_ok[None, :])
