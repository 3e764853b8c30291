"""difftrack.click_track without a browser: click events -> queries (t, x, y), incremental tracking (a fake tracker and
DiffTracker on diffusers' test-sized CogVideoX), drawing, and the widget panel driven through its click handler
(tests/test_browser.py clicks the real thing in JupyterLab)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cogvideox

from difftrack.click_track import (
    PALETTE,
    PANEL_CLASS,
    ClickTrack,
    click_track_panel,
    encode_png,
    event_to_point,
    moving_points,
)
from difftrack.tracking import DiffTracker

T, H, W = 8, 32, 48


def video(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)


class FakeTracker:
    """Each point moves by (+1, +0.5) px a frame from its query; hidden in the last frame. Records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, vid, queries):
        q = np.asarray(queries, np.float32)
        self.calls.append(q.copy())
        dt = np.arange(vid.shape[0])[None, :] - q[:, :1]  # [n, T]
        tracks = np.stack([q[:, 1:2] + dt, q[:, 2:3] + 0.5 * dt], -1).astype(np.float32)
        visible = np.ones(dt.shape, bool)
        visible[:, -1] = False
        return tracks, visible


# ------------------------------------------------------------------------------------------ click -> query
def test_event_to_point_uses_the_image_data_pixel():
    # a 32x48 video drawn 4x: the image is 128x192; data pixel (0, 0) is video pixel centre (0.125, 0.125)
    assert event_to_point({"dataX": 0, "dataY": 0}, (128, 192), (H, W)) == (0.125, 0.125)
    x, y = event_to_point({"dataX": 191, "dataY": 127, "relativeX": 5, "relativeY": 5}, (128, 192), (H, W))
    assert (x, y) == (47.875, 31.875)  # dataX/dataY win over the displayed position
    assert event_to_point({"dataX": 80, "dataY": 40}, (128, 192), (H, W)) == (20.125, 10.125)
    assert event_to_point({"dataX": 400, "dataY": -3}, (128, 192), (H, W)) == (48.0, 0.0)  # clipped to the frame


def test_event_to_point_without_data_coordinates_uses_the_displayed_fraction():
    ev = {"relativeX": 95, "relativeY": 31, "boundingRectWidth": 96, "boundingRectHeight": 64}  # shown at half size
    assert event_to_point(ev, (128, 192), (H, W)) == (47.75, 15.75)
    with pytest.raises(ValueError, match="without coordinates"):
        event_to_point({"type": "click"}, (128, 192), (H, W))


# ------------------------------------------------------------------------------------------ state and tracking
def test_points_on_later_frames_are_tracked_incrementally():
    fake = FakeTracker()
    st = ClickTrack(video(), fake, scale=4)
    st.add(5, 10.0, 12.0)
    st.add_event({"type": "click", "dataX": 80, "dataY": 40}, t=6)
    assert st.pending == 2 and st.describe().startswith("0 tracks (2 points being tracked)")
    tracks, visible = st.track()
    np.testing.assert_allclose(st.queries, [[5, 10, 12], [6, 20.125, 10.125]])
    assert tracks.shape == (2, T, 2) and visible.shape == (2, T) and len(fake.calls) == 1
    np.testing.assert_allclose(tracks[:, [5, 6]][[0, 1], [0, 1]], [[10, 12], [20.125, 10.125]])  # at the query frame
    np.testing.assert_allclose(tracks[0, 0], [5, 9.5])  # tracked backwards to frame 0 as well
    st.track()
    assert len(fake.calls) == 1  # nothing pending: no tracker call
    st.add(2, 40.0, 30.0)
    st.track()
    assert len(fake.calls) == 2 and fake.calls[1].tolist() == [[2, 40, 30]]  # only the new point is tracked
    assert st.tracks.shape == (3, T, 2) and st.tracker_calls == 2
    assert st.describe().startswith("3 tracks: (t=5, x=10.0, y=12.0), (t=6, x=20.1, y=10.1), (t=2, x=40.0, y=30.0)")
    st.clear()
    assert st.queries.shape == (0, 3) and st.tracks.shape == (0, T, 2) and st.describe().startswith("0 tracks")


@pytest.mark.parametrize("t, x, y, match", [(T, 1.0, 1.0, "frame t=8"), (-1, 1.0, 1.0, "frame t=-1"),
                                            (1.5, 1.0, 1.0, "integer frame"), (0, W + 1.0, 1.0, "outside the frame")])
def test_bad_points_are_refused(t, x, y, match):
    st = ClickTrack(video(), FakeTracker())
    with pytest.raises(ValueError, match=match):
        st.add(t, x, y)
    assert st.queries.shape == (0, 3)


def test_a_tracker_with_the_wrong_output_is_named():
    st = ClickTrack(video(), lambda v, q: (np.zeros((1, T - 1, 2)), np.ones((1, T - 1), bool)))
    st.add(0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"the tracker returned tracks \(1, 7, 2\)"):
        st.track()


def test_drawing_rings_tracks_and_strip():
    st = ClickTrack(video(), FakeTracker(), scale=4, trail=3, strip_frames=4)
    plain = st.frame_image(3)
    assert plain.shape == (H * 4, W * 4, 3) and plain.dtype == np.uint8
    np.testing.assert_array_equal(plain, np.repeat(np.repeat(st.video[3], 4, 0), 4, 1))
    st.add(3, 20.0, 16.0)
    ringed = st.frame_image(3)
    changed = np.argwhere((ringed != plain).any(-1))
    assert len(changed) and np.abs(changed.mean(0) - [16 * 4, 20 * 4]).max() < 2  # a ring around the click
    np.testing.assert_array_equal(st.frame_image(4), np.repeat(np.repeat(st.video[4], 4, 0), 4, 1))  # not tracked yet
    st.track()
    assert (st.frame_image(4) != plain).any()
    assert (st.frame_image(0) != np.repeat(np.repeat(st.video[0], 4, 0), 4, 1)).any()  # before the query frame too
    strip = st.strip_image()
    assert st.strip_indices() == [0, 2, 5, 7]
    assert strip.shape == (H * 4 + 14, 4 * W * 4 + 3 * 4, 3)
    png = encode_png(strip)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    fig = st.figure(title="clicked")
    assert [a.get_title() for a in fig.axes] == ["frame 0", "frame 2", "frame 5", "frame 7"]
    assert fig._suptitle.get_text() == "clicked"
    plt.close(fig)
    st.add(2, 40.0, 4.0)
    st.track()
    fig = st.figure()
    assert fig.axes[1].get_title() == "frame 2 (clicked)"
    plt.close(fig)
    # one colour per point in click order: the first point's disc keeps its colour when a second one is added
    x, y = (st.tracks[0, 4] * 4 - 0.5).round().astype(int)
    assert tuple(st.frame_image(4)[y, x]) == tuple(PALETTE[0])
    with pytest.raises(ValueError, match="frame 8"):
        st.frame_image(T)


def test_moving_points_for_the_demo_clicks():
    gt = np.zeros((4, 3, 2), np.float32)
    gt[:] = np.array([[10, 10], [12, 10], [40, 30], [20, 20]], np.float32)[:, None]  # still points
    gt[0, :, 0] += [0, 5, 10]  # moves 10 px
    gt[1, :, 0] += [0, 6, 12]  # moves 12 px, but hidden at frame 1
    gt[2, :, 1] += [0, -3, -6]  # moves 6 px
    vis = np.ones((4, 3), bool)
    vis[1, 1] = False
    np.testing.assert_allclose(moving_points(gt, vis, 1, n=2, min_dist=5), [[15, 10], [40, 27]])
    np.testing.assert_allclose(moving_points(gt, vis, 2, n=2, min_dist=5), [[24, 10], [40, 24]])
    assert moving_points(gt, np.zeros_like(vis), 1).shape == (0, 2)


# ------------------------------------------------------------------------------------------ the widget
def test_panel_clicks_on_a_later_frame_without_a_frontend():
    fake = FakeTracker()
    st = ClickTrack(video(), fake, scale=4)
    st.add(1, 5.0, 5.0)  # a start point, tracked when the panel is built
    panel = click_track_panel(st, frame=1)
    assert PANEL_CLASS in panel._dom_classes and len(fake.calls) == 1
    assert panel.frame_slider.description == "frame" and panel.frame_slider.max == T - 1
    assert (panel.image.layout.width, panel.image.layout.height) == ("192px", "128px")
    small = click_track_panel(ClickTrack(video(), fake, scale=4), max_width=96)
    assert (small.image.layout.width, small.image.layout.height) == ("96px", "64px")
    assert panel.label.value.startswith("1 track:")
    first_image, first_strip = panel.image.value, panel.strip.value
    assert first_image[:4] == b"\x89PNG"
    panel.frame_slider.value = 6  # go to a later frame, click two points
    moved = panel.image.value
    assert moved != first_image
    panel.handle_event({"type": "click", "dataX": 40, "dataY": 20})
    panel.handle_event({"type": "click", "dataX": 150, "dataY": 100})
    np.testing.assert_allclose(st.queries[1:], [[6, 10.125, 5.125], [6, 37.625, 25.125]])
    assert [len(c) for c in fake.calls] == [1, 1, 1]
    assert panel.label.value.startswith("3 tracks:") and panel.image.value != moved
    assert panel.strip.value != first_strip
    panel.handle_event({"type": "mousemove", "dataX": 1, "dataY": 1})  # not a click: ignored
    assert len(st.queries) == 3
    panel.clear_button.click()
    assert panel.label.value.startswith("0 tracks") and len(st.queries) == 0


def test_panel_shows_a_failing_tracker_in_its_label():
    def broken(v, q):
        raise RuntimeError("out of memory")

    panel = click_track_panel(ClickTrack(video(), broken), frame=2)
    panel.handle_event({"type": "click", "dataX": 4, "dataY": 4})
    assert panel.label.value == "tracking failed: RuntimeError: out of memory"
    with pytest.raises(ValueError, match="frame=8"):
        click_track_panel(ClickTrack(video(), broken), frame=T)


# ------------------------------------------------------------------------------------------ a real tracker
def _pool_encode(vid: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(vid).permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.avg_pool2d(torch.cat([x, x.mean(1, keepdim=True)], 1), 8)


def test_difftracker_points_after_frame_0_and_one_at_a_time_equals_together():
    """What the incremental tracking relies on: a point's track does not depend on the other points."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster on the shared 2-core machine
    try:
        _one_at_a_time_equals_together()
    finally:
        torch.set_num_threads(threads)


def _one_at_a_time_equals_together():
    model = tiny_cogvideox(layers=2)
    ehs = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    tracker = DiffTracker(model, layers=(1,), encode=_pool_encode, token_stride=16, encoder_hidden_states=ehs,
                          chunk_len=4)
    vid = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    together = ClickTrack(vid, tracker)
    one_by_one = ClickTrack(vid, tracker)
    clicks = [(3, 20.0, 30.0), (3, 50.5, 10.0), (1, 33.0, 60.0)]
    for c in clicks:
        together.add(*c)
        one_by_one.add(*c)
        one_by_one.track()
    together.track()
    assert together.tracker_calls == 1 and one_by_one.tracker_calls == 3
    np.testing.assert_allclose(one_by_one.tracks, together.tracks, atol=1e-4)
    np.testing.assert_array_equal(one_by_one.visible, together.visible)
    np.testing.assert_allclose(together.tracks[[0, 1, 2], [3, 3, 1]], [c[1:] for c in clicks])
    assert together.visible[[0, 1, 2], [3, 3, 1]].all()
