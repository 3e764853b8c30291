"""difftrack.params: every notebook parameter checked in the cell after the parameters cell, before any model load or
file write (issue 18). Unit tests of the checker, the committed notebooks' defaults, and one papermill run of
notebook 02 with a bad ``layer`` that must fail fast with figures/ and results/ untouched."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from difftrack import params as P
from difftrack.params import (
    ParameterError,
    check_notebook,
    check_params,
    model_geometry,
)

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_dataset", "02_layer_analysis", "03_timestep", "04_tracking", "05_cag"]


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(str(NB_DIR / f"{name}.ipynb"), as_version=4)


def _param_index(nb) -> int:
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(idx) == 1, "exactly one cell tagged 'parameters'"
    return idx[0]


def defaults(name: str) -> dict:
    """The parameters cell of the committed notebook, executed (it holds only typed literal assignments)."""
    nb = _read(name)
    g: dict = {}
    exec(nb.cells[_param_index(nb)].source, g)
    return {k: v for k, v in g.items() if not k.startswith("__")}


def _errors(name: str, **override) -> dict[str, str]:
    with pytest.raises(ParameterError) as exc:
        check_notebook(name, {**defaults(name), **override})
    return exc.value.errors


# ------------------------------------------------------------------------------------------ the committed notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_defaults_of_every_notebook_pass(name):
    ctx = check_notebook(name, defaults(name))
    if "model" in ctx:
        assert ctx["num_layers"] == 12


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_parameter_of_every_notebook_is_checked(name):
    assert set(defaults(name)) == set(P.SPECS[name][0]), "the spec must cover exactly the parameters cell"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_check_cell_comes_right_after_the_parameters_cell(name):
    nb = _read(name)
    i = _param_index(nb)
    assert f'check_notebook("{name}", globals())' in nb.cells[i + 1].source
    before = "\n".join(c.source for c in nb.cells[: i + 2] if c.cell_type == "code")
    for call in ("load_pipeline", "load_default", "write_text", "savefig", "to_csv", "save=", "figures_dir",
                 "results_dir", "cache_dir", "import torch"):
        assert call not in before, f"{call} before the parameter check of {name}"


# the released checkpoints' config entries the checks read, by the placeholder folder name of the parameter files:
# (pipeline class, transformer/config.json, vae/config.json)
CONFIGS = {
    "CogVideoX-2b": ("CogVideoXPipeline", dict(num_layers=30, patch_size=2, sample_frames=49, sample_height=60,
                                              sample_width=90),
                     dict(temporal_compression_ratio=4, block_out_channels=[128, 256, 256, 512])),
    "Wan2.2-TI2V-5B-Diffusers": ("WanPipeline", dict(num_layers=30, patch_size=[1, 2, 2]),
                                 dict(scale_factor_temporal=4, scale_factor_spatial=16)),
    "SkyReels-V2-DF-1.3B-540P-Diffusers": ("SkyReelsV2DiffusionForcingPipeline",
                                           dict(num_layers=30, patch_size=[1, 2, 2]),
                                           dict(scale_factor_temporal=4, scale_factor_spatial=8)),
    "mochi-1-preview": ("MochiPipeline", dict(num_layers=48, patch_size=2),
                        dict(temporal_expansions=[1, 2, 3], spatial_expansions=[2, 2, 2])),
    "HunyuanVideo-1.5-480p_t2v": ("HunyuanVideo15Pipeline", dict(num_layers=54, patch_size=1, patch_size_t=1),
                                  dict(temporal_compression_ratio=4, spatial_compression_ratio=16)),
    "Cosmos-Predict2-2B-Video2World": ("Cosmos2VideoToWorldPipeline", dict(num_layers=28, patch_size=[1, 2, 2]),
                                       dict(temperal_downsample=[False, True, True])),
}


@pytest.mark.parametrize("yaml_name, notebooks", [
    ("full.yaml", ["01_dataset", "02_layer_analysis", "03_timestep"]), ("04_full.yaml", ["04_tracking"]),
    ("cogvideox_2b.yaml", ["02_layer_analysis", "03_timestep"]), ("04_cogvideox_2b.yaml", ["04_tracking"]),
    ("wan22_ti2v_5b.yaml", ["02_layer_analysis", "03_timestep"]), ("04_wan22_ti2v_5b.yaml", ["04_tracking"]),
    ("skyreels_v2_df_1.3b.yaml", ["02_layer_analysis", "03_timestep"]),
    ("04_skyreels_v2_df_1.3b.yaml", ["04_tracking"]),
    ("mochi_1.yaml", ["02_layer_analysis", "03_timestep"]), ("04_mochi_1.yaml", ["04_tracking"]),
    ("hunyuanvideo15_480p.yaml", ["02_layer_analysis", "03_timestep"]),
    ("04_hunyuanvideo15_480p.yaml", ["04_tracking"]),
    ("cosmos_predict2_2b.yaml", ["02_layer_analysis", "03_timestep"]), ("04_cosmos_predict2_2b.yaml", ["04_tracking"])])
def test_committed_paper_scale_parameter_files_pass(yaml_name, notebooks, tmp_path):
    """notebooks/params/*.yaml on top of the defaults; the real-model files with a folder of the model's configs
    (the released checkpoints' transformer and VAE geometry, :data:`CONFIGS`) in place of their /path/to/...
    placeholder, and on the CPU where CUDA is missing."""
    import torch
    import yaml

    over = yaml.safe_load((NB_DIR / "params" / yaml_name).read_text())
    if "model" in over:
        name = Path(over["model"]).name
        cls, tcfg, vcfg = CONFIGS[name]
        over["model"] = str(_folder(tmp_path / name, cls, tcfg, vae=vcfg))
    if over.get("device") == "cuda" and not torch.cuda.is_available():
        over["device"] = "cpu"
    for name in notebooks:
        vals = {**defaults(name), **{k: v for k, v in over.items() if k in P.SPECS[name][0]}}
        check_notebook(name, vals)


# ------------------------------------------------------------------------------------------ each rule
BAD = [  # (notebook, parameter, bad value, a fragment of what is allowed)
    ("02_layer_analysis", "layer", 99, "-1..11"),
    ("02_layer_analysis", "layer", -2, "-1..11"),
    ("02_layer_analysis", "layer", 8.5, "an int (got float)"),
    ("02_layer_analysis", "step", 4, "-4..3"),  # the default num_steps is 4
    ("02_layer_analysis", "step", -5, "-4..3"),
    ("02_layer_analysis", "num_steps", 0, "1..1000"),
    ("02_layer_analysis", "grid_size", 0, ">= 1"),
    ("02_layer_analysis", "grid_size", 300, "raise the limit with DIFFTRACK_MAX_GRID_BYTES"),  # ~20 GiB
    ("02_layer_analysis", "inspect_video", -1, ">= 0"),
    ("02_layer_analysis", "num_points", 0, ">= 1"),
    ("02_layer_analysis", "untrained_control", 1, "True or False"),
    ("02_layer_analysis", "seed", -1, ">= 0"),
    ("02_layer_analysis", "dtype", "int8", "'bfloat16', 'bf16'"),  # the library's spellings (checks.check_dtype)
    ("02_layer_analysis", "device", "gpu", "'cpu', 'cuda'"),
    ("02_layer_analysis", "model", "/no/such/folder", "model_index.json"),
    ("02_layer_analysis", "size", [13, 64], "0 or 3 items"),
    ("02_layer_analysis", "size", [13, 63, 64], "multiples of 4 px"),
    ("02_layer_analysis", "size", [1, 64, 64], "at least 2 frames"),
    ("02_layer_analysis", "size", [13, 64.0, 64], "each item an int"),
    ("02_layer_analysis", "videos_per_family", -1, ">= 0"),
    ("01_dataset", "pseudo_check_per_family", 0, ">= 1"),
    ("01_dataset", "show_per_family", 0, ">= 1"),
    ("01_dataset", "exact_per_family", "1", "an int (got str)"),
    ("03_timestep", "layer", 12, "-1..11"),
    ("03_timestep", "num_steps", True, "an int (got bool)"),
    ("04_tracking", "layer", 12, "0..11"),
    ("04_tracking", "layer", -1, "0..11"),
    ("04_tracking", "step", 50, "-50..49"),
    ("04_tracking", "slider_layers", [2, 12], "0..11"),
    ("04_tracking", "slider_steps", [-1, -51], "-50..49"),
    ("04_tracking", "family", "cars", "objects"),
    ("04_tracking", "video_path", "no_such_video.mp4", "existing file"),
    ("04_tracking", "tapvid_path", "no_such_dir/tapvid_davis.pkl", "existing file or folder"),
    ("04_tracking", "benchmark", "no_such_table.json", "existing file"),
    ("04_tracking", "native_size", [480], "2 items"),
    ("04_tracking", "native_size", [0, 720], ">= 1"),
    ("04_tracking", "num_frames", 1, ">= 2"),
    ("04_tracking", "n_videos", 0, ">= 1"),
    ("04_tracking", "trail", -1, ">= 0"),
    ("04_tracking", "scale", 0, "1..32"),
    ("04_tracking", "tapvid_max_points", 0, ">= 1"),
    ("04_tracking", "device", "tpu", "'cpu', 'cuda'"),
    ("05_cag", "scales", [1.0, float("nan")], "finite"),
    ("05_cag", "scales", [-1.0], "0..20"),
    ("05_cag", "scales", [], "1..64 items"),
    ("05_cag", "scale", 2.0, "one of the CAG scales"),
    ("05_cag", "scale", 1e9, "0..20"),
    ("05_cag", "guidance_scale", float("inf"), "finite"),
    ("05_cag", "guidance_scale", 1e30, "0..50"),
    ("05_cag", "variant", "zero", "renormalized"),
    ("05_cag", "prompt_index", 2, "0..1"),
    ("05_cag", "layer_set", "top5", "bottom3"),
    ("05_cag", "threads", 0, "1..1024"),
    ("05_cag", "n_prompts", 0, ">= 1"),
    ("05_cag", "num_steps", 0, "1..1000"),
]


@pytest.mark.parametrize("notebook, name, value, allowed", BAD, ids=[f"{n[:2]}-{p}-{v!r}" for n, p, v, _ in BAD])
def test_each_rule_names_the_parameter_value_and_what_is_allowed(notebook, name, value, allowed):
    errors = _errors(notebook, **{name: value})
    assert list(errors) == [name], errors
    msg = errors[name]
    assert msg.startswith(f"{name}={value!r}"), msg
    assert "allowed" in msg and allowed in msg, msg


def test_every_bad_parameter_is_listed_at_once():
    with pytest.raises(ValueError) as exc:
        check_notebook("02_layer_analysis", {**defaults("02_layer_analysis"), "layer": 99, "step": 6, "seed": -1,
                                             "dtype": "int8", "size": [13, 63, 64]})
    msg = str(exc.value)
    assert msg.startswith("notebook 02_layer_analysis: 5 bad parameters"), msg
    for frag in ("layer=99", "step=6", "seed=-1", "dtype='int8'", "size=[13, 63, 64]"):
        assert frag in msg, msg
    assert "has 12 blocks" in msg


def test_missing_parameter_and_unknown_notebook():
    vals = defaults("03_timestep")
    del vals["layer"]
    with pytest.raises(ParameterError, match="layer='<missing>': missing"):
        check_notebook("03_timestep", vals)
    with pytest.raises(ValueError, match="unknown notebook"):
        check_notebook("06_nothing", {})
    assert check_notebook("notebooks/05_cag.ipynb", defaults("05_cag")) is not None  # a file name works too


def test_no_videos_and_compressed_time_are_cross_parameter_errors(tmp_path):
    assert "videos_per_family + exact_per_family >= 1" in \
        _errors("02_layer_analysis", videos_per_family=0, exact_per_family=0)["videos_per_family"]
    cog = _folder(tmp_path / "cog", "CogVideoXPipeline", dict(num_layers=30, patch_size=2, sample_frames=49,
                                                                sample_height=60, sample_width=90),
                  vae=dict(temporal_compression_ratio=4, block_out_channels=[128, 256, 256, 512]))
    assert "compresses time" in _errors("01_dataset", model=str(cog))["model"]
    assert check_notebook("02_layer_analysis", {**defaults("02_layer_analysis"), "model": str(cog), "layer": 29,
                                                "size": [49, 480, 720]})["num_layers"] == 30
    err = _errors("02_layer_analysis", model=str(cog), layer=30, size=[48, 480, 712])
    assert "0..29" not in err["layer"] and "-1..29" in err["layer"] and "has 30 blocks" in err["layer"]
    assert "frames - 1 divisible by 4" in err["size"] and "multiples of 16 px" in err["size"]
    assert "multiples of 16 px" in _errors("04_tracking", model=str(cog), native_size=[480, 730])["native_size"]


def test_errors_of_a_bad_parameter_skip_rules_that_depend_on_it():
    errors = _errors("05_cag", scales=["a"], scale=3.0)
    assert list(errors) == ["scales"], errors  # scale's membership is not checked against a bad list
    errors = _errors("02_layer_analysis", model="/no/such/folder", layer=99)
    assert list(errors) == ["model"], errors  # the layer range needs the model's block count


# ------------------------------------------------------------------------------------------ geometry and speed
def _folder(path: Path, cls: str, transformer: dict, vae: dict | None = None) -> Path:
    (path / "transformer").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    (path / "transformer" / "config.json").write_text(json.dumps(transformer))
    if vae is not None:
        (path / "vae").mkdir()
        (path / "vae" / "config.json").write_text(json.dumps(vae))
    return path


def test_prompt_only_generation_refused_for_video2world(tmp_path):
    """Cosmos Video2World generates from a conditioning image: notebook 02's check refuses videos_per_family > 0
    before any model load, and takes world videos only."""
    cls, transformer, vae = CONFIGS["Cosmos-Predict2-2B-Video2World"]
    folder = str(_folder(tmp_path / "cosmos", cls, transformer, vae=vae))
    vals = {**defaults("02_layer_analysis"), "model": folder, "size": [9, 32, 32]}
    with pytest.raises(ValueError, match=r"videos_per_family.*Cosmos2VideoToWorldPipeline does not generate from a "
                                         r"prompt alone; allowed: 0"):
        check_notebook("02_layer_analysis", dict(vals, videos_per_family=1))
    check_notebook("02_layer_analysis", dict(vals, videos_per_family=0, exact_per_family=1))


def test_embedded_geometry_matches_the_model_without_loading_it():
    from difftrack import mini
    from difftrack.runners import VideoRunner

    g = model_geometry("embedded")
    assert g.num_layers == mini.transformer_config()["num_layers"] == 12
    assert (g.stride, g.temporal, g.default_size) == (4, 1, (mini.FRAMES, mini.HEIGHT, mini.WIDTH))
    assert P.EMBEDDED_DIR == mini.WEIGHTS_DIR and P.EMBEDDED_PATCH == mini.PATCH
    runner = VideoRunner(mini.build_untrained())
    assert (runner.num_layers, runner.stride, runner.temporal) == (g.num_layers, g.stride, g.temporal)


def test_folder_geometry_from_config_files(tmp_path):
    hy = _folder(tmp_path / "hy", "HunyuanVideoPipeline", dict(num_layers=20, num_single_layers=40, patch_size=2),
                 vae=dict(temporal_compression_ratio=4, spatial_compression_ratio=8))
    assert (model_geometry(str(hy)).num_layers, model_geometry(str(hy)).stride) == (60, 16)
    wan = _folder(tmp_path / "wan", "WanPipeline", dict(num_layers=30, patch_size=[1, 2, 2]),
                  vae=dict(scale_factor_temporal=4, scale_factor_spatial=8))
    assert (model_geometry(str(wan)).num_layers, model_geometry(str(wan)).stride,
            model_geometry(str(wan)).temporal) == (30, 16, 4)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json.*not valid JSON"):
        model_geometry(str(bad))
    other = _folder(tmp_path / "sd", "StableDiffusionPipeline", dict(num_layers=1))
    with pytest.raises(ValueError, match="StableDiffusionPipeline.*allowed pipelines"):
        model_geometry(str(other))
    notr = tmp_path / "notr"
    notr.mkdir()
    (notr / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="transformer config .*missing"):
        model_geometry(str(notr))


def test_folder_geometry_matches_the_runner_of_saved_tiny_pipelines(tmp_path):
    """The config-file reading agrees with VideoRunner on the real diffusers classes (tiny random pipelines, as
    tests/test_notebooks_backbones.py runs notebooks 02 and 04 on), and those notebook runs' parameters pass."""
    from difftrack.runners import VideoRunner
    from difftrack.testing import EXPERT_KINDS, KINDS, build_tiny_pipeline, tiny_size

    for kind in KINDS + EXPERT_KINDS:
        FRAMES, HEIGHT, WIDTH = tiny_size(kind)
        folder = tmp_path / kind
        runner = VideoRunner(build_tiny_pipeline(kind, path=folder))
        g = model_geometry(str(folder))
        assert (g.num_layers, g.stride, g.temporal) == (runner.num_layers, runner.stride, runner.temporal), kind
        assert g.experts == runner.experts.names, kind  # Wan 2.2: ("transformer", "transformer_2")
        bad = _errors("04_tracking", model=str(folder), expert="transformer_3")["expert"]
        assert f"has the expert(s) {list(g.experts)}; allowed: ''" in bad
        if kind in EXPERT_KINDS:
            assert "expert" not in _errors("04_tracking", model=str(folder), expert="transformer_2")
        assert g.default_size in (None, runner.default_size()), kind
        last = g.num_layers - 1
        check_notebook("02_layer_analysis", {**defaults("02_layer_analysis"), "model": str(folder), "num_steps": 2,
                                             "size": [FRAMES, HEIGHT, WIDTH],  # Cosmos: world videos only
                                             "videos_per_family": int(runner.family.prompt_to_video)})
        check_notebook("04_tracking", {**defaults("04_tracking"), "model": str(folder), "layer": last,
                                       "slider_layers": [0, last], "slider_steps": [-1, -2],
                                       "native_size": [HEIGHT, WIDTH], "num_frames": FRAMES, "device": "cpu"})
        assert f"0..{last}" in _errors("04_tracking", model=str(folder), layer=last + 1)["layer"]


def test_constants_agree_with_the_modules_that_define_them():
    from difftrack import guidance, mini, runners, world

    assert P.PIPELINES == tuple(runners.PIPELINES) and P.DTYPES == runners.DTYPES
    assert P.FAMILIES == world.FAMILIES
    assert P.CAG_VARIANTS == guidance.VARIANTS and P.CAG_SCALE_RANGE == guidance.CAG_SCALE_RANGE
    assert P.GUIDANCE_SCALE_RANGE == mini.GUIDANCE_SCALE_RANGE


def test_cuda_device_checked_against_this_machine():
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert f"has {n} CUDA device" in _errors("02_layer_analysis", device=f"cuda:{n}")["device"]
    else:
        assert "CUDA is not available" in _errors("02_layer_analysis", device="cuda")["device"]
        assert "CUDA is not available" in _errors("05_cag", device="cuda:0")["device"]


def test_generic_checker_bounds_may_depend_on_other_parameters():
    spec = {"n": P.Param("int", lo=1), "i": P.Param("int", lo=0, hi=lambda c: c["n"] - 1),
            "x": P.Param("float", lo=0.0, hi=1.0)}
    assert check_params(spec, dict(n=3, i=2, x=0.5))["i"] == 2
    with pytest.raises(ParameterError) as exc:
        check_params(spec, dict(n=3, i=3, x=math.nan))
    assert set(exc.value.errors) == {"i", "x"}


def test_import_is_fast_and_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); import difftrack.params as p; "
            "p.check_notebook('02_layer_analysis', dict(model='embedded', videos_per_family=1, exact_per_family=1, "
            "num_steps=6, grid_size=8, device='cpu', dtype='float32', seed=0, size=[], layer=-1, step=-1, "
            "inspect_video=0, num_points=4, untrained_control=True)); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(time.perf_counter() - t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 5, r.stdout


# ------------------------------------------------------------------------------------------ a real notebook run
def _snapshot() -> dict[str, str]:
    out = {}
    for d in ("figures", "results"):
        for f in sorted((ROOT / d).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(ROOT))] = f"{hashlib.sha1(f.read_bytes()).hexdigest()} {f.stat().st_mtime_ns}"
    return out


def _git_status() -> str | None:
    r = subprocess.run(["git", "status", "--porcelain", "figures", "results"], cwd=ROOT, capture_output=True,
                       text=True)
    return r.stdout if r.returncode == 0 else None


def test_notebook_02_with_a_bad_layer_fails_fast_and_writes_nothing(tmp_path):
    before, status = _snapshot(), _git_status()
    cmd = [sys.executable, "-m", "papermill", str(NB_DIR / "02_layer_analysis.ipynb"), str(tmp_path / "out.ipynb"),
           "-p", "layer", "99", "--cwd", str(NB_DIR), "-k", "python3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - t0
    print(f"notebook 02 with layer=99 failed after {seconds:.1f} s")
    assert r.returncode != 0, r.stdout[-2000:]
    assert "ParameterError" in r.stderr and "layer=99" in r.stderr and "-1..11" in r.stderr, r.stderr[-3000:]
    assert seconds < 60, f"{seconds:.1f} s to the parameter error (the goal is < 15 s; 60 tolerates a loaded CI)"
    assert _snapshot() == before, "figures/ or results/ changed"
    assert _git_status() == status
    out = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
    failed = [i for i, c in enumerate(out.cells) if c.get("outputs") and any(o.get("output_type") == "error"
                                                                             for o in c.outputs)]
    ran = [i for i, c in enumerate(out.cells) if c.cell_type == "code" and c.get("execution_count")]
    assert len(failed) == 1 and ran[-1] == failed[0] and "check_notebook" in out.cells[failed[0]].source


def test_geometry_rules_belong_to_the_families():
    """params reads each family's config-level rule (no branch on the pipeline class outside difftrack.backbones)."""
    from difftrack.backbones import family_of_class

    cog = family_of_class("CogVideoXPipeline").geometry(
        dict(sample_frames=49, sample_height=60, sample_width=90), dict(temporal_compression_ratio=4,
                                                                         block_out_channels=[1, 2, 3, 4]))
    assert cog == (4, 8, (49, 480, 720))
    assert family_of_class("WanPipeline").geometry({}, dict(scale_factor_temporal=4, scale_factor_spatial=8)) == \
        (4, 8, None)
    assert family_of_class("HunyuanVideoPipeline").geometry({}, dict(temporal_compression_ratio=4,
                                                                     spatial_compression_ratio=8)) == (4, 8, None)
    emb = family_of_class("MiniVideoPipeline")
    assert emb.geometry(dict(sample_frames=13, sample_height=32, sample_width=32), {}) == (1, 2, (13, 64, 64))
    assert emb.fixed_size and not family_of_class("CogVideoXPipeline").fixed_size
    assert model_geometry("embedded").fixed_size
