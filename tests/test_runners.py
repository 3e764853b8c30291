"""difftrack.runners: latent-frame visibility by hand, step counts, model choices; the backbones package's VAE
latent scaling."""
import types

import numpy as np
import pytest
import torch

from difftrack import runners
from difftrack.backbones import scale_vae_latents


def test_latent_visibility_by_hand():
    """Frame 0 as is; latent frame k >= 1 visible only when all of video frames r(k-1)+1 .. rk are (r = 4, T = 9:
    latent 1 <- frames 1-4, latent 2 <- frames 5-8)."""
    vis = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1],   # always visible
                    [0, 1, 1, 1, 1, 1, 1, 1, 0],   # hidden at frame 0 and at the last frame
                    [1, 1, 1, 0, 1, 1, 1, 1, 1],   # one frame hidden in the first group
                    [1, 0, 0, 0, 0, 1, 1, 1, 1]], bool)
    out = runners.latent_visibility(vis, 4, 3)
    np.testing.assert_array_equal(out, [[1, 1, 1], [0, 1, 0], [1, 0, 1], [1, 0, 1]])
    assert out.dtype == bool
    # r = 1 is the identity, returned as a copy
    same = runners.latent_visibility(vis, 1, 9)
    np.testing.assert_array_equal(same, vis)
    same[0, 0] = False
    assert vis[0, 0]


def test_latent_visibility_names_bad_shapes():
    vis = np.ones((2, 9), bool)
    with pytest.raises(ValueError, match=r"9 video frames with temporal compression 4 give 3 latent frames, not 4"):
        runners.latent_visibility(vis, 4, 4)
    with pytest.raises(ValueError, match=r"visible must be \[n, T\]; got shape \(9,\)"):
        runners.latent_visibility(np.ones(9, bool), 4, 3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "50", None])
def test_check_num_steps_names_the_value(bad):
    with pytest.raises(ValueError, match=rf"num_steps={bad!r}; allowed: an int >= 1"):
        runners.check_num_steps(bad)


def test_check_num_steps_accepts_numpy_integers():
    assert runners.check_num_steps(np.int64(7)) == 7 and isinstance(runners.check_num_steps(np.int64(7)), int)


def test_pipeline_class_and_model_tag(tmp_path):
    assert runners.pipeline_class("embedded") == "MiniVideoPipeline"
    with pytest.raises(ValueError, match="neither 'embedded' nor a local diffusers pipeline folder"):
        runners.pipeline_class(str(tmp_path / "nowhere"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    assert runners.pipeline_class(str(tmp_path / "m")) == "WanPipeline"
    (tmp_path / "m" / "model_index.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match="holds a list; expected a JSON object"):
        runners.pipeline_class(str(tmp_path / "m"))
    # tags keep caches of different models and dtypes apart, and are stable
    a, b = runners.model_tag(str(tmp_path / "m")), runners.model_tag(str(tmp_path / "m"), "bfloat16")
    assert a.startswith("m-") and b == a + "-bfloat16" and a == runners.model_tag(str(tmp_path / "m"))
    assert runners.model_tag("embedded") == "embedded"
    assert runners.model_tag(str(tmp_path / "x" / "m")) != a


def test_scale_vae_latents_uses_mean_std_or_scaling_factor():
    """Wan-style VAEs (``latents_mean``/``latents_std``) normalise per channel; others multiply by
    ``scaling_factor``."""
    z = torch.arange(12.0).view(1, 2, 3, 2)
    wan = types.SimpleNamespace(config=types.SimpleNamespace(latents_mean=[1.0, 2.0], latents_std=[2.0, 4.0]))
    out = scale_vae_latents(wan, z)
    torch.testing.assert_close(out[0, 0], (z[0, 0] - 1) / 2)
    torch.testing.assert_close(out[0, 1], (z[0, 1] - 2) / 4)
    cog = types.SimpleNamespace(config=types.SimpleNamespace(scaling_factor=0.5))
    torch.testing.assert_close(scale_vae_latents(cog, z), z * 0.5)


def test_runner_dtype_is_the_compute_dtype_of_a_bf16_wan(tmp_path):
    """A Wan pipeline loaded in bf16 keeps its ``_keep_in_fp32_modules`` (``scale_shift_table``, the transformer's
    first parameter) in float32; the runner's dtype is still bf16, so inputs are cast to what the blocks compute in
    and the tracker runs (before: float32, and DiffTracker failed on "Input type (float) and bias type (BFloat16)")."""
    from difftrack.testing import build_tiny_pipeline
    from difftrack.tracking import DiffTracker

    build_tiny_pipeline("wan", path=tmp_path / "wan")
    pipe = runners.load_pipeline(str(tmp_path / "wan"), dtype="bfloat16")
    first = next(pipe.transformer.parameters())
    assert first.dtype == torch.float32  # the kept-in-fp32 module comes first: the case this guards
    assert runners.as_runner(pipe).dtype == torch.bfloat16
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    tracks, visible = DiffTracker(pipe, layers=(1,))(video, np.array([[0, 12.0, 20.0]], np.float32))
    assert tracks.shape == (1, 3, 2) and np.isfinite(tracks).all()
