"""Corrupt files name themselves (issue 18): a truncated or corrupted cache, record or config raises an error naming
the file (not a bare BadZipFile / UnpicklingError / JSONDecodeError); a corrupt cache entry is named in a warning and
recomputed."""

import numpy as np
import pytest

from difftrack import cag_eval, fileio
from difftrack.experiments import cag as cag_exp
from difftrack.experiments.analysis import load_cached
from difftrack.experiments.analysis import record_stem as cache_key
from difftrack.inspect_attn import QKInspector
from difftrack.runners import load_pipeline, pipeline_class


def test_broken_model_index_json_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline", ')
    for f in (pipeline_class, load_pipeline):
        with pytest.raises(ValueError, match=r"cannot read diffusers pipeline index '.*model_index\.json' "
                                             r"\(truncated or corrupted\?\): JSONDecodeError"):
            f(str(tmp_path))
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"model_index\.json' holds a list; expected a JSON object"):
        pipeline_class(str(tmp_path))


def test_qkinspector_load_names_a_truncated_file(tmp_path):
    insp = QKInspector(np.array([[8.0, 8.0]], np.float32), 4.0, 2, 2)
    good = tmp_path / "insp.npz"
    insp.save(good)
    assert QKInspector.load(good).S == 2
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(fileio.CorruptFileError, match=r"cannot read QKInspector file '.*truncated\.npz' "
                                                      r"\(truncated or corrupted\?\): BadZipFile"):
        QKInspector.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz' is not a QKInspector file"):
        QKInspector.load(other)
    with pytest.raises(FileNotFoundError):
        QKInspector.load(tmp_path / "missing.npz")


def test_cached_analysis_record_corrupt_is_named(tmp_path):
    item = dict(kind="exact", family="objects", seed=0)
    stem = tmp_path / cache_key(item, 2, 4)
    rec_path, vid_path = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + "_video.npy")
    np.save(vid_path, np.zeros((3, 8, 8, 3), np.uint8))
    rec_path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"cannot read cached analysis record '.*\.npz' .*rerun "
                                         r"analysis\.run_dataset"):
        load_cached(tmp_path, item, 2, 4)
    vid_path.write_bytes(vid_path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read cached analysis video '.*_video\.npy'"):
        load_cached(tmp_path, item, 2, 4)


def test_cag_video_cache_recomputes_a_corrupt_entry(tmp_path, monkeypatch):
    calls = []

    def fake_generate(pipe, prompts, seeds, *a, step_times=None, **k):
        calls.append(list(seeds))
        if step_times is not None:
            step_times.extend([0.1, 0.1])
        return np.stack([np.full((2, 4, 4, 3), s, np.uint8) for s in seeds])

    monkeypatch.setattr(cag_eval, "generate_videos", fake_generate)
    items = [dict(index=i, prompt="p", noise_seed=10 + i) for i in range(3)]
    cag_exp.generate_cached(None, items, tmp_path, log=None)
    assert calls == [[10, 11, 12]]
    p = cag_exp.video_path(tmp_path, 1, 11)
    p.write_bytes(p.read_bytes()[:-5])  # a crash / full disk left it short
    with pytest.raises(ValueError, match=r"cannot read cached CAG video '.*0001_seed11\.npy'.*generate phase"):
        cag_exp.load_cached(tmp_path, items)
    with pytest.warns(UserWarning, match=r"cached video '.*0001_seed11\.npy' is corrupt .* recomputed"):
        cag_exp.generate_cached(None, items, tmp_path, log=None)
    assert calls[-1] == [10, 11, 12]  # its whole batch, as first generated: a video depends on its batch
    assert [int(v[0, 0, 0, 0]) for v in cag_exp.load_cached(tmp_path, items)] == [10, 11, 12]


def test_broken_json_files_are_named(tmp_path):
    from difftrack.experiments.tracking import load_benchmark_table

    bad = tmp_path / "tracking_benchmark.json"
    bad.write_text('{"table": [')
    with pytest.raises(ValueError, match=r"cannot read benchmark table '.*tracking_benchmark\.json'"):
        load_benchmark_table(bad)
    summary = tmp_path / "analysis_summary.json"
    summary.write_text("{oops")
    with pytest.raises(ValueError, match=r"cannot read analysis summary '.*analysis_summary\.json'"):
        cag_exp.layer_sets(summary)


def test_num_steps_zero_is_named():
    """num_steps=0 used to fail later with "indices in -0..-1" (issue 18)."""
    from difftrack import mini
    from difftrack.runners import VideoRunner

    with pytest.raises(ValueError, match=r"num_steps=0; allowed: an int >= 1"):
        QKInspector(np.zeros((1, 2), np.float32), 4.0, 0, 2)
    with pytest.raises(ValueError, match=r"num_steps=0; allowed: an int >= 1"):
        VideoRunner(mini.build_untrained(0)).timesteps(0)
