"""Tests for difftrack.tapvid: metrics on hand-computed cases, conversions, samplers, loader."""

import os
import pickle
import re

import cv2
import numpy as np
import pytest

from difftrack import tapvid

THRESHOLDS = (1, 2, 4, 8, 16)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _two_track_case(query_frame_b: int):
    """Two tracks over 4 frames (batch of one).

    Track A: gt (10, 10), always visible; predicted visible at distances 0, 0.5, 3, 10.
    Track B: gt (30, 40), occluded at frame 2; predicted at distances 0, 1.5, 0, 0,
    predicted visible at frames 0-2 (frame 2 is a false positive) and occluded at frame 3.
    """
    gt_tracks = np.zeros((1, 2, 4, 2), np.float32)
    gt_tracks[0, 0] = (10, 10)
    gt_tracks[0, 1] = (30, 40)
    gt_occluded = np.zeros((1, 2, 4), bool)
    gt_occluded[0, 1, 2] = True
    pred_tracks = gt_tracks.copy()
    pred_tracks[0, 0, 1] = (10.5, 10)  # 0.5
    pred_tracks[0, 0, 2] = (10, 13)  # 3
    pred_tracks[0, 0, 3] = (20, 10)  # 10
    pred_tracks[0, 1, 1] = (31.5, 40)  # 1.5
    pred_occluded = np.zeros((1, 2, 4), bool)
    pred_occluded[0, 1, 3] = True
    # (t, y, x)
    query_points = np.array([[[0, 10, 10], [query_frame_b, 40, 30]]], np.float32)
    return query_points, gt_occluded, gt_tracks, pred_occluded, pred_tracks


def _check(metrics, expected):
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].shape == (1,), key
        np.testing.assert_allclose(metrics[key][0], value, rtol=0, atol=1e-12, err_msg=key)


def _expected(oa, within, jaccard):
    out = {"occlusion_accuracy": oa}
    for thr, w, j in zip(THRESHOLDS, within, jaccard):
        out[f"pts_within_{thr}"] = w
        out[f"jaccard_{thr}"] = j
    out["average_pts_within_thresh"] = np.mean(within)
    out["average_jaccard"] = np.mean(jaccard)
    return out


def test_metrics_first_both_queries_at_frame_0():
    # Evaluated: A at 1,2,3 (gt visible, d = .5, 3, 10); B at 1 (d 1.5), 2 (gt occ, pred vis), 3 (pred occ, d 0).
    # OA: A 3/3; B frame 1 ok, 2 wrong, 3 wrong -> 4/6.
    # within (of 5 gt-visible): d<1: A1,B3; d<2: +B1; d<4: +A2; d<8: same; d<16: +A3.
    # Jaccard TP excludes B3 (predicted occluded); FP = pred visible & (gt occ | far).
    #   1: TP A1, FP A2 A3 B1 B2 -> 1/9;  2: TP A1 B1, FP A2 A3 B2 -> 2/8
    #   4, 8: TP A1 A2 B1, FP A3 B2 -> 3/7;  16: TP A1 A2 A3 B1, FP B2 -> 4/6
    metrics = tapvid.compute_tapvid_metrics(*_two_track_case(0), query_mode="first")
    _check(metrics, _expected(4 / 6, [2 / 5, 3 / 5, 4 / 5, 4 / 5, 5 / 5], [1 / 9, 2 / 8, 3 / 7, 3 / 7, 4 / 6]))


def test_metrics_first_query_at_frame_1():
    # B evaluated at 2, 3 only. gt visible: A1 A2 A3 B3 (4). OA: 3 + 0 of 5.
    #   1: TP A1, FP A2 A3 B2 -> 1/7;  2: same -> 1/7;  4, 8: TP A1 A2, FP A3 B2 -> 2/6;  16: TP 3, FP B2 -> 3/5
    metrics = tapvid.compute_tapvid_metrics(*_two_track_case(1), query_mode="first")
    _check(metrics, _expected(3 / 5, [2 / 4, 2 / 4, 3 / 4, 3 / 4, 4 / 4], [1 / 7, 1 / 7, 2 / 6, 2 / 6, 3 / 5]))


def test_metrics_strided_query_at_frame_1():
    # B evaluated at 0, 2, 3 (everything but its query frame). gt visible: A1 A2 A3 B0 B3 (5).
    # OA: A 3, B frame 0 ok -> 4/6.
    #   1, 2: TP A1 B0, FP A2 A3 B2 -> 2/8;  4, 8: TP A1 A2 B0, FP A3 B2 -> 3/7;  16: TP 4, FP B2 -> 4/6
    metrics = tapvid.compute_tapvid_metrics(*_two_track_case(1), query_mode="strided")
    _check(metrics, _expected(4 / 6, [3 / 5, 3 / 5, 4 / 5, 4 / 5, 5 / 5], [2 / 8, 2 / 8, 3 / 7, 3 / 7, 4 / 6]))


def test_metrics_per_video_batch():
    a = _two_track_case(0)
    b = _two_track_case(1)
    batch = [np.concatenate([x, y]) for x, y in zip(a, b)]
    metrics = tapvid.compute_tapvid_metrics(*batch, query_mode="first")
    assert metrics["occlusion_accuracy"].shape == (2,)
    np.testing.assert_allclose(metrics["occlusion_accuracy"], [4 / 6, 3 / 5])
    np.testing.assert_allclose(metrics["pts_within_1"], [2 / 5, 2 / 4])


def test_metrics_threshold_is_strict():
    q = np.zeros((1, 1, 3), np.float32)
    occ = np.zeros((1, 1, 2), bool)
    gt = np.zeros((1, 1, 2, 2), np.float32)
    pred = gt.copy()
    pred[0, 0, 1] = (3.0, 4.0)  # distance exactly 5
    m = tapvid.compute_tapvid_metrics(q, occ, gt, occ, pred, "first", thresholds=(5, 6))
    assert m["pts_within_5"][0] == 0.0 and m["pts_within_6"][0] == 1.0
    assert m["jaccard_5"][0] == 0.0 and m["jaccard_6"][0] == 1.0


def test_metrics_perfect_prediction():
    case = _two_track_case(0)
    q, gt_occ, gt_tracks = case[:3]
    m = tapvid.compute_tapvid_metrics(q, gt_occ, gt_tracks, gt_occ.copy(), gt_tracks.copy(), "strided")
    for value in m.values():
        assert value[0] == 1.0


def test_metrics_bad_query_mode():
    with pytest.raises(ValueError, match="'last'"):
        tapvid.compute_tapvid_metrics(*_two_track_case(0), query_mode="last")


def test_metrics_bad_shapes():
    q, gt_occ, gt_tracks, pred_occ, pred_tracks = _two_track_case(0)
    with pytest.raises(ValueError, match=r"pred_tracks has shape \(1, 2, 3, 2\)"):
        tapvid.compute_tapvid_metrics(q, gt_occ, gt_tracks, pred_occ, pred_tracks[:, :, :3], "first")
    with pytest.raises(ValueError, match=r"gt_tracks has shape \(2, 4, 2\); expected \[B, N, T, 2\]"):
        tapvid.compute_tapvid_metrics(q, gt_occ, gt_tracks[0], pred_occ, pred_tracks, "first")
    with pytest.raises(ValueError, match="pred_occluded has dtype float32; expected bool"):
        tapvid.compute_tapvid_metrics(q, gt_occ, gt_tracks, pred_occ.astype(np.float32), pred_tracks, "first")
    with pytest.raises(ValueError, match="query frame"):
        tapvid.compute_tapvid_metrics(q + np.array([9, 0, 0], np.float32), gt_occ, gt_tracks, pred_occ,
                                      pred_tracks, "first")


def test_summary_table():
    metrics = tapvid.compute_tapvid_metrics(
        *[np.concatenate([x, y]) for x, y in zip(_two_track_case(0), _two_track_case(1))], query_mode="first"
    )
    table = tapvid.summary_table(metrics, name="toy")
    assert list(table.index) == ["toy"]
    assert list(table.columns[:3]) == ["average_jaccard", "average_pts_within_thresh", "occlusion_accuracy"]
    assert list(table.columns[3:8]) == [f"jaccard_{t}" for t in THRESHOLDS]
    assert list(table.columns[8:13]) == [f"pts_within_{t}" for t in THRESHOLDS]
    assert table.loc["toy", "n_videos"] == 2
    np.testing.assert_allclose(table.loc["toy", "occlusion_accuracy"], 100 * (4 / 6 + 3 / 5) / 2)
    both = tapvid.summary_table({"a": metrics, "b": metrics})
    assert list(both.index) == ["a", "b"]
    with pytest.raises(ValueError, match="empty"):
        tapvid.summary_table({})


# --------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------


def test_query_order_round_trip():
    rng = np.random.default_rng(0)
    q_txy = rng.random((2, 5, 3)).astype(np.float32)
    q_tyx = tapvid.queries_txy_to_tyx(q_txy)
    np.testing.assert_array_equal(q_tyx[..., 0], q_txy[..., 0])
    np.testing.assert_array_equal(q_tyx[..., 1], q_txy[..., 2])
    np.testing.assert_array_equal(q_tyx[..., 2], q_txy[..., 1])
    np.testing.assert_array_equal(tapvid.queries_tyx_to_txy(q_tyx), q_txy)
    with pytest.raises(ValueError, match=r"queries has shape \(5, 2\)"):
        tapvid.queries_txy_to_tyx(np.zeros((5, 2)))


def test_track_layout_round_trips():
    rng = np.random.default_rng(1)
    nt2 = rng.random((4, 6, 2)).astype(np.float32)
    bnt2 = tapvid.tracks_nt2_to_bnt2(nt2)
    assert bnt2.shape == (1, 4, 6, 2)
    np.testing.assert_array_equal(tapvid.tracks_bnt2_to_nt2(bnt2), nt2)
    btn2 = tapvid.tracks_bnt2_to_btn2(bnt2)
    assert btn2.shape == (1, 6, 4, 2)
    np.testing.assert_array_equal(btn2[0, 3, 2], nt2[2, 3])
    np.testing.assert_array_equal(tapvid.tracks_btn2_to_bnt2(btn2), bnt2)
    flags = rng.random((4, 6)) > 0.5
    np.testing.assert_array_equal(tapvid.tracks_bnt2_to_nt2(tapvid.tracks_nt2_to_bnt2(flags)), flags)
    np.testing.assert_array_equal(tapvid.occluded_to_visible(tapvid.visible_to_occluded(flags)), flags)
    assert not np.any(tapvid.visible_to_occluded(flags) == flags)
    with pytest.raises(ValueError, match=r"tracks has shape \(2, 4, 6, 2\); expected \[1, N, T, 2\]"):
        tapvid.tracks_bnt2_to_nt2(np.zeros((2, 4, 6, 2)))
    with pytest.raises(ValueError, match="visible has dtype float64"):
        tapvid.visible_to_occluded(np.zeros((2, 3)))


def test_pixel_conversions_round_trip_and_edges():
    rng = np.random.default_rng(2)
    pts = rng.random((3, 7, 2)).astype(np.float32)
    px = tapvid.tapvid_to_pixels(pts, 480, 720)
    np.testing.assert_allclose(px[..., 0], pts[..., 0] * 720, rtol=1e-6)
    np.testing.assert_allclose(px[..., 1], pts[..., 1] * 480, rtol=1e-6)
    np.testing.assert_allclose(tapvid.pixels_to_tapvid(px, 480, 720), pts, rtol=1e-6)
    # edge convention: 0 and 1 map to the image borders, 0.5 to the centre
    corners = np.array([[0, 0], [1, 1], [0.5, 0.5]], np.float32)
    np.testing.assert_array_equal(tapvid.tapvid_to_pixels(corners, 256, 512), [[0, 0], [512, 256], [256, 128]])
    with pytest.raises(ValueError, match="expected a \\(height, width\\)"):
        tapvid.tapvid_to_pixels(pts, 0, 10)


def test_rescale_round_trip():
    rng = np.random.default_rng(3)
    tracks = (rng.random((5, 9, 2)) * [720, 480]).astype(np.float32)
    to256 = tapvid.rescale_tracks(tracks, (480, 720), (256, 256))
    np.testing.assert_allclose(to256, tracks * [256 / 720, 256 / 480], rtol=1e-5)
    np.testing.assert_allclose(tapvid.rescale_tracks(to256, (256, 256), (480, 720)), tracks, rtol=1e-5)
    # same as going through normalised coordinates
    np.testing.assert_allclose(
        to256, tapvid.tapvid_to_pixels(tapvid.pixels_to_tapvid(tracks, 480, 720), 256, 256), rtol=1e-5
    )
    queries = np.array([[3, 360, 240]], np.float32)
    np.testing.assert_allclose(tapvid.rescale_queries(queries, (480, 720), (256, 256)), [[3, 128, 128]])


# --------------------------------------------------------------------------------------
# Samplers and resizing
# --------------------------------------------------------------------------------------


def _toy_tracks():
    occluded = np.array(
        [
            [True, False, False, True, False, False],  # first visible at 1
            [True, True, True, True, True, True],  # never visible: dropped by "first"
            [False, False, True, True, False, True],  # first visible at 0
        ]
    )
    points = np.arange(3 * 6 * 2, dtype=np.float32).reshape(3, 6, 2) / 100.0
    return occluded, points


def test_sample_queries_first():
    occluded, points = _toy_tracks()
    video = np.zeros((6, 4, 5, 3), np.uint8)
    out = tapvid.sample_queries_first(occluded, points, video)
    assert out["video"].shape == (1, 6, 4, 5, 3)
    assert out["query_points"].shape == (1, 2, 3)
    np.testing.assert_array_equal(out["occluded"][0], occluded[[0, 2]])
    np.testing.assert_array_equal(out["target_points"][0], points[[0, 2]])
    # (t, y, x)
    np.testing.assert_allclose(out["query_points"][0, 0], [1, points[0, 1, 1], points[0, 1, 0]])
    np.testing.assert_allclose(out["query_points"][0, 1], [0, points[2, 0, 1], points[2, 0, 0]])
    assert "video" not in tapvid.sample_queries_first(occluded, points)


def test_sample_queries_strided():
    occluded, points = _toy_tracks()
    out = tapvid.sample_queries_strided(occluded, points, stride=2)
    # frame 0: track 2; frame 2: track 0; frame 4: tracks 0 and 2
    np.testing.assert_array_equal(out["trackgroup"][0], [2, 0, 0, 2])
    np.testing.assert_array_equal(out["query_points"][0, :, 0], [0, 2, 4, 4])
    np.testing.assert_allclose(out["query_points"][0, 1, 1:], points[0, 2, ::-1])
    np.testing.assert_array_equal(out["occluded"][0], occluded[[2, 0, 0, 2]])
    # every query is visible in its own track
    for (t, y, x), occ, pts in zip(out["query_points"][0], out["occluded"][0], out["target_points"][0]):
        assert not occ[int(t)]
        np.testing.assert_allclose(pts[int(t)], [x, y])
    with pytest.raises(ValueError, match="stride=0"):
        tapvid.sample_queries_strided(occluded, points, stride=0)


def test_samplers_and_metrics_agree_on_perfect_predictions():
    occluded, points = _toy_tracks()
    px = tapvid.tapvid_to_pixels(points, 256, 256)
    for mode, sampler in (("first", tapvid.sample_queries_first), ("strided", tapvid.sample_queries_strided)):
        s = sampler(occluded, px)
        m = tapvid.compute_tapvid_metrics(
            s["query_points"], s["occluded"], s["target_points"], s["occluded"], s["target_points"], mode
        )
        assert m["average_jaccard"][0] == 1.0


def test_sampler_validation():
    occluded, points = _toy_tracks()
    with pytest.raises(ValueError, match=r"points has shape \(3, 5, 2\)"):
        tapvid.sample_queries_first(occluded, points[:, :5])
    with pytest.raises(ValueError, match="occluded has dtype int64; expected bool"):
        tapvid.sample_queries_first(occluded.astype(np.int64), points)


def test_resize_video_interpolation():
    rng = np.random.default_rng(4)
    video = rng.integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    small = tapvid.resize_video(video, (20, 30))
    assert small.shape == (2, 20, 30, 3) and small.dtype == np.uint8
    np.testing.assert_array_equal(small[1], cv2.resize(video[1], (30, 20), interpolation=cv2.INTER_AREA))
    big = tapvid.resize_video(video, (80, 90))
    np.testing.assert_array_equal(big[0], cv2.resize(video[0], (90, 80), interpolation=cv2.INTER_LINEAR))
    same = tapvid.resize_video(video, (40, 60))
    np.testing.assert_array_equal(same, video)
    assert same is not video
    with pytest.raises(ValueError, match="video has dtype float32"):
        tapvid.resize_video(video.astype(np.float32), (20, 30))
    with pytest.raises(ValueError, match=r"size=\(0, 30\)"):
        tapvid.resize_video(video, (0, 30))


# --------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------


def _smooth_video(rng, t, h, w):
    base = rng.random((t, 4, 4, 3)).astype(np.float32)
    frames = [cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in base]
    return (np.clip(np.stack(frames), 0, 1) * 255).astype(np.uint8)


def _example(rng, t=5, h=24, w=32, n=3):
    return {
        "video": _smooth_video(rng, t, h, w),
        "points": rng.random((n, t, 2)).astype(np.float32),
        "occluded": rng.random((n, t)) > 0.7,
    }


def test_davis_pickle_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    data = {"zebra": _example(rng), "bear": _example(rng, t=4, n=2)}
    path = tmp_path / "tapvid_davis.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    loaded = tapvid.load_tapvid(path)
    assert iter(loaded) is loaded  # lazy iterator
    items = list(loaded)
    assert [name for name, _ in items] == ["bear", "zebra"]  # sorted
    for name, item in items:
        np.testing.assert_array_equal(item["video"], data[name]["video"])
        np.testing.assert_array_equal(item["points"], data[name]["points"])
        np.testing.assert_array_equal(item["occluded"], data[name]["occluded"])
        assert item["points"].dtype == np.float32 and item["occluded"].dtype == bool

    # save_tapvid_pickle writes the same layout
    out = tmp_path / "world.pkl"
    tapvid.save_tapvid_pickle(data, out)
    again = dict(tapvid.load_tapvid(out))
    assert sorted(again) == ["bear", "zebra"]
    np.testing.assert_array_equal(again["zebra"]["video"], data["zebra"]["video"])


def test_davis_pickle_with_jpeg_frames(tmp_path):
    rng = np.random.default_rng(6)
    ex = _example(rng)
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in ex["video"]]
    path = tmp_path / "davis.pkl"
    with open(path, "wb") as f:
        pickle.dump({"v": {**ex, "video": jpegs}}, f)
    (name, item), = list(tapvid.load_tapvid(path))
    assert item["video"].shape == ex["video"].shape
    assert np.abs(item["video"].astype(int) - ex["video"]).mean() < 4


def test_kinetics_shards_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    shards = {}
    for shard in ("0001_of_0010.pkl", "0000_of_0010.pkl"):  # written out of order on purpose
        examples = []
        for _ in range(2):
            ex = _example(rng)
            # first frame pure red, to check BGR -> RGB decoding
            ex["video"][0] = (255, 0, 0)
            ex["jpeg"] = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in ex["video"]]
            examples.append(ex)
        shards[shard] = examples
        with open(tmp_path / shard, "wb") as f:
            pickle.dump([{"video": e["jpeg"], "points": e["points"], "occluded": e["occluded"]} for e in examples], f)
    (tmp_path / "notes.txt").write_text("not a shard")

    items = list(tapvid.load_tapvid(tmp_path))
    assert [name for name, _ in items] == ["0000_of_0010/0000", "0000_of_0010/0001", "0001_of_0010/0000",
                                           "0001_of_0010/0001"]
    expected = shards["0000_of_0010.pkl"] + shards["0001_of_0010.pkl"]
    for (_, item), ex in zip(items, expected):
        assert item["video"].dtype == np.uint8 and item["video"].shape == ex["video"].shape
        assert np.abs(item["video"].astype(int) - ex["video"]).mean() < 4  # JPEG is lossy
        red = item["video"][0].reshape(-1, 3).mean(0)
        assert red[0] > 240 and red[2] < 15
        np.testing.assert_array_equal(item["points"], ex["points"])
        np.testing.assert_array_equal(item["occluded"], ex["occluded"])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tapvid.load_tapvid(tmp_path / "missing.pkl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"_of_0010\.pkl"):
        tapvid.load_tapvid(empty)
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump(42, f)
    with pytest.raises(ValueError, match="holds an object of type 'int'"):
        tapvid.load_tapvid(bad)
    broken = tmp_path / "broken.pkl"
    with open(broken, "wb") as f:
        pickle.dump({"v": {"video": np.zeros((3, 4, 4, 3), np.uint8), "points": np.zeros((2, 5, 2)),
                           "occluded": np.zeros((2, 5), bool)}}, f)
    with pytest.raises(ValueError, match=r"v: points has shape \(2, 5, 2\)"):
        list(tapvid.load_tapvid(broken))
    with pytest.raises(ValueError, match="non-empty dict"):
        tapvid.save_tapvid_pickle({}, os.fspath(tmp_path / "x.pkl"))


@pytest.mark.parametrize("change,match", [
    (lambda p: p * 64, r"points\[\d+, \d+\] = .* lies outside \[0, 1\].*pixel coordinates\?"),
    (lambda p: p - 0.5, r"points\[0, 0\] = .* lies outside \[0, 1\]"),
    (lambda p: np.where(np.arange(p.shape[1])[None, :, None] == 2, np.nan, p), r"points\[0, 2\] = \(nan, nan\) "
                                                                                r"of a visible point is not finite"),
])
def test_loader_refuses_points_not_normalised(tmp_path, change, match):
    """Points in pixels, negative or NaN used to load silently (issue 18); the error names the file and the key."""
    rng = np.random.default_rng(8)
    ex = _example(rng)
    ex["occluded"][:] = False
    ex["points"] = change(ex["points"]).astype(np.float32)
    path = tmp_path / "davis.pkl"
    with open(path, "wb") as f:
        pickle.dump({"horse": ex}, f)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": horse: " + match):
        list(tapvid.load_tapvid(path))
    with pytest.raises(ValueError, match=r"horse: points"):
        tapvid.save_tapvid_pickle({"horse": ex}, tmp_path / "out.pkl")


def test_loader_ignores_occluded_points_and_border_rounding(tmp_path):
    rng = np.random.default_rng(9)
    ex = _example(rng)
    ex["occluded"][:, 1] = True
    ex["points"][:, 1] = -5.0  # occluded: not scored, allowed
    ex["points"][0, 0] = (1.0 + 1e-6, 0.0)
    path = tmp_path / "davis.pkl"
    with open(path, "wb") as f:
        pickle.dump({"v": ex}, f)
    (_, item), = list(tapvid.load_tapvid(path))
    np.testing.assert_array_equal(item["points"], ex["points"])


def test_loader_names_a_corrupted_pickle(tmp_path):
    good = tmp_path / "davis.pkl"
    with open(good, "wb") as f:
        pickle.dump({"v": _example(np.random.default_rng(1))}, f)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle at all")
    for p in (truncated, garbage):
        with pytest.raises(ValueError, match=r"cannot read TAP-Vid pickle .*" + re.escape(p.name)):
            tapvid.load_tapvid(p)
    shards = tmp_path / "kinetics"
    shards.mkdir()
    (shards / "0000_of_0010.pkl").write_bytes(b"\x80\x04broken")
    with pytest.raises(ValueError, match=r"cannot read TAP-Vid pickle .*0000_of_0010\.pkl"):
        list(tapvid.load_tapvid(shards))
