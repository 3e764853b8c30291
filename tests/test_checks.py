"""difftrack.checks: the shared input checks name the bad value and what is allowed, and normalise good input."""
import numpy as np
import pytest
import torch

from difftrack.checks import check_hw, check_queries, check_video


def test_check_video_accepts_arrays_and_tensors_and_names_the_problem():
    v = np.zeros((3, 4, 5, 3), np.uint8)
    assert check_video(v) is not None and check_video(torch.from_numpy(v)).shape == (3, 4, 5, 3)
    with pytest.raises(ValueError, match=r"clip has shape \(3, 4, 5\); expected uint8 \[T, H, W, 3\]"):
        check_video(v[..., 0], name="clip")
    with pytest.raises(ValueError, match="dtype float32; expected uint8"):
        check_video(v.astype(np.float32))
    with pytest.raises(ValueError, match=r"has 3 frame\(s\); at least 4 frames"):
        check_video(v, min_frames=4)
    with pytest.raises(ValueError, match="empty frame size 0x5"):
        check_video(np.zeros((3, 0, 5, 3), np.uint8))


def test_check_queries_returns_float32_and_frames_and_rejects_bad_ones():
    q, f = check_queries([[1, 2.5, 3.0]], 4, 10, 20)
    assert q.dtype == np.float32 and f.tolist() == [1]
    for bad, msg in (([[0.5, 1, 1]], "integer frame index in \\[0, 3\\]"), ([[0, 21, 1]], "outside the frame"),
                     (np.zeros((0, 3)), "empty"), ([[0, np.nan, 1]], "non-finite"), ([[0, 1]], "expected float32")):
        with pytest.raises(ValueError, match=msg):
            check_queries(bad, 4, 10, 20)


def test_check_hw():
    assert check_hw("size", (4, 6)) == (4, 6) and check_hw("resize", None, none_ok=True) is None
    with pytest.raises(ValueError, match=r"size=\(0, 6\); expected a \(height, width\) pair of positive ints"):
        check_hw("size", (0, 6))
    with pytest.raises(ValueError, match="expected None or a"):
        check_hw("resize", "ab", none_ok=True)
    with pytest.raises(ValueError, match="size=None"):
        check_hw("size", None)
