"""Read and write videos as ``uint8 [T, H, W, 3]`` RGB arrays (the public layout, ``docs/conventions.md``).

Uses ``imageio`` with the ``imageio-ffmpeg`` backend (a bundled ffmpeg binary), so mp4/webm/avi/mov/mkv work without
a system ffmpeg; gif is written with Pillow (always there). Without imageio-ffmpeg, :func:`write_video` refuses the
ffmpeg formats with :class:`VideoWriterMissing` naming what to install (:func:`can_write_video` asks first)::

    video = read_video("clip.mp4", max_frames=49, resize=(480, 720))   # uint8 [T, 480, 720, 3]
    write_video("out.mp4", video, fps=8)
"""
from __future__ import annotations

import math
import os
import uuid
import warnings
from pathlib import Path

import numpy as np

from .checks import check_hw

__all__ = ["read_video", "write_video", "write_movie", "can_write_video", "VideoWriterMissing", "VIDEO_SUFFIXES"]


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


#: suffixes :func:`write_video` writes: ffmpeg containers (the ``imageio-ffmpeg`` package's bundled ffmpeg) and GIF
#: (Pillow, always installed with imageio)
FFMPEG_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv")
VIDEO_SUFFIXES = FFMPEG_SUFFIXES + (".gif",)


class VideoWriterMissing(ImportError):
    """No writer for the requested format is installed (``pip install imageio-ffmpeg`` for mp4/webm/avi/mov/mkv)."""


def can_write_video(path_or_suffix: str | os.PathLike) -> bool:
    """Whether :func:`write_video` has a writer for this file name's suffix (or a suffix such as ``".mp4"``) here:
    GIF always; the ffmpeg formats when ``imageio-ffmpeg`` is installed. ``False`` for an unknown suffix."""
    suffix = str(path_or_suffix).lower() if str(path_or_suffix).startswith(".") else Path(path_or_suffix).suffix.lower()
    if suffix == ".gif":
        return True
    return suffix in FFMPEG_SUFFIXES and _ffmpeg_missing() is None


def _ffmpeg_missing() -> str | None:
    """``None`` when imageio-ffmpeg (and its ffmpeg binary) is usable, else why not."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return "the imageio-ffmpeg package is not installed"
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as err:  # noqa: BLE001 - it raises RuntimeError or OSError when no binary is found
        return f"imageio-ffmpeg finds no ffmpeg binary ({err})"
    return None


_CODECS = {".webm": "libvpx-vp9"}  # the others: H.264 (imageio-ffmpeg's default)


def _check_written(tmp: Path, frames: int) -> None:
    """``OSError`` unless ffmpeg decodes ``frames`` frames from the file just written."""
    import imageio_ffmpeg

    try:
        n, _ = imageio_ffmpeg.count_frames_and_secs(str(tmp))
    except Exception as err:  # noqa: BLE001 - RuntimeError/OSError from the ffmpeg subprocess
        raise OSError(f"the writer produced an unreadable file ({type(err).__name__}: {err})") from None
    if n != frames:
        raise OSError(f"the writer produced {n} of {frames} frames")


def write_video(path: str | os.PathLike, frames, fps: float = 8.0, quality: int | None = 8,
                value_range: tuple[float, float] | None = None) -> Path:
    """Write ``uint8 [T, H, W, 3]`` RGB frames to a video file (codec from the suffix: mp4 -> H.264, gif ...).

    Either the file is written completely or an error is raised and nothing is left behind: the frames go to a
    temporary file next to ``path``, which replaces ``path`` only once it is complete and non-empty (removed on any
    error). Suffixes: :data:`VIDEO_SUFFIXES` (mp4, webm, avi, mov, mkv need the ``imageio-ffmpeg`` package; gif is
    always available; :func:`can_write_video` says which work here).

    Frame sizes that are not multiples of 2 are padded by one edge row/column for H.264 (the ffmpeg writer would
    otherwise resize them to multiples of 16 with a warning). Returns the path written.

    Float frames are mapped to 0..255 with **one** range for the whole video: ``value_range=(lo, hi)`` if given,
    else ``[0, 1]`` when every value of the video lies in it, else ``[0, 255]`` when every value lies in that (a
    dark 0..255 video whose values all stay <= 1 is read as ``[0, 1]``: pass ``value_range`` to be explicit).
    Values outside the range raise; nothing is clipped.

    Raises:
        ValueError: frames not ``[T, H, W, 3]`` uint8 or float, ``T == 0``, float values outside the range,
            ``fps <= 0``, or a suffix not in :data:`VIDEO_SUFFIXES` (all checked before anything is written).
        VideoWriterMissing: an ffmpeg format without ``imageio-ffmpeg`` (an ``ImportError`` saying what to install).
        OSError: ``path`` cannot be written (a folder, an unwritable folder, a failed write), naming the path.
    """
    import imageio.v2 as iio2

    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames have shape {arr.shape}; expected uint8 [T, H, W, 3] with T >= 1")
    if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"frames have dtype {arr.dtype}; expected uint8 (or float with one range, see value_range)")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps={fps!r}; expected a positive number")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"cannot write video {str(path)!r}: unknown suffix {path.suffix!r}; allowed: "
                         f"{', '.join(VIDEO_SUFFIXES)}")
    if suffix in FFMPEG_SUFFIXES:
        why = _ffmpeg_missing()
        if why is not None:
            raise VideoWriterMissing(f"cannot write video {str(path)!r}: {suffix} needs ffmpeg and {why}; install it "
                                     f"with `pip install imageio-ffmpeg`, or write a .gif")
    if arr.dtype != np.uint8:
        arr = _float_to_uint8(arr, value_range)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write video {str(path)!r}: it is a folder; allowed: a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot write video {str(path)!r}: its folder cannot be created ({err})") from None
    # a new name next to the target (same file system for os.replace), created by the writer with the usual mode
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
    try:
        if suffix == ".gif":
            iio2.mimsave(tmp, list(arr), format="GIF", duration=1000.0 / fps, loop=0)
            if tmp.stat().st_size == 0:
                raise OSError("the writer produced an empty file")
        else:
            H, W = arr.shape[1:3]
            ph, pw = H % 2, W % 2
            if ph or pw:
                arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
            kw = dict(fps=fps, macro_block_size=1, format="FFMPEG", codec=_CODECS.get(suffix, "libx264"))
            if quality is not None:
                kw["quality"] = quality
            with iio2.get_writer(tmp, **kw) as w:
                for f in arr:
                    w.append_data(f)
            _check_written(tmp, len(arr))  # ffmpeg can fail on its output and still return
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, (ValueError, VideoWriterMissing)):
            raise OSError(f"cannot write video {str(path)!r}: {type(err).__name__}: {err}") from err
        raise
    return path


def write_movie(path: str | os.PathLike, frames, fps: float = 8.0, fallback_dir: str | os.PathLike | None = None,
                **kw) -> tuple[Path, str | None]:
    """:func:`write_video` to ``path`` when this machine has its writer; else (an ffmpeg format without
    ``imageio-ffmpeg``) the same frames as a GIF named like ``path`` in ``fallback_dir`` (default: ``path``'s folder),
    ``path`` itself untouched. Returns ``(the file written, None)`` or ``(the GIF, a note saying why and what to
    install)``; the notebooks print the note and run on."""
    path = Path(path)
    if can_write_video(path) or path.suffix.lower() not in FFMPEG_SUFFIXES:
        return write_video(path, frames, fps=fps, **kw), None
    gif = Path(fallback_dir if fallback_dir is not None else path.parent) / (path.stem + ".gif")
    written = write_video(gif, frames, fps=fps, value_range=kw.get("value_range"))
    return written, (f"no {path.suffix} writer on this machine ({_ffmpeg_missing()}; `pip install imageio-ffmpeg` "
                     f"adds it): wrote {written} instead, {path} left as it was")
