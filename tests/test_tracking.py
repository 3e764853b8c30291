"""Tests of difftrack.tracking (zero-shot point tracking) and difftrack.video_io.

Fast parts run on diffusers' test-sized CogVideoX transformer (conftest.tiny_cogvideox) with a pooling "encoder";
the behaviour check runs the embedded model on two short held-out world clips, trained vs random weights.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cogvideox
from difftrack import mini, tapvid, world
from difftrack.tracking import DiffTracker, FeatureTracker, plan_chunks, vae_encode_frames


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is several times faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------- helpers
def pool_encode(video: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [T, 4, H/8, W/8]: 8x8 average pooling of RGB + gray (a stand-in for a VAE)."""
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.cat([x, x.mean(1, keepdim=True)], 1)
    return F.avg_pool2d(x, 8)


@pytest.fixture(scope="module")
def tiny_tracker():
    model = tiny_cogvideox(layers=2)
    ehs = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    return DiffTracker(model, layers=(1,), encode=pool_encode, token_stride=16, encoder_hidden_states=ehs,
                       chunk_len=4)


def random_video(T=5, H=64, W=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- chunk planning
@pytest.mark.parametrize("interleave", [True, False])
def test_plan_chunks_covers_every_frame(interleave):
    for T in list(range(2, 30)) + [49, 50, 61, 250]:
        for L in (2, 3, 5, 13):
            for tq in sorted({0, T // 2, T - 1}):
                plan = plan_chunks(T, tq, L, interleave)
                covered = set()
                for c in plan:
                    assert c[0] == tq  # the query frame leads every chunk
                    assert 2 <= len(c) <= L
                    targets = c[1:]
                    assert tq not in targets and len(set(targets)) == len(targets) and targets == sorted(targets)
                    covered |= set(targets)
                assert covered == set(range(T)) - {tq}, (T, L, tq)
                n = T - 1
                assert len(plan) <= -(-n // (L - 1)) + (L - 1)  # never the one-frame sliding of the published loop


def test_plan_chunks_published_example_and_short_clips():
    # T = 50, L = 13: the published 5 interleaved chunks with stride 4
    plan = plan_chunks(50, 0, 13, True)
    assert plan[0] == [0] + list(range(1, 46, 4)) and plan[-1] == [0] + list(range(5, 50, 4)) and len(plan) == 5
    # T < 12 (the published code divides by zero there): a single chunk with every frame
    assert plan_chunks(5, 2, 13) == [[2, 0, 1, 3, 4]]
    assert plan_chunks(2, 1, 13) == [[1, 0]]
    # windows stay full and overlapping frames appear in several chunks
    plan = plan_chunks(36, 0, 13, True)
    assert all(len(c) == 13 for c in plan)
    counts = np.bincount(np.concatenate([c[1:] for c in plan]), minlength=36)
    assert counts[1:].min() >= 1 and counts.max() >= 2
    with pytest.raises(ValueError, match="at least 2 frames"):
        plan_chunks(1, 0)
    with pytest.raises(ValueError, match="query_frame"):
        plan_chunks(5, 5)
    with pytest.raises(ValueError, match="chunk_len"):
        plan_chunks(5, 0, 1)


def test_overlapping_costs_are_averaged(tiny_tracker, monkeypatch):
    """A frame covered by k chunks is matched on the mean of its k costs."""
    tr = tiny_tracker
    T, tq, L = 9, 0, 4
    plan = plan_chunks(T, tq, L, True)
    counts = np.bincount(np.concatenate([c[1:] for c in plan]), minlength=T)
    assert counts.max() >= 2  # the test needs overlaps
    calls = {"chunk": -1}
    orig_forward = tr._forward_chunk

    def forward(x, t, ehs, extra, **kw):
        calls["chunk"] += 1
        return orig_forward(x, t, ehs, extra, **kw)

    M = 16  # 4 x 4 tokens

    def costs(desc, j):
        return torch.full((M, M), float(calls["chunk"] * 10 + j))

    seen = {}

    def match(cost, rows, cols, pts):
        seen[len(seen)] = float(cost[0, 0])
        n = pts.shape[0]
        return pts.clone(), torch.ones(n), torch.zeros(n)

    monkeypatch.setattr(tr, "_forward_chunk", forward)
    monkeypatch.setattr(tr, "_chunk_costs", costs)
    monkeypatch.setattr(tr, "_match", match)
    tr.track(random_video(T), np.array([[tq, 30.0, 30.0]], np.float32))
    expected = {}
    for ci, c in enumerate(plan):
        for j, f in enumerate(c[1:], start=1):
            expected.setdefault(f, []).append(ci * 10 + j)
    assert sorted(seen.values()) == sorted(float(np.mean(v)) for v in expected.values())


# ----------------------------------------------------------------------------------------------- API on a tiny model
def test_shapes_dtypes_and_query_frame(tiny_tracker):
    video = random_video(5)
    q = np.array([[0, 10.0, 12.0], [2, 63.5, 0.5], [4, 32.0, 32.0]], np.float32)
    tracks, visible = tiny_tracker(video, q)
    assert tracks.shape == (3, 5, 2) and tracks.dtype == np.float32
    assert visible.shape == (3, 5) and visible.dtype == np.bool_
    for i, t in enumerate(q[:, 0].astype(int)):  # non-zero query frames too
        np.testing.assert_allclose(tracks[i, t], q[i, 1:])
        assert visible[i, t]
    assert np.isfinite(tracks).all()
    assert (tracks >= 0).all() and (tracks <= 64).all()
    out = tiny_tracker.track(video, q)
    assert set(out) >= {"tracks", "visible", "cycle_error", "confidence"}


@pytest.mark.parametrize("T", [2, 5])
def test_short_clips(tiny_tracker, T):
    q = np.array([[T - 1, 20.0, 40.0], [0, 5.0, 60.0]], np.float32)
    tracks, visible = tiny_tracker(random_video(T, seed=T), q)
    assert tracks.shape == (2, T, 2) and visible.shape == (2, T)
    np.testing.assert_allclose(tracks[0, T - 1], q[0, 1:])


def test_other_resolution_and_torch_inputs(tiny_tracker):
    video = random_video(3, 48, 80)
    tracks, visible = tiny_tracker(torch.from_numpy(video), torch.tensor([[1, 70.0, 40.0]]))
    assert tracks.shape == (1, 3, 2)


@pytest.mark.parametrize("video,queries,match", [
    (random_video(1), [[0, 1.0, 1.0]], "at least 2 frames"),
    (random_video(5).astype(np.float32), [[0, 1.0, 1.0]], "dtype float32"),
    (random_video(5)[..., :2], [[0, 1.0, 1.0]], r"shape \(5, 64, 64, 2\)"),
    (random_video(5), [[5, 1.0, 1.0]], r"frame t=5.0.*\[0, 4\]"),
    (random_video(5), [[-1, 1.0, 1.0]], r"\[0, 4\]"),
    (random_video(5), [[0.5, 1.0, 1.0]], "integer frame index"),
    (random_video(5), [[0, 64.5, 1.0]], r"outside the frame.*x in \[0, 64\]"),
    (random_video(5), [[0, 1.0, -0.1]], "outside the frame"),
    (random_video(5), [[0, 1.0]], r"shape \(1, 2\).*\[N, 3\]"),
    (random_video(5), np.zeros((0, 3)), "empty"),
    (random_video(5), [[0, np.nan, 1.0]], "non-finite"),
    (random_video(5), np.array([["a", "b", "c"]]), "dtype"),
])
def test_bad_inputs(tiny_tracker, video, queries, match):
    with pytest.raises(ValueError, match=match):
        tiny_tracker(video, np.asarray(queries))


def test_input_size_must_fit_the_token_grid(tiny_tracker):
    tr = DiffTracker(tiny_tracker.transformer, layers=(1,), encode=pool_encode, token_stride=16,
                     encoder_hidden_states=tiny_tracker._fixed_ehs, chunk_len=4, work_size="input")
    with pytest.raises(ValueError, match="multiple of this backbone's token stride 16.*work_size='model'"):
        tr(random_video(5, 60, 64), np.array([[0, 1.0, 1.0]]))
    # the default resizes any size to the model's 64x64 and maps the tracks back
    tracks, visible = tiny_tracker(random_video(5, 60, 64), np.array([[0, 1.0, 1.0]]))
    assert tracks.shape == (1, 5, 2) and (tracks[..., 1] <= 60).all()


def test_bad_settings():
    model = tiny_cogvideox(layers=2)
    kw = dict(encode=pool_encode, token_stride=16, encoder_hidden_states=torch.zeros(1, 8, 8), layers=(1,))
    for bad, match in [(dict(layers=(2,)), "0..1"), (dict(step=50), "step"), (dict(noise="x"), "noise"),
                       (dict(refine="x"), "refine"), (dict(occlusion="x"), "occlusion"), (dict(chunk_len=1), "chunk"),
                       (dict(tau=-1.0), "tau"), (dict(cycle_threshold=float("nan")), r"cycle_threshold=nan; allowed"),
                       (dict(cycle_threshold=-1.0), r"cycle_threshold=-1\.0; allowed: a finite number in \[0, inf\]"),
                       (dict(confidence_threshold=1.5), r"confidence_threshold=1\.5; allowed.*\[0, 1\]"),
                       (dict(ncc_threshold=float("nan")), r"ncc_threshold=nan; allowed.*\[-1, 1\] or None"),
                       (dict(feature_tau=0.0), r"feature_tau=0\.0"),
                       (dict(layers=8.5), r"layers=8\.5 \(float\); allowed: block indices"),
                       (dict(layers=(1.0,)), r"layers=\(1\.0,\); allowed: block indices in 0\.\.1 \(ints, not"),
                       (dict(num_steps=0), r"num_steps=0; allowed: an int >= 1"),
                       (dict(step=0.5), r"step=0\.5 \(float\)"),
                       (dict(work_size="native"), r"work_size='native'; allowed: \('model', 'input'\)"),
                       (dict(work_size=(64, 0)), r"work_size=\(64, 0\)"),
                       (dict(max_cost_bytes=0), r"max_cost_bytes=0")]:
        with pytest.raises(ValueError, match=match):
            tr = DiffTracker(model, **{**kw, **bad})
            tr(random_video(3), np.array([[0, 1.0, 1.0]], np.float32))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        DiffTracker(model, layers=(1,), encode=pool_encode, token_stride=16).text_embeddings()
    with pytest.raises(ValueError, match="encode="):
        DiffTracker(model, layers=(1,))


def test_nan_threshold_no_longer_hides_every_point(tiny_tracker):
    with pytest.raises(ValueError, match=r"cycle_threshold=nan"):
        tiny_tracker.decide_visible(np.zeros((1, 3)), np.ones((1, 3)), cycle_threshold=float("nan"))
    assert tiny_tracker.decide_visible(np.zeros((1, 3)), np.ones((1, 3))).all()


def test_dtype_and_device_do_not_touch_the_callers_model():
    """DiffTracker(dtype=bfloat16) used to convert the caller's transformer in place (issue 18)."""
    model = tiny_cogvideox(layers=2).train()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ehs = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    tr = DiffTracker(model, layers=(1,), encode=pool_encode, token_stride=16, encoder_hidden_states=ehs,
                     dtype=torch.bfloat16)
    assert tr.transformer is not model and tr.transformer.dtype == torch.bfloat16
    tracks, _ = tr(random_video(3), np.array([[0, 30.0, 30.0]], np.float32))
    assert np.isfinite(tracks).all()
    assert model.dtype == torch.float32 and model.training
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    # same dtype and device: no copy, and the caller's train/eval flag is left as it was
    tr = DiffTracker(model, layers=(1,), encode=pool_encode, token_stride=16, encoder_hidden_states=ehs)
    assert tr.transformer is model
    tr(random_video(3), np.array([[0, 30.0, 30.0]], np.float32))
    assert model.training


def test_any_size_tracked_at_the_model_size_and_mapped_back(tiny_tracker, monkeypatch):
    """The default resizes to the model's frame size, scales queries in and tracks back (the recipe of notebook 04)."""
    from difftrack import tapvid as tv

    assert tiny_tracker.model_frame_size() == (64, 64) and tiny_tracker.work_size == "model"
    video = random_video(4, 96, 160, seed=3)
    q = np.array([[0, 150.0, 90.0], [2, 10.0, 5.0]], np.float32)
    out = tiny_tracker.track(video, q)
    assert out["work_size"] == (64, 64) and out["tracks"].shape == (2, 4, 2)
    np.testing.assert_array_equal(out["tracks"][[0, 1], [0, 2]], q[:, 1:])  # exactly the caller's queries
    small = tv.resize_video(video, (64, 64))
    ref = tiny_tracker.track(small, tv.rescale_queries(q, (96, 160), (64, 64)))
    expect = tv.rescale_tracks(ref["tracks"], (64, 64), (96, 160))
    expect[[0, 1], [0, 2]] = q[:, 1:]
    np.testing.assert_allclose(out["tracks"], expect, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(out["visible"], ref["visible"])


def test_memory_guard_names_the_size():
    """512x512 with the embedded model's 4-px tokens took minutes and 7.9 GB; 1080p never returned (issue 18)."""
    pipe = mini.build_untrained(0)
    tr = DiffTracker(pipe, work_size="input")
    assert tr.model_frame_size() == (64, 64)
    assert tr.estimate_cost_bytes(13, 64, 64) < 2**27
    assert tr.estimate_cost_bytes(2, 1080, 1920) > 500 * 2**30
    called = []
    tr._latents = lambda v: called.append(v) or (_ for _ in ()).throw(AssertionError("encoded"))
    video = np.zeros((2, 512, 512, 3), np.uint8)
    with pytest.raises(ValueError, match=r"tracking at 512x512 px \(video 512x512, 2 frames, 16384 tokens a frame\) "
                                         r"needs about \d+\.\d GiB .* max_cost_bytes=4\.0 GiB; allowed: use "
                                         r"work_size='model' \(64x64, the default\)"):
        tr(video, np.array([[0, 10.0, 10.0]]))
    assert not called  # refused before any encoding or forward
    with pytest.raises(ValueError, match=r"tracking at 1080x1920 px"):
        tr(np.zeros((2, 1080, 1920, 3), np.uint8), np.array([[0, 10.0, 10.0]]))
    with pytest.raises(ValueError, match=r"tracking at 128x128 px .*max_cost_bytes=0\.0 GiB"):
        DiffTracker(pipe, work_size=(128, 128), max_cost_bytes=2**20)(random_video(2), np.array([[0, 1.0, 1.0]]))


def test_noise_fused_layers_steps_and_features():
    model = tiny_cogvideox(layers=3)
    kw = dict(encode=pool_encode, token_stride=16, encoder_hidden_states=torch.randn(1, 8, 8), layers=(1,))
    video, q = random_video(4), np.array([[1, 20.0, 20.0]], np.float32)
    for extra in (dict(noise="add", step=(-1, -5)), dict(layers=(0, 2), fuse="concat", tau="heads"),
                  dict(refine="softargmax", occlusion="cycle+confidence"), dict(refine="interp", radius=2),
                  dict(pixel_refine="ncc")):
        tracks, visible = DiffTracker(model, **{**kw, **extra})(video, q)
        assert tracks.shape == (1, 4, 2) and visible[0, 1]
    tracks, visible = FeatureTracker(model, **kw)(video, q)
    assert tracks.shape == (1, 4, 2)
    # noise="add" is seeded: the same result twice
    a = DiffTracker(model, noise="add", **kw)(video, q)[0]
    b = DiffTracker(model, noise="add", **kw)(video, q)[0]
    np.testing.assert_array_equal(a, b)


def test_vae_encode_frames_cogvideox_scaling():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(1)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
                                 up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4, scaling_factor=0.7).eval()
    video = random_video(3, 16, 16)
    z = vae_encode_frames(vae, video)
    assert z.shape == (3, 4, 8, 8)
    x = torch.from_numpy(video[1:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0] * 0.7
    torch.testing.assert_close(z[1:2], ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- embedded model
@pytest.fixture(scope="module")
def embedded():
    return mini.load_default()


def _within(tracker, n_frames=7):
    """Mean pts_within_4 (1 px at 64) and _8 at 256x256 over two held-out clips, query-first."""
    W = world.World(frames=n_frames)
    res = []
    for fam, seed in (("objects", 0), ("scenes", 1)):
        s = W.sample(seed, fam, "heldout")
        q = W.grid_queries(6)
        gt, vis = W.tracks(s, q)
        tracks, visible = tracker(s.video, q)
        qq = tapvid.rescale_queries(q, (64, 64), (256, 256))
        m = tapvid.compute_tapvid_metrics(tapvid.queries_txy_to_tyx(qq)[None], ~vis[None],
                                          tapvid.rescale_tracks(gt, (64, 64), (256, 256))[None], ~visible[None],
                                          tapvid.rescale_tracks(tracks, (64, 64), (256, 256))[None], "first")
        res.append([m["pts_within_4"][0], m["pts_within_8"][0]])
    return np.mean(res, 0)


def test_embedded_beats_untrained(embedded):
    trained = _within(DiffTracker(embedded))
    untrained = _within(DiffTracker(mini.build_untrained()))
    assert trained[1] > 0.4, trained  # within half a token (2 px at 64) for a clear share of the points
    assert trained[0] > 2 * untrained[0] and trained[1] > 2 * untrained[1], (trained, untrained)


def test_embedded_nonzero_query_frame_and_short_clip(embedded):
    """Queries in the middle of the clip are tracked backward and forward in time."""
    tr = DiffTracker(embedded)
    W = world.World(frames=5)
    s = W.sample(0, "objects", "heldout")
    q = W.grid_queries(4, frame=2)
    gt, vis = W.tracks(s, q)
    tracks, visible = tr(s.video, q)
    np.testing.assert_allclose(tracks[:, 2], q[:, 1:])
    assert visible[:, 2].all()
    other = vis.copy()
    other[:, 2] = False
    err = np.linalg.norm(tracks - gt, axis=-1)[other]
    err_untrained = np.linalg.norm(DiffTracker(mini.build_untrained())(s.video, q)[0] - gt, axis=-1)[other]
    assert np.mean(err < 2.0) > 0.6 and np.mean(err < 2.0) > 2 * np.mean(err_untrained < 2.0)
    tracks2, _ = tr(s.video[:2], np.array([[1, 30.0, 30.0]], np.float32))
    assert tracks2.shape == (1, 2, 2)


# ----------------------------------------------------------------------------------------------- video io
def test_video_io_roundtrip(tmp_path):
    from difftrack.video_io import read_video, write_video

    v = world.World(frames=6).sample(0, "objects", "heldout").video
    p = write_video(tmp_path / "clip.mp4", v, fps=8)
    r = read_video(p)
    assert r.shape == v.shape and r.dtype == np.uint8
    assert np.abs(r.astype(int) - v).mean() < 8
    assert read_video(p, max_frames=3, resize=(32, 48)).shape == (3, 32, 48, 3)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="max_frames"):
        read_video(p, max_frames=0)
    with pytest.raises(ValueError, match="T, H, W, 3"):
        write_video(tmp_path / "x.mp4", v[0])


def test_read_video_refuses_a_truncated_file(tmp_path):
    """A faststart mp4 cut in half used to give 29 of 60 frames without a word (issue 18)."""
    import subprocess

    import imageio_ffmpeg

    from difftrack.video_io import read_video, write_video

    v = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    p = write_video(tmp_path / "clip.mp4", v, fps=8)
    fs = tmp_path / "faststart.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(p), "-c", "copy",
                    "-movflags", "faststart", str(fs)], check=True)
    assert read_video(fs).shape[0] == 60
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(fs.read_bytes()[: fs.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.mp4' is truncated or damaged: only \d+ of the 60 frames.*"
                                         r"allow_truncated=True"):
        read_video(cut)
    assert read_video(cut, max_frames=10).shape[0] == 10  # the frames asked for are there
    with pytest.warns(UserWarning, match=r"cut\.mp4' is truncated"):
        part = read_video(cut, allow_truncated=True)
    assert 0 < part.shape[0] < 60


def test_write_video_one_float_range_for_the_whole_video(tmp_path):
    """A frame of mean 0.8 inside a 0..255 float video used to be scaled x255 on its own (issue 18)."""
    from difftrack.video_io import read_video, write_video

    v = np.full((4, 16, 16, 3), 200.0, np.float32)
    v[2] = 0.8  # a dark frame of a 0..255 video
    r = read_video(write_video(tmp_path / "a.mp4", v, fps=4, quality=10))
    assert abs(float(r[2].mean()) - 1) < 3 and abs(float(r[0].mean()) - 200) < 3
    unit = np.full((3, 16, 16, 3), 0.5, np.float32)  # a [0, 1] video
    assert abs(float(read_video(write_video(tmp_path / "b.mp4", unit, fps=4, quality=10)).mean()) - 128) < 3
    r = read_video(write_video(tmp_path / "c.mp4", np.full((2, 16, 16, 3), 0.0), fps=4, quality=10,
                               value_range=(-1, 1)))
    assert abs(float(r.mean()) - 128) < 3
    with pytest.raises(ValueError, match=r"float frames span \[-1, 300\]; allowed without value_range"):
        write_video(tmp_path / "d.mp4", np.array([-1.0, 300.0]).repeat(8 * 8 * 3).reshape(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"outside value_range=\(0, 1\).*nothing is clipped"):
        write_video(tmp_path / "e.mp4", v, value_range=(0, 1))
    with pytest.raises(ValueError, match="NaN or inf"):
        write_video(tmp_path / "f.mp4", np.full((2, 8, 8, 3), np.nan))


def test_rope_cogvideox_layout():
    """A CogVideoX-5B-style transformer (3D RoPE built per chunk) at a non-square size."""
    model = tiny_cogvideox(rope=True, layers=2)
    tr = DiffTracker(model, layers=(1,), encode=pool_encode, token_stride=16,
                     encoder_hidden_states=torch.randn(1, 8, 8))
    tracks, visible = tr(random_video(4, 64, 96), np.array([[1, 50.0, 30.0]], np.float32))
    assert tracks.shape == (1, 4, 2) and visible[0, 1]


def test_wan_pipeline_with_its_vae():
    """Another backbone layout ([B, C, F, H, W], text by cross-attention) encoded by its own VAE per frame."""
    from difftrack.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan")
    ehs = pipe.encode_prompt("", do_classifier_free_guidance=False, device="cpu")[0]
    tr = DiffTracker(pipe, layers=(1,), encoder_hidden_states=ehs)
    assert tr.token_stride == 16 and tr.model_frame_size() == (480, 832)  # the pipeline's default size
    assert tr.resolve_work_size(3, 32, 32) == (32, 32)  # RoPE backbone: a size on the token grid is used as is
    assert tr.resolve_work_size(3, 30, 32) == (480, 832)
    video = random_video(3, 32, 32)
    z = vae_encode_frames(pipe.vae, video)
    assert z.shape[0] == 3 and z.shape[-2:] == (4, 4)
    tracks, visible = tr(video, np.array([[2, 20.0, 10.0]], np.float32))
    assert tracks.shape == (1, 3, 2)
    np.testing.assert_allclose(tracks[0, 2], [20.0, 10.0])


def test_heads_subset_tracker():
    """DiffTracker(heads=...) averages the cost over the chosen heads: every head is bitwise the default tracker,
    a single head gives other tracks; bad head lists and heads on features are refused with the allowed values."""
    from difftrack.tracking import FeatureTracker

    model = tiny_cogvideox(layers=2)
    ehs = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(layers=(1,), encode=pool_encode, token_stride=16, encoder_hidden_states=ehs, occlusion="none")
    H = model.transformer_blocks[1].attn1.heads
    video = random_video(5, 64, 64, seed=3)
    q = np.array([[0, 20.0, 30.0], [0, 40.0, 12.0]], np.float32)
    ref = DiffTracker(model, **kw)(video, q)[0]
    assert np.array_equal(DiffTracker(model, heads=list(range(H)), **kw)(video, q)[0], ref)
    one = DiffTracker(model, heads=[0], **kw)(video, q)[0]
    assert one.shape == ref.shape and not np.array_equal(one, ref)
    with pytest.raises(ValueError, match=f"heads=\\[{H}\\]; allowed: None or a non-empty list"):
        DiffTracker(model, heads=[H], **kw)
    with pytest.raises(ValueError, match="query-key matching only"):
        FeatureTracker(model, layers=(1,), encode=pool_encode, token_stride=16, encoder_hidden_states=ehs, heads=[0])
