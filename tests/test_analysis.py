"""difftrack.analysis: hand-computed harmonic mean and score tables (the per-video cache of run_dataset is tested in
test_experiments_analysis.py)."""
import numpy as np
import pytest

from difftrack import analysis

def test_harmonic_mean_and_score_tables_by_hand():
    """Hand-computed cases: min-max over the whole table, 0 where a term is 0; PCK over visible later frames."""
    acc = np.array([[0.0, 0.5], [1.0, 0.5]])
    conf = np.array([[0.2, 0.4], [0.6, 0.6]])
    attn = np.array([[1.0, 3.0], [3.0, 2.0]])
    hm = analysis.harmonic_mean(acc, conf, attn)
    # normalised: acc [[0, .5], [1, .5]], conf [[0, .5], [1, 1]], attn [[0, 1], [1, .5]]
    np.testing.assert_allclose(hm, [[0.0, 3 / (2 + 2 + 1)], [1.0, 3 / (2 + 1 + 2)]])
    rec = analysis.Recorder(np.array([[2.0, 2.0]], np.float32), 4.0, 1, 1, 3).record(check=False)
    rec.qk_tracks = np.array([[[[[2, 2], [3.5, 2], [9, 9]]]]], np.float32)  # [S, L, n, F, 2]
    rec.feat_tracks = rec.qk_tracks.copy()
    for k in ("max_text", "sum_text"):
        setattr(rec, k, np.zeros((1, 1, 1), np.float32))
    rec.max_frame = np.array([[[[0.9, 0.5, 0.3]]]], np.float32)
    rec.sum_frame = np.array([[[[0.5, 0.3, 0.2]]]], np.float32)
    gt = np.array([[[2, 2], [2, 2], [2, 2]]], np.float32)
    t = analysis.score_tables(rec, gt, np.array([[True, True, True]]))
    assert t["qk_acc"][0, 0] == 0.5  # frame 1 within 2 px (1.5), frame 2 not
    assert t["attn_cross"][0, 0] == pytest.approx(0.5) and t["attn_self"][0, 0] == pytest.approx(0.5)
    assert t["conf_cross"][0, 0] == pytest.approx(0.4)
    t2 = analysis.score_tables(rec, gt, np.array([[True, True, False]]))
    assert t2["qk_acc"][0, 0] == 1.0 and t2["conf_cross"][0, 0] == pytest.approx(0.5)
