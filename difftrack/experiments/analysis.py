"""The analysis job's orchestration: the analysed items, the per-video record cache (resume), the notebooks' analysis
run, the summaries of its tables and the ``analysis_summary.json`` record.

The computation is :mod:`difftrack.analysis` (recording, ground truth, per-(step, layer) tables); here it is run over
a list of videos, each cached as ``<record_stem>.npz`` (:class:`difftrack.analysis.AnalysisRecord`) and
``<record_stem>_video.npy`` in a cache folder. A cached record is reused only when its cache key
(:func:`difftrack.experiments.cache_key` of :func:`cache_fields`: item, steps, grid, size, guidance, model, matching
settings) equals the one asked for; otherwise it is recomputed, or the differing fields are named.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import analysis as A
from . import RecordError, ResultRecord, cache_key

#: Version of the cached analysis record's layout (part of its cache key).
RECORD_SCHEMA = "analysis-record/1"


# ---------------------------------------------------------------------------------------------- items
def analysis_items(generated_per_family: int, exact_per_family: int, seed: int = 0, families=None,
                   split: str = "heldout") -> list[dict]:
    """The analysed videos, as :func:`run_dataset` items.

    * ``generated``: the embedded model generates from the prompt of world video ``seed + i`` of each family
      (held-out textures, so the prompt is in the model's vocabulary but the video is new); noise seed ``seed + i``.
    * ``exact``: world video ``seed + i`` of each family itself, with exact ground truth.
    """
    from ..world import FAMILIES, World

    families = FAMILIES if families is None else tuple(families)
    w = World()
    items = []
    for fam in families:
        for i in range(generated_per_family):
            s = w.sample(seed + i, fam, split)
            items.append(dict(kind="generated", family=fam, seed=seed + i, prompt=s.prompt, split=split))
    for fam in families:
        for i in range(exact_per_family):
            items.append(dict(kind="exact", family=fam, seed=seed + i, split=split))
    return items


def load_cached(cache_dir, item: dict, num_steps: int, grid_size: int):
    """``(AnalysisRecord, video uint8 [T, H, W, 3])`` that :func:`run_dataset` cached for
    ``item``; raises ``FileNotFoundError`` naming the fix when it is not there, and
    :class:`difftrack.fileio.CorruptFileError` (a ``ValueError``) naming the file when it is truncated or corrupted
    (delete it; ``run_dataset`` then recomputes it)."""
    stem = Path(cache_dir) / record_stem(item, num_steps, grid_size)
    path, vid = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + "_video.npy")
    if not path.exists() or not vid.exists():
        raise FileNotFoundError(f"no cached analysis for {item} at {path}; run analysis.run_dataset(pipe, items, "
                                f"cache_dir={cache_dir!s}, num_steps={num_steps}, grid_size={grid_size}) first")
    from ..fileio import READ_ERRORS, CorruptFileError, load_npy

    fix = f"delete it and rerun analysis.run_dataset (cache_dir={cache_dir!s}) to recompute it"
    video = load_npy(vid, "cached analysis video", hint=fix)
    try:
        rec = A.AnalysisRecord.load(path)
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:
        raise CorruptFileError(f"cannot read cached analysis record {str(path)!r} (truncated or corrupted?): "
                               f"{type(err).__name__}: {err}; {fix}") from err
    return rec, video


def item_ground_truth(item: dict, rec, video: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """``(tracks [n, F, 2], visible [n, F], source)`` for the record's queries **per latent frame** (``F = T``
    for the embedded model): exact world tracks for ``exact`` items, pseudo ground truth (Lucas-Kanade, needs
    OpenCV) for ``generated`` ones; ``source`` is ``"exact"`` or ``"pseudo"``
    (:func:`difftrack.analysis.record_ground_truth`)."""
    return A.record_ground_truth(rec, item, video)


def latent_video(rec, video: np.ndarray) -> np.ndarray:
    """The video frames the record's latent frames are pinned to (``video`` itself for the embedded model)."""
    return video[np.asarray(rec.meta.get("frame_index", range(video.shape[0])), int)]


# ---------------------------------------------------------------------------------------------- summaries
#: What each scoring protocol's numbers are (written into ``analysis_summary.json`` beside them).
PROTOCOL_NOTES = {
    "difftrack": "the project's protocol: soft-argmax refinement (3x3 around the peak); accuracy per latent frame, "
                 "frames 1.. only, visibility of the AND rule over the video frames a latent frame encodes; scores "
                 "at the matching temperature; features by cosine similarity, bidirectional",
    "published": "the published analysis code's definitions (analyze_generation.py / MatchingEvaluator) with its "
                 "defects [B3], [B4] and the second softmax fixed: argmax per source token + bilinear interpolation "
                 "of the match map; latent-frame tracks linearly interpolated to every video frame (the identity "
                 "when latent frames are video frames) and all frames scored, frame 0 included, per-video-frame "
                 "visibility; the AND rule only in the confidence score; scores at sqrt(head_dim); features by "
                 "raw dot product, forward only",
}


@dataclass
class Summary:
    """Headline numbers of one set of mean tables (see :func:`summarize_tables`)."""

    qk_best_acc: float
    feat_best_acc: float
    qk_best_layer: int
    best_layers_top3: list
    hm_top3_over_median: float
    acc_last_over_first_step: float
    acc_first_step: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def summarize_tables(tables: dict[str, np.ndarray], step: int = -1, protocol: str = "difftrack") -> Summary:
    """Headline numbers of mean tables ``[S, L]`` (:func:`difftrack.analysis.mean_tables`) of ``protocol``
    (:func:`protocol_tables`; ``ValueError`` when it was not recorded), at ``step``:

    * ``qk_best_acc`` / ``feat_best_acc``: best accuracy over layers (fraction in ``[0, 1]``);
    * ``best_layers_top3``: layers with the highest harmonic mean;
    * ``hm_top3_over_median``: mean harmonic mean of those three over the median layer's harmonic mean
      (``inf`` when the median is 0, i.e. at least half the layers score the minimum);
    * ``acc_last_over_first_step``: the best layer's (by QK accuracy at ``step``) accuracy at ``step`` over its
      accuracy at step 0.
    """
    tables = protocol_tables(tables, protocol)
    if tables is None:
        raise ValueError(f"no {protocol!r} tables: record with protocols=('difftrack', 'published')")
    hm = A.harmonic_mean(tables["qk_acc"], tables["conf_cross"], tables["attn_cross"])
    qk, feat = tables["qk_acc"][step], tables["feat_acc"][step]
    top3 = A.top_layers(hm, k=min(3, hm.shape[1]), step=step)
    med = float(np.median(hm[step]))
    top_mean = float(np.mean(hm[step][top3]))
    best = int(np.nanargmax(qk))
    first = float(tables["qk_acc"][0, best])
    return Summary(qk_best_acc=float(np.nanmax(qk)), feat_best_acc=float(np.nanmax(feat)), qk_best_layer=best,
                   best_layers_top3=top3, hm_top3_over_median=top_mean / med if med > 0 else float("inf"),
                   acc_last_over_first_step=float(qk[best]) / first if first > 0 else float("inf"),
                   acc_first_step=first)


def protocol_summaries(grouped: dict[str, dict[str, np.ndarray]], step: int = -1) -> dict[str, dict | None]:
    """``{protocol: {subset: Summary dict} or None}`` of :func:`group_tables` output, for every protocol of
    :data:`difftrack.analysis.PROTOCOLS` (``None``: not recorded)."""
    out = {}
    for protocol in A.PROTOCOLS:
        recorded = all(protocol_tables(t, protocol) is not None for t in grouped.values())
        out[protocol] = ({name: summarize_tables(t, step, protocol).to_dict() for name, t in grouped.items()}
                         if recorded else None)
    return out


def headline_frame(by_protocol: dict[str, dict | None]):
    """``pandas.DataFrame`` of headline numbers, one row per (protocol, subset), from
    ``{protocol: {subset: summary dict} or None}`` (:func:`protocol_summaries`, or a paper-scale summary's blocks);
    a protocol that was not recorded gets one row saying so."""
    import pandas as pd

    cols = ("qk_best_acc", "feat_best_acc", "qk_best_layer", "best_layers_top3", "hm_top3_over_median",
            "acc_last_over_first_step")
    rows = []
    for protocol, subsets in by_protocol.items():
        if not subsets:
            rows.append(dict(protocol=protocol, subset="not recorded"))
            continue
        for name, s in subsets.items():
            rows.append(dict(protocol=protocol, subset=name, **{c: s.get(c) for c in cols}))
    return pd.DataFrame(rows).set_index(["protocol", "subset"])


def group_tables(results: list[tuple[dict, dict]]) -> dict[str, dict[str, np.ndarray]]:
    """Mean tables (:func:`difftrack.analysis.mean_tables`) of ``run_dataset`` results per subset: ``"generated"``
    (pseudo ground truth), ``"exact"`` (world videos, exact ground truth) and ``"all"``; each table gains ``"hm"``,
    the harmonic mean (and ``"pub_hm"`` from the published protocol's tables when recorded). Empty subsets are left
    out."""
    groups = {"generated": [t for it, t in results if it["kind"] == "generated"],
              "exact": [t for it, t in results if it["kind"] == "exact"],
              "all": [t for _, t in results]}
    out = {}
    for name, tabs in groups.items():
        if tabs:
            m = A.mean_tables(tabs)
            m["hm"] = A.harmonic_mean(m["qk_acc"], m["conf_cross"], m["attn_cross"])
            p = A.PUBLISHED_PREFIX
            if p + "qk_acc" in m:
                m[p + "hm"] = A.harmonic_mean(m[p + "qk_acc"], m[p + "conf_cross"], m[p + "attn_cross"])
            out[name] = m
    return out


def tables_frame(grouped: dict[str, dict[str, np.ndarray]], timesteps=None):
    """Long ``pandas.DataFrame`` of grouped tables: one row per (subset, step, layer), one column per table."""
    import pandas as pd

    rows = []
    for name, tabs in grouped.items():
        S, L = tabs["qk_acc"].shape
        for s in range(S):
            for l in range(L):
                r = {"subset": name, "step": s, "layer": l}
                if timesteps is not None:
                    r["timestep"] = int(timesteps[s])
                r.update({k: float(v[s, l]) for k, v in tabs.items()})
                rows.append(r)
    return pd.DataFrame(rows)


@dataclass
class NotebookAnalysis:
    """One analysis run of notebooks 02 and 03 (:func:`run_notebook_analysis`): the pipeline and its runner, the
    video size, the items, their per-item cache folder, the schedule's timesteps, the per-video results of
    :func:`run_dataset` and their :func:`group_tables`."""

    pipe: object
    runner: object
    size: tuple
    items: list
    cache: object
    timesteps: list
    results: list
    grouped: dict
    seconds: float


def run_notebook_analysis(model: str, device: str, dtype: str, size, videos_per_family: int, exact_per_family: int,
                          seed: int, num_steps: int, grid_size: int, log=print,
                          protocols=("difftrack", "published")) -> NotebookAnalysis:
    """Load ``model``, analyse ``videos_per_family`` generated and ``exact_per_family`` world videos of each family
    with :func:`run_dataset` (per-video cache under ``cache/analysis_nb/<model tag>``, shared
    by notebooks 01-03: a rerun with the same parameters skips the model) and group the tables; ``log`` gets what
    was run. ``protocols``: the scoring protocols recorded (:data:`difftrack.analysis.PROTOCOLS`; both by default,
    the published one's tables prefixed ``pub_``)."""
    from .. import paths
    from ..runners import VideoRunner, load_pipeline, model_tag

    pipe = load_pipeline(model, device, dtype)
    runner = VideoRunner(pipe)  # the backbone's conventions: token stride, latent frames, VAE, text conditioning
    size = runner.resolve_size(size)  # empty: the model's default
    log(f"model {model}: {type(pipe).__name__}, {runner.num_layers} blocks, videos of {size[0]} frames at "
        f"{size[2]}x{size[1]} px, {runner.stride} px per token, {runner.latent_frames(size[0])} latent frames")
    items = analysis_items(videos_per_family, exact_per_family, seed)
    cache = paths.cache_dir(f"analysis_nb/{model_tag(model, dtype)}")
    timesteps = [int(t) for t in runner.timesteps(num_steps)]
    if runner.experts.several:  # Wan 2.2 A14B: each step is recorded from the expert that runs it
        by = [runner.experts.at(t) for t in runner.timesteps(num_steps)]
        log(f"experts ({runner.experts.rule}): " + ", ".join(
            f"{e} steps {[s for s, b in enumerate(by) if b == e]}" for e in runner.experts.names))
    t0 = time.time()
    results = run_dataset(runner, items, cache, num_steps=num_steps, grid_size=grid_size, size=size,
                          protocols=protocols)
    seconds = time.time() - t0
    log(f"{len(results)} videos analysed in {seconds:.1f} s (per-video cache: {cache})")
    grouped = group_tables(results)
    log("subsets:", {k: sum(1 for it, _ in results if k == "all" or it["kind"] == k) for k in grouped})
    return NotebookAnalysis(pipe, runner, size, items, cache, timesteps, results, grouped, seconds)


# ---------------------------------------------------------------------------------------------- per-video cache
def _match_settings(kw: dict) -> dict:
    """Every matching / recording setting of a run (``Recorder`` arguments and ``features``), defaults filled in."""
    import inspect

    params = inspect.signature(A.Recorder.__init__).parameters
    allowed = [n for n in params if n not in ("self", "queries_px", "stride", "num_steps", "num_layers", "frames",
                                              "steps")]  # steps: analyze_exact's own argument
    unknown = sorted(set(kw) - set(allowed) - {"features"})
    if unknown:
        raise ValueError(f"unknown analysis settings {unknown}; allowed: {sorted(allowed + ['features', 'size'])} "
                         f"(and guidance_scale)")
    out = {n: kw.get(n, params[n].default) for n in allowed}
    out["features"] = bool(kw.get("features", True))
    protocols = A.check_protocols(out.pop("protocols"))
    if protocols != ("difftrack",):  # left out when default: records made before protocols existed stay valid
        out["protocols"] = "+".join(protocols)
    return {k: (v if v is None or isinstance(v, (bool, int, float, str)) else str(v)) for k, v in out.items()}


def model_id(runner) -> str:
    """What identifies a model for the analysis cache: pipeline class, weights folder name, blocks, dtype and the
    fingerprint of the weights themselves (:func:`difftrack.experiments.weights_fingerprint`), so new weights in the
    same folder never reuse records of the old ones."""
    from . import weights_fingerprint

    pipe = runner.pipe
    name = Path(str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")).name
    dtype = str(getattr(getattr(pipe, "transformer", None), "dtype", ""))
    return f"{type(pipe).__name__}:{name}:{runner.num_layers}:{dtype}:{weights_fingerprint(pipe)}"


def cache_fields(item: dict, num_steps: int, grid_size: int, size=None, guidance_scale: float = 6.0,
                 model: str | None = None, **kw) -> dict:
    """Everything a cached analysis record depends on besides its file name's kind, family, seed, steps and grid:
    split, prompt and guidance (generated videos), size, model and every matching setting. Stored in the record
    (``meta["cache_fields"]``) and compared on every reuse."""
    f = dict(kind=item["kind"], seed=int(item["seed"]), family=item.get("family"),
             split=item.get("split", "heldout"), num_steps=int(num_steps), grid_size=int(grid_size),
             match=_match_settings(kw))
    if item["kind"] == "generated":
        f.update(prompt=item["prompt"], guidance_scale=float(guidance_scale))
    if size is not None:
        f["size"] = [int(v) for v in size]
    if model is not None:
        f["model"] = model
    return f


def _field_diff(stored: dict | None, want: dict) -> dict:
    """``{field: (stored, wanted)}`` for every wanted field the stored record disagrees with."""
    stored = stored or {}
    return {k: (stored.get(k), v) for k, v in want.items() if stored.get(k) != v}


def record_stem(item: dict, num_steps: int, grid_size: int) -> str:
    """File stem of ``item``'s cached record (``<stem>.npz``) and video (``<stem>_video.npy``) in
    :func:`run_dataset`'s cache folder (readable names); the record's identity is its cache key
    (:func:`record_key`), of everything in :func:`cache_fields`."""
    return f"{item['kind']}_{item.get('family', 'x')}_{item['seed']}_s{num_steps}_g{grid_size}"


def record_key(fields: dict) -> str:
    """The cache key (:func:`difftrack.experiments.cache_key`) of an analysis record made with ``fields``
    (:func:`cache_fields`)."""
    return cache_key("analysis", RECORD_SCHEMA, fields)


def stale_fields(stored: dict | None, want: dict) -> dict:
    """``{}`` when a record cached with ``stored`` fields is the one asked for: the cache key (:func:`record_key`) of
    its fields equals that of ``want`` (fields left out of ``want``, e.g. the model when only scoring, are not
    compared); else ``{field: (stored, wanted)}`` naming what differs."""
    stored = stored or {}
    if record_key({k: stored.get(k) for k in want}) == record_key(want):
        return {}
    return _field_diff(stored, want)


def check_items(items) -> list[dict]:
    """:func:`run_dataset`'s items, all checked before any work: a list of dicts, each ``kind`` ``"generated"``
    (``prompt`` a non-empty string, ``seed`` an int >= 0) or ``"exact"`` (``family`` in ``world.FAMILIES``, ``seed``
    an int >= 0); ``split`` (optional) in ``world.SPLITS``. ``ValueError`` naming the item and what is allowed."""
    from ..checks import check_int
    from ..world import FAMILIES, SPLITS

    if isinstance(items, (str, bytes, dict)) or not isinstance(items, (list, tuple)):
        raise ValueError(f"items={items!r}; allowed: a list of item dicts (experiments.analysis.analysis_items)")
    for i, item in enumerate(items):
        where = f"item {i} ({item!r})"
        if not isinstance(item, dict):
            raise ValueError(f"{where} is a {type(item).__name__}; allowed: a dict with kind 'generated' (prompt, "
                             f"seed) or 'exact' (family, seed)")
        kind = item.get("kind")
        if kind not in ("generated", "exact"):
            raise ValueError(f"{where}: unknown item kind {kind!r}; allowed: 'generated', 'exact'")
        try:
            check_int("seed", item.get("seed"), lo=0)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if kind == "generated" and (not isinstance(item.get("prompt"), str) or not item["prompt"].strip()):
            raise ValueError(f"{where}: prompt={item.get('prompt')!r}; allowed: a non-empty string")
        if kind == "exact" and item.get("family") not in FAMILIES:
            raise ValueError(f"{where}: family={item.get('family')!r}; allowed: {FAMILIES}")
        if item.get("split", "heldout") not in SPLITS:
            raise ValueError(f"{where}: split={item.get('split')!r}; allowed: {SPLITS}")
    return list(items)


def check_cache_dir(cache_dir, create: bool) -> Path:
    """``cache_dir`` as a ``Path``: a folder this process can write (``create``: made when missing), or, only to read
    (``create=False``), an existing folder. ``ValueError`` naming the path and why otherwise."""
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"cache_dir={cache_dir!r}; allowed: a folder path (str or pathlib.Path)")
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cache_dir={str(path)!r} exists and is not a folder; allowed: a folder path")
    if not create:
        if not path.is_dir():
            raise ValueError(f"cache_dir={str(path)!r} does not exist and no pipeline was given to compute into it; "
                             f"pass the pipeline, or the folder the records were cached in")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cache_dir={str(path)!r} cannot be created ({type(err).__name__}: {err}); allowed: a "
                         f"folder this process can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"cache_dir={str(path)!r} is not writable; allowed: a folder this process can write")
    return path


def _prepare(pipe, items, cache_dir, num_steps, grid_size, guidance_scale, size, max_grid_bytes, kw):
    """Every check of :func:`run_dataset` / :func:`record_dataset`, before any work; returns ``(items, runner or
    None, wanted (T, H, W) or None, model id or None, cache folder)``."""
    from ..checks import check_grid_size, check_guidance_scale, check_int

    check_int("num_steps", num_steps, lo=1)
    check_guidance_scale(guidance_scale)
    items = check_items(items)
    _match_settings(kw)  # unknown settings are named now, not after the first video
    runner, want, model = _setup(pipe, size)
    if runner is not None:
        A.check_grid(runner, grid_size, want, num_steps, kw.get("head_sets"), max_grid_bytes)
    else:
        check_grid_size(grid_size)
    return items, runner, want, model, check_cache_dir(cache_dir, create=runner is not None)


def _setup(pipe, size):
    """``(runner or None, wanted (T, H, W) or None, model id or None)`` of a run."""
    from ..runners import as_runner

    runner = None if pipe is None else as_runner(pipe)
    want = runner.resolve_size(size) if runner is not None else (tuple(int(v) for v in size) if size else None)
    return runner, want, (model_id(runner) if runner is not None else None)


def _cached_or_computed(runner, want, model, item: dict, cache_dir: Path, num_steps: int, grid_size: int,
                        guidance_scale: float, kw: dict, max_grid_bytes=None):
    """``(AnalysisRecord, video)`` of one item: read from the cache when it was made with the same settings, else
    computed (with a runner) and cached atomically; see :func:`run_dataset` for the rules."""
    import warnings

    from ..fileio import READ_ERRORS, load_npy
    from ..world import World

    if item.get("kind") not in ("generated", "exact"):
        raise ValueError(f"unknown item kind {item.get('kind')!r} in {item}; allowed: 'generated', 'exact'")
    fields = cache_fields(item, num_steps, grid_size, want, guidance_scale, model, **kw)
    key = record_stem(item, num_steps, grid_size)
    path = cache_dir / f"{key}.npz"
    vid_path = cache_dir / f"{key}_video.npy"
    rec = video = None
    if path.exists() and vid_path.exists():
        try:
            rec, video = A.AnalysisRecord.load(path), load_npy(vid_path, "cached analysis video")
        except READ_ERRORS as err:
            if runner is None:
                raise
            warnings.warn(f"corrupt analysis cache entry {path} / {vid_path.name} ({err}); recomputing it",
                          stacklevel=3)
            rec = video = None
    if rec is not None:
        diff = stale_fields(rec.meta.get("cache_fields"), fields)
        if want is not None and tuple(video.shape[:3]) != tuple(want):
            diff["video shape"] = (list(video.shape[:3]), list(want))
        if diff and runner is not None:  # made with other settings / another model: recompute
            rec = video = None
        elif diff:
            raise ValueError(f"cached analysis {path} was made with other settings than asked for: "
                             + "; ".join(f"{k}: cached {a!r}, asked {b!r}" for k, (a, b) in diff.items())
                             + ". Pass the pipeline to recompute it, or the settings it was made with.")
    if rec is None:
        if runner is None:
            raise ValueError(f"no cached analysis for {item} at {path} and no pipeline to compute it; pass the "
                             f"pipeline, or record first with the same num_steps={num_steps}, "
                             f"grid_size={grid_size}")
        T, H, W = want
        t0 = time.time()
        if item["kind"] == "generated":
            video, rec = A.analyze_generation(runner, item["prompt"], item["seed"], num_steps, grid_size,
                                              guidance_scale=guidance_scale, size=(T, H, W),
                                              max_grid_bytes=max_grid_bytes, **kw)
        else:
            s = World(T, H, W).sample(item["seed"], item["family"], item.get("split", "heldout"))
            rec, video = A.analyze_exact(runner, s, num_steps, grid_size=grid_size, max_grid_bytes=max_grid_bytes,
                                         **kw), s.video
        rec.meta["seconds"] = time.time() - t0
        rec.meta["cache_fields"] = fields
        rec.meta["cache_key"] = record_key(fields)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = vid_path.with_suffix(".tmp.npy")
        np.save(tmp, video)
        os.replace(tmp, vid_path)
        rec.save(path)
    return rec, video


def run_dataset(pipe, items: list[dict], cache_dir: str | Path, num_steps: int = 50, grid_size: int = 10,
                progress: bool = True, size=None, guidance_scale: float = 6.0, max_grid_bytes=None,
                **kw) -> list[tuple[dict, dict]]:
    """Analyse a list of videos with per-video caching (resumes after an interruption; finished videos are not
    recomputed). ``items``: dicts with ``kind`` ``"generated"`` (``prompt``, ``seed``) or ``"exact"`` (``family``,
    ``seed``, ``split``). ``pipe``: a pipeline or :class:`difftrack.runners.VideoRunner`, or ``None`` to only score
    videos already cached (``ValueError`` for one that is not); ``size``: ``(frames, height, width)`` of generated and
    world videos (default: the pipeline's); ``guidance_scale``: CFG of generated videos; ``kw``: matching settings
    (:class:`difftrack.analysis.Recorder`) and ``features``.

    A cached record is reused only when everything it depends on matches (:func:`cache_fields`: prompt, split, size,
    steps, grid, guidance, model, matching and feature settings); otherwise it is recomputed (with a pipeline) or a
    ``ValueError`` names the differing fields (without). A corrupt cache entry is named in a warning and recomputed.

    Checked before any work (``ValueError`` naming the value and what is allowed): every item (:func:`check_items`),
    the cache folder (:func:`check_cache_dir`: writable, created if missing; without a pipeline it must exist),
    ``num_steps``, ``guidance_scale`` and ``grid_size`` by the library's one rule for each
    (:mod:`difftrack.checks`; the grid's memory estimate against ``max_grid_bytes``), and the matching settings.
    Several processes record with :func:`record_dataset`, then one scores here with ``pipe=None``.
    Returns ``[(item, tables)]``."""
    from tqdm.auto import tqdm

    items, runner, want, model, cache_dir = _prepare(pipe, items, cache_dir, num_steps, grid_size, guidance_scale, size,
                                                     max_grid_bytes, kw)
    out = []
    for item in (tqdm(items, desc="analysis") if progress else items):
        rec, video = _cached_or_computed(runner, want, model, item, cache_dir, num_steps, grid_size, guidance_scale,
                                         kw, max_grid_bytes)
        out.append((item, score_record(rec, item, video)))
    return out


def record_dataset(pipe, items: list[dict], cache_dir: str | Path, num_steps: int = 50, grid_size: int = 10,
                   processes=None, progress: bool = True, size=None, guidance_scale: float = 6.0,
                   max_grid_bytes=None, **kw) -> None:
    """Record (compute and cache, no scoring) this process's share of ``items``
    (:class:`difftrack.experiments.distributed.Processes`, default: one process) with :func:`run_dataset`'s cache
    rules, then wait for every process. Each record depends on its item alone, so the cache holds the same records
    whatever the number of processes; :func:`run_dataset` with ``pipe=None`` then scores them on one process."""
    from .distributed import Processes

    items, runner, want, model, cache_dir = _prepare(pipe, items, cache_dir, num_steps, grid_size, guidance_scale, size,
                                                     max_grid_bytes, kw)
    procs = processes or Processes()
    procs.run(items, lambda i, item: _cached_or_computed(runner, want, model, item, cache_dir, num_steps, grid_size,
                                                         guidance_scale, kw, max_grid_bytes), desc="analysis record",
              progress=progress)


def score_record(rec, item: dict, video: np.ndarray) -> dict[str, np.ndarray]:
    """Tables of one record (:func:`difftrack.analysis.score_tables`) for every protocol it holds: the default
    protocol's under their names, the published protocol's (when recorded) prefixed ``pub_``
    (:data:`difftrack.analysis.PUBLISHED_PREFIX`, see :func:`protocol_tables`)."""
    gt, vis, _ = A.video_ground_truth(rec, item, video)
    tables = A.score_tables(rec, *A.latent_ground_truth(rec, gt, vis))
    if "published" in (rec.protocols or ()):
        tables.update({A.PUBLISHED_PREFIX + k: v for k, v in A.score_tables(rec, gt, vis, protocol="published").items()})
    return tables


def protocol_tables(tables: dict[str, np.ndarray], protocol: str = "difftrack") -> dict[str, np.ndarray] | None:
    """The tables of one protocol out of a mixed dict (:func:`score_record`, :func:`group_tables`), under their plain
    names (``qk_acc`` ...); ``None`` when ``protocol="published"`` was not recorded."""
    A.check_protocol(protocol)
    p = A.PUBLISHED_PREFIX
    if protocol == "difftrack":
        return {k: v for k, v in tables.items() if not k.startswith(p)}
    out = {k[len(p):]: v for k, v in tables.items() if k.startswith(p)}
    return out or None


# ---------------------------------------------------------------------------------------------- summary record
@dataclass(kw_only=True)
class AnalysisSummary(ResultRecord):
    """``results/analysis_summary.json`` (``scripts/run_analysis.py``): headline numbers per subset, the mean tables
    and the run's settings.

    Blocks ``generated``, ``exact`` and ``combined`` (each :class:`Summary` plus ``count``, ``layer_ranking`` best
    first and ``worst_layers_bottom3``); ``tables``: per block ``name -> [steps][layers]``; ``timesteps`` ``[S]``.
    A summary of one set may hold its block's keys at the top level instead of under ``combined``. These top-level
    numbers are of ``protocol`` (``"difftrack"``; absent in summaries written before protocols existed, which are
    the same protocol). ``published``: the same blocks and ``tables`` under the published protocol
    (:data:`PROTOCOL_NOTES`), absent when it was not recorded (:meth:`protocol_block`).
    """

    SCHEMA = "analysis_summary/1"
    WHAT = "analysis summary"

    num_steps: int | None = None
    generated: dict | None = None
    exact: dict | None = None
    combined: dict | None = None
    timesteps: list | None = None
    tables: dict | None = None
    counts: dict | None = None
    settings: dict | None = None
    device: str | None = None
    commit: str | None = None
    protocol: str | None = None
    published: dict | None = None

    def protocol_block(self, protocol: str = "difftrack") -> dict | None:
        """``{"generated", "exact", "combined", "tables", ...}`` of one protocol: the top level for ``"difftrack"``,
        the ``published`` block for ``"published"`` (``None`` when this summary did not record it)."""
        A.check_protocol(protocol)
        if protocol == "published":
            return self.published
        return self.to_json()

    def ranking_block(self) -> dict:
        """The block holding the layer ranking: ``combined`` (generated + exact videos), else the top level of a
        summary with one block."""
        return self.combined if self.combined is not None else self.to_json()

    def layer_sets(self) -> dict:
        """``{"top3": [...], "bottom3": [...]}``: ``best_layers_top3`` and ``worst_layers_bottom3`` of
        :meth:`ranking_block`, or the first / last three of its ``layer_ranking``. :class:`RecordError` names the
        file and the missing key when it has neither."""
        b = self.ranking_block()
        ranking = b.get("layer_ranking")
        out = {}
        for name, key, part in (("top3", "best_layers_top3", slice(None, 3)),
                                ("bottom3", "worst_layers_bottom3", slice(-3, None))):
            v = b.get(key) or (list(ranking)[part] if ranking else None)
            if v is None:
                block = "'combined'" if self.combined is not None else "the top level"
                raise RecordError(f"{self.where} misses the key {key!r} (or 'layer_ranking') in {block}")
            out[name] = [int(x) for x in v]
        return out
