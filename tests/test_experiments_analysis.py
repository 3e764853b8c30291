"""difftrack.experiments.analysis: the per-video cache of run_dataset reuses a record only when everything it depends
on matches (its cache key); corrupt entries are recomputed; bad settings are named; the cached files are read back;
the analysed items, their ground truth and the table summaries; the analysis_summary.json record.
(Moved from test_analysis.py and test_inspect_attn.py with the functions.)"""
import json
import warnings

import numpy as np
import pytest

from conftest import with_schema
from difftrack import analysis
from difftrack.experiments import analysis as xa

QUERIES = np.array([[10.0, 10.0], [30.0, 20.0]], np.float32)


@pytest.fixture()
def fake(monkeypatch):
    """Stand-ins for the model-running analysis that count their calls and record the settings they got."""
    calls = []

    def fake_generation(pipe, prompt, seed, num_steps, grid_size, guidance_scale=6.0, size=None, **kw):
        calls.append(("generated", prompt, guidance_scale, kw))
        rec = analysis.Recorder(QUERIES, 4.0, num_steps, 2, 13).record(check=False)
        rec.meta = dict(kind="generated", prompt=prompt, seed=seed)
        return np.full((13, 64, 64, 3), len(calls), np.uint8), rec

    def fake_exact(pipe, sample, num_steps, grid_size=10, **kw):
        calls.append(("exact", sample.split if hasattr(sample, "split") else None, None, kw))
        rec = analysis.Recorder(QUERIES, 4.0, num_steps, 2, 13).record(check=False)
        rec.meta = dict(kind="exact")
        return rec

    monkeypatch.setattr(analysis, "analyze_generation", fake_generation)
    monkeypatch.setattr(analysis, "analyze_exact", fake_exact)
    monkeypatch.setattr(analysis, "pseudo_ground_truth",
                        lambda v, q: (np.zeros((len(q), 13, 2), np.float32), np.ones((len(q), 13), bool)))
    from test_guidance import tiny_mini_pipe

    return calls, tiny_mini_pipe()


GEN = dict(kind="generated", family="objects", seed=3, prompt="a red circle moving left on a still background")


def test_cached_record_is_reused_only_with_the_same_settings(fake, tmp_path):
    calls, pipe = fake
    run = lambda p=pipe, items=(GEN,), **kw: xa.run_dataset(p, list(items), tmp_path, num_steps=2,  # noqa: E731
                                                                  grid_size=4, progress=False, **kw)
    run()
    run()
    assert len(calls) == 1  # same settings: reused
    run(refine="argmax")
    assert len(calls) == 2 and calls[-1][3]["refine"] == "argmax"  # another matching rule: recomputed
    run(refine="argmax", guidance_scale=3.0)
    assert len(calls) == 3 and calls[-1][2] == 3.0  # another guidance: recomputed
    run(items=[dict(GEN, prompt="a blue square moving up on a still background")], refine="argmax",
        guidance_scale=3.0)
    assert len(calls) == 4  # another prompt under the same seed: recomputed
    with pytest.raises(ValueError, match=r"other settings.*match.*'refine': 'argmax'.*'refine': 'softargmax'"):
        run(p=None, items=[dict(GEN, prompt="a blue square moving up on a still background")],
            guidance_scale=3.0)  # scoring without a pipeline never scores a record made with other settings
    res = run(p=None, items=[dict(GEN, prompt="a blue square moving up on a still background")], refine="argmax",
              guidance_scale=3.0)
    assert res[0][1]["qk_acc"].shape == (2, 2)


def test_exact_items_take_guidance_and_split_is_part_of_the_key(fake, tmp_path):
    calls, pipe = fake
    ex = dict(kind="exact", family="scenes", seed=1, split="heldout")
    xa.run_dataset(pipe, [ex], tmp_path, num_steps=2, grid_size=4, progress=False, guidance_scale=3.0)
    assert len(calls) == 1  # no TypeError: guidance only goes to generated videos
    xa.run_dataset(pipe, [dict(ex, split="train")], tmp_path, num_steps=2, grid_size=4, progress=False)
    assert len(calls) == 2  # the train split's video is another video
    with pytest.raises(ValueError, match="split"):
        xa.run_dataset(None, [ex], tmp_path, num_steps=2, grid_size=4, progress=False)


def test_corrupt_cache_entry_is_named_and_recomputed(fake, tmp_path):
    calls, pipe = fake
    xa.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False)
    (npz,) = tmp_path.glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=npz.name):
        xa.run_dataset(None, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        xa.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False)
    assert len(calls) == 2 and any(npz.name in str(x.message) and "recomputing" in str(x.message) for x in w)
    analysis.AnalysisRecord.load(npz)  # whole again


def test_bad_settings_are_named(fake, tmp_path):
    _, pipe = fake
    with pytest.raises(ValueError, match=r"unknown analysis settings \['refine_rule'\]"):
        xa.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False, refine_rule="x")
    with pytest.raises(ValueError, match="num_steps=0"):
        xa.run_dataset(pipe, [GEN], tmp_path, num_steps=0, grid_size=4, progress=False)
    with pytest.raises(ValueError, match="guidance_scale=nan"):
        xa.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=4, progress=False,
                             guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="unknown item kind 'real'"):
        xa.run_dataset(pipe, [dict(GEN, kind="real")], tmp_path, num_steps=2, grid_size=4, progress=False)
    with pytest.raises(ValueError, match="num_steps=0"):
        analysis.Recorder(QUERIES, 4.0, 0, 2, 13)


def test_cache_key_matches_run_dataset(tmp_path, monkeypatch):
    """load_cached reads exactly the files analysis.run_dataset writes (a fake analysis stands in for the model)."""
    from difftrack import analysis

    queries = np.array([[10.0, 10.0], [30.0, 20.0]], np.float32)

    def fake_generation(pipe, prompt, seed, num_steps, grid_size, **kw):
        rec = analysis.Recorder(queries, 4.0, num_steps, 2, 13).record(check=False)
        rec.meta = dict(kind="generated", prompt=prompt, seed=seed)
        return np.zeros((13, 64, 64, 3), np.uint8), rec

    monkeypatch.setattr(analysis, "analyze_generation", fake_generation)
    monkeypatch.setattr(analysis, "pseudo_ground_truth",
                        lambda v, q: (np.zeros((len(q), 13, 2), np.float32), np.ones((len(q), 13), bool)))
    item = dict(kind="generated", family="objects", seed=3, prompt="a red circle moving left on a still background")
    from test_guidance import tiny_mini_pipe

    with pytest.raises(ValueError, match="no cached analysis .* no pipeline to compute it"):
        xa.run_dataset(None, [item], tmp_path, num_steps=2, grid_size=4, progress=False)
    xa.run_dataset(tiny_mini_pipe(), [item], tmp_path, num_steps=2, grid_size=4, progress=False)
    rec, vid = xa.load_cached(tmp_path, item, 2, 4)
    assert vid.shape == (13, 64, 64, 3) and np.allclose(rec.queries, queries)
    (res,) = xa.run_dataset(None, [item], tmp_path, num_steps=2, grid_size=4, progress=False)  # cache only
    assert res[1]["qk_acc"].shape == (2, 2)
    with pytest.raises(FileNotFoundError, match="run_dataset"):
        xa.load_cached(tmp_path, dict(item, seed=4), 2, 4)


def test_analysis_items_and_ground_truth():
    items = xa.analysis_items(1, 2, seed=5)
    kinds = [(it["kind"], it["family"], it["seed"]) for it in items]
    assert kinds == [("generated", "objects", 5), ("generated", "scenes", 5), ("exact", "objects", 5),
                     ("exact", "objects", 6), ("exact", "scenes", 5), ("exact", "scenes", 6)]
    assert all(isinstance(it["prompt"], str) for it in items if it["kind"] == "generated")
    # exact ground truth of an exact item starts at the queries
    from difftrack.analysis import AnalysisRecord
    from difftrack.world import World

    w = World()
    q = w.grid_queries(3)[:, 1:]
    rec = AnalysisRecord(queries=q, stride=4.0, num_steps=1, num_layers=1, frames=13)
    s = w.sample(5, "objects", "heldout")
    tr, vis, src = xa.item_ground_truth(items[2], rec, s.video)
    assert src == "exact" and tr.shape == (9, 13, 2) and np.allclose(tr[:, 0], q) and vis[:, 0].all()


def test_summarize_and_group_tables():
    S, L = 3, 5
    acc = np.tile(np.linspace(0.1, 0.5, L), (S, 1)) * np.array([[0.5], [0.8], [1.0]])
    acc[:, 2] += 0.4
    tab = dict(qk_acc=acc, feat_acc=acc * 0.5, conf_cross=acc.copy(), attn_cross=acc.copy(),
               conf_text=acc, conf_self=acc, attn_text=acc, attn_self=acc)
    s = xa.summarize_tables(tab)
    assert s.qk_best_layer == 2 and s.best_layers_top3[0] == 2
    assert s.qk_best_acc == pytest.approx(acc[-1, 2]) and s.feat_best_acc == pytest.approx(acc[-1, 2] * 0.5)
    assert s.acc_last_over_first_step == pytest.approx(acc[-1, 2] / acc[0, 2])
    assert s.hm_top3_over_median > 1
    grouped = xa.group_tables([(dict(kind="generated"), tab), (dict(kind="exact"), tab)])
    assert set(grouped) == {"generated", "exact", "all"} and "hm" in grouped["all"]
    df = xa.tables_frame(grouped, timesteps=[999, 500, 1])
    assert len(df) == 3 * S * L and {"subset", "step", "layer", "timestep", "qk_acc", "hm"} <= set(df.columns)


# ---------------------------------------------------------------------------------------------- cache key
def test_cache_key_by_hand():
    """The key is the first 16 hex digits of sha256 of the canonical JSON (sorted keys, no spaces) of
    {"fields", "job", "schema"}; dict order does not matter, any changed field changes it."""
    import hashlib

    from difftrack.experiments import cache_key, canonical_json

    fields = {"seed": 3, "item": {"kind": "exact", "family": "scenes"}, "size": (13, 64, 64), "tau": None}
    blob = ('{"fields":{"item":{"family":"scenes","kind":"exact"},"seed":3,"size":[13,64,64],"tau":null},'
            '"job":"analysis","schema":"1"}')
    assert canonical_json({"job": "analysis", "schema": "1", "fields": fields}) == blob
    key = cache_key("analysis", "1", fields)
    assert key == hashlib.sha256(blob.encode()).hexdigest()[:16] and len(key) == 16
    reordered = {"tau": None, "size": [13, 64, 64], "item": {"family": "scenes", "kind": "exact"}, "seed": np.int64(3)}
    assert cache_key("analysis", "1", reordered) == key  # same content, other order / numpy int / tuple -> list
    changed = [cache_key("cag", "1", fields), cache_key("analysis", "2", fields),
               cache_key("analysis", "1", dict(fields, seed=4)), cache_key("analysis", "1", dict(fields, tau=0.1)),
               cache_key("analysis", "1", dict(fields, item={"kind": "exact", "family": "objects"})),
               cache_key("analysis", "1", dict(fields, extra=1))]
    assert len({key, *changed}) == 1 + len(changed)
    with pytest.raises(ValueError, match="job=''"):
        cache_key("", "1", fields)


def test_record_key_covers_every_cache_field(tmp_path):
    """The analysis cache identity: the key of cache_fields changes with each setting the record depends on, and a
    record made with the same fields is fresh (no stale fields)."""
    item = dict(GEN)
    base = xa.cache_fields(item, 2, 4, (13, 64, 64), 6.0, "M:w:2:float32")
    others = [xa.cache_fields(dict(item, prompt="x"), 2, 4, (13, 64, 64), 6.0, "M:w:2:float32"),
              xa.cache_fields(item, 3, 4, (13, 64, 64), 6.0, "M:w:2:float32"),
              xa.cache_fields(item, 2, 4, (9, 64, 64), 6.0, "M:w:2:float32"),
              xa.cache_fields(item, 2, 4, (13, 64, 64), 3.0, "M:w:2:float32"),
              xa.cache_fields(item, 2, 4, (13, 64, 64), 6.0, "M:w:2:bfloat16"),
              xa.cache_fields(item, 2, 4, (13, 64, 64), 6.0, "M:w:2:float32", refine="argmax")]
    keys = {xa.record_key(f) for f in [base] + others}
    assert len(keys) == 1 + len(others)
    assert xa.stale_fields(json.loads(json.dumps(base)), base) == {}  # a JSON round trip (the .npz) keeps the key
    assert xa.stale_fields(base, others[-1]) == {"match": (base["match"], others[-1]["match"])}


# ---------------------------------------------------------------------------------------------- summary record
def test_analysis_summary_record_round_trip_and_errors(tmp_path):
    from difftrack.experiments import RecordError, read_record, write_record
    from difftrack.paths import results_dir

    committed = results_dir() / "analysis_summary.json"
    rec = read_record(xa.AnalysisSummary, committed)
    assert rec.num_steps == 50 and rec.layer_sets() == {"top3": rec.combined["best_layers_top3"],
                                                        "bottom3": rec.combined["worst_layers_bottom3"]}
    out = write_record(tmp_path / "s.json", rec)
    back = json.loads(out.read_text())
    expected = with_schema(json.loads(committed.read_text()), "analysis_summary/1")
    assert back == expected and list(back) == list(expected)  # every key, in the same order, "schema" first
    (tmp_path / "one.json").write_text(json.dumps({"layer_ranking": [3, 2, 1, 0]}))
    assert read_record(xa.AnalysisSummary, tmp_path / "one.json").layer_sets() == {"top3": [3, 2, 1],
                                                                                    "bottom3": [2, 1, 0]}
    (tmp_path / "none.json").write_text(json.dumps({"combined": {"count": 3}}))
    with pytest.raises(RecordError, match=r"analysis summary '.*none\.json' misses the key 'best_layers_top3'"):
        read_record(xa.AnalysisSummary, tmp_path / "none.json").layer_sets()
    (tmp_path / "bad.json").write_text(json.dumps({"combined": [1, 2]}))
    with pytest.raises(RecordError, match=r"'.*bad\.json': 'combined' is a list"):
        read_record(xa.AnalysisSummary, tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "cag/1"}))
    with pytest.raises(RecordError, match=r"has schema 'cag/1'; expected 'analysis_summary/1'"):
        read_record(xa.AnalysisSummary, tmp_path / "other.json")


def test_weights_fingerprint_and_digest_follow_the_weights(tmp_path):
    import torch

    from difftrack import mini
    from difftrack.experiments import weights_digest, weights_fingerprint

    a, b = mini.build_untrained(0), mini.build_untrained(0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.transformer.transformer_blocks[5].attn1.to_q.weight[3, 7] += 1e-4
    assert weights_fingerprint(a) != weights_fingerprint(b)
    with pytest.raises(ValueError, match="no torch.nn.Module component"):
        weights_fingerprint(object())
    a.save_pretrained(str(tmp_path / "a"))
    b.save_pretrained(str(tmp_path / "b"))
    assert weights_digest(tmp_path / "a") != weights_digest(tmp_path / "b")
    assert weights_digest(tmp_path / "a") == weights_digest(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no .*weight file under"):
        weights_digest(tmp_path / "a" / "scheduler")


def test_model_id_changes_with_the_weights_not_only_the_folder():
    import torch

    from difftrack import mini
    from difftrack.runners import as_runner

    a, b = mini.build_untrained(0), mini.build_untrained(0)
    assert xa.model_id(as_runner(a)) == xa.model_id(as_runner(b))
    with torch.no_grad():
        next(b.text_encoder.parameters()).view(-1)[0] += 1e-3
    assert xa.model_id(as_runner(a)) != xa.model_id(as_runner(b))
