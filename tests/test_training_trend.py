"""scripts/training_trend.py (issue 30): the log fit, its inverse, its input checks and the lineage it reads."""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import training_trend as tt  # noqa: E402


def test_fit_recovers_a_log_law_and_its_inverse_reaches_the_goal():
    m = np.array([10.0, 20.0, 40.0, 80.0])
    a, b = tt.fit_log(m, 0.3 + 0.05 * np.log(m))
    assert a == pytest.approx(0.3) and b == pytest.approx(0.05)
    need = tt.minutes_to_reach(a, b, 0.5)
    assert 0.3 + 0.05 * math.log(need) == pytest.approx(0.5)
    assert tt.minutes_to_reach(0.5, -0.01, 0.6) == math.inf  # a falling fit never reaches a higher goal


@pytest.mark.parametrize("m, v", [([1.0], [0.5]), ([0.0, 2.0], [0.1, 0.2]), ([3.0, 3.0], [0.1, 0.2]),
                                  ([1.0, 2.0], [0.1])])
def test_fit_rejects_bad_input_naming_it(m, v):
    with pytest.raises(ValueError, match="fit_log"):
        tt.fit_log(m, v)


def test_lineage_of_the_committed_records_and_a_missing_arm(tmp_path):
    pts = tt.lineage_points()
    assert [p["label"] for p in pts] == [lab for lab, _, _ in tt.LINEAGE]
    assert all(b["minutes"] > a["minutes"] for a, b in zip(pts, pts[1:]))  # cumulative: every step trained
    rounds = {r["name"]: r for r in json.loads((tt.ROUNDS / "rounds.json").read_text())["rounds"]}
    assert pts[0]["minutes"] == rounds["runs 1+2"]["minutes"] and pts[0]["qk_half"] == rounds["runs 1+2"]["qk_half"]
    fits = tt.trend(pts)
    assert set(fits) == set(tt.GOALS) and all(f["last_left_out"]["measured"] == pts[-1][k] for k, f in fits.items())
    d = tmp_path / "train_rounds"
    shutil.copytree(tt.ROUNDS, d, ignore=shutil.ignore_patterns("ab3"))
    with pytest.raises(KeyError, match="ab3"):
        tt.lineage_points(d)
