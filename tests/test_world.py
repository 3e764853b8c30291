"""The procedural world: determinism, exact tracks (photometric consistency, occlusion), TAP-Vid export, errors."""
import numpy as np
import pytest

from difftrack.world import World, make_dataset, texture_bank, texture_ids, to_tapvid


def test_deterministic_and_splits_disjoint():
    w = World()
    a, b = w.sample(3, "objects", "train"), w.sample(3, "objects", "train")
    assert np.array_equal(a.video, b.video) and a.prompt == b.prompt
    assert a.video.shape == (13, 64, 64, 3) and a.video.dtype == np.uint8
    _, names, held = texture_bank()
    train, test = set(texture_ids("train")), set(texture_ids("heldout"))
    assert not train & test and {names[i] for i in test} == set(held)
    for s in range(20):
        smp = w.sample(s, "scenes", "heldout")
        assert smp.layers[0].texture in test


@pytest.mark.parametrize("family", ["objects", "scenes"])
def test_tracks_follow_the_content(family):
    """Colour at the true track position equals the colour at the query (visible points)."""
    w = World()
    diffs, n_vis = [], 0
    for seed in range(4):
        s = w.sample(seed, family, "train")
        q = w.grid_queries(10)
        tr, vis = w.tracks(s, q)
        assert tr.shape == (100, 13, 2) and vis.shape == (100, 13) and vis[:, 0].all()
        np.testing.assert_allclose(tr[:, 0], q[:, 1:], atol=1e-4)
        v = s.video.astype(float)
        c0 = v[0, q[:, 2].astype(int), q[:, 1].astype(int)]
        for t in range(1, 13):
            inside = vis[:, t] & (tr[:, t] > 1).all(1) & (tr[:, t] < 63).all(1)
            xi, yi = tr[inside, t, 0].astype(int), tr[inside, t, 1].astype(int)
            diffs.append(np.abs(v[t, yi, xi] - c0[inside]).mean(-1))
            n_vis += inside.sum()
    d = np.concatenate(diffs)
    assert n_vis > 1000 and np.median(d) < 6.0  # a few grey levels (bilinear resampling), not a wrong pixel


def test_occlusion_and_leaving_the_frame():
    w = World()
    found_occ = found_out = False
    for seed in range(25):
        s = w.sample(seed, "objects", "train")
        q = w.grid_queries(12)
        tr, vis = w.tracks(s, q)
        inside = ((tr >= 0) & (tr <= 64)).all(-1)
        found_out |= bool((~inside & ~vis).any())
        found_occ |= bool((inside & ~vis).any())
        assert not (vis & ~inside).any(), "a point outside the frame is marked visible"
    assert found_occ and found_out


def test_tapvid_export_and_dataset():
    d = make_dataset(2, "objects", "heldout", grid_size=4)
    assert len(d) == 2 and d[0]["points"].shape == (16, 13, 2) and d[0]["occluded"].dtype == bool
    assert (d[0]["points"][:, 0] >= 0).all() and (d[0]["points"][:, 0] <= 1).all()
    with pytest.raises(ValueError, match="do not match"):
        to_tapvid(d[0]["video"], np.zeros((3, 5, 2), np.float32), np.zeros((3, 5), bool))


def test_errors():
    w = World()
    s = w.sample(0, "scenes")
    with pytest.raises(ValueError, match="unknown family 'cats'"):
        w.sample(0, "cats")
    with pytest.raises(ValueError, match="unknown split"):
        w.sample(0, "scenes", "test")
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        w.tracks(s, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="inside the 64x64 frame"):
        w.tracks(s, np.array([[0, 70.0, 3.0]], np.float32))
    with pytest.raises(ValueError, match=r"integers in \[0, 12\]"):
        w.tracks(s, np.array([[13, 3.0, 3.0]], np.float32))
    with pytest.raises(ValueError, match="at least 2 frames"):
        World(frames=1)


def test_render_fast_equals_render():
    w = World()
    rng = np.random.default_rng(0)
    vids = [w.sample_layers(rng, f, "train")[0] for f in ("objects", "scenes", "objects")]
    np.testing.assert_allclose(w.render(vids).numpy(), w.render_fast(vids).numpy(), atol=1e-5)
