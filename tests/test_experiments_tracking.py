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
