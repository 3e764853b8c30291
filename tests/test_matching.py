"""Peak refinement rules of difftrack.matching on synthetic maps with known answers."""
import pytest
import torch
import torch.nn.functional as F

from difftrack.matching import match_from_cost, refine_peak

ROWS, COLS = 7, 9


def gaussian_maps(centres, sigma=0.8):
    """[n, ROWS*COLS] maps exp(-d^2 / 2 sigma^2) around centres (u, v) in token units."""
    vv, uu = torch.meshgrid(torch.arange(ROWS).float(), torch.arange(COLS).float(), indexing="ij")
    c = torch.as_tensor(centres, dtype=torch.float32)
    d2 = (uu[None] - c[:, 0, None, None]) ** 2 + (vv[None] - c[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2)).reshape(len(c), -1)


CENTRES = [(3.3, 2.8), (4.0, 3.0), (5.45, 3.6), (2.6, 4.45)]


def test_parabola_recovers_gaussian_peaks_exactly():
    pos, peak = refine_peak(gaussian_maps(CENTRES), ROWS, COLS, "parabola")
    torch.testing.assert_close(pos, torch.tensor(CENTRES), rtol=0, atol=1e-4)
    assert (peak <= 1).all() and (peak > 0.5).all()


def test_softargmax_is_biased_towards_the_token_centre_and_parabola_is_not():
    maps = gaussian_maps([(3.3, 2.8)])
    soft, _ = refine_peak(maps, ROWS, COLS, "softargmax", radius=1)
    para, _ = refine_peak(maps, ROWS, COLS, "parabola")
    assert abs(soft[0, 0] - 3.0) < abs(3.3 - 3.0)  # pulled towards the integer peak
    assert abs(para[0, 0] - 3.3) < abs(soft[0, 0] - 3.3)


def test_softargmax_window_equals_unfold_reference():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(6, ROWS * COLS, generator=g) ** 4
    prob[0, 0] = 5.0  # a peak in the corner: window cells outside the frame count 0
    for radius, sharpen in ((1, 1.0), (2, 0.5)):
        pos, peak = refine_peak(prob, ROWS, COLS, "softargmax", radius=radius, sharpen=sharpen)
        k = 2 * radius + 1
        win = F.unfold(F.pad(prob.view(-1, 1, ROWS, COLS), (radius,) * 4), k)  # [n, k*k, M]
        idx = prob.argmax(-1)
        w = win[torch.arange(len(prob)), :, idx].clamp_min(0) ** (1 / sharpen)
        off = torch.arange(-radius, radius + 1).float()
        dv, du = torch.meshgrid(off, off, indexing="ij")
        ref = torch.stack([idx % COLS + (w * du.reshape(1, -1)).sum(-1) / w.sum(-1),
                           idx // COLS + (w * dv.reshape(1, -1)).sum(-1) / w.sum(-1)], -1).float()
        torch.testing.assert_close(pos, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(peak, prob.max(-1).values)


def test_parabola_at_the_border_and_flat_maps_keeps_the_integer_peak():
    prob = torch.zeros(2, ROWS * COLS)
    prob[0, 0] = 1.0  # corner peak: no neighbour on one side
    prob[0, 1] = 0.5
    prob[1] = 1.0  # flat: not concave
    pos, _ = refine_peak(prob, ROWS, COLS, "parabola")
    assert pos[0].tolist() == [0.0, 0.0] and pos[1].tolist() == [0.0, 0.0]


def test_match_from_cost_parabola_on_a_shifted_identity():
    """Target = source shifted by (+1.3, -0.6) tokens: every source token's row is a Gaussian around its match."""
    vv, uu = torch.meshgrid(torch.arange(ROWS).float(), torch.arange(COLS).float(), indexing="ij")
    src = torch.stack([uu.flatten(), vv.flatten()], -1)
    cost = gaussian_maps(src + torch.tensor([1.3, -0.6]))
    pts = torch.tensor([[3.0, 3.0], [4.0, 2.0]])
    pos, _ = match_from_cost(cost, ROWS, COLS, pts, refine="parabola")
    torch.testing.assert_close(pos, pts + torch.tensor([1.3, -0.6]), rtol=0, atol=1e-3)


def test_unknown_rule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown refine 'cubic'; allowed: .*parabola"):
        refine_peak(torch.rand(1, ROWS * COLS), ROWS, COLS, "cubic")
