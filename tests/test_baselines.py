"""Tests for difftrack.baselines on synthetic videos with known motion."""

import cv2
import numpy as np
import pytest

from difftrack.baselines import DenseFlowTracker, LucasKanadeTracker, PatchMatchTracker

H = W = 96
SQUARE = 32


def _texture(rng, h, w, sigma=1.5):
    """Smooth random RGB texture, uint8 `[h, w, 3]` spanning 0..255."""
    noise = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), sigma)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return (noise * 255).astype(np.uint8)


def make_video(num_frames, start, velocity, seed=0):
    """A textured square translating by an integer ``velocity`` (dx, dy) per frame over a static texture.

    Returns ``video`` uint8 `[T, H, W, 3]`; the square's top-left corner at frame t is
    ``start + t * velocity`` (it is clipped where it leaves the frame).
    """
    rng = np.random.default_rng(seed)
    background = _texture(rng, H, W)
    square = _texture(rng, SQUARE, SQUARE)
    video = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        x0, y0 = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + SQUARE, W), min(y0 + SQUARE, H)
        if xb > xa and yb > ya:
            video[t, ya:yb, xa:xb] = square[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return video


def ground_truth(points0, velocity, num_frames):
    """Edge-pixel positions `[N, T, 2]` of square points given at frame 0."""
    steps = np.arange(num_frames, dtype=np.float32)[None, :, None] * np.asarray(velocity, np.float32)
    return points0[:, None, :] + steps


TRACKERS = [
    LucasKanadeTracker(),
    DenseFlowTracker(method="dis"),
    DenseFlowTracker(method="farneback"),
    PatchMatchTracker(),
]
IDS = [t.name for t in TRACKERS]

T_MOVE, START, VELOCITY = 8, (20, 30), (3, 2)
# Points inside the square at frame 0 (pixel centres and sub-pixel positions), edge convention.
POINTS0 = np.array([[36.5, 46.5], [32.5, 49.5], [40.0, 42.0], [30.25, 40.75]], np.float32)


@pytest.fixture(scope="module")
def moving_video():
    return make_video(T_MOVE, START, VELOCITY)


@pytest.mark.parametrize("tracker", TRACKERS, ids=IDS)
def test_tracks_translating_square(tracker, moving_video):
    queries = np.concatenate([np.zeros((len(POINTS0), 1), np.float32), POINTS0], axis=1)
    tracks, visible = tracker(moving_video, queries)
    assert tracks.shape == (len(POINTS0), T_MOVE, 2) and tracks.dtype == np.float32
    assert visible.shape == (len(POINTS0), T_MOVE) and visible.dtype == bool
    gt = ground_truth(POINTS0, VELOCITY, T_MOVE)
    np.testing.assert_array_equal(tracks[:, 0], POINTS0)
    assert np.linalg.norm(tracks - gt, axis=-1).max() < 1.0
    assert visible.all()


@pytest.mark.parametrize("tracker", TRACKERS, ids=IDS)
def test_query_in_the_middle_tracks_backward(tracker, moving_video):
    t0 = 5
    gt = ground_truth(POINTS0, VELOCITY, T_MOVE)
    queries = np.concatenate([np.full((len(POINTS0), 1), t0, np.float32), gt[:, t0]], axis=1)
    tracks, visible = tracker.track(moving_video, queries)
    np.testing.assert_array_equal(tracks[:, t0], gt[:, t0])
    assert np.linalg.norm(tracks - gt, axis=-1).max() < 1.0  # frames 0..4 come from backward tracking
    assert visible.all()


@pytest.mark.parametrize("tracker", TRACKERS, ids=IDS)
def test_mixed_query_frames(tracker, moving_video):
    gt = ground_truth(POINTS0[:2], VELOCITY, T_MOVE)
    queries = np.array([[2, *gt[0, 2]], [7, *gt[1, 7]]], np.float32)
    tracks, visible = tracker(moving_video, queries)
    assert np.linalg.norm(tracks - gt, axis=-1).max() < 1.0
    assert visible[0, 2] and visible[1, 7]


@pytest.mark.parametrize("tracker", TRACKERS, ids=IDS)
def test_point_leaving_the_frame_is_not_visible(tracker):
    num_frames, start, velocity = 14, (50, 32), (4, 0)
    video = make_video(num_frames, start, velocity, seed=1)
    points0 = np.array([[66.5, 46.5], [60.5, 52.5]], np.float32)
    queries = np.concatenate([np.zeros((2, 1), np.float32), points0], axis=1)
    tracks, visible = tracker(video, queries)
    gt = ground_truth(points0, velocity, num_frames)
    outside = gt[..., 0] > W + 1  # well beyond the right border
    assert outside.sum() >= 8
    assert not visible[outside].any()
    inside = gt[..., 0] < W - 8  # whole neighbourhood still in the frame
    assert visible[inside].all()
    assert np.linalg.norm(tracks - gt, axis=-1)[inside].max() < 1.0


def test_static_background_points_stay_put(moving_video):
    queries = np.array([[0, 80.5, 10.5], [3, 8.5, 88.5]], np.float32)
    for tracker in TRACKERS:
        tracks, visible = tracker(moving_video, queries)
        assert np.abs(tracks - queries[:, None, 1:]).max() < 0.5, tracker.name
        assert visible.all(), tracker.name


def test_empty_queries(moving_video):
    for tracker in TRACKERS:
        tracks, visible = tracker(moving_video, np.zeros((0, 3), np.float32))
        assert tracks.shape == (0, T_MOVE, 2) and visible.shape == (0, T_MOVE)


def test_names_and_thresholds():
    assert LucasKanadeTracker.name == "lucas_kanade"
    assert DenseFlowTracker("farneback").name == "dense_flow_farneback"
    assert PatchMatchTracker(score_threshold=0.8).score_threshold == 0.8
    assert LucasKanadeTracker(fb_threshold=2.0).fb_threshold == 2.0
    assert DenseFlowTracker(ncc_threshold=None).ncc_threshold is None
    assert "fb_threshold=1.0" in repr(LucasKanadeTracker())


def test_bad_inputs(moving_video):
    tracker = PatchMatchTracker()
    good = np.array([[0, 10, 10]], np.float32)
    with pytest.raises(ValueError, match=r"video has shape \(8, 96, 96\); expected uint8 \[T, H, W, 3\]"):
        tracker(moving_video[..., 0], good)
    with pytest.raises(ValueError, match="video has dtype float32"):
        tracker(moving_video.astype(np.float32), good)
    with pytest.raises(ValueError, match=r"queries has shape \(1, 2\)"):
        tracker(moving_video, good[:, :2])
    with pytest.raises(ValueError, match="t=8.0"):
        tracker(moving_video, np.array([[8, 10, 10]], np.float32))
    with pytest.raises(ValueError, match="t=1.5"):
        tracker(moving_video, np.array([[1.5, 10, 10]], np.float32))
    with pytest.raises(ValueError, match=r"\(x, y\)=\(97.0, 10.0\)"):
        tracker(moving_video, np.array([[0, 97, 10]], np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        tracker(moving_video, np.array([[0, np.nan, 10]], np.float32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="method='raft'"):
        DenseFlowTracker(method="raft")
    with pytest.raises(ValueError, match="fb_threshold=-1"):
        LucasKanadeTracker(fb_threshold=-1)
    with pytest.raises(ValueError, match="patch_size=14"):
        PatchMatchTracker(patch_size=14)
    with pytest.raises(ValueError, match="score_threshold=2"):
        PatchMatchTracker(score_threshold=2)
    with pytest.raises(ValueError, match="ncc_threshold=1.5"):
        LucasKanadeTracker(ncc_threshold=1.5)
    with pytest.raises(ValueError, match="max_level=-1"):
        LucasKanadeTracker(max_level=-1)
