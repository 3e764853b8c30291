"""scripts/head_study.py: the head sets it compares and a one-video run's record (choice made on train videos,
reported on held-out ones, the all-heads set equal to the head average)."""
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import head_study  # noqa: E402


def test_head_sets_are_singles_pairs_then_all():
    assert head_study.head_sets(3) == [[0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]
    assert head_study.head_sets(2) == [[0], [1], [0, 1]]


def test_one_video_run_records_train_choice_and_heldout_report(tmp_path):
    out = tmp_path / "heads.json"
    assert head_study.main(["--videos", "1", "--steps", "2", "--grid", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    L, K = r["num_layers"], len(r["head_sets"])
    for split in ("train", "heldout"):
        acc = np.asarray(r["per_split"][split]["acc_half"])
        assert acc.shape == (L, K) and ((0 <= acc) & (acc <= 1)).all()
        assert (np.asarray(r["per_split"][split]["acc_one"]) >= acc - 1e-9).all()  # one token >= half a token
    c = r["choice"]["single_head"]
    assert len(c["heads"]) == 1 and c["train_half"] == max(
        np.asarray(r["per_split"]["train"]["acc_half"])[:, j].max() for j, s in enumerate(r["head_sets"]) if len(s) == 1)
    assert r["choice"]["head_average"]["heads"] == list(range(r["num_heads"]))
    assert "beat" in r["finding"] and r["commit"]
