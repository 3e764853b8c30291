"""difftrack.experiments.cag: layer sets read back from the analysis summary, the settings, JSON cleaning (moved
from test_cag_eval.py with the functions), and the cag.json / prompt-agreement records."""
import json

import numpy as np
import pytest

from conftest import with_schema
from difftrack.experiments import cag as X
from difftrack.experiments import json_clean


def test_settings_layers_and_json(tmp_path):
    ls = X.layer_sets(tmp_path / "missing.json")
    assert ls["top3"] == [8, 11, 5] and ls["bottom3"] == [0, 6, 9] and "defaults" in ls["source"]
    (tmp_path / "a.json").write_text(json.dumps({"best_layers_top3": [1, 2, 3], "layer_ranking": list(range(12))}))
    ls = X.layer_sets(tmp_path / "a.json")
    assert ls["top3"] == [1, 2, 3] and ls["bottom3"] == [9, 10, 11]
    st = X.cag_settings(ls, [0.5, 2])
    assert list(st) == ["none", "top3_s0.5", "bottom3_s0.5", "top3_s2", "bottom3_s2"]
    assert json.loads(json.dumps(json_clean({"a": float("nan"), "b": np.float32(1.5)}))) == {"a": None, "b": 1.5}


def _committed(name):
    from difftrack.paths import results_dir

    return results_dir() / name


@pytest.mark.parametrize("cls,name", [(X.CagResult, "cag.json"), (X.CagResult, "cag_notebook.json"),
                                      (X.PromptAgreement, "mini_prompt_agreement.json")])
def test_records_read_the_committed_results_and_round_trip(tmp_path, cls, name):
    from difftrack.experiments import read_record, write_record

    path = _committed(name)
    rec = read_record(cls, path)
    original = json.loads(path.read_text())
    back = json.loads(write_record(tmp_path / name, rec).read_text())
    expected = with_schema(original, cls.SCHEMA)
    assert back == expected and list(back) == list(expected)
    assert cls.from_json(json.loads((tmp_path / name).read_text())).to_json() == back


def test_records_name_the_file_and_the_missing_key(tmp_path):
    from difftrack.experiments import RecordError, read_record

    d = json.loads(_committed("cag.json").read_text())
    p = tmp_path / "cag.json"
    p.write_text(json.dumps({k: v for k, v in d.items() if k != "protocol"}))
    with pytest.raises(RecordError, match=r"CAG result '.*cag\.json' misses the key 'protocol'"):
        read_record(X.CagResult, p)
    d["settings"]["none"].pop("summary")
    p.write_text(json.dumps(d))
    with pytest.raises(RecordError, match=r"'.*cag\.json': settings\['none'\] misses the key 'summary'"):
        read_record(X.CagResult, p)
    p.write_text(json.dumps({"n_videos": 2, "agreement": 0.5, "protocol": {}}))
    with pytest.raises(RecordError, match=r"prompt agreement result '.*cag\.json' misses the key 'generated'"):
        read_record(X.PromptAgreement, p)
    p.write_text("[1]")
    with pytest.raises(RecordError, match=r"holds a list; expected a JSON object"):
        read_record(X.PromptAgreement, p)


def test_non_finite_values_are_written_as_null(tmp_path):
    from difftrack.experiments import write_record

    rec = X.CagResult(protocol={"steps": 2}, settings={"none": dict(layer_set="none", scale=0.0,
                                                                    summary={"agree": {"mean": np.float32(np.nan)}})})
    back = json.loads(write_record(tmp_path / "c.json", rec).read_text())
    assert back == {"schema": "cag/1", "protocol": {"steps": 2},
                    "settings": {"none": {"layer_set": "none", "scale": 0.0, "summary": {"agree": {"mean": None}}}}}
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed over the target


def test_cached_videos_of_other_weights_are_generated_again(tmp_path, monkeypatch):
    import torch

    from difftrack import cag_eval

    calls = []

    def fake_generate(pipe, prompts, seeds, *a, step_times=None, **k):
        calls.append(list(seeds))
        step_times.extend([0.1, 0.1])
        return np.stack([np.full((2, 4, 4, 3), s, np.uint8) for s in seeds])

    monkeypatch.setattr(cag_eval, "generate_videos", fake_generate)
    torch.manual_seed(0)
    old, new = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    items = [dict(index=i, prompt="p", noise_seed=10 + i) for i in range(2)]
    X.generate_cached(old, items, tmp_path, log=None)
    X.generate_cached(old, items, tmp_path, log=None)  # same weights: every video reused
    assert calls == [[10, 11]]
    with pytest.warns(UserWarning, match=r"made by other weights .* 2 files deleted and generated again"):
        X.generate_cached(new, items, tmp_path, log=None)
    assert calls == [[10, 11], [10, 11]]
    with torch.no_grad():
        new.weight[1, 2] += 1e-3  # one weight changed in place
    with pytest.warns(UserWarning, match="made by other weights"):
        X.generate_cached(new, items, tmp_path, log=None)
    assert len(calls) == 3
