"""Notebook parameter checks: every parameter of a notebook, checked at once, before any model load or file write.

Each notebook calls :func:`check_notebook` in the cell right after its ``parameters`` cell (and papermill's injected
parameters). A bad value raises :class:`ParameterError` (a ``ValueError``) listing **every** bad parameter with its
value and what is allowed, within seconds: nothing here imports torch (only a ``"cuda"`` device asks it whether CUDA
is available) and a model's geometry (blocks, token stride, temporal compression) is read from its
``transformer/config.json`` and ``vae/config.json`` without loading weights.

The checks are declarative: a notebook's :data:`SPECS` entry maps each parameter to a :class:`Param` (type, bounds,
choices, list items) plus a few cross-parameter :class:`Rule` s; bounds may be callables of the context (the
parameters already found valid plus the model's :class:`Geometry`), e.g. ``layer < number of blocks``.

    from difftrack.params import check_notebook
    check_notebook("02_layer_analysis", globals())
"""
from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import backbones as _backbones
from . import checks as _checks
from .backbones import embedded as _embedded

# kept equal to the modules that define them (tests/test_params.py compares), so this module never imports torch
PIPELINES = tuple(_backbones.pipeline_families())  # runners.PIPELINES (the backbones package imports no torch)
DTYPES = _checks.DTYPES  # runners.DTYPES; every spelling of checks.DTYPE_ALIASES is accepted
FAMILIES = ("objects", "scenes")  # world.FAMILIES
CAG_VARIANTS = ("renormalized", "zero_after_softmax")  # guidance.VARIANTS
CAG_SCALE_RANGE = _checks.CAG_SCALE_RANGE  # the library's one rule (guidance.CAG_SCALE_RANGE)
GUIDANCE_SCALE_RANGE = _checks.GUIDANCE_SCALE_RANGE  # the library's one rule (mini.GUIDANCE_SCALE_RANGE)
EMBEDDED_DIR = Path(__file__).parent / "weights" / "mini-cogvideox"  # mini.WEIGHTS_DIR
EMBEDDED_PATCH = _embedded.PIXEL_PATCH  # mini.PATCH: the embedded model's pixel patching
TRACKER_STEPS = 50  # DiffTracker's default num_steps: notebook 04's `step` indexes a 50-step schedule
MAX_STEPS = 1000  # the schedulers' num_train_timesteps


class ParameterError(ValueError):
    """Bad notebook parameters; ``errors`` maps each bad name to its message."""

    def __init__(self, message: str, errors: dict[str, str]):
        super().__init__(message)
        self.errors = errors


# ---------------------------------------------------------------------------------------------- model geometry
@dataclass(frozen=True)
class Geometry:
    """What the checks need to know of a model, read from its config files (no weights loaded)."""
    model: str
    pipeline: str  # model_index.json's _class_name
    num_layers: int  # transformer blocks the analysis indexes (HunyuanVideo: dual-stream + single-stream)
    stride: int  # pixels per token side (VAE or patching factor x transformer patch)
    temporal: int  # video frames per latent frame
    default_size: tuple[int, int, int] | None  # (frames, height, width) when the configs say it
    fixed_size: bool = False  # the family runs at its default size only (the embedded model)
    experts: tuple[str, ...] = ("transformer",)  # Wan 2.2 A14B: ("transformer", "transformer_2")
    prompt_to_video: bool = True  # the family generates from a prompt alone (not Cosmos Video2World)

    def describe(self) -> str:
        return (f"model {self.model!r} ({self.pipeline}) has {self.num_layers} blocks, {self.stride} px per token, "
                f"{self.temporal} video frame(s) per latent frame")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} holds a {type(data).__name__}, not a JSON object")
    return data


def model_geometry(model: str) -> Geometry:
    """Geometry of ``"embedded"`` or a local diffusers pipeline folder, from ``model_index.json``,
    ``transformer/config.json`` and ``vae/config.json`` (no weights are read). ``ValueError`` naming the folder or
    file otherwise."""
    if not isinstance(model, str) or not model:
        raise ValueError("allowed: 'embedded' or a local diffusers pipeline folder holding model_index.json")
    folder = EMBEDDED_DIR if model == "embedded" else Path(model).expanduser()
    if model != "embedded" and not (folder / "model_index.json").is_file():
        why = "does not exist" if not folder.exists() else "has no model_index.json"
        raise ValueError(f"the folder {why}; allowed: 'embedded' or a local diffusers pipeline folder holding "
                         f"model_index.json (nothing is downloaded)")
    index = _read_json(folder / "model_index.json", "pipeline index")
    cls = index.get("_class_name", "")
    if cls not in PIPELINES:
        raise ValueError(f"{folder / 'model_index.json'} names pipeline {cls or '(no _class_name)'!r}; allowed "
                         f"pipelines: {list(PIPELINES)}")
    tcfg = _read_json(folder / "transformer" / "config.json", "transformer config")
    try:
        layers = int(tcfg["num_layers"]) + int(tcfg.get("num_single_layers") or 0)  # HunyuanVideo: one list
        ps = tcfg.get("patch_size", 2)
        patch = int(ps[-1] if isinstance(ps, (list, tuple)) else ps)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'transformer' / 'config.json'} has no usable num_layers / patch_size "
                         f"({err!r})") from None
    # the family's rule (the pipelines' own vae_scale_factor_* rules; diffusers' defaults 4 and 8 without a VAE)
    vpath = folder / "vae" / "config.json"
    vcfg = _read_json(vpath, "VAE config") if vpath.is_file() else {}
    family = _backbones.family_of_class(cls)
    try:
        temporal, spatial, default = family.geometry(tcfg, vcfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'vae' / 'config.json'} or {folder / 'transformer' / 'config.json'}: no usable "
                         f"compression or sample size ({err!r})") from None
    return Geometry(model=model, pipeline=cls, num_layers=layers, stride=spatial * patch, temporal=temporal,
                    default_size=default, fixed_size=family.fixed_size, experts=family.experts_in_index(index),
                    prompt_to_video=family.prompt_to_video)


# ---------------------------------------------------------------------------------------------- declarative spec
@dataclass(frozen=True)
class Param:
    """One parameter.

    kind: ``"int"``, ``"float"`` (finite), ``"bool"``, ``"str"``, ``"list"``, ``"model"`` (``"embedded"`` or a
        pipeline folder; its :class:`Geometry` joins the context), ``"device"`` (``"cpu"``, ``"cuda"``,
        ``"cuda:N"``; ``""`` when ``empty_ok``), ``"file"`` / ``"path"`` (an existing file / file or folder;
        ``""`` when ``empty_ok``).
    lo, hi: inclusive bounds of a number (or of each item of a list); a callable of the context (valid parameters
        plus the geometry's fields) is evaluated after the types are checked, and skipped when what it needs is bad.
    choices: allowed values. item: kind of each list item. lengths: allowed list lengths.
    note: what special values mean (shown in the message), e.g. ``"-1: the last step"``.
    """
    kind: str
    lo: Any = None
    hi: Any = None
    choices: tuple | None = None
    item: str | None = None
    lengths: tuple[int, ...] | None = None
    empty_ok: bool = False
    note: str = ""


@dataclass(frozen=True)
class Rule:
    """A cross-parameter check run when every name in ``needs`` is valid; ``check(ctx)`` returns
    ``(name, message)`` pairs (message without the ``name=value`` prefix)."""
    needs: tuple[str, ...]
    check: Callable[[dict], Iterable[tuple[str, str]]]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_KIND_TEXT = {"int": "an int", "float": "a finite number", "bool": "True or False", "str": "a string",
              "list": "a list"}


def _type_error(kind: str, v) -> str | None:
    """``None`` when ``v`` has the kind's type, else what is allowed."""
    if kind == "int":
        good = _is_int(v)
    elif kind == "float":
        good = _is_float(v) and math.isfinite(float(v))
    elif kind == "bool":
        good = isinstance(v, bool)
    elif kind == "list":
        good = isinstance(v, (list, tuple))
    elif kind in ("str", "model", "device", "file", "path"):
        good = isinstance(v, str)
    else:
        raise ValueError(f"unknown parameter kind {kind!r}")
    if good:
        return None
    if kind == "float" and _is_float(v):
        return "allowed: a finite number"
    return f"allowed: {_KIND_TEXT.get(kind, 'a string')} (got {type(v).__name__})"


def _device_error(v: str, empty_ok: bool) -> str | None:
    allowed = "'cpu', 'cuda' or 'cuda:N'" + (" ('': cuda when available, else cpu)" if empty_ok else "")
    if v == "" and empty_ok or v == "cpu":
        return None
    m = re.fullmatch(r"cuda(?::(\d+))?", v)
    if not m:
        return f"allowed: {allowed}"
    import torch  # only when a GPU is asked for

    if not torch.cuda.is_available():
        return f"CUDA is not available on this machine (torch {torch.__version__}); allowed here: 'cpu'" + \
            (" or ''" if empty_ok else "")
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        return f"this machine has {n} CUDA device(s); allowed: 'cuda' or 'cuda:0'..'cuda:{n - 1}'"
    return None


def _bound(b, ctx):
    """The bound's value; ``KeyError`` when a callable needs something that is not valid."""
    return b(ctx) if callable(b) else b


def _range_text(lo, hi, kind: str) -> str:
    what = _KIND_TEXT.get(kind, "a value")
    if lo is not None and hi is not None:
        return f"{what} in {lo:g}..{hi:g}" if kind == "float" else f"{what} in {lo}..{hi}"
    if lo is not None:
        return f"{what} >= {lo:g}" if kind == "float" else f"{what} >= {lo}"
    if hi is not None:
        return f"{what} <= {hi:g}" if kind == "float" else f"{what} <= {hi}"
    return what


def _fmt(name: str, value, msg: str) -> str:
    return f"{name}={value!r}: {msg}"


def check_params(spec: Mapping[str, Param], values: Mapping[str, Any], rules: Iterable[Rule] = (),
                 where: str = "") -> dict:
    """Check ``values`` against ``spec`` (and ``rules``); return the context (the valid values plus the model's
    geometry fields: ``num_layers``, ``stride``, ``temporal``, ``default_size``, ``geometry``).

    Raises :class:`ParameterError` listing every bad parameter (missing, wrong type, out of range, not a choice,
    file missing, model folder unusable, device unavailable, or a failed rule), each with its value and what is
    allowed."""
    errors: dict[str, str] = {}
    ok: dict[str, Any] = {}

    def bad(name, msg, value=None):
        if name in errors:
            errors[name] += f"; and {msg}"
        else:
            errors[name] = _fmt(name, values.get(name, value), msg)

    # pass 1: presence, types, choices, files, the model and the device
    for name, p in spec.items():
        if name not in values:
            bad(name, f"missing (the notebook's parameters cell defines it); allowed: "
                      f"{_KIND_TEXT.get(p.kind, 'a string')}", value="<missing>")
            continue
        v = values[name]
        err = _type_error(p.kind, v)
        if err is None and p.choices is not None and v not in p.choices:
            err = f"allowed: one of {list(p.choices)}"
        if err is None and p.kind == "list":
            if p.lengths is not None and len(v) not in p.lengths:
                n = p.lengths
                txt = f"{n[0]}..{n[-1]}" if len(n) > 2 and list(n) == list(range(n[0], n[-1] + 1)) else \
                    " or ".join(map(str, n))
                err = f"{len(v)} item(s); allowed: {txt} items"
            elif p.item is not None:
                for i, x in enumerate(v):
                    e = _type_error(p.item, x)
                    if e is not None:
                        err = f"item {i} is {x!r}; {e.replace('allowed: ', 'allowed: each item ', 1)}"
                        break
        if err is None and p.kind == "model":
            try:
                g = model_geometry(v)
            except ValueError as e:
                err = str(e)
            else:
                ok.update(geometry=g, num_layers=g.num_layers, stride=g.stride, temporal=g.temporal,
                          default_size=g.default_size)
        if err is None and p.kind == "device":
            err = _device_error(v, p.empty_ok)
        if err is None and p.kind in ("file", "path") and not (p.empty_ok and v == ""):
            path = Path(v).expanduser()
            exists = path.is_file() if p.kind == "file" else path.exists()
            if not exists:
                what = "file" if p.kind == "file" else "file or folder"
                err = (f"no such {what} (relative paths start at {Path.cwd()}); allowed: an existing {what}" +
                       (" or '' (none)" if p.empty_ok else ""))
        if err is not None:
            bad(name, err)
        else:
            ok[name] = v
    # pass 2: bounds, possibly depending on other parameters or the model
    for name, p in spec.items():
        if name not in ok or (p.lo is None and p.hi is None):
            continue
        try:
            lo, hi = _bound(p.lo, ok), _bound(p.hi, ok)
        except KeyError:
            continue  # depends on a bad parameter, which is reported
        kind = p.item if p.kind == "list" else p.kind
        items = list(enumerate(ok[name])) if p.kind == "list" else [(None, ok[name])]
        for i, x in items:
            if (lo is not None and x < lo) or (hi is not None and x > hi):
                allowed = _range_text(lo, hi, kind)
                if lo is not None and hi is not None and hi < lo:
                    allowed = "nothing (the range is empty)"
                msg = (f"out of range; allowed: {allowed}" if i is None else
                       f"item {i} ({x!r}) out of range; allowed: each item {allowed}")
                if p.note:
                    msg += f" ({p.note})"
                if _last_layer in (p.lo, p.hi):
                    msg += f"; model {ok['model']!r} has {ok['num_layers']} blocks"
                bad(name, msg)
                ok.pop(name, None)
                break
    # pass 3: cross-parameter rules
    for rule in rules:
        if all(n in ok for n in rule.needs):
            for name, msg in rule.check(ok):
                bad(name, msg)
    if errors:
        order = list(spec)
        errors = {n: errors[n] for n in sorted(errors, key=lambda n: order.index(n) if n in order else len(order))}
        head = (f"{where}: " if where else "") + (f"{len(errors)} bad parameter{'s' if len(errors) > 1 else ''} "
                                                  f"(checked before any model load or file write):")
        raise ParameterError("\n  ".join([head, *errors.values()]), errors)
    return ok


# ---------------------------------------------------------------------------------------------- shared rules
def _last_layer(ctx) -> int:
    return ctx["num_layers"] - 1


def _size_rule(name: str = "size") -> Rule:
    """``size`` empty (the model's default) or ``[frames, height, width]`` the model accepts."""
    def check(ctx):
        size = ctx[name]
        if len(size) == 0:
            return
        T, H, W = (int(v) for v in size)
        r, s = ctx["temporal"], ctx["stride"]
        g = ctx["geometry"]
        if T < 2 or (T - 1) % r:
            yield name, (f"frames={T}; allowed: at least 2 frames with frames - 1 divisible by {r} "
                         f"(e.g. {max(1, round((T - 1) / r)) * r + 1}); {g.describe()}")
        if H < s or W < s or H % s or W % s:
            yield name, (f"height x width {H}x{W}; allowed: positive multiples of {s} px, e.g. "
                         f"{max(s, round(H / s) * s)}x{max(s, round(W / s) * s)}; {g.describe()}")
        if min(H, W) < 8:
            yield name, f"height x width {H}x{W}; allowed: at least 8x8 pixels (the world renders)"
    return Rule((name, "model"), check)


def _grid_memory(ctx):
    """The analysis' grid memory estimate against its limit (:func:`difftrack.checks.check_grid_size`, the rule
    ``analyze_generation`` / ``run_dataset`` apply): for the run's steps, the model's blocks and latent frames."""
    g = ctx["geometry"]
    size = ctx["size"] or g.default_size
    if not size:
        return
    T, H, W = (int(v) for v in size)
    s = g.stride
    try:
        _checks.check_grid_size(ctx["grid_size"], num_steps=ctx["num_steps"], num_layers=g.num_layers,
                                frames=(T - 1) // g.temporal + 1, tokens_per_frame=(H // s) * (W // s))
    except ValueError as err:
        yield "grid_size", str(err).split("; allowed: ", 1)[0].split(" ", 1)[1] + \
            "; allowed: a smaller grid, or raise the limit with DIFFTRACK_MAX_GRID_BYTES in the environment"


def _some_videos(ctx):
    if ctx["videos_per_family"] + ctx["exact_per_family"] < 1:
        yield "videos_per_family", ("no video to analyse (exact_per_family is 0 too); allowed: "
                                    "videos_per_family + exact_per_family >= 1")


def _expert_of_model(ctx):
    g, e = ctx["geometry"], ctx["expert"]
    if e and e not in g.experts:
        yield "expert", (f"{g.pipeline} at {g.model!r} has the expert(s) {list(g.experts)}; allowed: '' (the "
                         f"pipeline's expert at each timestep) or one of them")


def _generates(ctx):
    g = ctx["geometry"]
    if ctx["videos_per_family"] > 0 and not g.prompt_to_video:
        yield "videos_per_family", (f"{ctx['videos_per_family']}: {g.pipeline} does not generate from a prompt "
                                    f"alone; allowed: 0 (analyse world videos: exact_per_family >= 1)")


def _temporal_one(ctx):
    g = ctx["geometry"]
    if g.temporal != 1:
        yield "model", (f"{g.pipeline} compresses time ({g.temporal} video frames per latent frame); this "
                        f"notebook's figures assume one latent frame per video frame (the embedded layout); "
                        f"notebooks 02 and 03 take it")


COMMON = {  # notebooks 01-03 (same defaults in their parameters cells: tests/test_notebook_pairs.py)
    "model": Param("model"),
    "videos_per_family": Param("int", lo=0),
    "exact_per_family": Param("int", lo=0),
    "num_steps": Param("int", lo=1, hi=MAX_STEPS),
    "grid_size": Param("int", lo=1, note="its memory is estimated against DIFFTRACK_MAX_GRID_BYTES (4 GiB)"),
    "device": Param("device"),
    "dtype": Param("str", choices=tuple(_checks.DTYPE_ALIASES)),
    "seed": Param("int", lo=0),
    "size": Param("list", item="int", lengths=(0, 3), note="[frames, height, width]; empty: the model's default"),
}
COMMON_RULES = (Rule(("videos_per_family", "exact_per_family"), _some_videos), _size_rule(),
                Rule(("grid_size", "num_steps", "size", "model"), _grid_memory),
                Rule(("videos_per_family", "model"), _generates))


def _native_size_rule(ctx):
    g = ctx["geometry"]
    H, W = (int(v) for v in ctx["native_size"])
    if g.fixed_size:
        return  # the embedded layout always works at its own 64x64
    s = g.stride
    if H < s or W < s or H % s or W % s:
        yield "native_size", (f"{H}x{W}; allowed: positive multiples of {s} px for this model, e.g. "
                              f"{max(s, round(H / s) * s)}x{max(s, round(W / s) * s)}; {g.describe()}")


def _scale_in_scales(ctx):
    scales = [float(s) for s in ctx["scales"]]
    if float(ctx["scale"]) not in scales:
        yield "scale", f"not one of scales={scales}; allowed: one of the CAG scales this notebook runs"


SPECS: dict[str, tuple[dict[str, Param], tuple[Rule, ...]]] = {
    "01_dataset": ({
        **COMMON,
        "pseudo_check_per_family": Param("int", lo=1),
        "show_per_family": Param("int", lo=1),
    }, (*COMMON_RULES, Rule(("model",), _temporal_one))),
    "02_layer_analysis": ({
        **COMMON,
        "layer": Param("int", lo=-1, hi=_last_layer, note="-1: the best layer by harmonic mean"),
        "step": Param("int", lo=lambda c: -c["num_steps"], hi=lambda c: c["num_steps"] - 1,
                      note="an index into the num_steps schedule; -1: the last step"),
        "inspect_video": Param("int", lo=0),
        "num_points": Param("int", lo=1),
        "untrained_control": Param("bool"),
    }, COMMON_RULES),
    "03_timestep": ({
        **COMMON,
        "layer": Param("int", lo=-1, hi=_last_layer, note="-1: the mean over layers"),
    }, COMMON_RULES),
    "04_tracking": ({
        "model": Param("model"),
        "video_path": Param("file", empty_ok=True),
        "tapvid_path": Param("path", empty_ok=True),
        "layer": Param("int", lo=0, hi=_last_layer),
        "step": Param("int", lo=-TRACKER_STEPS, hi=TRACKER_STEPS - 1,
                      note=f"an index into the {TRACKER_STEPS}-step schedule; -1: the last step"),
        "slider_layers": Param("list", item="int", lo=0, hi=_last_layer),
        "slider_steps": Param("list", item="int", lo=-TRACKER_STEPS, hi=TRACKER_STEPS - 1,
                              note=f"indices into the {TRACKER_STEPS}-step schedule"),
        "family": Param("str", choices=FAMILIES),
        "seed": Param("int", lo=0),
        "n_videos": Param("int", lo=1),
        "grid_size": Param("int", lo=1, hi=256),
        "num_frames": Param("int", lo=2),
        "native_size": Param("list", item="int", lengths=(2,), lo=1, note="[height, width]"),
        "include_features": Param("bool"),
        "trail": Param("int", lo=0),
        "scale": Param("int", lo=1, hi=32),
        "tapvid_max_videos": Param("int", lo=1),
        "tapvid_max_frames": Param("int", lo=2),
        "tapvid_max_points": Param("int", lo=1),
        "benchmark": Param("file", empty_ok=True),
        "device": Param("device", empty_ok=True),
        "expert": Param("str", note="'': the pipeline's expert at each timestep (Wan 2.2 A14B: 'transformer' or "
                                    "'transformer_2')"),
    }, (Rule(("native_size", "model"), _native_size_rule), Rule(("expert", "model"), _expert_of_model))),
    "05_cag": ({
        "n_prompts": Param("int", lo=1),
        "num_steps": Param("int", lo=1, hi=MAX_STEPS),
        "scales": Param("list", item="float", lo=CAG_SCALE_RANGE[0], hi=CAG_SCALE_RANGE[1],
                        lengths=tuple(range(1, 65)), note="0 disables CAG"),
        "guidance_scale": Param("float", lo=GUIDANCE_SCALE_RANGE[0], hi=GUIDANCE_SCALE_RANGE[1],
                                note="<= 1 runs without CFG"),
        "variant": Param("str", choices=CAG_VARIANTS),
        "prompt_index": Param("int", lo=0, hi=lambda c: c["n_prompts"] - 1),
        "scale": Param("float", lo=CAG_SCALE_RANGE[0], hi=CAG_SCALE_RANGE[1]),
        "layer_set": Param("str", choices=("top3", "bottom3")),
        "threads": Param("int", lo=1, hi=1024),
        "device": Param("device", empty_ok=True),
    }, (Rule(("scale", "scales"), _scale_in_scales),)),
}


def notebook_names() -> list[str]:
    return list(SPECS)


def _spec(notebook: str) -> tuple[str, dict[str, Param], tuple[Rule, ...]]:
    key = Path(notebook).stem
    if key not in SPECS:
        raise ValueError(f"unknown notebook {notebook!r}; allowed: {list(SPECS)}")
    return (key, *SPECS[key])


#: first line of the cell papermill injects after the ``parameters`` cell (``papermill.translators``)
INJECTED_HEADER = "# Parameters"


def injected_names(history: Iterable[str] | None) -> list[str]:
    """Names assigned by papermill's injected-parameters cells in a kernel's input history (IPython's ``In``, which
    the notebook's ``globals()`` holds): every executed cell whose first line is ``# Parameters``."""
    import ast

    names: list[str] = []
    for src in history or ():
        if not isinstance(src, str) or src.split("\n", 1)[0].strip() != INJECTED_HEADER:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def check_names(notebook: str, names: Iterable[str]) -> None:
    """Raise :class:`ParameterError` when ``names`` (parameters passed to ``notebook``, e.g. by papermill ``-p``)
    holds a name the notebook's ``parameters`` cell does not define, naming it and the allowed names (papermill
    itself only warns and runs on the defaults)."""
    key, spec, _ = _spec(notebook)
    unknown = [n for n in names if n not in spec]
    if unknown:
        errors = {n: f"{n}: unknown parameter of notebook {key}" for n in unknown}
        raise ParameterError(f"notebook {key}: unknown parameter name{'s' if len(unknown) > 1 else ''} "
                             f"{unknown} (misspelt?); allowed names: {list(spec)}", errors)


def check_notebook(notebook: str, values: Mapping[str, Any]) -> dict:
    """Check the parameters of ``notebook`` (a :data:`SPECS` key such as ``"02_layer_analysis"``, or its file
    name) in ``values`` (the notebook's ``globals()``: the notebook's parameter names are read, and the names
    papermill injected, from the kernel's input history ``In``: an unknown one raises, :func:`check_names`).
    Returns the context of :func:`check_params` (the model geometry included); raises :class:`ParameterError`
    naming every bad parameter, its value and what is allowed."""
    key, spec, rules = _spec(notebook)
    check_names(key, injected_names(values.get("In")))
    return check_params(spec, values, rules, where=f"notebook {key}")
