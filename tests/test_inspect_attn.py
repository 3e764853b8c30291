"""difftrack.inspect_attn: attention maps, q/k PCA, the capture callback and model loading errors. CPU-only,
seconds. (The analysis cache, items and table summaries are tested in test_experiments_analysis.py.)"""
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
