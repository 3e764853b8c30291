"""Several processes (issue 32): difftrack.experiments.distributed, and a job under torchrun with two CPU processes
(gloo) whose results equal the one-process results byte for byte, killed midway and resumed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from difftrack.experiments import distributed as D

ROOT = Path(__file__).resolve().parents[1]
# what legitimately differs between two runs of the analysis summary: wall times, commit, the device string (it
# names the threads), the number of processes
RUN_KEYS = ("seconds", "commit", "record_commit", "device", "timing", "analysis_time_ratio", "analysis_extra_peak_mib")


def test_items_are_split_by_index_once_each():
    for n in (0, 1, 5, 7, 16):
        for world in (1, 2, 3, 8):
            shares = [D.Processes(rank=r, world_size=world).indices(n) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            assert all(i % world == r for r, s in enumerate(shares) for i in s)
    assert D.Processes(rank=1, world_size=2).mine(list("abcde")) == ["b", "d"]


def test_bad_process_layouts_and_stop_values_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"rank=2, world_size=2"):
        D.Processes(rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"n=-1; allowed: an integer >= 0"):
        D.Processes().indices(-1)
    monkeypatch.setenv(D.STOP_ENV, "zero")
    with pytest.raises(ValueError, match=r"DIFFTRACK_STOP_AFTER_ITEMS='zero'; allowed: an integer >= 1"):
        D.Processes().run([1], lambda i, it: None, desc="x")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two'"):
        D.processes()


def test_one_process_without_launcher_is_rank_0_of_1_and_maps_in_order(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    p = D.processes()
    assert (p.rank, p.world_size, p.is_main, p.distributed) == (0, 1, True, False)
    assert p.device("cuda") == "cuda" and p.device("cpu") == "cpu"  # one process: the device as given
    assert p.map(lambda t: t * t, [3, 1, 2], desc="x", progress=False) == [9, 1, 4]
    seen = []
    p.run(["a", "b"], lambda i, it: seen.append((i, it)), desc="x", progress=False)
    assert seen == [(0, "a"), (1, "b")]


def test_device_per_local_rank(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devs = [D.Processes(rank=r, world_size=5, local_rank=r).device("cuda") for r in range(5)]
    assert devs == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]  # more processes than GPUs: they share
    assert D.Processes(rank=1, world_size=2, local_rank=1).device("cuda:1") == "cuda:1"  # an explicit index stays
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        D.Processes(rank=1, world_size=2, local_rank=1).device("cuda")


def _entries(folder: Path, pattern: str) -> list:
    """The cache entries under ``folder`` (not a temporary file a killed process left behind)."""
    return sorted(f for f in folder.rglob(pattern) if ".tmp" not in f.name)


def _arrays(npz: Path) -> dict:
    with np.load(npz) as z:  # every array of the record but its JSON scalars (they hold the wall time)
        return {k: z[k].tobytes() for k in z.files if k != "_scalars"}


def _results(summary: Path) -> str:
    d = json.loads(summary.read_text())
    return json.dumps({k: v for k, v in d.items() if k not in RUN_KEYS}, sort_keys=True)


def test_analysis_under_torchrun_with_two_cpu_processes_equals_one_process_and_resumes(tmp_path):
    """The analysis job (2 generated + 2 exact-GT videos, 2 steps, grid 4) as one plain process, then under torchrun
    with two CPU processes (gloo) killed after one video each (DIFFTRACK_STOP_AFTER_ITEMS=1) and run again: the
    second run computes only the two missing videos, records that it ran on 2 processes, and its records, videos
    and summary equal the one-process ones byte for byte."""
    job = ["scripts/run_analysis.py", "--videos-per-family", "1", "--exact", "1", "--steps", "2", "--grid", "4",
           "--device", "cpu", "--no-timing"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", D.STOP_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # the launcher's 1 thread per process for both
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def run(cmd, name, **extra):
        return subprocess.run(cmd + ["--cache", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json")],
                              cwd=ROOT, env=dict(env, **extra), capture_output=True, text=True, timeout=600)

    p = run([sys.executable] + job, "one")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run(two + job, "two", **{D.STOP_ENV: "1"})
    assert p.returncode != 0 and "stopping after 1 items" in p.stderr, p.stderr[-3000:]
    first = _entries(tmp_path / "two", "*.npz")
    # rank 0 took item 0, rank 1 item 1 (split by index): the two generated videos; when one rank exits, torchrun
    # stops the other, which may not have finished its item
    assert 1 <= len(first) <= 2 and {f.name for f in first} <= {"generated_objects_0_s2_g4.npz",
                                                                   "generated_scenes_0_s2_g4.npz"}
    assert not (tmp_path / "two.json").exists()  # killed before the merge: nothing half-written
    stamps = {f: f.stat().st_mtime_ns for f in first}

    p = run(two + job, "two")
    assert p.returncode == 0, p.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in first} == stamps  # resumed: not recomputed
    meta = json.loads(next((tmp_path / "two").rglob("record_meta.json")).read_text())
    assert next(iter(meta.values()))["record_processes"] == 2  # the world size seen inside the job
    assert json.loads((tmp_path / "two.json").read_text())["seconds"]["record_processes"] == 2

    one_files = [f.relative_to(tmp_path / "one") for f in _entries(tmp_path / "one", "*.np[yz]")]
    two_files = [f.relative_to(tmp_path / "two") for f in _entries(tmp_path / "two", "*.np[yz]")]
    assert one_files == two_files and len(one_files) == 8  # 4 records + 4 videos
    for rel in one_files:
        a, b = tmp_path / "one" / rel, tmp_path / "two" / rel
        if rel.suffix == ".npy":
            assert a.read_bytes() == b.read_bytes(), rel
        else:
            assert _arrays(a) == _arrays(b), rel
    assert _results(tmp_path / "one.json") == _results(tmp_path / "two.json")


@pytest.mark.parametrize("rope", [False, True], ids=["sincos-2B", "rope-5B"])
def test_capture_stays_exact_on_a_model_dispatched_by_a_device_map(rope, tmp_path):
    """A transformer split by accelerate's device map (dispatch_model: every other block offloaded to disk, the rest
    on the CPU, accelerate's AlignDevicesHook on each module) gives bit-identical outputs and captured q/k/features
    to the same model in one piece, and a forward after the capture is unchanged. A split over several GPUs runs the
    same hooks with cuda:i in place of cpu/disk (not testable here)."""
    import copy

    import torch
    from accelerate import dispatch_model
    from conftest import tiny_cogvideox, tiny_inputs

    from difftrack.capture import capture

    whole = tiny_cogvideox(rope=rope, layers=4)
    split = copy.deepcopy(whole)
    device_map = {n: "cpu" for n, _ in split.named_children() if n != "transformer_blocks"}
    device_map.update({f"transformer_blocks.{i}": ("disk" if i % 2 else "cpu") for i in range(4)})
    split = dispatch_model(split, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))
    assert hasattr(split.transformer_blocks[1], "_hf_hook")  # accelerate's hooks are really there
    assert any((tmp_path / "offload").iterdir())  # and the odd blocks' weights live on disk
    kw = tiny_inputs(rope=rope)
    with torch.no_grad():
        with capture(whole, layers="all", what=("q", "k", "features")) as ref:
            out_ref = whole(**kw)[0]
        with capture(split, layers="all", what=("q", "k", "features")) as got:
            out = split(**kw)[0]
        after = split(**kw)[0]
    assert torch.equal(out_ref, out) and torch.equal(out_ref, after)
    assert sorted(got.keys()) == sorted(ref.keys()) and len(ref.keys()) == 4 * 3  # q, k, block output per layer
    for layer in range(4):
        for what in ("q", "k", "features"):
            assert torch.equal(getattr(ref, what)(layer), getattr(got, what)(layer)), (what, layer)
