"""The one interception layer of capture and guidance: SDPA calls inside attention processors, and processor
wrappers that install and come off in any order.

* :class:`SDPAIntercept` -- a ``TorchFunctionMode`` that hands the first matching
  ``F.scaled_dot_product_attention`` call of a processor to a callback, which observes it (capture: the post-norm,
  post-RoPE query and key) or replaces it (CAG: the perturbed attention). Every other torch call runs unchanged, so
  an observer leaves the model's outputs bit-identical. Inside the callback the mode is off: its own torch calls
  run plainly.
* :func:`processor_wrapper_class` -- wrapper classes that declare the wrapped processor's ``__call__`` signature
  (diffusers' ``Attention`` drops keyword arguments a processor does not declare).
* :func:`set_processor` -- installs a processor on any diffusers attention module.
* :func:`unwrap_processor` -- removes one wrapper from an attention module's processor chain wherever it sits,
  so nested contexts (a capture inside CAG, two captures) can exit in any order.
* :func:`track_grid` -- a forward pre-hook that reads the token grid of every transformer call from its inputs.
* :func:`check_diffusers_hooks` / :func:`check_attention_backend` -- refuse, before the first forward, diffusers hooks
  that skip or reuse work (:data:`REFUSED_HOOKS`; :data:`EXACT_HOOKS` are allowed) and attention backends that
  bypass torch SDPA.
* :class:`Coverage` -- the one completeness check: each requested (quantity, layer, step) recorded or perturbed, else
  :class:`IncompleteRunError` naming it and why; per-step :class:`StepRun` records (timestep, calls, expert).
* :func:`eager_compile` -- code compiled with ``torch.compile`` runs eagerly while capture or CAG is open.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


class SDPAIntercept(TorchFunctionMode):
    """Hands the first ``F.scaled_dot_product_attention`` call for which ``match(call)`` holds to ``fn(call)`` (with
    ``every=True``: every such call, for processors that attend per batch row, Mochi's).

    ``call`` is the dict of the call's arguments by name (:data:`SDPA_ARGS`, plus any other keyword). ``fn``
    returns ``None`` to let the call run unchanged (an observer) or the tensor that replaces its result.
    ``handled`` counts the calls handed over (0 or 1; any number with ``every``).
    """

    def __init__(self, fn: Callable[[dict], object], match: Callable[[dict], bool] | None = None,
                 every: bool = False):
        super().__init__()
        self.fn, self.match, self.every, self.handled = fn, match, every, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and (self.every or not self.handled):
            call = dict(zip(SDPA_ARGS, args))
            call.update(kwargs)
            if self.match is None or self.match(call):
                self.handled += 1
                out = self.fn(call)
                if out is not None:
                    return out
        return func(*args, **kwargs)


_WRAPPERS: dict[tuple[type, type], type] = {}


def processor_wrapper_class(base: type, wrapped: type, prefix: str) -> type:
    """A subclass of ``base`` whose ``__call__`` forwards to ``self._run`` with the **signature of** ``wrapped``'s
    ``__call__`` (diffusers' ``Attention`` drops keyword arguments a processor's signature lacks, so a wrapper must
    declare the wrapped processor's, e.g. ``image_rotary_emb``). Cached per ``(base, wrapped)``."""
    key = (base, wrapped)
    if key not in _WRAPPERS:
        def __call__(self, *args, **kwargs):
            return self._run(*args, **kwargs)

        __call__.__signature__ = inspect.signature(wrapped.__call__)
        _WRAPPERS[key] = type(f"{prefix}{wrapped.__name__}", (base,), {"__call__": __call__})
    return _WRAPPERS[key]


def _inner_of(proc):
    """What a wrapping processor wraps (its ``inner`` or ``original`` attribute), else ``None``."""
    for name in ("inner", "original"):
        if hasattr(proc, name):
            return name, getattr(proc, name)
    return None, None


def set_processor(attn: nn.Module, processor) -> None:
    """Install ``processor`` on the attention module ``attn``: ``attn.set_processor`` where the class has it
    (diffusers' ``Attention`` and ``AttentionModuleMixin``), else the ``processor`` attribute (``MochiAttention``,
    which calls ``self.processor`` and has no setter)."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:
        attn.processor = processor


def unwrap_processor(attn: nn.Module, wrapper) -> bool:
    """Remove ``wrapper`` from ``attn``'s processor chain, wherever it now sits, re-linking what it currently wraps.

    Wrappers installed later (a nested capture, CAG) may sit on top of ``wrapper``; they are kept and re-linked, and
    one removed earlier from below ``wrapper`` has re-linked ``wrapper`` itself, so contexts can be exited in any
    order. A wrapper is any processor with an ``inner`` (capture) or ``original`` (CAG) attribute pointing to what it
    wraps. Returns whether ``wrapper`` was found (``False`` when the processor was replaced from outside meanwhile,
    e.g. by ``set_attn_processor``; then nothing is touched)."""
    _, below = _inner_of(wrapper)
    if attn.processor is wrapper:
        set_processor(attn, below)
        return True
    cur, seen = attn.processor, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name, nxt = _inner_of(cur)
        if nxt is wrapper:
            setattr(cur, name, below)
            return True
        cur = nxt
    return False




def track_grid(transformer: nn.Module, adapter, set_grid: Callable) -> object:
    """Register a forward pre-hook on ``transformer`` that calls ``set_grid(adapter.grid(...))`` with the token
    grid of every call; returns the hook handle (``.remove()`` it)."""
    def pre(module, args, kwargs):
        set_grid(adapter.grid(module, args, kwargs))

    return transformer.register_forward_pre_hook(pre, with_kwargs=True)


# ------------------------------------------------------------------------------------------ diffusers hooks
# ModelHook classes of diffusers 0.42.1 (``diffusers.hooks``) that change neither which blocks run nor what they
# compute: capture, analysis, tracking and CAG run under them and stay exact (tests/test_diffusers_features.py).
EXACT_HOOKS = {
    "LayerwiseCastingHook": "layerwise casting (enable_layerwise_casting): weights stored in a low dtype, upcast "
                            "for each forward",
    "PeftInputAutocastDisableHook": "layerwise casting of PEFT layers",
    "GroupOffloadingHook": "group offloading (enable_group_offload): weights moved to the device for each group",
    "LazyPrefetchGroupOffloadingHook": "group offloading (prefetch order)",
    "LayerExecutionTrackerHook": "group offloading (layer order tracker)",
    "TextKVCacheTransformerHook": "TextKVCache's transformer hook (it records the prompt tensor's address; its "
                                  "block hooks exist only for NucleusMoE-Image blocks)",
}
# ModelHook classes that skip blocks or steps, reuse or predict outputs of earlier steps, or alter the attention:
# refused before the first forward, naming the feature, why and how to remove it
REFUSED_HOOKS = {
    "FBCHeadBlockHook": ("FirstBlockCache", "skips every block after the first at steps whose first-block output "
                         "is close to the previous step's"),
    "FBCBlockHook": ("FirstBlockCache", "skips every block after the first at steps whose first-block output is "
                     "close to the previous step's"),
    "PyramidAttentionBroadcastHook": ("PyramidAttentionBroadcast", "reuses attention outputs of earlier steps "
                                      "instead of computing them"),
    "FasterCacheDenoiserHook": ("FasterCache", "reuses attention outputs of earlier steps and approximates the "
                                "unconditional branch"),
    "FasterCacheBlockHook": ("FasterCache", "reuses attention outputs of earlier steps"),
    "TaylorSeerCacheHook": ("TaylorSeerCache", "predicts module outputs from earlier steps instead of computing "
                            "them"),
    "MagCacheHeadHook": ("MagCache", "skips the blocks at steps it judges redundant"),
    "MagCacheBlockHook": ("MagCache", "skips the blocks at steps it judges redundant"),
    "SeaCacheRootHook": ("SeaCache", "skips the blocks at steps it judges redundant"),
    "SeaCacheLeaderBlockHook": ("SeaCache", "skips the blocks at steps it judges redundant"),
    "SeaCacheBlockHook": ("SeaCache", "skips the blocks at steps it judges redundant"),
    "SeaCachePostNormHook": ("SeaCache", "skips the blocks at steps it judges redundant"),
    "TextKVCacheBlockHook": ("TextKVCache", "feeds cached text keys and values to the attention"),
    "AttentionProcessorSkipHook": ("LayerSkip", "skips the attention of its blocks"),
    "FeedForwardSkipHook": ("LayerSkip", "skips the feed-forward of its blocks"),
    "TransformerBlockSkipHook": ("LayerSkip", "skips whole blocks"),
    "SmoothedEnergyGuidanceHook": ("SmoothedEnergyGuidance", "blurs the attention queries of its blocks"),
    "ContextParallelSplitHook": ("context parallelism", "splits the token sequence across processes (a block sees "
                                 "part of the token grid)"),
    "ContextParallelGatherHook": ("context parallelism", "splits the token sequence across processes (a block sees "
                                  "part of the token grid)"),
}


class UnsupportedHookError(ValueError):
    """A diffusers hook on the transformer that capture, analysis, tracking or CAG cannot run under exactly."""


def diffusers_hooks(module: nn.Module) -> list[tuple[str, str, str]]:
    """Every diffusers ``ModelHook`` registered on ``module`` or a submodule (their ``HookRegistry``,
    ``module._diffusers_hook``): ``[(module path, hook name, hook class name)]`` (path ``""``: ``module`` itself)."""
    out = []
    for path, m in module.named_modules():
        reg = getattr(m, "_diffusers_hook", None)
        for name, hook in (getattr(reg, "hooks", None) or {}).items():
            out.append((path, name, type(hook).__name__))
    return out


def check_diffusers_hooks(transformer: nn.Module, who: str, when: str = "before the first forward") -> None:
    """Raise :class:`UnsupportedHookError` when ``transformer`` carries a diffusers hook that is not in
    :data:`EXACT_HOOKS` (caches, layer skipping, smoothed energy guidance, context parallelism, any unknown hook) or
    a tensor/context parallel config: the error names each such hook, what it does to the computation and how to
    remove it. ``who`` names the caller (``"capture"``, ``"CAG"``) and ``when`` the moment of the check."""
    bad = [(p, n, c) for p, n, c in diffusers_hooks(transformer) if c not in EXACT_HOOKS]
    par = getattr(transformer, "_parallel_config", None)
    if not bad and par is None:
        return
    cache = getattr(transformer, "_cache_config", None)
    groups: dict[tuple[str, str], tuple[list[str], list[str]]] = {}  # (feature, why) -> (hook names, module paths)
    for path, name, cls in bad:
        key = REFUSED_HOOKS.get(cls, (f"an unknown diffusers hook ({cls})", "difftrack cannot tell whether it "
                                      "changes which blocks run or what they compute"))
        names, paths = groups.setdefault(key, ([], []))
        for item, seen in ((name, names), (path or "the transformer itself", paths)):
            if item not in seen:
                seen.append(item)
    lines = []
    for (feature, why), (names, paths) in groups.items():
        where = ", ".join(paths[:3]) + (f", ... ({len(paths)} modules)" if len(paths) > 3 else "")
        if cache is not None and feature not in ("LayerSkip", "SmoothedEnergyGuidance"):
            fix = "pipe.transformer.disable_cache()"
        else:
            reg = "HookRegistry.check_if_exists_or_initialize(pipe.transformer)"
            fix = " and ".join(f"{reg}.remove_hook({n!r}, recurse=True)" for n in names)
            if feature in ("LayerSkip", "SmoothedEnergyGuidance"):
                fix += (" (a guider such as SkipLayerGuidance or SmoothedEnergyGuidance adds it for its own forwards: "
                        "use ClassifierFreeGuidance or difftrack's CrossAttentionGuidance)")
        lines.append(f"{feature} (hook {', '.join(map(repr, names))} on {where}) {why}; remove it: {fix}")
    if par is not None:
        lines.append(f"a parallel config ({type(par).__name__}: context or tensor parallelism) splits the tokens or "
                     f"heads across processes; run the transformer without enable_parallelism")
    raise UnsupportedHookError(
        f"{who} refused {when}: the transformer ({type(transformer).__name__}) carries diffusers hooks under which "
        f"the requested layers and steps would not be computed as the model defines them, so the result would be "
        f"incomplete or wrong:\n  " + "\n  ".join(lines) +
        f"\nAllowed diffusers hooks (exact): {sorted(EXACT_HOOKS)}")


# diffusers attention backends (``set_attention_backend``) that compute with ``F.scaled_dot_product_attention``, the
# call capture observes and CAG replaces; the others (flash, sage, flex, xformers, ...) call their own kernels
SDPA_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn")


def check_attention_backend(attns, who: str) -> None:
    """Raise ``ValueError`` before any forward when a self-attention in ``attns`` (``[(layer, attention module)]``)
    dispatches to a diffusers attention backend outside :data:`SDPA_BACKENDS` -- set on its processor by
    ``set_attention_backend`` or active globally (the ``attention_backend`` context, ``DIFFUSERS_ATTN_BACKEND``):
    its query and key never reach torch SDPA, so capture could not see them and CAG could not perturb them."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        active = _AttentionBackendRegistry.get_active_backend()[0]
    except (ImportError, AttributeError, KeyError):
        active = None
    bad = {}
    for layer, attn in attns:
        proc = unwrap_chain(attn.processor)
        if not hasattr(proc, "_attention_backend"):  # the processor calls torch SDPA itself (CogVideoX)
            continue
        backend = proc._attention_backend or active
        name = getattr(backend, "value", backend)
        if name is not None and str(name) not in SDPA_BACKENDS:
            bad.setdefault(str(name), []).append(layer)
    if bad:
        desc = "; ".join(f"{b!r} in layers {ls}" for b, ls in bad.items())
        raise ValueError(f"{who} refused before the first forward: attention backend {desc} does not compute with "
                         f"torch scaled_dot_product_attention, where {who} reads the query and key; call "
                         f"pipe.transformer.set_attention_backend('native') (or reset_attention_backend()); allowed "
                         f"backends: {SDPA_BACKENDS}")


def unwrap_chain(proc):
    """The innermost processor under capture / CAG wrappers (their ``inner`` / ``original``)."""
    seen = set()
    while id(proc) not in seen:
        seen.add(id(proc))
        _, below = _inner_of(proc)
        if below is None:
            return proc
        proc = below
    return proc


_EAGER_DEPTH = [0, None]  # open contexts, the stance to restore when the last one closes


@contextmanager
def eager_compile():
    """Run every ``torch.compile``\\ d function or module eagerly while the context is open
    (``torch.compiler.set_stance("force_eager")``), so the hooks and processors installed by capture and CAG run
    as Python, exactly, in a ``torch.compile(transformer)`` or ``transformer.compile()`` model; the compiled code is
    used again afterwards. Nested contexts may close in any order: the stance in force before the first one is
    restored when the last one closes."""
    import torch

    if _EAGER_DEPTH[0] == 0:
        _EAGER_DEPTH[1] = torch._dynamo.eval_frame._stance
        torch.compiler.set_stance("force_eager")
    _EAGER_DEPTH[0] += 1
    try:
        yield
    finally:
        _EAGER_DEPTH[0] -= 1
        if _EAGER_DEPTH[0] == 0:
            torch._dynamo.eval_frame._set_stance(_EAGER_DEPTH[1])


# ------------------------------------------------------------------------------------------ completeness
@dataclass
class StepRun:
    """One denoising step as a recording or guiding context saw it.

    Attributes:
        timestep: the step's timestep (``None`` when the call had none).
        calls: transformer calls in the step (sequential CFG: 2).
        expert: the transformer that ran it, for pipelines with several (``None``: the only one).
    """

    timestep: float | None = None
    calls: int = 0
    expert: str | None = None


class IncompleteRunError(ValueError):
    """A requested (quantity, layer, step) was not recorded, or not perturbed, by the end of the run."""


class Coverage:
    """What one context (capture, CAG) was asked to record or perturb and what it saw; :meth:`check` is the one
    completeness check of capture, analysis, tracking and CAG.

    Entries are ``(what, layer, step)``: ``what`` names the quantity and its branch (``"q/k (cond)"``,
    ``"features (cond)"``, ``"perturbed attention (cond)"``), ``layer`` a block index, ``step`` a denoising step.
    :meth:`call` notes each transformer call of a step in :attr:`runs` (``{step: StepRun}``, the record a step's
    expert is kept in), :meth:`mark` each entry seen.

    Args:
        who: the caller, named in errors (``"capture"``, ``"CAG"``).
        whats: the quantities expected at each (layer, step).
        layers: the block indices expected.
        steps: the steps expected (resolved, ``>= 0``); ``None``: every step the run had.
        num_steps: the number of steps the run must have (``None``: not checked).
        verb: ``"recorded"`` or ``"perturbed"``, for the error.
    """

    def __init__(self, who: str, whats, layers, steps=None, num_steps: int | None = None, verb: str = "recorded"):
        self.who, self.whats, self.layers = who, tuple(whats), sorted(set(layers))
        self.steps, self.num_steps, self.verb = (None if steps is None else set(steps)), num_steps, verb
        self.runs: dict[int, StepRun] = {}
        self.seen: set[tuple[str, int, int]] = set()
        self.uncaptured: set[int] = set()  # steps run by an expert this context does not cover (steps=None)

    def call(self, step: int, timestep: float | None = None, expert: str | None = None) -> StepRun:
        """Note one transformer call at ``step``."""
        run = self.runs.setdefault(step, StepRun(timestep, 0, expert))
        run.calls += 1
        return run

    def ran_by(self, step: int, expert: str | None, captured: bool = True) -> None:
        """Note that ``expert`` ran ``step`` (multi-expert pipelines); a step of an expert that is not captured is
        not expected when every step is (``steps=None``): a requested one is refused by the caller before it runs."""
        self.runs[step].expert = expert
        if not captured:
            self.uncaptured.add(step)

    def mark(self, what: str, layer: int, step: int) -> None:
        self.seen.add((what, layer, step))

    def reset(self) -> None:
        """Forget the run (a new run starts)."""
        self.runs.clear()
        self.seen.clear()
        self.uncaptured.clear()

    def expected(self) -> list[tuple[str, int, int]]:
        steps = sorted(set(self.runs) - self.uncaptured) if self.steps is None else sorted(self.steps)
        return [(w, l, s) for s in steps for l in self.layers for w in self.whats]

    def reason(self, what: str, layer: int, step: int) -> str:
        """Why ``(what, layer, step)`` is missing (worded without the layer and step, so that entries missing for
        the same reason are listed together)."""
        run = self.runs.get(step)
        if run is None:
            if not self.runs:
                return "the transformer was never called inside the context"
            n = max(self.runs) + 1
            return f"the run had {n} step(s) (0..{n - 1})"
        by = f" (run by {run.expert})" if run.expert else ""
        if "uncond" in what and run.calls == 1:
            return f"the step had one transformer call{by}: no unconditional branch"
        return (f"the step ran{by} but the block's self-attention was not reached in it (a hook or code outside "
                f"difftrack skipped the block, or the forward stopped early)")

    def missing(self) -> list[tuple[str, int, int, str]]:
        return [(w, l, s, self.reason(w, l, s)) for w, l, s in self.expected() if (w, l, s) not in self.seen]

    def check(self) -> None:
        """Raise :class:`IncompleteRunError` naming every missing entry and why, or a run of the wrong length."""
        problems = []
        if not self.runs and self.layers and self.whats:
            problems.append("the transformer was never called inside the context")
        if self.num_steps is not None and self.runs and len(self.runs) != self.num_steps:
            problems.append(f"num_steps={self.num_steps} was given but the run had {len(self.runs)} step(s)")
        miss = self.missing()
        if miss:
            groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
            for w, l, s, why in miss:
                groups.setdefault((w, why), []).append((l, s))
            for (w, why), ls in groups.items():
                pairs = ", ".join(f"(layer {l}, step {s})" for l, s in ls[:8]) + (", ..." if len(ls) > 8 else "")
                problems.append(f"{w} not {self.verb} at {len(ls)} (layer, step): {pairs}: {why}")
        if problems:
            n = len(self.expected())
            raise IncompleteRunError(
                f"{self.who}: the run is incomplete ({len(miss)} of {n} requested (layer, step) entries not "
                f"{self.verb}); nothing partial is returned:\n  " + "\n  ".join(problems))


def scheduler_steps(scheduler, first_timestep: float | None) -> int | None:
    """The number of denoising steps a run starting at ``first_timestep`` has on ``scheduler`` (after the pipeline's
    ``set_timesteps``): the distinct consecutive values of ``scheduler.timesteps`` from that timestep on (steps are
    counted the way capture counts them). ``None`` when the scheduler has no timesteps or none matches."""
    ts = getattr(scheduler, "timesteps", None)
    if ts is None or first_timestep is None or len(ts) == 0:
        return None
    vals = [float(t) for t in ts]
    tol = 1e-2 * max(1.0, abs(first_timestep))  # the pipeline may cast the timestep (bf16)
    start = next((i for i, v in enumerate(vals) if abs(v - first_timestep) <= tol), None)
    if start is None:
        return None
    vals = vals[start:]
    return 1 + sum(a != b for a, b in zip(vals, vals[1:]))
