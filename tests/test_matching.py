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


@pytest.mark.parametrize("src_frame", [0, 3, 4])
def test_match_video_equals_per_frame_reference_for_any_source_frame(src_frame):
    """match_video (all target frames at once, slicing instead of index lists) equals matching each frame pair on
    its own through qk_cost + match_from_cost, bit for bit, whichever frame holds the queries."""
    from difftrack.matching import match_video, px_to_tokens, qk_cost, tokens_to_px

    g = torch.Generator().manual_seed(1)
    H, Fr, R, C, D = 2, 5, 4, 6, 8
    q, k = torch.randn(H, Fr, R, C, D, generator=g), torch.randn(H, Fr, R, C, D, generator=g)
    pts = torch.tensor([[3.0, 2.0], [9.5, 7.25], [0.5, 15.0]])
    tracks, conf = match_video(q, k, pts, 4.0, src_frame=src_frame)
    qf, kf = q.reshape(H, Fr, R * C, D), k.reshape(H, Fr, R * C, D)
    tok = px_to_tokens(pts, 4.0)
    for f in range(Fr):
        if f == src_frame:
            assert torch.equal(tracks[:, f], pts) and torch.equal(conf[:, f], torch.ones(3))
            continue
        cost = qk_cost(qf[:, src_frame], kf[:, src_frame], qf[:, f], kf[:, f])
        pos, c = match_from_cost(cost, R, C, tok)
        torch.testing.assert_close(tracks[:, f], tokens_to_px(pos, 4.0), rtol=0, atol=1e-5)
        torch.testing.assert_close(conf[:, f], c, rtol=0, atol=1e-6)


def test_recorder_keeps_results_on_the_device_until_read():
    """The analysis recorder writes each (step, layer) into tensors on the capture's device and converts them to
    the record's numpy tables once, when ``rec`` is read. Reading it checked (``rec``) with cells never recorded
    raises, naming them; ``record(check=False)`` gives them as nan (a record to fill by hand)."""
    import numpy as np

    from difftrack.analysis import Recorder
    from difftrack.capture import FeatureEvent

    rec = Recorder(np.array([[6.0, 6.0], [10.0, 2.0]], np.float32), 4.0, num_steps=3, num_layers=2, frames=4)
    feat = torch.randn(1, 4, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    rec.on_features(FeatureEvent(1, 2, 19.0, feat, None))
    assert isinstance(rec._buf["feat_tracks"], torch.Tensor) and rec._buf["feat_tracks"].device == feat.device
    from difftrack.hooks import IncompleteRunError

    with pytest.raises(IncompleteRunError, match=r"never recorded \(tables \['feat_tracks', .*'qk_tracks'"):
        rec.rec
    out = rec.record(check=False)
    assert out.feat_tracks.shape == (3, 2, 2, 4, 2) and out.feat_tracks.dtype == np.float32
    assert np.isfinite(out.feat_tracks[2, 1]).all() and np.isnan(out.feat_tracks[:2]).all()
    assert np.isnan(out.feat_tracks[2, 0]).all() and np.isnan(out.qk_tracks).all()
    np.testing.assert_array_equal(out.feat_tracks[2, 1, :, 0], [[6.0, 6.0], [10.0, 2.0]])  # source frame


def test_float32_products_are_unchanged_off_cuda():
    """``_mm_f32`` off CUDA (and for float32 inputs) is exactly ``a.float() @ b.float() / t``; bf16 inputs on the CPU
    take the same float32 route (the tensor-core route is CUDA-only)."""
    from difftrack.matching import _mm_f32

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 8, generator=g), torch.randn(3, 8, 7, generator=g)
    assert torch.equal(_mm_f32(a, b, 1.7), a @ b / 1.7)
    ab, bb = a.bfloat16(), b.bfloat16()
    assert _mm_f32(ab, bb, 2.0).dtype == torch.float32
    assert torch.equal(_mm_f32(ab, bb, 2.0), ab.float() @ bb.float() / 2.0)


def test_feature_cost_frames_matches_per_pair_cosine_on_cpu():
    """The batched feature cost equals the per-pair :func:`feature_cost` (cosine / tau, bidirectional softmax)."""
    from difftrack.matching import feature_cost, feature_cost_frames

    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(6, 16, generator=g), torch.randn(3, 6, 16, generator=g)
    batched = feature_cost_frames(src, tgt, tau=0.1)
    for f in range(3):
        torch.testing.assert_close(batched[f], feature_cost(src, tgt[f], tau=0.1), rtol=1e-5, atol=1e-7)


def test_head_subsets_average_only_those_heads():
    """``heads=`` matches with the cost averaged over the chosen heads: every head equals the default head average
    bitwise; one head equals matching that head alone with the layer's temperature; bad head lists are named."""
    from difftrack.matching import match_video, temperature

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 3, 5, 8, generator=g), torch.randn(3, 4, 3, 5, 8, generator=g)
    pts = torch.tensor([[6.0, 6.0], [10.0, 2.0]])
    full, _ = match_video(q, k, pts, 4.0)
    assert torch.equal(match_video(q, k, pts, 4.0, heads=[0, 1, 2])[0], full)
    one, _ = match_video(q, k, pts, 4.0, heads=[1])
    alone, _ = match_video(q[1:2], k[1:2], pts, 4.0, tau=temperature(None, 3, 8))
    assert torch.equal(one, alone)
    assert not torch.equal(one, full)
    for bad in ([], [3], [0, 0], [True], 1):
        with pytest.raises(ValueError, match="heads="):
            match_video(q, k, pts, 4.0, heads=bad)


def test_recorder_records_head_sets_and_scores_them():
    """Recorder(head_sets=...) keeps tracks per head set next to the head average; the set of every head equals the
    head average and score_tables gives its accuracy per set."""
    import numpy as np

    from difftrack.analysis import Recorder, score_tables
    from difftrack.capture import QKEvent
    from difftrack.capture import TokenGrid

    g = torch.Generator().manual_seed(1)
    H, Fr, R, C, D = 2, 3, 3, 4, 8
    grid = TokenGrid(frames=Fr, rows=R, cols=C, text_len=2, text_first=True, stride=4)
    q, k = torch.randn(1, H, 2 + Fr * R * C, D, generator=g), torch.randn(1, H, 2 + Fr * R * C, D, generator=g)
    rec = Recorder(np.array([[6.0, 6.0], [10.0, 2.0]], np.float32), 4.0, 1, 1, Fr, head_sets=[[0], [1], [0, 1]],
                   features=False)
    rec.on_qk(QKEvent(0, 0, 19.0, q, k, grid))
    out = rec.rec
    assert out.qk_tracks_heads.shape == (1, 1, 3, 2, Fr, 2) and out.head_sets == [[0], [1], [0, 1]]
    np.testing.assert_array_equal(out.qk_tracks_heads[0, 0, 2], out.qk_tracks[0, 0])
    gt = out.qk_tracks_heads[0, 0, 0]  # ground truth = head 0's own tracks
    tab = score_tables(out, gt, np.ones(gt.shape[:2], bool))
    assert tab["qk_acc_heads"].shape == (1, 1, 3) and tab["qk_acc_heads"][0, 0, 0] == 1.0
    with pytest.raises(ValueError, match="head_sets"):
        Recorder(np.zeros((1, 2), np.float32), 4.0, 1, 1, Fr, head_sets=[])


def test_source_row_subset_equals_the_full_cost_rows():
    """``src_rows``: the cost rows of chosen source tokens only (the CUDA fast path of the analysis). They equal the
    same rows of the full cost -- the target->source softmax still normalises over every source token -- and the
    tracks placed from them equal the full-cost tracks, for query-key and feature costs, both directions or one."""
    from difftrack.matching import (_corners, _match_frames, feature_cost_frames, px_to_tokens, qk_cost_frames)

    g = torch.Generator().manual_seed(3)
    H, Fr, R, C, D = 3, 4, 5, 7, 8
    q, k = torch.randn(H, Fr + 1, R * C, D, generator=g), torch.randn(H, Fr + 1, R * C, D, generator=g)
    rows = torch.tensor([0, 34, 5, 5, 17])  # any order, repeats allowed
    for bidir in (True, False):
        full = qk_cost_frames(q[:, 0], k[:, 0], q[:, 1:], k[:, 1:], bidirectional=bidir, head_chunk=2)
        sub = qk_cost_frames(q[:, 0], k[:, 0], q[:, 1:], k[:, 1:], bidirectional=bidir, head_chunk=2, src_rows=rows)
        assert sub.shape == (Fr, 5, R * C)
        torch.testing.assert_close(sub, full[:, rows], rtol=1e-5, atol=1e-7)
        f_src, f_tgt = torch.randn(R * C, 16, generator=g), torch.randn(Fr, R * C, 16, generator=g)
        full_f = feature_cost_frames(f_src, f_tgt, tau=0.1, bidirectional=bidir)
        sub_f = feature_cost_frames(f_src, f_tgt, tau=0.1, bidirectional=bidir, src_rows=rows)
        torch.testing.assert_close(sub_f, full_f[:, rows], rtol=1e-5, atol=1e-7)
    pts = px_to_tokens(torch.tensor([[3.0, 2.0], [25.5, 17.25], [0.5, 19.0], [27.9, 0.1]]), 4.0)
    idx = _corners(pts, R, C)[0].reshape(-1)
    assert idx.shape == (16,) and int(idx.min()) >= 0 and int(idx.max()) < R * C
    full = qk_cost_frames(q[:, 0], k[:, 0], q[:, 1:], k[:, 1:])
    sub = qk_cost_frames(q[:, 0], k[:, 0], q[:, 1:], k[:, 1:], src_rows=idx)
    for refine in ("argmax", "softargmax", "parabola"):
        pos_full, conf_full = _match_frames(full, R, C, pts, refine, 1, 1.0)
        pos_sub, conf_sub = _match_frames(sub, R, C, pts, refine, 1, 1.0, subset=True)
        torch.testing.assert_close(pos_sub, pos_full, rtol=0, atol=1e-4)
        torch.testing.assert_close(conf_sub, conf_full, rtol=1e-5, atol=1e-7)


def test_row_subset_is_cuda_only_and_never_for_the_paper_rule():
    """On the CPU the full cost is kept (bit-identical tracks to earlier versions); ``refine="paper"`` needs every
    source row; so does a point set whose corners would cover the frame."""
    from difftrack.matching import _point_rows

    pts = torch.tensor([[1.0, 1.0]])
    assert _point_rows(pts, 5, 7, "softargmax") is None
    if torch.cuda.is_available():
        assert _point_rows(pts.cuda(), 5, 7, "softargmax").shape == (4,)
        assert _point_rows(pts.cuda(), 5, 7, "paper") is None
        assert _point_rows(pts.repeat(9, 1).cuda(), 5, 7, "softargmax") is None


def test_fused_row_path_equals_the_full_cost_rows():
    """The fused source-row path (per-head normalisers from the log-sum-exp, head sums of the probabilities; on the
    CPU through the torch reference of the kernel) equals the same rows of the full cost, both directions or one."""
    from difftrack.matching import _qk_rows_fused, qk_cost_frames, temperature

    g = torch.Generator().manual_seed(5)
    H, Fr, M, D = 3, 4, 35, 8
    q, k = torch.randn(H, Fr + 1, M, D, generator=g), torch.randn(H, Fr + 1, M, D, generator=g)
    rows = torch.tensor([0, 34, 5, 5, 17])
    for bidir in (True, False):
        full = qk_cost_frames(q[:, 0], k[:, 0], q[:, 1:], k[:, 1:], bidirectional=bidir)
        got = _qk_rows_fused(q[:, 0], k[:, 0], q[:, 1:], k[:, 1:], temperature(None, H, D), bidir, rows)
        torch.testing.assert_close(got, full[:, rows], rtol=1e-5, atol=1e-7)
