"""Reading the library's own files (caches, records, configs) with errors that name the file.

A truncated or corrupted ``.npy`` / ``.npz``, a bad pickle inside one or a broken JSON file otherwise surfaces as a bare
``BadZipFile``, ``UnpicklingError``, ``EOFError`` or ``JSONDecodeError`` without the path. These helpers raise
:class:`CorruptFileError` (a ``ValueError``) naming the file and what it should hold; caches use :func:`npy_intact` to
spot a corrupt entry cheaply, warn naming it and recompute it.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CorruptFileError", "READ_ERRORS", "load_npy", "load_npz", "read_json", "npy_intact"]

#: What numpy / json / pickle raise on a damaged file.
READ_ERRORS = (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError, TypeError,
               UnicodeDecodeError, AttributeError, IndexError)


class CorruptFileError(ValueError):
    """A file exists but cannot be read (truncated, corrupted, or not the expected format)."""


def _fail(path, what: str, err: BaseException, hint: str = "") -> CorruptFileError:
    return CorruptFileError(f"cannot read {what} {str(path)!r} (truncated or corrupted?): {type(err).__name__}: {err}"
                            + (f"; {hint}" if hint else ""))


def load_npy(path: str | os.PathLike, what: str = "array file", hint: str = "") -> np.ndarray:
    """``np.load`` of a ``.npy`` file (no pickles), raising :class:`CorruptFileError` naming it when damaged."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:
        raise _fail(path, what, err, hint) from err


def load_npz(path: str | os.PathLike, what: str = "archive", hint: str = "") -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file, read at once (a damaged member fails here, naming the file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:
        raise _fail(path, what, err, hint) from err


def read_json(path: str | os.PathLike, what: str = "JSON file", hint: str = "") -> Any:
    """Parsed JSON, raising :class:`CorruptFileError` naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise _fail(path, what, err, hint) from err


def npy_intact(path: str | os.PathLike) -> bool:
    """Whether a ``.npy`` file has a valid header and exactly the bytes its header promises (cheap: the data is not
    read). A truncated or garbled cache entry gives ``False``."""
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            if dtype.hasobject:
                return False
            need = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return os.path.getsize(path) == need
    except READ_ERRORS:
        return False
