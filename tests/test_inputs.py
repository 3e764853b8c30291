"""Issue 28 (inputs): every public entry point checks its input before any work, with one rule per quantity
(difftrack.checks): dtype spellings, integer grid sizes with a memory estimate against a limit, guidance scales, CAG
scales at every schedule step; run_dataset's items and cache folder; write_video writes the file or raises one clear
error and leaves nothing behind; a misspelt notebook parameter name fails within seconds."""
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from difftrack import analysis, checks
from difftrack.experiments import analysis as xa
from difftrack.hooks import IncompleteRunError

ROOT = Path(__file__).resolve().parents[1]
GEN = dict(kind="generated", family="objects", seed=0, prompt="a red circle moving left on a still background")


def _tiny_mini():
    from test_guidance import tiny_mini_pipe

    return tiny_mini_pipe()


def _count_forwards(transformer) -> list:
    calls = []
    transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


# ---------------------------------------------------------------------------------------------- dtype
def test_dtype_spellings_are_one_rule_for_every_entry_point():
    from difftrack import runners
    from difftrack.cag_eval import autocast_context
    from difftrack.capture import capture
    from difftrack.tracking import DiffTracker

    for spelling in ("bf16", "bfloat16", torch.bfloat16):
        assert checks.check_dtype(spelling) == "bfloat16" and runners._dtype(spelling) is torch.bfloat16
    assert checks.as_torch_dtype("fp16") is torch.float16 and checks.as_torch_dtype("half") is torch.float16
    # one cache tag per dtype, whatever the spelling
    assert runners.model_tag("embedded", "bf16") == runners.model_tag("embedded", torch.bfloat16) == \
        runners.model_tag("embedded", "bfloat16") == "embedded-bfloat16"
    assert runners.model_tag("embedded", "fp32") == "embedded"
    with autocast_context("cpu", "bfloat16") as ctx:
        assert ctx is not None and torch.get_autocast_dtype("cpu") is torch.bfloat16
    allowed = r"allowed: \['bf16', 'bfloat16', 'float', 'float16', 'float32', 'fp16', 'fp32', 'half'\]"
    with pytest.raises(ValueError, match=r"dtype='int8'; " + allowed):
        runners.load_pipeline("embedded", dtype="int8")
    with pytest.raises(ValueError, match=r"autocast='fp32'; allowed: None or a half-precision dtype"):
        autocast_context("cpu", "fp32")
    pipe = _tiny_mini()
    with pytest.raises(ValueError, match=r"dtype='float64'; " + allowed):
        DiffTracker(pipe, layers=[0], dtype="float64")
    tracker = DiffTracker(pipe, layers=[0], dtype="bf16")  # a string works as a torch.dtype does
    assert tracker.dtype is torch.bfloat16 and next(tracker.transformer.parameters()).dtype is torch.bfloat16
    assert next(pipe.transformer.parameters()).dtype is torch.float32  # the caller's model is untouched
    with pytest.raises(ValueError, match=r"dtype='f32'; " + allowed):
        with capture(pipe, layers=[0], steps=[0], dtype="f32"):
            pass
    with pytest.raises(IncompleteRunError):  # the dtype was accepted; nothing ran inside the context
        with capture(pipe, layers=[0], steps=[0], dtype="fp16") as cap:
            assert cap.dtype is torch.float16


# ---------------------------------------------------------------------------------------------- grid sizes
@pytest.mark.parametrize("bad", [4.0, True, "4", 0, -2, None])
def test_grid_size_must_be_an_int(bad):
    with pytest.raises(ValueError, match=r"grid_size=.*allowed: an int >= 1"):
        checks.check_grid_size(bad)
    from difftrack.world import World

    with pytest.raises(ValueError, match=r"grid_size=.*allowed: an int >= 1"):
        World().grid_queries(bad)


def test_grid_memory_is_estimated_and_refused_above_the_limit_before_any_forward(monkeypatch, tmp_path):
    pipe = _tiny_mini()
    calls = _count_forwards(pipe.transformer)
    size = (3, 16, 16)
    with pytest.raises(ValueError, match=r"grid_size=4.0 \(float\); allowed: an int >= 1"):
        analysis.analyze_generation(pipe, GEN["prompt"], 0, num_steps=2, grid_size=4.0, size=size)
    # 3000 x 3000 points: the estimate names the bytes and the limit, and how to raise it
    need = checks.grid_memory_bytes(3000 ** 2, 2, 2, 3, 16)
    assert need > 4 * 2 ** 30
    with pytest.raises(ValueError, match=r"grid_size=3000 \(9000000 points\) over 2 steps x 2 layers x 3 latent "
                                         r"frames of 16 tokens needs about .* GiB, above the limit of 4.00 GiB; "
                                         r".*max_grid_bytes=.*DIFFTRACK_MAX_GRID_BYTES"):
        analysis.analyze_generation(pipe, GEN["prompt"], 0, num_steps=2, grid_size=3000, size=size)
    with pytest.raises(ValueError, match=r"needs about"):
        xa.run_dataset(pipe, [GEN], tmp_path / "c", num_steps=2, grid_size=3000, size=size, progress=False)
    assert calls == [] and not (tmp_path / "c").exists()
    # the limit is overridable: by argument, or in the environment
    small = checks.grid_memory_bytes(16, 2, 2, 3, 16)
    with pytest.raises(ValueError, match=r"grid_size=4 .* above the limit"):
        analysis.analyze_generation(pipe, GEN["prompt"], 0, num_steps=2, grid_size=4, size=size,
                                    max_grid_bytes=small - 1)
    monkeypatch.setenv("DIFFTRACK_MAX_GRID_BYTES", str(small - 1))
    with pytest.raises(ValueError, match=r"grid_size=4 .* above the limit"):
        analysis.analyze_generation(pipe, GEN["prompt"], 0, num_steps=2, grid_size=4, size=size)
    assert calls == []
    video, rec = analysis.analyze_generation(pipe, GEN["prompt"], 0, num_steps=2, grid_size=4, size=size,
                                             max_grid_bytes=small)  # exactly at the limit: runs
    assert video.shape == (3, 16, 16, 3) and len(calls) > 0
    monkeypatch.setenv("DIFFTRACK_MAX_GRID_BYTES", "lots")
    with pytest.raises(ValueError, match=r"DIFFTRACK_MAX_GRID_BYTES='lots' in the environment"):
        checks.max_grid_bytes()


def test_notebook_grid_size_uses_the_same_memory_rule():
    from difftrack.params import check_notebook

    values = dict(model="embedded", videos_per_family=1, exact_per_family=1, num_steps=4, grid_size=300,
                  device="cpu", dtype="bf16", seed=0, size=[], pseudo_check_per_family=8, show_per_family=1)
    with pytest.raises(ValueError, match=r"grid_size=300: .*needs about .* GiB, above the limit of 4.00 GiB"):
        check_notebook("01_dataset", values)
    check_notebook("01_dataset", dict(values, grid_size=8))  # "bf16": the dtype spellings of the library


# ---------------------------------------------------------------------------------------------- guidance scales
def test_guidance_scale_is_one_rule_for_analysis_and_run_dataset(tmp_path):
    from difftrack.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("cogvideox")  # a diffusers pipeline: it would accept a negative scale itself
    calls = _count_forwards(pipe.transformer)
    msg = r"guidance_scale=-1.0; allowed: a finite number in \[0, 50\]"
    with pytest.raises(ValueError, match=msg):
        analysis.analyze_generation(pipe, "a red car", 0, num_steps=2, grid_size=2, guidance_scale=-1.0)
    with pytest.raises(ValueError, match=msg):
        xa.run_dataset(pipe, [GEN], tmp_path, num_steps=2, grid_size=2, guidance_scale=-1.0, progress=False)
    with pytest.raises(ValueError, match=r"guidance_scale=True; allowed"):
        analysis.analyze_generation(pipe, "a red car", 0, num_steps=2, grid_size=2, guidance_scale=True)
    from difftrack.guidance import generate_with_cag_diffusers

    with pytest.raises(ValueError, match=msg):  # without CAG too (the diffusers pipeline would run it)
        generate_with_cag_diffusers(pipe, None, prompt="a red car", guidance_scale=-1.0, num_inference_steps=2)
    assert calls == []


# ---------------------------------------------------------------------------------------------- CAG schedules
@pytest.mark.parametrize("bad", [math.nan, -0.5, 25.0])
def test_cag_schedule_value_is_checked_at_every_step(bad):
    from difftrack.guidance import CAGConfig, generate_with_cag

    def schedule(step):
        return bad if step == 2 else 1.0

    cfg = CAGConfig([0], scale=1.0, schedule=schedule)
    assert cfg.scale_at(1, 4) == 1.0
    with pytest.raises(ValueError, match=r"at denoising step 2: the CAG schedule's scale=.*allowed: a finite number "
                                         r"in \[0, 20\].*refused, not applied"):
        cfg.scale_at(2, 4)
    with pytest.raises(ValueError, match="at denoising step 2"):
        cfg.check_steps(4)
    pipe = _tiny_mini()
    calls = _count_forwards(pipe.transformer)
    kw = dict(num_frames=3, height=16, width=16, num_inference_steps=4, progress=False)
    with pytest.raises(ValueError, match="at denoising step 2"):
        generate_with_cag(pipe, GEN["prompt"], cfg, **kw)
    assert calls == []  # refused before the first forward
    cfg.check_steps(2)  # a run that ends before step 2 never uses that value

    # a schedule that changes its mind during the run is still refused at the step it happens
    state = {"calls": 0}

    def flaky(step):
        state["calls"] += 1
        return -1.0 if state["calls"] > 4 else 1.0

    with pytest.raises(ValueError, match=r"at denoising step 0: the CAG schedule's scale=-1.0"):
        generate_with_cag(pipe, GEN["prompt"], CAGConfig([0], schedule=flaky), **kw)
    with pytest.raises(ValueError, match=r"returned 'x' at denoising step 0"):
        CAGConfig([0], schedule=lambda s: "x").scale_at(0, 4)


# ---------------------------------------------------------------------------------------------- run_dataset
def test_run_dataset_checks_items_and_cache_folder_before_any_work(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(analysis, "analyze_generation", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("no work may start")))
    monkeypatch.setattr(analysis, "analyze_exact", lambda *a, **k: calls.append(a))
    pipe = _tiny_mini()
    good = [GEN]
    for items, msg in (([GEN, dict(kind="real", seed=0)], r"item 1 .*unknown item kind 'real'"),
                       ([GEN, dict(kind="exact", family="animals", seed=0)], r"item 1 .*family='animals'; allowed"),
                       ([dict(GEN, seed=1.5)], r"item 0 .*seed=1.5 \(float\); allowed: an int >= 0"),
                       ([dict(GEN, prompt="")], r"item 0 .*prompt=''; allowed: a non-empty string"),
                       ([dict(GEN, split="test")], r"item 0 .*split='test'; allowed"),
                       ("generated", r"items='generated'; allowed: a list of item dicts")):
        with pytest.raises(ValueError, match=msg):
            xa.run_dataset(pipe, items, tmp_path / "cache", num_steps=2, grid_size=2, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"cache_dir='.*file' exists and is not a folder"):
        xa.run_dataset(pipe, good, blocker, num_steps=2, grid_size=2, progress=False)
    with pytest.raises(ValueError, match=r"cache_dir='.*file/sub' cannot be created"):
        xa.run_dataset(pipe, good, blocker / "sub", num_steps=2, grid_size=2, progress=False)
    with pytest.raises(ValueError, match=r"cache_dir='.*missing' does not exist and no pipeline"):
        xa.run_dataset(None, good, tmp_path / "missing", num_steps=2, grid_size=2, progress=False)
    with pytest.raises(ValueError, match=r"unknown analysis settings \['refine_rule'\]"):
        xa.run_dataset(pipe, [GEN, dict(kind="exact", family="objects", seed=0)], tmp_path / "cache",
                       num_steps=2, grid_size=2, progress=False, refine_rule="x")
    assert calls == [] and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- write_video
def _clip():
    return np.random.default_rng(0).integers(0, 255, (3, 16, 18, 3), dtype=np.uint8)


def test_write_video_writes_every_format_or_raises_one_clear_error_leaving_nothing(tmp_path):
    from difftrack.video_io import VIDEO_SUFFIXES, read_video, write_video

    v = _clip()
    for suffix in VIDEO_SUFFIXES:
        p = write_video(tmp_path / f"ok{suffix}", v, fps=4)
        assert p.exists() and read_video(p).shape == (3, 16, 18, 3)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"cannot write video '.*x.tiff': unknown suffix '.tiff'; allowed: .mp4, "
                                         r".webm, .avi, .mov, .mkv, .gif"):
        write_video(tmp_path / "x.tiff", v)
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(OSError, match=r"cannot write video '.*folder.mp4': it is a folder"):
        write_video(tmp_path / "folder.mp4", v)
    (tmp_path / "notafolder").write_text("x")
    with pytest.raises(OSError, match=r"cannot write video '.*notafolder/a.mp4': its folder cannot be created"):
        write_video(tmp_path / "notafolder" / "a.mp4", v)
    assert sorted(tmp_path.iterdir()) == sorted(before + [tmp_path / "folder.mp4", tmp_path / "notafolder"])


def test_write_video_fails_midway_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    import imageio.v2 as iio2

    from difftrack.video_io import write_video

    target = tmp_path / "clip.mp4"
    target.write_bytes(b"old")
    real = iio2.get_writer

    class Broken:
        def __init__(self, *a, **k):
            self.w = real(*a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.w.close()

        def append_data(self, f):
            self.w.append_data(f)
            raise RuntimeError("disk full")

    monkeypatch.setattr(iio2, "get_writer", Broken)
    with pytest.raises(OSError, match=r"cannot write video '.*clip.mp4': RuntimeError: disk full"):
        write_video(target, _clip())
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"] and target.read_bytes() == b"old"


def test_write_video_without_imageio_ffmpeg_names_what_to_install_and_notebooks_fall_back(tmp_path, monkeypatch):
    from difftrack.video_io import VideoWriterMissing, can_write_video, read_video, write_movie, write_video

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg -> ImportError
    assert not can_write_video(".mp4") and can_write_video(tmp_path / "a.gif") and not can_write_video(".tiff")
    with pytest.raises(VideoWriterMissing, match=r"cannot write video '.*a.mp4': .mp4 needs ffmpeg and the "
                                                 r"imageio-ffmpeg package is not installed; install it with `pip "
                                                 r"install imageio-ffmpeg`"):
        write_video(tmp_path / "a.mp4", _clip())
    assert list(tmp_path.iterdir()) == []
    # what notebook 04 does: the committed mp4 stays as it is, the movie becomes a GIF elsewhere, with a note
    figures, fallback = tmp_path / "figures", tmp_path / "cache"
    figures.mkdir()
    (figures / "04_tracks.mp4").write_bytes(b"committed")
    movie, note = write_movie(figures / "04_tracks.mp4", _clip(), fps=4, fallback_dir=fallback)
    assert movie == fallback / "04_tracks.gif" and read_video(movie).shape == (3, 16, 18, 3)
    assert "pip install imageio-ffmpeg" in note and (figures / "04_tracks.mp4").read_bytes() == b"committed"
    assert [p.name for p in figures.iterdir()] == ["04_tracks.mp4"]
    monkeypatch.delitem(sys.modules, "imageio_ffmpeg")
    movie, note = write_movie(figures / "04_tracks.mp4", _clip(), fps=4, fallback_dir=fallback)
    assert note is None and movie == figures / "04_tracks.mp4" and read_video(movie).shape == (3, 16, 18, 3)


# ---------------------------------------------------------------------------------------------- notebook names
def test_unknown_notebook_parameter_names_are_refused():
    from difftrack import params as P

    history = ["", "model = 'embedded'", "# Parameters\ngrid_szie = 4\nnum_steps = 2\n", "from x import y"]
    assert P.injected_names(history) == ["grid_szie", "num_steps"]
    values = dict(model="embedded", videos_per_family=1, exact_per_family=1, num_steps=2, grid_size=8,
                  device="cpu", dtype="float32", seed=0, size=[], pseudo_check_per_family=8, show_per_family=1)
    P.check_notebook("01_dataset", dict(values, In=history[:2]))  # nothing injected: fine
    with pytest.raises(P.ParameterError, match=r"notebook 01_dataset: unknown parameter name \['grid_szie'\] "
                                               r"\(misspelt\?\); allowed names: \['model', .*'grid_size'"):
        P.check_notebook("01_dataset", dict(values, In=history))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import run_notebooks
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match=r"unknown parameter name \['grid_szie'\]"):
        run_notebooks.check_parameter_names(ROOT / "notebooks" / "02_layer_analysis.ipynb", {"grid_szie": 4})
    run_notebooks.check_parameter_names(ROOT / "notebooks" / "02_layer_analysis.ipynb", {"grid_size": 4})
    assert run_notebooks.main([str(ROOT / "notebooks" / "05_cag.ipynb"), "-p", "n_promts", "2"]) == 2  # no kernel


def test_plain_papermill_fails_within_seconds_on_a_misspelt_name(tmp_path):
    """The notebook's own check cell refuses it (papermill alone only warns and runs on the defaults)."""
    import papermill

    t0 = time.monotonic()
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameter name \['grid_szie'\]"):
        papermill.execute_notebook(str(ROOT / "notebooks" / "01_dataset.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"grid_szie": 4}, cwd=str(ROOT / "notebooks"), progress_bar=False,
                                   kernel_name="python3")
    assert time.monotonic() - t0 < 120  # kernel start + the parameters check; no model is loaded
