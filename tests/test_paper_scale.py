"""scripts/paper_scale.py: argument checks, where results go, and that CAG takes its layers from the measured
ranking (the GPU run itself is not repeated here)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import paper_scale  # noqa: E402


def test_quick_never_writes_into_the_repository_results(capsys):
    with pytest.raises(SystemExit):
        paper_scale.parse_args(["--quick", "--device", "cpu"])
    assert "never writes into the repository's results/" in capsys.readouterr().err


def test_unknown_stage_and_cpu_without_consent_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        paper_scale.parse_args(["--stages", "analysis,bogus", "--device", "cuda"])
    assert "unknown ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper_scale.parse_args(["--device", "cpu", "--out-dir", str(tmp_path)])
    assert "takes hours on a CPU" in capsys.readouterr().err


def test_stages_run_in_order_and_cag_reads_the_measured_ranking(tmp_path):
    a = paper_scale.parse_args(["--stages", "cag,analysis", "--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert a.stages == ["analysis", "cag"] and a.figures_dir == tmp_path / "figures"
    cmd = paper_scale.commands(a)["cag"][0]
    assert "--require-measured-layers" in cmd
    assert cmd[cmd.index("--analysis-summary") + 1] == str(tmp_path / "analysis_summary.json")
    paper = paper_scale.parse_args(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert paper_scale.stage_key(a, "cag") != paper_scale.stage_key(paper, "cag")  # settings change the key
    assert paper.settings["steps"] == 50 and paper.settings["cag_prompts"] >= 100


def test_cag_eval_refuses_default_layers_when_measured_ones_are_required(tmp_path):
    p = subprocess.run([sys.executable, "scripts/run_cag_eval.py", "--phase", "score", "--prompts", "2",
                        "--analysis-summary", str(tmp_path / "missing.json"), "--require-measured-layers",
                        "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "cag.json")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "not the measured ranking" in p.stderr
    (tmp_path / "a.json").write_text(json.dumps({"combined": {"best_layers_top3": [3, 1, 2],
                                                              "worst_layers_bottom3": [0, 4, 5]}}))
    from difftrack.experiments.cag import layer_sets

    ls = layer_sets(tmp_path / "a.json")
    assert ls["top3"] == [3, 1, 2] and ls["bottom3"] == [0, 4, 5] and "default" not in ls["source"]


def test_pseudo_vs_exact_on_a_still_video_and_with_shifted_truth():
    """Lucas-Kanade on a still textured video finds every point where it is: against the true (still) tracks all
    points are within 1 px; against tracks shifted by 3 px none is within 2 px and all are within 4 px."""
    from difftrack.analysis import pseudo_vs_exact

    rng = np.random.default_rng(0)
    frame = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    import cv2

    frame = cv2.GaussianBlur(frame, (5, 5), 1.0)
    video = np.repeat(frame[None], 5, 0)
    q = np.array([[20.0, 20.0], [40.0, 30.0], [30.0, 44.0]], np.float32)
    tracks = np.repeat(q[:, None], 5, 1)
    vis = np.ones((3, 5), bool)
    m = pseudo_vs_exact(video, q, tracks, vis)
    assert m["pts_within_1"] == 1.0 and m["median_error_px"] < 0.05 and m["occlusion_accuracy"] == 1.0
    shifted = tracks + np.float32([3.0, 0.0])
    shifted[:, 0] = q  # the query frame itself is the query
    m2 = pseudo_vs_exact(video, q, shifted, vis)
    assert m2["pts_within_2"] == 0.0 and m2["pts_within_4"] == 1.0
    assert abs(m2["median_error_px"] - 3.0) < 0.05


def test_paper_results_read_back_the_committed_files(tmp_path):
    """load_analysis returns the tables in group_tables' layout only for a >= 50-step summary; load_videos filters
    by prefix and carries the per-video metadata."""
    from difftrack.experiments import paper_results as P

    assert P.load_analysis(tmp_path) is None and P.load_videos("cag/", tmp_path) == {}
    d = dict(num_steps=50, timesteps=[999, 19], counts=dict(generated=2, exact=2), settings=dict(grid=10),
             device="GPU X", commit="abc1234", combined=dict(best_layers_top3=[1, 0, 2]),
             tables=dict(combined=dict(qk_acc=[[0.1, 0.2], [0.3, 0.4]]), exact=dict(qk_acc=[[0.0, 0.1], [0.2, 0.5]])))
    (tmp_path / "analysis_summary.json").write_text(json.dumps(d))
    a = P.load_analysis(tmp_path)
    assert a.tables["all"]["qk_acc"].shape == (2, 2) and a.tables["exact"]["qk_acc"][1, 1] == 0.5
    assert a.timesteps == [999, 19] and a.summary["all"]["best_layers_top3"] == [1, 0, 2]
    assert "GPU X" in a.caption and "50 steps" in a.caption and "abc1234" in a.caption
    (tmp_path / "analysis_summary.json").write_text(json.dumps(dict(d, num_steps=4)))
    assert P.load_analysis(tmp_path) is None  # a small run is never shown as paper scale
    (tmp_path / "analysis_summary.json").write_text("{broken")
    with pytest.raises(ValueError, match="analysis_summary.json is not valid JSON"):
        P.load_analysis(tmp_path)
    v = np.zeros((3, 4, 4, 3), np.uint8)
    np.savez_compressed(tmp_path / "paper_videos.npz", **{"cag/none/0": v, "cag/top3_s1/0": v + 1, "analysis/x_0": v})
    (tmp_path / "paper_videos.json").write_text(json.dumps(dict(
        steps=50, device="cuda", cag={"cag/none/0": dict(prompt="p", layers=[])}, analysis={})))
    vids = P.load_videos("cag/", tmp_path)
    assert list(vids) == ["cag/none/0", "cag/top3_s1/0"] and vids["cag/none/0"][1]["prompt"] == "p"
    assert vids["cag/top3_s1/0"][0].max() == 1 and vids["cag/none/0"][1]["steps"] == 50
    (tmp_path / "paper_videos.json").write_text(json.dumps(dict(steps=6, cag={})))
    assert P.load_videos("cag/", tmp_path) == {}


def test_manifest_totals_count_interrupted_attempts(tmp_path):
    """total_wall_s adds every stage's time including interrupted attempts; complete only when all stages are done."""
    m = {"stages": {s: {"status": "done", "wall_s": 10.0, "earlier_attempts_s": 0.0} for s in paper_scale.STAGES}}
    m["stages"]["tracking"].update(earlier_attempts_s=62.0)
    paper_scale._write_manifest(tmp_path / "m.json", m)
    back = json.loads((tmp_path / "m.json").read_text())
    assert back["total_wall_s"] == 10.0 * len(paper_scale.STAGES) + 62.0
    assert back["complete"] and back["within_20_minutes"]
    m["stages"]["videos"]["status"] = "interrupted"
    paper_scale._write_manifest(tmp_path / "m.json", m)
    back = json.loads((tmp_path / "m.json").read_text())
    assert not back["complete"] and not back["within_20_minutes"]


def test_stages_run_through_the_launcher_and_their_keys_ignore_the_number_of_processes(tmp_path, capsys):
    """--num-processes N starts every stage script through torchrun (one plain process for N = 1); a finished stage
    is not re-run for another N (results do not depend on it); several machines need machine 0's address."""
    one = paper_scale.parse_args(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    four = paper_scale.parse_args(["--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--num-processes", "4"])
    assert one.num_processes == 1 and paper_scale.commands(one)["analysis"][0][:2] == [sys.executable,
                                                                                       "scripts/run_analysis.py"]
    cmd = paper_scale.commands(four)["tracking"][0]
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone"]
    assert cmd[6] == "scripts/run_tracking_benchmark.py" and "--workers" not in cmd
    assert all(paper_scale.stage_key(one, s) == paper_scale.stage_key(four, s) for s in paper_scale.STAGES)
    from torch.distributed.run import get_args_parser

    for stage, cmds in paper_scale.commands(four).items():  # torchrun's own parser hands every argument over
        for c in cmds:  # (an abbreviation of its options, e.g. --n, would stop it: that is how --per-family came)
            ns = get_args_parser().parse_args(c[3:])
            assert (ns.nproc_per_node, ns.standalone, ns.training_script, ns.training_script_args) == \
                ("4", True, c[6], c[7:]), stage
    multi = paper_scale.parse_args(["--device", "cuda", "--out-dir", str(tmp_path), "--num-machines", "2",
                                    "--machine-rank", "1", "--main-address", "node0"])
    assert multi.num_processes == 8  # the CUDA default
    assert paper_scale.launcher(multi)[3:] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
                                               "--master_addr", "node0", "--master_port", "29500"]
    for bad, msg in ((["--num-processes", "0"], "--num-processes 0: must be >= 1"),
                     (["--num-machines", "2"], "pass --main-address"),
                     (["--num-machines", "2", "--machine-rank", "2", "--main-address", "h"], "--machine-rank 2"),
                     (["--workers", "4"], "unrecognized arguments: --workers 4")):
        with pytest.raises(SystemExit):
            paper_scale.parse_args(["--quick", "--device", "cpu", "--out-dir", str(tmp_path), *bad])
        assert msg in capsys.readouterr().err


def test_head_study_is_read_back_and_drawn(tmp_path):
    """paper_results.load_heads reads results/heads.json (None when missing, a named error when damaged) and
    viz.head_heatmap draws its [layers, head sets] table with the chosen cell outlined."""
    from difftrack import viz
    from difftrack.experiments import paper_results

    assert paper_results.load_heads(tmp_path) is None
    (tmp_path / "heads.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a head study"):
        paper_results.load_heads(tmp_path)
    d = {"per_split": {"heldout": {"acc_half": [[0.1, 0.2, 0.15], [0.5, 0.3, 0.4]]}},
         "protocol": {"videos_per_split": 2, "step_index": 49, "num_steps": 50}, "device": "cpu", "commit": "abcdef0123",
         "head_sets": [[0], [1], [0, 1]], "head_set_names": ["0", "1", "all"],
         "choice": {"single_head": {"layer": 1, "heads": [0]}}}
    (tmp_path / "heads.json").write_text(json.dumps(d))
    h = paper_results.load_heads(tmp_path)
    assert h.acc_half.shape == (2, 3) and h.names[-1] == "all" and "commit abcdef0" in h.caption
    fig = viz.head_heatmap(h.acc_half, h.names, mark=[(1, 0)], save=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0 and len(fig.axes[0].patches) == 1
    with pytest.raises(ValueError, match="2 head-set names for 3 columns"):
        viz.head_heatmap(h.acc_half, ["a", "b"])


def test_new_weights_change_every_stage_key(tmp_path, monkeypatch):
    import difftrack.experiments as ex

    a = paper_scale.parse_args(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    before = {s: paper_scale.stage_key(a, s) for s in paper_scale.STAGES}
    assert before == {s: paper_scale.stage_key(a, s) for s in paper_scale.STAGES}
    monkeypatch.setattr(ex, "weights_digest", lambda folder: "0" * 16)
    assert all(paper_scale.stage_key(a, s) != before[s] for s in paper_scale.STAGES)
