"""difftrack.analysis: the per-video cache of run_dataset reuses a record only when everything it depends on
matches; corrupt entries are recomputed; bad settings are named."""
import warnings

import numpy as np
import pytest

from difftrack import analysis

QUERIES = np.array([[10.0, 10.0], [30.0, 20.0]], np.float32)


@pytest.fixture()
def fake(monkeypatch):
    """Stand-ins for the model-running analysis that count their calls and record the settings they got."""
    calls = []

    def fake_generation(pipe, prompt, seed, num_steps, grid_size, guidance_scale=6.0, size=None, **kw):
        calls.append(("generated", prompt, guidance_scale, kw))
        rec = analysis.Recorder(QUERIES, 4.0, num_steps, 2, 13).rec
        rec.meta = dict(kind="generated", prompt=prompt, seed=seed)
        return np.full((13, 64, 64, 3), len(calls), np.uint8), rec

    def fake_exact(pipe, sample, num_steps, grid_size=10, **kw):
        calls.append(("exact", sample.split if hasattr(sample, "split") else None, None, kw))
        rec = analysis.Recorder(QUERIES, 4.0, num_steps, 2, 13).rec
        rec.meta = dict(kind="exact")
        return rec

    monkeypatch.setattr(analysis, "analyze_generation", fake_generation)
    monkeypatch.setattr(analysis, "analyze_exact", fake_exact)
    monkeypatch.setattr(analysis, "pseudo_ground_truth",
                        lambda v, q: (np.zeros((len(q), 13, 2), np.float32), np.ones((len(q), 13), bool)))
    from test_guidance import tiny_mini_pipe

    return calls, tiny_mini_pipe()


GEN = dict(kind="generated", family="objects", seed=3, prompt="a red circle moving left on a still background")


def test_cached_record_is_reused_only_with_the_same_settings(fake, tmp_path):
    calls, pipe = fake
    run = lambda p=pipe, items=(GEN,), **kw: analysis.run_dataset(p, list(items), tmp_path, num_steps=2,  # noqa: E731
                                                                  grid_size=4, progress=False, **kw)
    run()
    run()
    assert len(calls) == 1  # same settings: reused
    run(refine="argmax")
    assert len(calls) == 2 and calls[-1][3]["refine"] == "argmax"  # another matching rule: recomputed
    run(refine="argmax", guidance_scale=3.0)
    assert len(calls) == 3 and calls[-1][2] == 3.0  # another guidance: recomputed
    run(items=[dict(GEN, prompt="a blue square moving up on a still background")], refine="argmax",
        guidance_scale=3.0)
    assert len(calls) == 4  # another prompt under the same seed: recomputed
    with pytest.raises(ValueError, match=r"other settings.*match.*'refine': 'argmax'.*'refine': 'softargmax'"):
        run(p=None, items=[dict(GEN, prompt="a blue square moving up on a still background")],
            guidance_scale=3.0)  # scoring without a pipeline never scores a record made with other settings
    res = run(p=None, items=[dict(GEN, prompt="a blue square moving up on a still background")], refine="argmax",
              guidance_scale=3.0)
    assert res[0][1]["qk_acc"].shape == (2, 2)


def test_exact_items_take_guidance_and_split_is_part_of_the_key(fake, tmp_path):
    calls, pipe = fake
    ex = dict(kind="exact", family="scenes", seed=1, split="heldout")
    analysis.run_dataset(pipe, [ex], tmp_path, num_steps=2, grid_size=4, progress=False, guidance_scale=3.0)
    assert len(calls) == 1  # no TypeError: guidance only goes to generated videos
    analysis.run_dataset(pipe, [dict(ex, split="train")], tmp_path, num_steps=2, grid_size=4, progress=False)
    assert len(calls) == 2  # the train split's video is another video
    with pytest.raises(ValueError, match="split"):
        analysis.run_dataset(None, [ex], tmp_path, num_steps=2, grid_size=4, progress=False)


def test_corrupt_cache_entry_is_named_and_recomputed(fake, tmp_path):
    calls, pipe = fake
    analysis.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False)
    (npz,) = tmp_path.glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=npz.name):
        analysis.run_dataset(None, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        analysis.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False)
    assert len(calls) == 2 and any(npz.name in str(x.message) and "recomputing" in str(x.message) for x in w)
    analysis.AnalysisRecord.load(npz)  # whole again


def test_bad_settings_are_named(fake, tmp_path):
    _, pipe = fake
    with pytest.raises(ValueError, match=r"unknown analysis settings \['refine_rule'\]"):
        analysis.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False, refine_rule="x")
    with pytest.raises(ValueError, match="num_steps=0"):
        analysis.run_dataset(pipe, [GEN], tmp_path, num_steps=0, grid_size=4, progress=False)
    with pytest.raises(ValueError, match="guidance_scale=nan"):
        analysis.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False,
                             guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="unknown item kind 'real'"):
        analysis.run_dataset(pipe, [dict(GEN, kind="real")], tmp_path, num_steps=2, grid_size=4, progress=False)
    with pytest.raises(ValueError, match="num_steps=0"):
        analysis.Recorder(QUERIES, 4.0, 0, 2, 13)


def test_harmonic_mean_and_score_tables_by_hand():
    """Hand-computed cases: min-max over the whole table, 0 where a term is 0; PCK over visible later frames."""
    acc = np.array([[0.0, 0.5], [1.0, 0.5]])
    conf = np.array([[0.2, 0.4], [0.6, 0.6]])
    attn = np.array([[1.0, 3.0], [3.0, 2.0]])
    hm = analysis.harmonic_mean(acc, conf, attn)
    # normalised: acc [[0, .5], [1, .5]], conf [[0, .5], [1, 1]], attn [[0, 1], [1, .5]]
    np.testing.assert_allclose(hm, [[0.0, 3 / (2 + 2 + 1)], [1.0, 3 / (2 + 1 + 2)]])
    rec = analysis.Recorder(np.array([[2.0, 2.0]], np.float32), 4.0, 1, 1, 3).rec
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
