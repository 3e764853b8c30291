"""Read and write videos as ``uint8 [T, H, W, 3]`` RGB arrays (the public layout, ``docs/conventions.md``).

Uses ``imageio`` with the ``imageio-ffmpeg`` backend (a bundled ffmpeg binary), so mp4/webm/avi/mov/gif all work
without a system ffmpeg::

    video = read_video("clip.mp4", max_frames=49, resize=(480, 720))   # uint8 [T, 480, 720, 3]
    write_video("out.mp4", video, fps=8)
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from .checks import check_hw

__all__ = ["read_video", "write_video"]


def _check_size(resize) -> tuple[int, int] | None:
    return check_hw("resize", resize, none_ok=True)


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """A decoded frame (uint8 gray, RGB or RGBA; 16-bit decoders scaled down) as ``uint8 [H, W, 3]``."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, -1)
    if frame.shape[-1] == 4:
        frame = frame[..., :3]
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    elif frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return frame


def _declared_frames(path: Path, plugin: str | None) -> int | None:
    """Frames the container declares (``nframes``, else ``duration x fps`` of its header); ``None`` if unknown."""
    import imageio.v3 as iio

    try:
        meta = iio.immeta(path, plugin=plugin) if plugin else iio.immeta(path)
    except Exception:  # noqa: BLE001 - metadata is best effort
        return None
    n = meta.get("nframes")
    if isinstance(n, (int, np.integer)) and n > 0:
        return int(n)
    dur, fps = meta.get("duration"), meta.get("fps")
    if isinstance(dur, (int, float)) and isinstance(fps, (int, float)) and math.isfinite(dur) and math.isfinite(fps) \
            and dur > 0 and fps > 0:
        return int(round(dur * fps))
    return None


def read_video(path: str | os.PathLike, max_frames: int | None = None, resize: tuple[int, int] | None = None,
               allow_truncated: bool = False) -> np.ndarray:
    """Read a video file into ``uint8 [T, H, W, 3]`` RGB.

    Args:
        path: a video file (mp4, webm, avi, mov, mkv, gif ...).
        max_frames: keep at most this many frames from the start (``None``: all).
        resize: ``(height, width)`` to resize every frame to (area interpolation when shrinking, bilinear when
            enlarging); ``None`` keeps the stored size.
        allow_truncated: a damaged file (decoding stops with an error, or fewer frames decode than the container
            declares, ``nframes`` or ``duration x fps``, beyond a 2 % + 1 frame tolerance for variable frame rates)
            raises by default; ``True`` returns the frames that decoded with a warning naming the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad ``max_frames`` / ``resize``, a file that cannot be decoded, one without frames, or a
            truncated file (see ``allow_truncated``).
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
    plugin = "pyav" if _has_pyav() else None
    problem = None
    try:
        for frame in iio.imiter(path, plugin=plugin) if plugin else iio.imiter(path):
            frames.append(_to_rgb(frame))
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as err:  # noqa: BLE001 - imageio raises many types; report them uniformly
        if not frames:
            raise ValueError(f"cannot decode video {str(path)!r}: {type(err).__name__}: {err}") from err
        problem = f"decoding stopped after {len(frames)} frames with {type(err).__name__}: {err}"
    if not frames:
        raise ValueError(f"video {str(path)!r} contains no frames")
    if problem is None and (max_frames is None or len(frames) < max_frames):
        declared = _declared_frames(path, plugin)
        if declared is not None and len(frames) < declared - (1 + 0.02 * declared):
            problem = f"only {len(frames)} of the {declared} frames its header declares could be decoded"
    if problem is not None:
        msg = f"video {str(path)!r} is truncated or damaged: {problem}"
        if not allow_truncated:
            raise ValueError(f"{msg}; pass allow_truncated=True to use the frames that decoded")
        warnings.warn(f"{msg}; using those frames (allow_truncated=True)", stacklevel=2)
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


def _float_to_uint8(arr: np.ndarray, value_range) -> np.ndarray:
    """A float video to uint8 with **one** range for the whole video (never guessed per frame)."""
    if not np.isfinite(arr).all():
        raise ValueError("frames contain NaN or inf; expected finite values")
    lo_v, hi_v = float(arr.min()), float(arr.max())
    if value_range is None:
        if lo_v >= 0.0 and hi_v <= 1.0:
            value_range = (0.0, 1.0)
        elif lo_v >= 0.0 and hi_v <= 255.0:
            value_range = (0.0, 255.0)
        else:
            raise ValueError(f"float frames span [{lo_v:g}, {hi_v:g}]; allowed without value_range: the whole "
                             f"video in [0, 1] or in [0, 255]; pass value_range=(lo, hi) or uint8 frames")
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range={value_range!r}; expected None or a (low, high) pair of numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"value_range={value_range!r}; expected finite low < high")
    if lo_v < lo or hi_v > hi:
        raise ValueError(f"float frames span [{lo_v:g}, {hi_v:g}], outside value_range=({lo:g}, {hi:g}); allowed: "
                         f"values within value_range (nothing is clipped)")
    return np.round((arr.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def write_video(path: str | os.PathLike, frames, fps: float = 8.0, quality: int | None = 8,
                value_range: tuple[float, float] | None = None) -> Path:
    """Write ``uint8 [T, H, W, 3]`` RGB frames to a video file (codec from the suffix: mp4 -> H.264, gif ...).

    Frame sizes that are not multiples of 2 are padded by one edge row/column for H.264 (the ffmpeg writer would
    otherwise resize them to multiples of 16 with a warning). Returns the path written.

    Float frames are mapped to 0..255 with **one** range for the whole video: ``value_range=(lo, hi)`` if given,
    else ``[0, 1]`` when every value of the video lies in it, else ``[0, 255]`` when every value lies in that (a
    dark 0..255 video whose values all stay <= 1 is read as ``[0, 1]``: pass ``value_range`` to be explicit).
    Values outside the range raise; nothing is clipped.

    Raises:
        ValueError: frames not ``[T, H, W, 3]`` uint8 or float, ``T == 0``, float values outside the range, or
            ``fps <= 0``.
    """
    import imageio.v2 as iio2

    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames have shape {arr.shape}; expected uint8 [T, H, W, 3] with T >= 1")
    if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"frames have dtype {arr.dtype}; expected uint8 (or float with one range, see value_range)")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps={fps!r}; expected a positive number")
    if arr.dtype != np.uint8:
        arr = _float_to_uint8(arr, value_range)
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
