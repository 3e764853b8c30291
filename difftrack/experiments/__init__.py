"""The experiments layer: orchestration of the three jobs (analysis, tracking benchmark, CAG evaluation) over files.

The core modules (``capture``, ``matching``, ``analysis``, ``tracking``, ``guidance``, ``cag_eval``, ``world``, ...)
compute on arrays and know nothing of files, caches or notebooks. Everything that does lives here:

* :mod:`difftrack.experiments.analysis` -- the analysed items, the per-video record cache (resume), the notebooks'
  analysis run and its summaries, the ``analysis_summary.json`` record;
* :mod:`difftrack.experiments.cag` -- cached CAG generation (one folder per setting), timing, the layer sets read back
  from the analysis summary, the ``cag.json`` and prompt-agreement records;
* :mod:`difftrack.experiments.tracking` -- benchmark tables read back, the ``tracking_benchmark.json`` record and the
  TAP-Vid evaluation of a user's dataset (per-video cache);
* :mod:`difftrack.experiments.paper_results` -- the committed paper-scale results, read back for the notebooks.
* :mod:`difftrack.experiments.distributed` -- several processes for every job (``torchrun`` / ``accelerate launch``):
  the item split by index, the barrier, the merge on rank 0, the device of each process.

This module holds what they share: the one cache-key function (:func:`cache_key`, a hash of the canonical JSON of
everything a result depends on) and the JSON record helpers (:class:`ResultRecord`, :func:`write_json`,
:func:`read_record`, :func:`json_clean`). Scripts and notebooks call this layer and stay thin.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = ["canonical_json", "cache_key", "weights_digest", "weights_fingerprint", "json_clean", "write_json",
           "RecordError", "ResultRecord", "read_record", "write_record"]


# ---------------------------------------------------------------------------------------------- cache keys
def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: keys sorted, no whitespace, numpy values as Python ones, tuples as lists
    (so two dicts with the same content in another order give the same text)."""
    return json.dumps(json_clean(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def cache_key(job: str, schema: str, fields: dict) -> str:
    """The one cache key of a result: the first 16 hex digits of the SHA-256 of the canonical JSON of
    ``{"job", "schema", "fields"}``.

    Args:
        job: the job that makes the result (``"analysis"``, ``"cag"``, ...).
        schema: version of the result's layout; a new layout never reuses an old entry.
        fields: everything else the result depends on (item, settings, model id and dtype, ...), JSON-able.

    Returns:
        ``str`` of 16 lowercase hex digits; the same for the same content whatever the dict order, different when any
        field changes.
    """
    if not isinstance(job, str) or not job:
        raise ValueError(f"job={job!r}; allowed: a non-empty string naming the job, e.g. 'analysis'")
    if not isinstance(fields, dict):
        raise ValueError(f"fields is a {type(fields).__name__}; allowed: a dict of what the result depends on")
    blob = canonical_json({"job": job, "schema": str(schema), "fields": fields})
    return hashlib.sha256(blob.encode("ascii")).hexdigest()[:16]


def weights_digest(folder: str | os.PathLike) -> str:
    """What identifies the weights saved in a pipeline folder, without loading them: the first 16 hex digits of the
    SHA-256 of the bytes of every ``*.safetensors`` / ``*.bin`` file under ``folder``, in sorted path order.
    ``FileNotFoundError`` naming the folder when it holds no weight file."""
    folder = Path(folder)
    files = sorted(f for pattern in ("*.safetensors", "*.bin") for f in folder.rglob(pattern))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight file under {str(folder)!r}")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def weights_fingerprint(pipe) -> str:
    """What identifies the weights a pipeline holds in memory, for cache keys: the first 16 hex digits of a SHA-256
    over every parameter and buffer of its ``torch.nn.Module`` components (or of ``pipe`` itself when it is a module):
    name, shape, dtype, the float64 sum and sum of squares (10 significant digits, so the device's summation order
    does not matter) and the first 8 values. One pass over the weights on their own device; two pipelines whose
    weights differ anywhere give different fingerprints."""
    import torch

    comps = {"": pipe} if isinstance(pipe, torch.nn.Module) else dict(getattr(pipe, "components", {}) or {})
    mods = {k: v for k, v in comps.items() if isinstance(v, torch.nn.Module)}
    if not mods:
        raise ValueError(f"{type(pipe).__name__} has no torch.nn.Module component to fingerprint")
    h = hashlib.sha256()
    with torch.no_grad():
        for cname in sorted(mods):
            tensors = list(mods[cname].named_parameters()) + list(mods[cname].named_buffers())
            for name, t in tensors:
                d = t.detach().reshape(-1)
                stats = torch.stack([d.double().sum(), d.double().square().sum()]).tolist()
                head = d[:8].double().tolist()
                h.update(f"{cname}.{name}|{tuple(t.shape)}|{t.dtype}|{stats[0]:.10g}|{stats[1]:.10g}|"
                         f"{[f'{v:.10g}' for v in head]}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- JSON helpers
def json_clean(obj):
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON), numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON atomically (a temporary file next to ``path``, then ``os.replace``): a crash never
    leaves a half-written file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)
    return path


class RecordError(ValueError):
    """A result file lacks a key its record needs, or holds the wrong type or schema there."""


@dataclass(kw_only=True)
class ResultRecord:
    """Base of the typed result records, one subclass per result file.

    A subclass declares ``SCHEMA`` (``"<name>/<version>"``) and, as dataclass fields, the keys it needs (no default:
    required) or reads when present (a default); a field annotated ``dict`` or ``list`` must hold a JSON object or
    array. ``ENTRIES`` maps a key holding ``{name: entry}`` to the keys every entry needs. Every other key of the file
    is kept, in order, in ``extra``, so :meth:`to_json` gives back every key and value it was built from, plus
    ``"schema"``.
    """

    SCHEMA: ClassVar[str] = ""
    WHAT: ClassVar[str] = "result file"
    ENTRIES: ClassVar[dict] = {}

    extra: dict = field(default_factory=dict, repr=False, compare=False)
    key_order: list = field(default_factory=list, repr=False, compare=False)
    path: str | None = field(default=None, repr=False, compare=False)  # the file read, for error messages

    _BOOKKEEPING: ClassVar[tuple] = ("extra", "key_order", "path")

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls._BOOKKEEPING]

    @classmethod
    def _required(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls._BOOKKEEPING
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]

    @property
    def where(self) -> str:
        """``<what> '<path>'`` for error messages."""
        return f"{self.WHAT} {self.path!r}" if self.path is not None else self.WHAT

    @classmethod
    def _check_layout(cls, data: dict, where: str) -> None:
        """The JSON type of every declared key present, and the keys of each entry of :attr:`ENTRIES`."""
        kinds = {"dict": (dict, "a JSON object"), "list": (list, "a JSON array")}
        for f in dataclasses.fields(cls):
            kind = kinds.get(str(f.type).split(" ")[0])
            if kind and data.get(f.name) is not None and not isinstance(data[f.name], kind[0]):
                raise RecordError(f"{where}: {f.name!r} is a {type(data[f.name]).__name__}; expected {kind[1]}")
        for key, needed in cls.ENTRIES.items():
            for name, entry in (data.get(key) or {}).items():
                if not isinstance(entry, dict):
                    raise RecordError(f"{where}: {key}[{name!r}] is a {type(entry).__name__}; expected a JSON object")
                missing = [k for k in needed if k not in entry]
                if missing:
                    raise RecordError(f"{where}: {key}[{name!r}] misses the key {missing[0]!r}; each entry of "
                                      f"{key!r} needs {list(needed)}")

    @classmethod
    def from_json(cls, data: Any, path: str | os.PathLike | None = None) -> "ResultRecord":
        """The record of a parsed JSON object; :class:`RecordError` names the file (``path``) and the missing or bad
        key."""
        where = f"{cls.WHAT} {str(path)!r}" if path is not None else cls.WHAT
        if not isinstance(data, dict):
            raise RecordError(f"{where} holds a {type(data).__name__}; expected a JSON object ({cls.SCHEMA})")
        schema = data.get("schema")
        if schema is not None and schema != cls.SCHEMA:
            raise RecordError(f"{where} has schema {schema!r}; expected {cls.SCHEMA!r}")
        data = {k: v for k, v in data.items() if k != "schema"}
        cls._check_layout(data, where)
        missing = [k for k in cls._required() if k not in data]
        if missing:
            raise RecordError(f"{where} misses the key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else "")
                              + f"; a {cls.SCHEMA} record needs {cls._required()}")
        names = cls._names()
        return cls(**{k: data[k] for k in names if k in data}, extra={k: v for k, v in data.items() if k not in names},
                   key_order=list(data), path=None if path is None else str(path))

    def to_json(self) -> dict:
        """The JSON object: ``"schema"`` first, then every key in the order it was read (new keys last)."""
        values = {k: getattr(self, k) for k in self._names()}
        values.update(self.extra)
        order = [k for k in self.key_order if k in values] + [k for k in values if k not in self.key_order]
        return {"schema": self.SCHEMA, **{k: values[k] for k in order if values[k] is not None or k in self.key_order}}


def read_record(cls: type[ResultRecord], path: str | os.PathLike) -> ResultRecord:
    """Read a result file into its record (``FileNotFoundError`` when absent; :class:`difftrack.fileio.CorruptFileError`
    or :class:`RecordError`, both ``ValueError``, naming the file when it is damaged or lacks a key)."""
    from ..fileio import read_json

    return cls.from_json(read_json(path, cls.WHAT), path)


def write_record(path: str | os.PathLike, record: ResultRecord, indent: int | None = 1, clean: bool = True) -> Path:
    """Write a record atomically (:func:`write_json`); ``clean``: strict JSON, non-finite floats as ``null``
    (:func:`json_clean`), else as Python's ``json`` writes them."""
    data = record.to_json()
    return write_json(path, json_clean(data) if clean else data, indent=indent)
