"""difftrack.fused: the head sum of softmax probabilities, reference and (on a GPU) Triton kernel."""
import math

import pytest
import torch

from difftrack import fused


def _inputs(B, H, M, N, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    return q, k


def test_reference_is_the_head_sum_of_softmax_probabilities():
    """With the log-sum-exp over the same keys, each head's term is a softmax row: the head sum equals the sum of
    ``torch.softmax`` maps (rows sum to H) -- computed here independently, per head, in float64."""
    q, k = _inputs(2, 3, 5, 7, 8)
    scale = 1 / math.sqrt(8)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * scale, -1)
    out = fused.headsum_exp(q, k, lse, scale)
    assert out.shape == (2, 5, 7) and out.dtype == torch.float32
    want = sum(torch.softmax(q[:, h].double() @ k[:, h].double().transpose(-1, -2) * scale, -1) for h in range(3))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.sum(-1), torch.full((2, 5), 3.0), rtol=1e-5, atol=1e-5)


def test_a_subset_of_keys_gives_those_columns_of_the_full_softmax():
    """The normaliser may come from more keys than are evaluated: columns of the full softmax."""
    q, k = _inputs(1, 2, 4, 9, 16, seed=1)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1)
    cols = torch.tensor([8, 0, 3])
    full = fused.headsum_exp(q, k, lse, 0.3)
    part = fused.headsum_exp(q, k[:, :, cols], lse, 0.3)
    torch.testing.assert_close(part, full[..., cols], rtol=1e-6, atol=1e-7)


def test_bad_shapes_are_named():
    q, k = _inputs(1, 2, 4, 9, 16)
    with pytest.raises(ValueError, match=r"q \(1, 2, 4, 16\).*\[B, H, M\]"):
        fused.headsum_exp(q, k, torch.zeros(1, 2, 5), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("D", [64, 128])
def test_triton_kernel_equals_the_reference_on_the_gpu(D):
    """The kernel (bf16 inputs, float32 accumulation) against the float32 reference on the same bf16 values, with
    ragged sizes (masking), a stride-0 batch (expanded queries) and non-contiguous keys."""
    q, k = _inputs(3, 5, 77, 130, D, dtype=torch.bfloat16, device="cuda", seed=2)
    q = q[:1].expand(3, -1, -1, -1)
    k = k.transpose(0, 1).contiguous().transpose(0, 1)
    scale = 1 / math.sqrt(D)
    lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * scale, -1)
    assert fused.triton_ok(q, k)
    got = fused.headsum_exp(q, k, lse, scale)
    torch.testing.assert_close(got, fused.headsum_exp_reference(q, k, lse, scale), rtol=2e-5, atol=1e-6)
