"""difftrack.inspect_attn: attention maps, q/k PCA, the capture callback, the analysis cache key, model loading
errors and table summaries. CPU-only, seconds."""
import json

import numpy as np
import pytest
import torch

from difftrack import inspect_attn as ia


def _qk(H=2, F=3, rows=4, cols=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, F, rows, cols, D, generator=g), torch.randn(H, F, rows, cols, D, generator=g)


def test_attention_maps_match_full_softmax():
    q, k = _qk()
    H, F, rows, cols, D = q.shape
    stride = 4.0
    pts = np.array([[5.0, 9.0], [19.9, 0.1]], np.float32)  # tokens (row 2, col 1) and (row 0, col 4)
    maps = ia.query_attention_maps(q, k, pts, stride)
    assert maps.shape == (2, F, rows, cols)
    assert torch.allclose(maps.sum((-1, -2)), torch.ones(2, F), atol=1e-5)
    # reference: explicit loops
    for n, (r, c) in enumerate([(2, 1), (0, 4)]):
        for f in range(F):
            ref = torch.stack([torch.softmax((q[h, 0, r, c] @ k[h, f].reshape(-1, D).T) / D ** 0.5, -1)
                               for h in range(H)]).mean(0).reshape(rows, cols)
            assert torch.allclose(maps[n, f], ref, atol=1e-6)


def test_attention_map_peaks_at_identical_token():
    """Keys equal to scaled queries: the point's own token wins in every frame (row from y, col from x)."""
    q, _ = _qk(H=1, F=2, rows=4, cols=4, D=16)
    q = torch.nn.functional.normalize(q, dim=-1) * 8
    maps = ia.query_attention_maps(q, q.clone(), np.array([[13.0, 5.0]]), 4.0)  # col 3, row 1
    assert maps[0, 0].argmax() == 1 * 4 + 3


def test_attention_maps_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match="src_frame"):
        ia.query_attention_maps(q, k, np.zeros((1, 2)), 4.0, src_frame=7)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        ia.query_attention_maps(q, k, np.zeros((1, 3)), 4.0)
    with pytest.raises(ValueError, match="both be"):
        ia.query_attention_maps(q, k[:, :2], np.zeros((1, 2)), 4.0)


def test_qk_pca_joint_and_frame():
    q, _ = _qk(F=3, rows=4, cols=4, D=8)
    rgb = ia.qk_pca(q)
    assert rgb.shape == (3, 4, 4, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    # one descriptor repeated in every frame gets the same colour in every frame under joint normalisation
    x = q.mean(0, keepdim=True).expand(1, 3, 4, 4, 8).clone()
    x[:, 1:] = x[:, :1]
    same = ia.qk_pca(x)
    assert np.allclose(same[0], same[1]) and np.allclose(same[0], same[2])
    per_frame = ia.qk_pca(q, normalize="frame")
    assert per_frame.shape == rgb.shape
    with pytest.raises(ValueError, match="normalize"):
        ia.qk_pca(q, normalize="bad")


def test_qk_pca_recovers_dominant_direction():
    """Data varying along one direction: the first component is that direction (up to sign)."""
    g = torch.Generator().manual_seed(0)
    d = torch.zeros(8)
    d[3] = 1
    a = torch.randn(2, 4, 4, 1, generator=g) * 10
    x = a * d + 0.01 * torch.randn(2, 4, 4, 8, generator=g)
    rgb = ia.qk_pca(x, clip=0.0)
    r = rgb[..., 0].ravel()
    assert abs(np.corrcoef(r, a.ravel().numpy())[0, 1]) > 0.99


def test_inspector_on_tiny_model(tiny, tmp_path):
    """QKInspector as a capture callback on diffusers' tiny CogVideoX: every layer filled, maps normalised."""
    from conftest import tiny_inputs

    from difftrack.capture import capture

    model = tiny(layers=2)
    kw = tiny_inputs(batch=2, frames=2)
    insp = ia.QKInspector(np.array([[1.0, 1.0], [6.0, 5.0]]), 2.0, num_steps=1, num_layers=2)
    with capture(model, layers="all", store=False, on_qk=insp.on_qk):
        with torch.no_grad():
            model(**kw)
    assert insp.attn.shape[:3] == (1, 2, 2)
    assert np.isfinite(insp.attn).all() and np.isfinite(insp.pca_q).all()
    assert np.allclose(insp.attn.sum((-1, -2)), 1, atol=1e-4)
    assert insp.timesteps[0] == 500
    path = tmp_path / "insp.npz"
    insp.save(path)
    back = ia.QKInspector.load(path)
    assert np.array_equal(back.attn, insp.attn) and np.array_equal(back.pca_k, insp.pca_k)
    assert np.array_equal(back.points, insp.points) and back.stride == 2.0 and (back.S, back.L) == (1, 2)


def test_cache_key_matches_run_dataset(tmp_path, monkeypatch):
    """load_cached reads exactly the files analysis.run_dataset writes (a fake analysis stands in for the model)."""
    from difftrack import analysis

    queries = np.array([[10.0, 10.0], [30.0, 20.0]], np.float32)

    def fake_generation(pipe, prompt, seed, num_steps, grid_size, **kw):
        rec = analysis.Recorder(queries, 4.0, num_steps, 2, 13).rec
        rec.meta = dict(kind="generated", prompt=prompt, seed=seed)
        return np.zeros((13, 64, 64, 3), np.uint8), rec

    monkeypatch.setattr(analysis, "analyze_generation", fake_generation)
    monkeypatch.setattr(analysis, "pseudo_ground_truth",
                        lambda v, q: (np.zeros((len(q), 13, 2), np.float32), np.ones((len(q), 13), bool)))
    item = dict(kind="generated", family="objects", seed=3, prompt="a red circle moving left on a still background")
    from test_guidance import tiny_mini_pipe

    with pytest.raises(ValueError, match="no cached analysis .* no pipeline to compute it"):
        analysis.run_dataset(None, [item], tmp_path, num_steps=2, grid_size=4, progress=False)
    analysis.run_dataset(tiny_mini_pipe(), [item], tmp_path, num_steps=2, grid_size=4, progress=False)
    rec, vid = ia.load_cached(tmp_path, item, 2, 4)
    assert vid.shape == (13, 64, 64, 3) and np.allclose(rec.queries, queries)
    (res,) = analysis.run_dataset(None, [item], tmp_path, num_steps=2, grid_size=4, progress=False)  # cache only
    assert res[1]["qk_acc"].shape == (2, 2)
    with pytest.raises(FileNotFoundError, match="run_dataset"):
        ia.load_cached(tmp_path, dict(item, seed=4), 2, 4)


def test_analysis_items_and_ground_truth():
    items = ia.analysis_items(1, 2, seed=5)
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
    tr, vis, src = ia.item_ground_truth(items[2], rec, s.video)
    assert src == "exact" and tr.shape == (9, 13, 2) and np.allclose(tr[:, 0], q) and vis[:, 0].all()


def test_load_pipeline_rejects_other_layouts(tmp_path):
    with pytest.raises(ValueError, match="neither 'embedded'"):
        ia.load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline; allowed pipelines: .*CogVideoXPipeline.*"
                                         "HunyuanVideoPipeline.*WanPipeline"):
        ia.load_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        ia.load_pipeline("embedded", dtype="float99")
    assert ia.model_tag("embedded") == "embedded" and ia.model_tag("embedded", "float16") == "embedded-float16"
    assert ia.model_tag(str(tmp_path)).startswith(tmp_path.name + "-")


def test_load_pipeline_from_minivideo_folder():
    """A local folder holding a MiniVideoPipeline (here the committed weights folder itself) loads."""
    from difftrack import mini

    pipe = ia.load_pipeline(str(mini.WEIGHTS_DIR))
    assert isinstance(pipe, mini.MiniVideoPipeline) and pipe.transformer.dtype == torch.float32


def test_summarize_and_group_tables():
    S, L = 3, 5
    acc = np.tile(np.linspace(0.1, 0.5, L), (S, 1)) * np.array([[0.5], [0.8], [1.0]])
    acc[:, 2] += 0.4
    tab = dict(qk_acc=acc, feat_acc=acc * 0.5, conf_cross=acc.copy(), attn_cross=acc.copy(),
               conf_text=acc, conf_self=acc, attn_text=acc, attn_self=acc)
    s = ia.summarize_tables(tab)
    assert s.qk_best_layer == 2 and s.best_layers_top3[0] == 2
    assert s.qk_best_acc == pytest.approx(acc[-1, 2]) and s.feat_best_acc == pytest.approx(acc[-1, 2] * 0.5)
    assert s.acc_last_over_first_step == pytest.approx(acc[-1, 2] / acc[0, 2])
    assert s.hm_top3_over_median > 1
    grouped = ia.group_tables([(dict(kind="generated"), tab), (dict(kind="exact"), tab)])
    assert set(grouped) == {"generated", "exact", "all"} and "hm" in grouped["all"]
    df = ia.tables_frame(grouped, timesteps=[999, 500, 1])
    assert len(df) == 3 * S * L and {"subset", "step", "layer", "timestep", "qk_acc", "hm"} <= set(df.columns)
