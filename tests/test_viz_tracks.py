"""Track drawing (difftrack.viz_tracks): shapes, colours where tracks pass, mp4 writing, figure. (The results table
is tested in test_experiments_tracking.py.)"""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from difftrack.viz_tracks import draw_tracks, mean_error_per_frame, side_by_side, track_colors, track_strip


def _toy(T=6, H=16, W=20):
    video = np.full((T, H, W, 3), 40, np.uint8)
    t = np.arange(T, dtype=np.float32)
    tracks = np.stack([np.stack([2.5 + 2 * t, np.full(T, 4.5)], -1),       # moves right along y = 4.5
                       np.stack([np.full(T, 15.5), 3.0 + 1.5 * t], -1)])    # moves down along x = 15.5
    visible = np.ones((2, T), bool)
    visible[1, 3] = False
    return video, tracks.astype(np.float32), visible


def test_shapes_and_input_untouched():
    video, tracks, visible = _toy()
    before = video.copy()
    out = draw_tracks(video, tracks, visible, trail=3, scale=4)
    assert out.shape == (6, 64, 80, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(video, before)
    assert draw_tracks(video, tracks, visible, scale=1).shape == video.shape


def test_colours_differ_where_a_track_passes():
    video, tracks, visible = _toy()
    s = 4
    out = draw_tracks(video, tracks, visible, trail=5, scale=s)
    for n in range(2):
        for t in (0, 2, 5):
            if not visible[n, t]:
                continue
            x, y = (tracks[n, t] * s).astype(int)
            assert np.abs(out[t, y, x].astype(int) - 40).sum() > 60, (n, t)
    # far from every track the frame is untouched
    assert (out[0, 60:, :8] == 40).all()
    # the two tracks (different query y) get different colours
    c = track_colors(tracks)
    assert c.shape == (2, 3) and np.abs(c[0].astype(int) - c[1]).sum() > 50
    # trail: at frame 5 the first track's frame-3 position is painted (as trail) although no point is there now
    x, y = (tracks[0, 3] * s).astype(int)
    assert np.abs(out[5, y, x].astype(int) - 40).sum() > 30


def test_occluded_points_hollow_or_skipped():
    video, tracks, visible = _toy()
    s = 4
    x, y = (tracks[1, 3] * s).astype(int)
    hollow = draw_tracks(video, tracks, visible, trail=0, scale=s)
    assert (hollow[3, y, x] == 40).all()  # centre of a hollow ring is empty
    ring = hollow[3, y - 6:y + 7, x - 6:x + 7]
    assert (np.abs(ring.astype(int) - 40).sum(-1) > 60).any()
    skipped = draw_tracks(video, tracks, visible, trail=0, scale=s, draw_occluded=False)
    assert (skipped[3, y - 6:y + 7, x - 6:x + 7] == 40).all()


def test_tracks_start_at_query_frame():
    video, tracks, visible = _toy()
    out = draw_tracks(video, tracks, visible, trail=0, scale=4, query_frames=[2, 0])
    x, y = (tracks[0, 0] * 4).astype(int)
    assert (out[0, y, x] == 40).all()  # track 0 not drawn before its query frame


def test_bad_inputs():
    video, tracks, visible = _toy()
    with pytest.raises(ValueError, match="tracks"):
        draw_tracks(video, tracks[:, :3], visible)
    with pytest.raises(ValueError, match="uint8"):
        draw_tracks(video.astype(np.float32), tracks, visible)
    with pytest.raises(ValueError, match="scale"):
        draw_tracks(video, tracks, visible, scale=0)


def test_write_mp4(tmp_path):
    video, tracks, visible = _toy(T=8, H=16, W=16)
    tracks[:, :, 0] = np.clip(tracks[:, :, 0], 0, 16)
    frames = draw_tracks(video, tracks, visible, scale=4)
    both = side_by_side(frames, frames)
    assert both.shape == (8, 64, 132, 3)
    path = tmp_path / "tracks.mp4"
    try:
        from difftrack.video_io import read_video, write_video
    except ImportError:  # video_io not there yet: plain imageio
        import imageio.v3 as iio

        iio.imwrite(path, frames, fps=4, codec="libx264", macro_block_size=1)
        back = iio.imread(path)
    else:
        write_video(path, frames, fps=4)
        back = read_video(path)
    assert path.stat().st_size > 0
    assert back.shape[0] == 8 and back.shape[-1] == 3


def test_track_strip_and_error():
    import matplotlib.pyplot as plt

    video, tracks, visible = _toy()
    gt = tracks + np.float32(1.0)
    err = mean_error_per_frame(tracks, gt, visible)
    np.testing.assert_allclose(err, np.sqrt(2), rtol=1e-5)
    fig = track_strip(video, tracks, visible, gt_tracks=gt, gt_visible=visible, title="t")
    assert len(fig.axes) == 6  # 5 frames + error panel
    plt.close(fig)
    fig = track_strip(video, tracks, visible, frames=[0, 5])
    assert len(fig.axes) == 2
    plt.close(fig)


def test_one_colour_rule_for_notebook_plots_and_drawn_videos():
    """viz_tracks.track_colors (videos) is viz.track_colours (matplotlib plots) of the query points, in uint8 RGB."""
    from difftrack.viz import track_colours

    tracks = np.array([[[5.0, 9.0], [6.0, 9.0]], [[2.0, 1.0], [2.0, 2.0]], [[7.0, 1.0], [8.0, 1.0]]], np.float32)
    rgb = track_colors(tracks)
    ref = (track_colours(tracks[:, 0])[:, :3] * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(rgb, ref) and len({tuple(c) for c in rgb}) == 3
