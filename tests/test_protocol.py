"""The published scoring protocol (issue 29): parity with a direct re-derivation of the published formulas, written
here from the spec (shared reference sections 4.3-4.4) in plain numpy, independent of the library's matching code."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from difftrack import analysis as A
from difftrack.backbones import TokenGrid
from difftrack.capture import FeatureEvent, QKEvent
from difftrack.hooks import IncompleteRunError

ROOT = Path(__file__).resolve().parents[1]
H, D, F, ROWS, COLS, TEXT, STRIDE, R = 3, 8, 4, 3, 5, 6, 16, 4  # 4 latent frames of 3x5 tokens; 4 video / latent
T = R * (F - 1) + 1  # 13 video frames
QUERIES = np.array([[8.0, 8.0], [37.3, 20.9], [79.0, 47.5], [50.5, 3.0], [12.2, 44.0]], np.float32)  # px (x, y)


# ------------------------------------------------------------------ the published formulas, from the spec
def _softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _bilerp_map(mm, u, v):
    """Bilinear sample of an integer match map ``mm [rows, cols, 2]`` at token units (u, v), border clamped."""
    u, v = min(max(u, 0.0), COLS - 1.0), min(max(v, 0.0), ROWS - 1.0)
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    u1, v1 = min(u0 + 1, COLS - 1), min(v0 + 1, ROWS - 1)
    a, b = u - u0, v - v0
    return (mm[v0, u0] * (1 - a) * (1 - b) + mm[v0, u1] * a * (1 - b) + mm[v1, u0] * (1 - a) * b
            + mm[v1, u1] * a * b)


def _track(cost_per_frame):
    """Latent-frame track [n, F, 2] px: frame 0 the query; frame k the argmax match map of ``cost [M, M]``
    (no second softmax) sampled at the query (cell-centre units u = x / 16 - 0.5, [B4] fixed), back to px."""
    out = np.zeros((len(QUERIES), F, 2))
    out[:, 0] = QUERIES
    for k in range(1, F):
        j = cost_per_frame[k].argmax(1)
        mm = np.stack([j % COLS, j // COLS], -1).reshape(ROWS, COLS, 2).astype(float)
        for n, (x, y) in enumerate(QUERIES):
            out[n, k] = (_bilerp_map(mm, x / STRIDE - 0.5, y / STRIDE - 0.5) + 0.5) * STRIDE
    return out


def _to_video_frames(tr):
    """F.interpolate(size=T, mode='linear', align_corners=False) along time, written out."""
    out = np.zeros((tr.shape[0], T, 2))
    for t in range(T):
        p = max((t + 0.5) * F / T - 0.5, 0.0)
        i0 = min(int(np.floor(p)), F - 1)
        i1 = min(i0 + 1, F - 1)
        out[:, t] = tr[:, i0] * (1 - (p - i0)) + tr[:, i1] * (p - i0)
    return out


def _published_reference(q, k, feat, gt, vis):
    """qk_acc, feat_acc, conf_*, attn_* of one (step, layer) by the published definitions."""
    qv = q[:, TEXT:].reshape(H, F, ROWS * COLS, D)
    kv = k[:, TEXT:].reshape(H, F, ROWS * COLS, D)
    tau = np.sqrt(D)  # the analysis hook: sqrt(head_dim)
    qk_cost = {f: 0.5 * (_softmax(qv[:, 0] @ kv[:, f].transpose(0, 2, 1) / tau, -1).mean(0)
                         + _softmax(qv[:, f] @ kv[:, 0].transpose(0, 2, 1) / tau, -1).mean(0).T)
               for f in range(1, F)}
    fv = feat.reshape(F, ROWS * COLS, -1)
    feat_cost = {f: _softmax(fv[0] @ fv[f].T, -1) for f in range(1, F)}  # raw dot product, forward only
    out = {}
    for name, cost in (("qk_acc", qk_cost), ("feat_acc", feat_cost)):
        d = np.linalg.norm(_to_video_frames(_track(cost)) - gt, axis=-1)  # [n, T]
        out[name] = ((d < 0.5 * STRIDE) & vis).sum() / vis.sum()  # every frame, frame 0 included; 8 px at stride 16
    # attention of each point's frame-0 token (the token holding the point, [B3] fixed) over the whole sequence
    tok = [TEXT + int(min(y // STRIDE, ROWS - 1)) * COLS + int(min(x // STRIDE, COLS - 1)) for x, y in QUERIES]
    att = _softmax(q[:, tok] @ k.transpose(0, 2, 1) / tau, -1).mean(0)  # [n, N]
    video = att[:, TEXT:].reshape(len(QUERIES), F, ROWS * COLS)
    vbar = np.stack([vis[:, 0]] + [vis[:, R * f - R + 1: R * f + 1].all(1) for f in range(1, F)], 1)  # AND rule
    cross = (vbar[:, 1:] * video[:, 1:].max(-1)).sum(1) / np.maximum(vbar[:, 1:].sum(1), 1e-8)
    v0 = vis[:, 0]
    out.update(conf_text=att[:, :TEXT].max(1).mean(), conf_self=video[:, 0].max(-1).mean(), conf_cross=cross.mean(),
               attn_text=att[v0, :TEXT].sum(1).mean(), attn_self=video[v0, 0].sum(-1).mean(),
               attn_cross=video[v0, 1:].sum((1, 2)).mean())
    return out, _to_video_frames(_track(qk_cost))


# ------------------------------------------------------------------ the library
def _record(protocols=("difftrack", "published"), tau=1.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = TEXT + F * ROWS * COLS
    q = torch.randn(1, H, N, D, generator=g)
    k = q + 0.3 * torch.randn(1, H, N, D, generator=g)  # peaked, tie-free costs
    feat = torch.randn(1, F, ROWS, COLS, 6, generator=g)
    grid = TokenGrid(F, ROWS, COLS, text_len=TEXT, text_first=True, stride=STRIDE)
    rec = A.Recorder(QUERIES, STRIDE, 1, 1, F, tau=tau, protocols=protocols)
    rec.on_qk(QKEvent(0, 0, None, q, k, grid))
    rec.on_features(FeatureEvent(0, 0, None, feat, grid))
    out = rec.rec
    out.meta = dict(temporal=R, frame_index=list(range(0, T, R)))
    return out, q[0].double().numpy(), k[0].double().numpy(), feat[0].double().numpy()


def test_published_protocol_equals_the_published_formulas():
    """Parity: argmax + match-map interpolation, 4 -> 13 frame linear interpolation, all frames incl. frame 0 with
    per-frame visibility, AND visibility only in the confidence, sqrt(head_dim) scores (the matching tau here is
    1.7, so the published scores are recorded separately)."""
    rec, q, k, feat = _record()
    rng = np.random.default_rng(1)
    _, ref_tracks = _published_reference(q, k, feat, np.zeros((len(QUERIES), T, 2)), np.ones((len(QUERIES), T), bool))
    # ground truth: the reference track moved by 0 (within 8 px) or 20 px (outside) per (point, frame)
    gt = ref_tracks + rng.choice([0.0, 3.0, 20.0], size=ref_tracks.shape[:2])[..., None] * np.array([0.6, 0.8])
    vis = rng.random((len(QUERIES), T)) > 0.25
    vis[0, 0] = False  # a point hidden at frame 0: out of the attention score
    ref, _ = _published_reference(q, k, feat, gt, vis)
    np.testing.assert_allclose(A.interpolate_frames(rec.pub_qk_tracks, T)[0, 0], ref_tracks, atol=1e-3)
    got = A.score_tables(rec, gt.astype(np.float32), vis, protocol="published")
    for name, v in ref.items():
        np.testing.assert_allclose(got[name][0, 0], v, rtol=1e-5, atol=1e-6, err_msg=name)
    assert 0 < got["qk_acc"][0, 0] < 1  # both outcomes occur
    # the default protocol's scores are at tau = 1.7, so they differ from the published ones
    assert not np.isclose(A.score_tables(rec, gt[:, ::R], vis[:, ::R])["conf_cross"][0, 0], ref["conf_cross"])


def test_interpolation_is_the_published_one_and_the_identity_on_the_embedded_layout():
    tr = np.arange(13, dtype=np.float64)[None, :, None].repeat(2, -1)  # latent position = value
    up = A.interpolate_frames(tr, 49)
    assert up[0, 0, 0] == 0 and up[0, 48, 0] == 12  # clamped at both ends
    assert abs(up[0, 4, 0] - (4.5 * 13 / 49 - 0.5)) < 1e-12  # frame 4 reads latent 0.69, not latent 1
    ref = torch.nn.functional.interpolate(torch.from_numpy(tr[:, :, 0])[None], size=49, mode="linear",
                                          align_corners=False)[0].numpy()
    np.testing.assert_allclose(up[..., 0], ref, atol=1e-12)
    assert np.array_equal(A.interpolate_frames(tr, 13), tr)  # latent frames = video frames: identity


def test_recording_both_protocols_leaves_the_default_tables_unchanged():
    """One run records both; the default protocol's record is bit-identical to a run recording it alone (CPU), and
    at the default temperature the published scores are the default ones (not recorded twice)."""
    both, *_ = _record(tau=None)
    alone, *_ = _record(protocols=("difftrack",), tau=None)
    for name in A.Recorder.TABLES:
        assert np.array_equal(getattr(both, name), getattr(alone, name), equal_nan=True), name
    assert alone.pub_qk_tracks is None and both.pub_max_text is None and both.scores_at_sqrt_dim
    vis = np.ones((len(QUERIES), T), bool)
    gt = A.interpolate_frames(both.pub_qk_tracks[0, 0], T)
    pub = A.score_tables(both, gt, vis, protocol="published")
    assert pub["qk_acc"][0, 0] == 1.0  # its own tracks, every frame
    dft = A.score_tables(both, gt[:, ::R], vis[:, ::R])
    assert pub["conf_cross"][0, 0] == dft["conf_cross"][0, 0]


def test_protocol_misuse_is_named():
    rec, *_ = _record(protocols=("difftrack",))
    vis = np.ones((len(QUERIES), T), bool)
    with pytest.raises(ValueError, match="no published-protocol tracks"):
        A.score_tables(rec, np.zeros((len(QUERIES), T, 2)), vis, protocol="published")
    with pytest.raises(ValueError, match="protocol='paper'"):
        A.score_tables(rec, np.zeros((len(QUERIES), F, 2)), vis[:, :F], protocol="paper")
    with pytest.raises(ValueError, match="per latent frame"):
        A.score_tables(rec, np.zeros((len(QUERIES), T, 2)), vis)  # default protocol given video frames
    with pytest.raises(ValueError, match="holds 'difftrack'"):
        A.Recorder(QUERIES, STRIDE, 1, 1, F, protocols=("published",))
    with pytest.raises(ValueError, match="tau="):
        A.Recorder(QUERIES, STRIDE, 1, 1, F, tau="hot")
    with pytest.raises(ValueError, match="different protocols"):
        A.mean_tables([{"qk_acc": np.zeros(1)}, {"qk_acc": np.zeros(1), "pub_qk_acc": np.zeros(1)}])


def test_cache_key_of_default_records_unchanged_and_protocols_named():
    from difftrack.experiments import analysis as xa

    item = dict(kind="exact", family="objects", seed=0)
    assert "protocols" not in xa.cache_fields(item, 3, 4)["match"]  # records made before protocols stay valid
    both = xa.cache_fields(item, 3, 4, protocols=["published", "difftrack"])["match"]
    assert both["protocols"] == "difftrack+published"


def test_summary_without_published_block_reads_and_says_so(tmp_path):
    """The committed summary predates the published block: it still reads, and the block is None (the notebooks
    then say "not recorded"); a summary with the block gives its tables."""
    from difftrack.experiments import paper_results
    from difftrack.experiments.analysis import AnalysisSummary

    d = json.loads((ROOT / "results" / "analysis_summary.json").read_text())
    d.pop("published", None)
    s = AnalysisSummary.from_json(d)
    assert s.protocol_block("published") is None and s.protocol_block()["combined"] == d["combined"]
    (tmp_path / "analysis_summary.json").write_text(json.dumps(d))
    assert paper_results.load_analysis(tmp_path).published_tables is None
    d["published"] = dict(protocol="published", combined=d["combined"], tables=d["tables"])
    (tmp_path / "analysis_summary.json").write_text(json.dumps(d))
    p = paper_results.load_analysis(tmp_path)
    assert p.published_summary["all"] == d["combined"] and p.published_tables["all"]["qk_acc"].shape[0] == 50


def test_published_chunk_loop():
    """plan_chunks(plan="published") is the published loop (reference section 7.2): DAVIS's 50 frames give the
    published five interleaved chunks, 30 frames seven (short, sliding windows) where the project's plan needs 4."""
    from difftrack.tracking import plan_chunks

    davis = plan_chunks(50, 0, plan="published")
    assert davis == [[0] + list(range(s, 50, 4))[:12] for s in (1, 2, 3, 4, 5)] == plan_chunks(50, 0)
    p30 = plan_chunks(30, 0, plan="published")
    assert len(p30) == 7 and len(plan_chunks(30, 0)) == 4
    assert p30[2] == [0] + list(range(3, 26, 2)) and p30[-1] == [0] + list(range(7, 30, 2))
    assert plan_chunks(8, 0, plan="published") == [list(range(8))]  # the published loop divides by zero here
    assert plan_chunks(30, 0, interleave=False, plan="published")[-1] == [0] + list(range(25, 30))  # short last block
    with pytest.raises(ValueError, match="plan='davis'"):
        plan_chunks(30, 0, plan="davis")


def test_feature_similarity_dot_is_the_raw_product():
    from difftrack.matching import feature_cost_frames

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    got = feature_cost_frames(a, b, tau=1.0, bidirectional=False, similarity="dot")
    assert torch.allclose(got, torch.softmax(torch.einsum("sc,fkc->fsk", a, b), -1))
    with pytest.raises(ValueError, match="similarity='l2'"):
        feature_cost_frames(a, b, similarity="l2")


def test_headlines_of_both_protocols_and_not_recorded():
    from difftrack.experiments import analysis as xa

    rng = np.random.default_rng(0)
    names = ("qk_acc", "feat_acc", "conf_cross", "attn_cross")
    tabs = {n: rng.random((3, 4)) for n in names}
    tabs.update({"pub_" + n: rng.random((3, 4)) for n in names})
    tabs["qk_acc"][-1, 2] = 2.0  # the project protocol's best layer: 2
    tabs["pub_qk_acc"][-1, 1] = 2.0  # the published one's: 1
    by = xa.protocol_summaries({"all": tabs})
    assert by["difftrack"]["all"]["qk_best_layer"] == 2 and by["published"]["all"]["qk_best_layer"] == 1
    frame = xa.headline_frame(by)
    assert frame.loc[("published", "all"), "qk_best_layer"] == 1
    only = xa.protocol_summaries({"all": {n: tabs[n] for n in names}})
    assert only["published"] is None
    assert ("published", "not recorded") in xa.headline_frame(only).index
    with pytest.raises(ValueError, match="no 'published' tables"):
        xa.summarize_tables({n: tabs[n] for n in names}, protocol="published")


def test_recorder_without_features_expects_no_feature_table_of_either_protocol():
    """``features=False`` (no block-feature events): neither ``feat_tracks`` nor the published ``pub_feat_tracks`` is
    expected, so a run with query/key events only is complete; a missing query/key table still raises."""
    g = torch.Generator().manual_seed(0)
    N = TEXT + F * ROWS * COLS
    q = torch.randn(1, H, N, D, generator=g)
    grid = TokenGrid(F, ROWS, COLS, text_len=TEXT, text_first=True, stride=STRIDE)
    rec = A.Recorder(QUERIES, STRIDE, 1, 1, F, protocols=("difftrack", "published"), features=False)
    rec.on_qk(QKEvent(0, 0, None, q, q + 0.3 * torch.randn(1, H, N, D, generator=g), grid))
    out = rec.rec
    assert np.isfinite(out.pub_qk_tracks).all() and np.isnan(out.pub_feat_tracks).all()
    empty = A.Recorder(QUERIES, STRIDE, 1, 1, F, protocols=("difftrack", "published"), features=False)
    with pytest.raises(IncompleteRunError, match="pub_qk_tracks"):
        empty.rec


# ------------------------------------------------------------------ recording cost: the same bytes (issue 32)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CI: the CPU; on a GPU box both


def _frames_paper_reference(cost, pts):
    """``refine="paper"`` as first written: one frame pair, separate ``grid_sample`` calls for the match map and the
    peak. cost ``[M_s, M_k]``, pts ``[n, 2]`` token units -> ``(positions [n, 2], peak [n])``."""
    peak, idx = cost.max(-1)
    mm = torch.stack([(idx % COLS).float(), (idx // COLS).float()], 0).view(1, 2, ROWS, COLS)
    g = torch.stack([pts[:, 0] / (COLS - 1) * 2 - 1, pts[:, 1] / (ROWS - 1) * 2 - 1], -1).view(1, 1, -1, 2)
    kw = dict(mode="bilinear", padding_mode="border", align_corners=True)
    return (torch.nn.functional.grid_sample(mm, g, **kw)[0, :, 0].T,
            torch.nn.functional.grid_sample(peak.view(1, 1, ROWS, COLS), g, **kw)[0, 0, 0])


def _tracks_reference(costs, pts, refine, src=0):
    """Tracks ``[n, F, 2]`` px and confidence ``[n, F]`` from ``costs [F - 1, M, M]`` as first written: one frame at a
    time for "paper", the 4 corner rows gathered and blended one by one otherwise, the source frame filled in."""
    from difftrack.matching import _corners, refine_peak

    n = len(pts)
    tracks, conf = pts.unsqueeze(1).repeat(1, F, 1), torch.ones(n, F, device=pts.device)
    others = [f for f in range(F) if f != src]
    for i, f in enumerate(others):
        if refine == "paper":
            tracks[:, f], conf[:, f] = _frames_paper_reference(costs[i], pts)
            continue
        index, fu, fv = _corners(pts, ROWS, COLS)
        r = [costs[i][index[c]] for c in range(4)]
        blend = r[0] * (1 - fu) * (1 - fv) + r[1] * fu * (1 - fv) + r[2] * (1 - fu) * fv + r[3] * fu * fv
        tracks[:, f], conf[:, f] = refine_peak(blend, ROWS, COLS, refine, 1)
    return (tracks + 0.5) * STRIDE, conf


def _edge_queries():
    """QUERIES, 24 random points and points on token centres, on the frame's edges and outside it (border
    clamping)."""
    extra = [[8.0, 8.0], [24.0, 40.0], [0.0, 0.0], [80.0, 48.0], [90.0, -3.0], [72.0, 24.0]]
    rand = np.random.default_rng(7).uniform(0, [COLS * STRIDE, ROWS * STRIDE], (24, 2))
    return np.concatenate([QUERIES, rand, extra]).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_paper_refine_is_the_per_frame_formula_bit_for_bit(device):
    """The match maps and peaks of every frame pair go through one ``grid_sample``: the same bytes as one call per
    frame and quantity, also with tied maxima and points on token centres, edges and outside the frame."""
    from difftrack.matching import _match_frames, match_from_cost, px_to_tokens

    g = torch.Generator().manual_seed(5)
    pts = px_to_tokens(torch.from_numpy(_edge_queries()), STRIDE).to(device)
    for ties in (False, True):
        costs = torch.rand(F - 1, ROWS * COLS, ROWS * COLS, generator=g)
        costs = ((costs * 3).round() / 3 if ties else costs).to(device)
        pos, conf = _match_frames(costs, ROWS, COLS, pts, "paper", 1, 1.0)
        ref = [_frames_paper_reference(c, pts) for c in costs]
        assert torch.equal(pos, torch.stack([r[0] for r in ref], 1))
        assert torch.equal(conf, torch.stack([r[1] for r in ref], 1))
        one = match_from_cost(costs[1], ROWS, COLS, pts, "paper")
        assert torch.equal(one[0], ref[1][0]) and torch.equal(one[1], ref[1][1])


@pytest.mark.parametrize("device", DEVICES)
def test_recorded_tables_are_the_straightforward_computation_bit_for_bit(device):
    """Both protocols recorded in one run (shared cost, one point layout for every call): each track table is,
    byte for byte, the straightforward per-frame computation from the same cost (the code before the batching),
    at the default temperature (one cost, two refinements) and at another one (two costs)."""
    from difftrack.matching import feature_cost_frames, px_to_tokens, qk_cost_frames, temperature

    g = torch.Generator().manual_seed(2)
    N = TEXT + F * ROWS * COLS
    q = torch.randn(1, H, N, D, generator=g)
    k = q + 0.3 * torch.randn(1, H, N, D, generator=g)
    feat = torch.randn(1, F, ROWS, COLS, 6, generator=g)
    q, k, feat = q.to(device), k.to(device), feat.to(device)
    grid = TokenGrid(F, ROWS, COLS, text_len=TEXT, text_first=True, stride=STRIDE)
    qp = _edge_queries()
    pts = px_to_tokens(torch.from_numpy(qp), STRIDE).to(device)
    qv = q[0, :, TEXT:].reshape(H, F, ROWS * COLS, D)
    kv = k[0, :, TEXT:].reshape(H, F, ROWS * COLS, D)
    fv = feat[0].reshape(F, ROWS * COLS, -1)
    for tau in (None, 1.7):
        rec = A.Recorder(qp, STRIDE, 2, 1, F, tau=tau, protocols=("difftrack", "published"))
        for step in range(2):  # the second step reuses the layout made by the first
            rec.on_qk(QKEvent(0, step, None, q, k, grid))
            rec.on_features(FeatureEvent(0, step, None, feat, grid))
        out = rec.rec
        cost = {t: qk_cost_frames(qv[:, 0], kv[:, 0], qv[:, 1:], kv[:, 1:], t) for t in {tau, "dim"}}
        want = dict(qk_tracks=_tracks_reference(cost[tau], pts, "softargmax")[0],
                    pub_qk_tracks=_tracks_reference(cost["dim"], pts, "paper")[0],
                    feat_tracks=_tracks_reference(feature_cost_frames(fv[0], fv[1:], 0.05), pts, "softargmax")[0],
                    pub_feat_tracks=_tracks_reference(feature_cost_frames(fv[0], fv[1:], 1.0, False, similarity="dot"),
                                                      pts, "paper")[0])
        assert (temperature(tau, H, D) == temperature("dim", H, D)) == (tau is None)
        for name, v in want.items():
            for step in range(2):
                assert np.array_equal(getattr(out, name)[step, 0], v.cpu().numpy()), (tau, name, step)


@pytest.mark.parametrize("device", DEVICES)
def test_point_layout_reuse_is_checked_and_changes_nothing(device):
    """``layout=`` (made once by ``point_layout``) gives the same bytes as without, for every refinement and source
    frame; a layout made for other points, a modified points tensor or another grid is refused by name."""
    from difftrack import matching as M

    g = torch.Generator().manual_seed(4)
    q = torch.randn(H, F, ROWS, COLS, D, generator=g)
    k = q + 0.3 * torch.randn(H, F, ROWS, COLS, D, generator=g)
    feat = torch.randn(F, ROWS, COLS, 6, generator=g)
    q, k, feat = q.to(device), k.to(device), feat.to(device)
    pts = torch.from_numpy(_edge_queries()).to(device)
    lay = M.point_layout(pts, STRIDE, ROWS, COLS)
    for src in (0, 2, F - 1):
        for refine in M.REFINE:
            for a, b in ((M.match_video(q, k, pts, STRIDE, src, refine=refine, layout=lay),
                          M.match_video(q, k, pts, STRIDE, src, refine=refine)),
                         (M.match_video_features(feat, pts, STRIDE, src, refine=refine, layout=lay),
                          M.match_video_features(feat, pts, STRIDE, src, refine=refine))):
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (src, refine)
        if src == 0:  # tracks and confidence (the blended peak: any rounding of the blend shows) as first written
            cost = M.qk_cost_frames(q[:, 0].flatten(1, 2), k[:, 0].flatten(1, 2), q[:, 1:].flatten(2, 3),
                                    k[:, 1:].flatten(2, 3))
            got = M.match_video_refines(q, k, pts, STRIDE, ("softargmax", "paper", "argmax"), layout=lay)
            for (tr, cf), refine in zip(got, ("softargmax", "paper", "argmax")):
                ref = _tracks_reference(cost, M.px_to_tokens(pts, STRIDE), refine)
                assert torch.equal(tr, ref[0]) and torch.equal(cf, ref[1]), refine
    with pytest.raises(ValueError, match="layout= was made for other points"):
        M.match_video(q, k, pts.clone(), STRIDE, layout=lay)
    with pytest.raises(ValueError, match="layout= was made for other points"):
        M.match_video_features(feat[:, :2], pts, STRIDE, layout=lay)  # a 2 x 5 grid
    with pytest.raises(ValueError, match="layout= was made for other points"):
        M.match_video(q, k, pts, STRIDE / 2, layout=lay)
    pts[0, 0] += 1.0  # edited in place after the layout was made
    with pytest.raises(ValueError, match="layout= was made for other points"):
        M.match_video(q, k, pts, STRIDE, layout=lay)
    with pytest.raises(ValueError, match=r"points_px must be \[n, 2\]"):
        M.point_layout(pts[:, :1], STRIDE, ROWS, COLS)
