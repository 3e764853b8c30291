"""Read and write videos as ``uint8 [T, H, W, 3]`` RGB arrays (the public layout, ``docs/conventions.md``).

Uses ``imageio`` with the ``imageio-ffmpeg`` backend (a bundled ffmpeg binary), so mp4/webm/avi/mov/gif all work
without a system ffmpeg::

    video = read_video("clip.mp4", max_frames=49, resize=(480, 720))   # uint8 [T, 480, 720, 3]
    write_video("out.mp4", video, fps=8)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["read_video", "write_video"]


def _check_size(resize) -> tuple[int, int] | None:
    if resize is None:
        return None
    try:
        h, w = (int(s) for s in resize)
    except (TypeError, ValueError):
        raise ValueError(f"resize={resize!r}; expected None or a (height, width) pair of positive ints") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"resize={resize!r}; expected None or a (height, width) pair of positive ints")
    return h, w


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, -1)
    if frame.shape[-1] == 4:
        frame = frame[..., :3]
    if frame.dtype != np.uint8:
        if np.issubdtype(frame.dtype, np.floating) and frame.max() <= 1.0:
            frame = frame * 255.0
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return frame


def read_video(path: str | os.PathLike, max_frames: int | None = None, resize: tuple[int, int] | None = None
               ) -> np.ndarray:
    """Read a video file into ``uint8 [T, H, W, 3]`` RGB.

    Args:
        path: a video file (mp4, webm, avi, mov, mkv, gif ...).
        max_frames: keep at most this many frames from the start (``None``: all).
        resize: ``(height, width)`` to resize every frame to (area interpolation when shrinking, bilinear when
            enlarging); ``None`` keeps the stored size.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad ``max_frames`` / ``resize``, a file that cannot be decoded, or one without frames.
    """
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {str(path)!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer))
                                   or max_frames < 1):
        raise ValueError(f"max_frames={max_frames!r}; expected None or a positive int")
    size = _check_size(resize)
    frames = []
    try:
        for frame in iio.imiter(path, plugin="pyav") if _has_pyav() else iio.imiter(path):
            frames.append(_to_rgb(frame))
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as err:  # noqa: BLE001 - imageio raises many types; report them uniformly
        if frames:  # a truncated tail: keep what decoded
            pass
        else:
            raise ValueError(f"cannot decode video {str(path)!r}: {type(err).__name__}: {err}") from err
    if not frames:
        raise ValueError(f"video {str(path)!r} contains no frames")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"video {str(path)!r} has frames of different sizes {sorted(shapes)}")
    video = np.stack(frames)
    if size is not None and size != video.shape[1:3]:
        from .tapvid import resize_video

        video = resize_video(video, size)
    return video


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def write_video(path: str | os.PathLike, frames, fps: float = 8.0, quality: int | None = 8) -> Path:
    """Write ``uint8 [T, H, W, 3]`` RGB frames to a video file (codec from the suffix: mp4 -> H.264, gif ...).

    Frame sizes that are not multiples of 2 are padded by one edge row/column for H.264 (the ffmpeg writer would
    otherwise resize them to multiples of 16 with a warning). Returns the path written.

    Raises:
        ValueError: frames not ``[T, H, W, 3]`` (uint8, or float in ``[0, 1]``), ``T == 0`` or ``fps <= 0``.
    """
    import imageio.v2 as iio2

    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames have shape {arr.shape}; expected uint8 [T, H, W, 3] with T >= 1")
    if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"frames have dtype {arr.dtype}; expected uint8 (or float in [0, 1])")
    if not isinstance(fps, (int, float, np.number)) or fps <= 0:
        raise ValueError(f"fps={fps!r}; expected a positive number")
    arr = np.stack([_to_rgb(f) for f in arr])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        iio2.mimsave(path, list(arr), duration=1000.0 / fps, loop=0)
        return path
    H, W = arr.shape[1:3]
    ph, pw = H % 2, W % 2
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    kw = dict(fps=fps, macro_block_size=1)
    if quality is not None:
        kw["quality"] = quality
    with iio2.get_writer(path, **kw) as w:
        for f in arr:
            w.append_data(f)
    return path
