"""difftrack.experiments.tracking: benchmark tables read back (moved from test_viz_tracks.py with the function) and
the tracking_benchmark.json record."""
import json

import pytest

from conftest import with_schema
from difftrack.experiments.tracking import TrackingBenchmark, load_benchmark_table


def test_load_benchmark_table(tmp_path):
    rows = [{"method": "DiffTracker", "average_jaccard": 50.0}, {"method": "LK", "average_jaccard": 30.0}]
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"config": {"n": 2}, "table": rows}))
    df = load_benchmark_table(p)
    assert list(df.index) == ["DiffTracker", "LK"] and df.attrs["meta"] == {"config": {"n": 2}}
    p2 = tmp_path / "b.json"
    p2.write_text(json.dumps({"DiffTracker": {"average_jaccard": 50.0}}))
    assert load_benchmark_table(p2).loc["DiffTracker", "average_jaccard"] == 50.0
    p3 = tmp_path / "c.csv"
    p3.write_text("method,average_jaccard\nDiffTracker,50\n")
    assert load_benchmark_table(p3).loc["DiffTracker", "average_jaccard"] == 50


def test_tracking_benchmark_record(tmp_path):
    from difftrack.experiments import RecordError, read_record, write_record
    from difftrack.paths import results_dir

    path = results_dir() / "tracking_benchmark.json"
    rec = read_record(TrackingBenchmark, path)
    assert "difftrack" in rec.methods and rec.settings["query_mode"] == "first"
    original = json.loads(path.read_text())
    back = json.loads(write_record(tmp_path / "t.json", rec, clean=False).read_text())
    expected = with_schema(original, "tracking_benchmark/1")
    assert back == expected and list(back) == list(expected)
    (tmp_path / "m.json").write_text(json.dumps({"methods": {"a": {"average_jaccard": 1.0}}}))
    with pytest.raises(RecordError, match=r"tracking benchmark '.*m\.json' misses the key 'settings'"):
        read_record(TrackingBenchmark, tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({"settings": {}, "methods": {"a": 1.0}}))
    with pytest.raises(RecordError, match=r"methods\['a'\] is a float; expected a JSON object"):
        read_record(TrackingBenchmark, tmp_path / "m.json")
    assert load_benchmark_table(path).loc["difftrack", "average_jaccard"] == rec.methods["difftrack"]["average_jaccard"]


def _still_tapvid(tmp_path, n_videos=3, frames=5):
    """A TAP-Vid pickle of still videos: every point stays where it is and is always visible."""
    import numpy as np

    from difftrack.tapvid import save_tapvid_pickle

    rng = np.random.default_rng(0)
    vids = {}
    for i in range(n_videos):
        pts = rng.uniform(0.2, 0.8, (6, 1, 2)).astype(np.float32).repeat(frames, 1)
        vids[f"v{i}"] = dict(video=(rng.random((frames, 32, 48, 3)) * 255).astype(np.uint8), points=pts,
                             occluded=np.zeros((6, frames), bool))
    save_tapvid_pickle(vids, tmp_path / "tapvid.pkl")
    return tmp_path / "tapvid.pkl"


class _Stay:
    """Tracks every query where it is, visible everywhere (perfect on still videos)."""

    def __init__(self, calls, fail_at=None):
        self.calls, self.fail_at = calls, fail_at

    def __call__(self, video, queries):
        import numpy as np

        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        self.calls.append(len(video))
        return np.repeat(queries[:, None, 1:], len(video), 1), np.ones((len(queries), len(video)), bool)


def test_tapvid_evaluation_scores_resumes_from_its_cache_and_limits(tmp_path):
    """evaluate_tapvid: a perfect tracker on still videos scores 1.0; a run killed at the second video keeps the
    first one cached and the next run tracks only the missing ones; --max-frames / --max-videos apply; other settings
    never reuse the cache."""
    from difftrack.experiments.tracking import evaluate_tapvid

    path = _still_tapvid(tmp_path)
    calls: list = []
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_tapvid({"stay": lambda: _Stay(calls, fail_at=1)}, path, tmp_path / "c", (16, 16), max_frames=4,
                        progress=False)
    assert calls == [4]  # one video done and cached, 4 frames kept
    res = evaluate_tapvid({"stay": lambda: _Stay(calls)}, path, tmp_path / "c", (16, 16), max_frames=4,
                          progress=False)
    assert calls == [4, 4, 4] and res["videos"] == ["v0", "v1", "v2"]  # resumed: only the two missing videos
    m = res["methods"]["stay"]["metrics"]
    assert m["average_pts_within_thresh"] == pytest.approx(1.0) and m["average_jaccard"] == pytest.approx(1.0)
    assert len(res["methods"]["stay"]["per_video"]["average_jaccard"]) == 3
    evaluate_tapvid({"stay": lambda: _Stay(calls)}, path, tmp_path / "c", (16, 16), max_frames=4, progress=False)
    assert len(calls) == 3  # everything cached
    res = evaluate_tapvid({"stay": lambda: _Stay(calls)}, path, tmp_path / "c", (16, 16), max_frames=3, max_videos=2,
                          progress=False)
    assert calls[3:] == [3, 3] and res["videos"] == ["v0", "v1"]  # other limits: a cache of their own
    with pytest.raises(ValueError, match=r"max_frames=0; allowed: None or an integer >= 1"):
        evaluate_tapvid({"stay": lambda: _Stay(calls)}, path, tmp_path / "c", (16, 16), max_frames=0)
