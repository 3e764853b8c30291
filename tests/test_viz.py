"""difftrack.viz: figures build, files are written only when asked, no widget imports. CPU-only, seconds.
(difftrack.inspect_attn's tests are in test_inspect_attn.py.)"""

import numpy as np
import pytest
from matplotlib.figure import Figure

from difftrack import viz


@pytest.fixture
def video():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)


@pytest.fixture
def tracks():
    t = np.arange(6, dtype=np.float32)
    tr = np.stack([np.stack([2 + t + i, 3 + 0.5 * t + i], -1) for i in range(4)]).astype(np.float32)  # [4, 6, 2]
    vis = np.ones((4, 6), bool)
    vis[1, 3:] = False
    return tr, vis


def _check(fig, path=None):
    assert isinstance(fig, Figure)
    if path is not None:
        assert path.exists() and path.stat().st_size > 1000


def test_figures_build_and_save(tmp_path, video, tracks):
    tr, vis = tracks
    L, S = 5, 4
    rng = np.random.default_rng(1)
    tab = rng.random((S, L))
    cases = {
        "grid.png": lambda p: viz.video_grid([video, video], ["a", "b"], save=p),
        "grid_tracks.png": lambda p: viz.video_grid([video], ["a"], frames=[0, 5], tracks=[tr], visible=[vis], save=p),
        "frame.png": lambda p: viz.track_frame(video[2], tr, vis, 2, gt=(tr, vis), save=p),
        "curves.png": lambda p: viz.threshold_curves((1, 2, 4, 8), {"x": [0.1, 0.5, 0.9, 1.0]}, marker_x=2, save=p),
        "hist.png": lambda p: viz.histogram({"a": rng.random(50), "b": np.zeros(0)}, save=p),
        "lines.png": lambda p: viz.layer_lines({"qk": tab[-1], "feat": tab[0]}, "acc (%)", highlight=[1], save=p),
        "bars.png": lambda p: viz.layer_bars(tab[-1], "hm", highlight=[0, 2], save=p),
        "heat.png": lambda p: viz.table_heatmap(tab, step_labels=[999, 600, 300, 100], highlight=[3], save=p),
        "scores.png": lambda p: viz.score_bars({"self": tab[0], "cross": tab[1], "text": tab[2]}, "score", save=p),
        "steps.png": lambda p: viz.step_lines({"layer 1": tab[:, 1]}, "acc (%)", [999, 600, 300, 100], save=p),
        "share.png": lambda p: viz.attention_share({"self": [0.5] * S, "cross": [0.4] * S, "text": [0.1] * S},
                                                   save=p),
        "attn.png": lambda p: viz.attention_maps(video, rng.random((6, 4, 4)), (5.0, 6.0), track=tr[0], save=p),
        "pca.png": lambda p: viz.pca_frames({"video": video, "q": rng.random((6, 4, 4, 3))}, frames=[0, 3], save=p),
        "bar_table.png": lambda p: viz.bar_table({"a": 0.5, "b": 0.7}, "x", percent=True, save=p),
    }
    for name, make in cases.items():
        path = tmp_path / "sub" / name
        _check(make(path), path)


def test_no_file_without_save(tmp_path, monkeypatch, video):
    monkeypatch.chdir(tmp_path)
    viz.video_grid([video])
    viz.layer_bars(np.ones(3), "x")
    assert list(tmp_path.iterdir()) == []


def test_viz_errors(video):
    with pytest.raises(ValueError, match="out of range"):
        viz.video_grid([video], frames=[0, 99])
    with pytest.raises(ValueError, match="no videos"):
        viz.video_grid([])


def test_library_does_not_import_widgets():
    import difftrack.inspect_attn
    import difftrack.viz

    for mod in (difftrack.viz, difftrack.inspect_attn):
        src = open(mod.__file__).read()
        assert "ipywidgets" not in src.replace("No widget code", "")


# ---------------------------------------------------------------------------------------------- inspect_attn


def test_point_colours_are_fixed_by_the_order_points_came_in():
    """Click-to-track's rule: adding points never recolours the earlier ones; the palette repeats after 10."""
    from difftrack.viz import POINT_PALETTE, point_colours

    three, twelve = point_colours(3), point_colours(12)
    assert three.shape == (3, 3) and three.dtype == np.uint8
    np.testing.assert_array_equal(twelve[:3], three)
    np.testing.assert_array_equal(twelve[10], POINT_PALETTE[0])
    assert len({tuple(c) for c in POINT_PALETTE}) == len(POINT_PALETTE)  # distinct colours
