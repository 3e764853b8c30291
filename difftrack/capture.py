"""Capture of post-norm, post-RoPE query/key (and block features) from diffusers video transformers.

What is recorded is **exactly the query and key tensors that enter** ``scaled_dot_product_attention`` inside the
selected blocks' self-attention, i.e. after QK-norm and after RoPE (where the backbone has RoPE), per head. The
original attention processor runs unchanged: capture wraps it and watches its SDPA call through a
``TorchFunctionMode``, so the model computes bit-identical outputs with and without capture. No diffusers source is
forked or monkey-patched; processors are swapped on the selected attention modules only and restored on exit, even
when the body raises.

Example (TransformerLens-style names, one context manager)::

    with capture(pipe, layers=[17], steps=[-1], num_steps=50) as cache:
        pipe(prompt, num_inference_steps=50)
    q = cache.q(17, step=49)            # [B, heads, frames, rows, cols, head_dim]
    cache["blocks.17.attn.k", 49]       # the same key as a name

For analysis that must not hold tensors (all layers x all steps), pass ``on_qk=`` / ``on_features=`` callbacks and
``store=False``: each event is handed over while the forward runs and nothing is kept.

Steps are the denoising loop index (0 = noisiest). They are counted from the ``timestep`` argument of successive
transformer calls: a new value starts a new step, an equal value is the same step (Wan calls the transformer twice
per step), a larger value starts a new run at step 0. Use :meth:`Capture.set_step` to set steps by hand.

Classifier-free guidance of batched backbones (CogVideoX, LTX: one batch ``[uncond, cond]``) is recognised from
the call itself, not guessed from the batch size: the pipelines duplicate the latents for the two halves
(``torch.cat([latents] * 2)``), so a call is a CFG call when its batch is even and both halves of
``hidden_states`` are bit-identical. A batch of different videos (several prompts with ``guidance_scale <= 1``) is
kept whole. When that evidence changes within one run (two videos started from the same noise look like a CFG
pair at step 0 only) capture raises and asks for ``cfg=True`` / ``cfg=False``.

One capture holds one generation: with ``store=True``, a second run over the same steps (a new run at step 0, or the
same ``(name, step)`` captured twice) raises ``ValueError`` instead of overwriting what was captured; use one
capture per generation, or ``cache.clear()`` between them. With ``store=False`` the callbacks see every run
(``Capture.runs`` counts them). Nested captures (and CAG processors) may be exited in any order: each context removes
exactly the wrapper it installed.
"""
from __future__ import annotations

import collections.abc as _abc
import inspect
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .backbones import BackboneAdapter, TokenGrid, adapter_for, resolve_transformer
from .hooks import SDPAIntercept, processor_wrapper_class, unwrap_processor  # noqa: F401 (re-exported)

BRANCHES = ("cond", "uncond", "all")
WHAT = ("q", "k", "features")


@dataclass
class QKEvent:
    """One captured self-attention call.

    Attributes:
        layer, step, timestep: where it happened.
        q, k: ``[B, H, N, D]`` the full attention sequence (text included) of the selected CFG branch; views of the
            model's tensors, valid only during the callback (clone to keep).
        grid: the token layout.
    """

    layer: int
    step: int
    timestep: float | None
    q: torch.Tensor
    k: torch.Tensor
    grid: TokenGrid

    def _video(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        v = x[:, :, g.video_slice(x.shape[2])]
        return v.reshape(v.shape[0], v.shape[1], g.frames, g.rows, g.cols, v.shape[-1])

    @property
    def q_video(self) -> torch.Tensor:
        """``[B, H, frames, rows, cols, D]``"""
        return self._video(self.q)

    @property
    def k_video(self) -> torch.Tensor:
        """``[B, H, frames, rows, cols, D]``"""
        return self._video(self.k)


@dataclass
class FeatureEvent:
    """Block output features of the video tokens: ``features [B, frames, rows, cols, C]``."""

    layer: int
    step: int
    timestep: float | None
    features: torch.Tensor
    grid: TokenGrid


class _CapturingProcessor:
    """Wraps an attention processor; subclasses copy the wrapped class's ``__call__`` signature so that diffusers'
    ``Attention`` keeps passing the same keyword arguments (it drops those not in the signature)."""

    def __init__(self, inner, layer: int, owner: "Capture"):
        self.inner, self.layer, self.owner = inner, layer, owner

    def _run(self, *args, **kwargs):
        if not self.owner._active("qk"):
            return self.inner(*args, **kwargs)
        watch = SDPAIntercept(lambda call: self.owner._on_sdpa(self.layer, call["query"], call["key"]))
        with watch:
            out = self.inner(*args, **kwargs)
        if not watch.handled:
            raise RuntimeError(
                f"no scaled_dot_product_attention call was seen in layer {self.layer}'s processor "
                f"{type(self.inner).__name__}; capture needs the native SDPA attention backend")
        return out


def _wrap(proc, layer: int, owner: "Capture") -> _CapturingProcessor:
    return processor_wrapper_class(_CapturingProcessor, type(proc), "Capturing")(proc, layer, owner)


def _normalise_layers(layers, n_blocks: int, model_name: str) -> list[int]:
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(n_blocks))
    if isinstance(layers, (numbers.Integral, str)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, _abc.Iterable) or isinstance(layers, (bytes, torch.Tensor)):
        raise ValueError(f"layers={layers!r} ({type(layers).__name__}); allowed: a block index (int), a name such as "
                         f"'blocks.17', a list of them, or None / 'all' ({model_name} has {n_blocks} blocks)")
    out = []
    for l in layers:
        if isinstance(l, str):
            parts = [p for p in l.split(".") if p.isdigit()]
            if not parts:
                raise ValueError(f"layer name {l!r} has no block index (use e.g. 'blocks.17' or 17)")
            l = int(parts[0])
        if not isinstance(l, numbers.Integral) or isinstance(l, bool):
            raise ValueError(f"layer {l!r} ({type(l).__name__}) is not a block index; allowed: ints 0..{n_blocks - 1}"
                             f" or names such as 'blocks.17'")
        if not 0 <= l < n_blocks:
            raise ValueError(f"layer {l!r} out of range: {model_name} has {n_blocks} blocks, allowed 0..{n_blocks - 1}")
        out.append(int(l))
    return sorted(set(out))


def _normalise_steps(steps, num_steps: int | None) -> set[int] | None:
    if num_steps is not None and (not isinstance(num_steps, numbers.Integral) or isinstance(num_steps, bool)
                                  or num_steps < 1):
        raise ValueError(f"num_steps={num_steps!r}; allowed: an int >= 1 (the number of denoising steps) or None")
    if steps is None or (isinstance(steps, str) and steps == "all"):
        return None
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        steps = [steps]
    if not isinstance(steps, _abc.Iterable) or isinstance(steps, (str, bytes)):
        raise ValueError(f"steps={steps!r}; allowed: a denoising loop index (int), a list of them, or None / 'all'")
    out = set()
    for s in steps:
        if not isinstance(s, numbers.Integral) or isinstance(s, bool):
            raise ValueError(f"step {s!r} must be an int (the denoising loop index)")
        s = int(s)
        if num_steps is not None:
            if not -num_steps <= s < num_steps:
                raise ValueError(f"step {s} out of range for {num_steps} denoising steps; allowed "
                                 f"0..{num_steps - 1} (or -{num_steps}..-1 from the end)")
            s = s % num_steps
        elif s < 0:
            raise ValueError(f"step {s}: negative steps count from the end and need num_steps=")
        out.add(s)
    return out


class Capture:
    """What a :func:`capture` context records. Keys: ``(name, step)`` with names ``blocks.{l}.attn.q``,
    ``blocks.{l}.attn.k`` and ``blocks.{l}.out`` (block output features)."""

    def __init__(self, model: nn.Module, adapter: BackboneAdapter, layers: list[int], steps: set[int] | None,
                 what: tuple[str, ...], branch: str, cfg: bool | None, store: bool, on_qk, on_features,
                 device, dtype):
        self.model, self.adapter, self.layers, self.steps = model, adapter, layers, steps
        self.what, self.branch, self.cfg, self.store = what, branch, cfg, store
        self.on_qk, self.on_features, self.device, self.dtype = on_qk, on_features, device, dtype
        self.data: dict[tuple[str, int], torch.Tensor] = {}
        self.timesteps: dict[int, float | None] = {}
        self.grid: TokenGrid | None = None
        self.step = -1
        self._last_t = None
        self._call_in_step = 0
        self._manual_step: int | None = None
        self.runs = 0
        self._cfg_now: bool = False  # whether the current (batched) call is a CFG [uncond, cond] pair
        self._batch_now: int | None = None  # its batch size as the pre-forward hook saw it
        self._cfg_run: dict[int, bool] = {}  # batch size -> CFG decision seen in this run

    # ---------------------------------------------------------------- bookkeeping
    def set_step(self, step: int | None) -> None:
        """Fix the step index of the following calls (``None`` returns to counting from timesteps)."""
        self._manual_step = step

    def _pre_forward(self, module, args, kwargs):
        self.grid = self.adapter.grid(module, args, kwargs)
        t = kwargs.get("timestep")
        if t is None:
            params = list(inspect.signature(type(module).forward).parameters)[1:]  # drop self
            i = params.index("timestep") if "timestep" in params else None
            t = args[i] if i is not None and len(args) > i else None
        # per-token timesteps (Wan 2.2 TI2V, LTX I2V) hold 0 for conditioning frames: the max is the step's value
        tv = float(t.max()) if isinstance(t, torch.Tensor) else (None if t is None else float(t))
        if self._manual_step is not None:
            if self._manual_step != self.step:
                self._call_in_step = 0
            else:
                self._call_in_step += 1
            self.step = self._manual_step
        elif self._last_t is None or (tv is not None and self._last_t is not None and tv > self._last_t):
            if self._last_t is not None:
                self.runs += 1
                self._cfg_run.clear()
                if self.store and self.data:
                    raise ValueError(
                        f"a second generation started inside one capture (timestep {tv:g} after {self._last_t:g}: "
                        f"step 0 again after step {self.step}); it would overwrite the {len(self.data)} captured "
                        f"tensors. Allowed: one generation per capture, or cache.clear() between generations, or "
                        f"store=False with callbacks")
            self._check_branch_complete()
            self.step, self._call_in_step = 0, 0
        elif tv == self._last_t:
            self._call_in_step += 1
        else:
            self._check_branch_complete()
            self.step, self._call_in_step = self.step + 1, 0
        self._last_t = tv
        self.timesteps[self.step] = tv
        self._cfg_now = self._detect_cfg(args, kwargs)
        x = kwargs.get("hidden_states", args[0] if args else None)
        self._batch_now = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    def _detect_cfg(self, args, kwargs) -> bool:
        """Whether this call's batch is a CFG pair ``[uncond, cond]`` (batched backbones; see the module docstring)."""
        if self.adapter.cfg == "sequential" or self.branch == "all":
            return False
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return bool(self.cfg)
        B = x.shape[0]
        if self.cfg is not None:
            if self.cfg and B % 2:
                raise ValueError(f"cfg=True needs an even batch [uncond, cond]; got batch {B}")
            return bool(self.cfg)
        if B < 2 or B % 2:
            return False
        u, c = x.chunk(2)
        pair = bool(torch.equal(u, c))
        seen = self._cfg_run.setdefault(B, pair)
        if seen != pair:
            raise ValueError(
                f"cannot tell whether the batch of {B} is a classifier-free-guidance pair [uncond, cond]: its two "
                f"halves had {'equal' if seen else 'different'} latents earlier in this run and "
                f"{'equal' if pair else 'different'} ones at step {self.step} (several videos started from the same "
                f"noise?); pass cfg=True (batch is [uncond, cond]) or cfg=False (a batch of separate videos)")
        return pair

    def _check_branch_complete(self):
        if (self.adapter.cfg == "sequential" and self.branch == "uncond" and self.step >= 0
                and self._call_in_step == 0 and self._step_selected()):
            raise ValueError(f"branch 'uncond' requested, but step {self.step} had a single transformer call "
                             f"(no classifier-free guidance); allowed here: 'cond' or 'all'")

    def _step_selected(self) -> bool:
        return self.steps is None or self.step in self.steps

    def _active(self, kind: str) -> bool:
        if not self._step_selected():
            return False
        if self.adapter.first_call_only and self._call_in_step > 0:
            return False  # a later guidance call of the same step (LTX-2's STG / modality isolation)
        if self.adapter.cfg == "sequential" and self.branch != "all":
            cond_idx = 0 if self.adapter.sequential_cond_first else 1
            want = cond_idx if self.branch == "cond" else 1 - cond_idx
            return self._call_in_step == want
        return True

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        """Pick the CFG branch along the batch dimension (the decision is taken per call by :meth:`_detect_cfg`)."""
        if self.adapter.cfg == "sequential" or self.branch == "all":
            return x
        B = x.shape[0]
        # a batch changed after this capture's pre-hook saw it (e.g. CAG's hooks append a perturbed slot) is not the
        # pair that was checked: it is kept whole
        cfg_now = self._cfg_now and (self._batch_now is None or B == self._batch_now)
        if not cfg_now:
            if self.branch == "uncond":
                why = (f"cfg={self.cfg}" if self.cfg is not None else
                       "its halves are different videos, not a duplicated [uncond, cond] pair")
                raise ValueError(f"branch 'uncond' requested, but the batch of {B} has no classifier-free-guidance "
                                 f"half ({why}); allowed: 'cond' or 'all'")
            return x
        u, c = x.chunk(2)
        return c if self.branch == "cond" else u

    def _put(self, key: tuple[str, int], x: torch.Tensor) -> None:
        """Store ``x`` under ``key``; never overwrites (sequential CFG with ``branch="all"`` concatenates the calls
        of one step along the batch, in call order)."""
        if key in self.data:
            if self.adapter.cfg == "sequential" and self.branch == "all" and self._call_in_step > 0:
                self.data[key] = torch.cat([self.data[key], x])
                return
            raise ValueError(f"{key[0]!r} at step {key[1]} was already captured in this context (a second "
                             f"transformer call at the same step: a second generation, or set_step() repeating a "
                             f"step); allowed: one generation per capture, or cache.clear() before the next")
        self.data[key] = x

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device=self.device or x.device, dtype=self.dtype or x.dtype, copy=True)

    def _on_sdpa(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        q, k = self._select(q), self._select(k)
        ev = QKEvent(layer, self.step, self.timesteps.get(self.step), q, k, self.grid)
        if self.store:
            if "q" in self.what:
                self._put((f"blocks.{layer}.attn.q", self.step), self._keep(ev.q_video))
            if "k" in self.what:
                self._put((f"blocks.{layer}.attn.k", self.step), self._keep(ev.k_video))
        if self.on_qk is not None:
            self.on_qk(ev)

    def _on_block(self, layer: int, output) -> None:
        if not self._active("features"):
            return
        h = self._select(self.adapter.block_video_output(output, self.grid))
        g = self.grid
        f = h.reshape(h.shape[0], g.frames, g.rows, g.cols, h.shape[-1])
        if self.store:
            self._put((f"blocks.{layer}.out", self.step), self._keep(f))
        if self.on_features is not None:
            self.on_features(FeatureEvent(layer, self.step, self.timesteps.get(self.step), f, g))

    # ---------------------------------------------------------------- access
    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        if key not in self.data:
            name, step = key
            have_steps = sorted({s for n, s in self.data if n == name})
            raise KeyError(f"{name!r} at step {step} was not captured; captured steps for it: {have_steps}; "
                           f"captured names: {sorted({n for n, _ in self.data})}")
        return self.data[key]

    def _get(self, name: str, step: int | None) -> torch.Tensor:
        if step is None:
            steps = sorted(s for n, s in self.data if n == name)
            if not steps:
                raise KeyError(f"{name!r} was not captured; captured: {sorted({n for n, _ in self.data})}")
            step = steps[-1]
        return self[name, step]

    def q(self, layer: int, step: int | None = None) -> torch.Tensor:
        """Query of the video tokens, ``[B, heads, frames, rows, cols, head_dim]`` (latest step if ``None``)."""
        return self._get(f"blocks.{layer}.attn.q", step)

    def k(self, layer: int, step: int | None = None) -> torch.Tensor:
        """Key of the video tokens, ``[B, heads, frames, rows, cols, head_dim]``."""
        return self._get(f"blocks.{layer}.attn.k", step)

    def features(self, layer: int, step: int | None = None) -> torch.Tensor:
        """Block output of the video tokens, ``[B, frames, rows, cols, channels]``."""
        return self._get(f"blocks.{layer}.out", step)

    def keys(self):
        return list(self.data)

    def clear(self) -> None:
        self.data.clear()


@contextmanager
def capture(model, layers: int | str | Sequence[int | str] | None = None, steps: int | Iterable[int] | None = None,
            what: Sequence[str] = ("q", "k"), branch: str = "cond", num_steps: int | None = None,
            cfg: bool | None = None, store: bool = True, on_qk: Callable[[QKEvent], None] | None = None,
            on_features: Callable[[FeatureEvent], None] | None = None, device=None, dtype=None):
    """Record query/key (and block features) of selected layers and denoising steps.

    Args:
        model: a supported diffusers transformer, or a pipeline with ``.transformer``.
        layers: block indices (0-based, flat list; HunyuanVideo: dual-stream blocks first), names such as
            ``"blocks.17"``, or ``None`` / ``"all"`` for every block.
        steps: denoising loop indices (``None`` = every step; negative counts from the end with ``num_steps``).
        what: any of ``"q"``, ``"k"``, ``"features"``.
        branch: ``"cond"`` (default), ``"uncond"`` or ``"all"`` classifier-free-guidance branch.
        num_steps: number of denoising steps, to validate ``steps`` and allow negative ones.
        cfg: whether the batch is ``[uncond, cond]``; ``None`` (default) decides per call from the inputs: an even
            batch whose two halves of ``hidden_states`` are bit-identical (the pipelines' duplicated latents) is a
            CFG pair, any other batch is kept whole (batched backbones; see the module docstring).
        store: keep copies in the returned :class:`Capture` (set ``False`` with callbacks to keep nothing).
        on_qk, on_features: callbacks receiving :class:`QKEvent` / :class:`FeatureEvent` during the forward.
        device, dtype: where and how to keep stored copies (default: as captured).

    Yields:
        :class:`Capture`.
    """
    transformer = resolve_transformer(model)
    adapter = adapter_for(transformer)
    blocks = adapter.blocks(transformer)
    layer_ids = _normalise_layers(layers, len(blocks), type(transformer).__name__)
    step_ids = _normalise_steps(steps, num_steps)
    what = tuple([what] if isinstance(what, str) else what)
    bad = [w for w in what if w not in WHAT]
    if bad:
        raise ValueError(f"unknown capture target(s) {bad}; allowed: {WHAT}")
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; allowed: {BRANCHES}")
    cap = Capture(transformer, adapter, layer_ids, step_ids, what, branch, cfg, store, on_qk, on_features,
                  device, dtype)
    want_qk = bool({"q", "k"} & set(what)) or on_qk is not None
    want_feat = "features" in what or on_features is not None
    installed: list[tuple[nn.Module, object]] = []  # (attention, our wrapper)
    handles = []
    try:
        handles.append(transformer.register_forward_pre_hook(cap._pre_forward, with_kwargs=True))
        for l in layer_ids:
            block = blocks[l][1]
            if want_qk:
                attn = adapter.self_attention(block)
                wrapper = _wrap(attn.processor, l, cap)
                installed.append((attn, wrapper))
                attn.set_processor(wrapper)
            if want_feat:
                handles.append(block.register_forward_hook(lambda m, a, o, l=l: cap._on_block(l, o)))
        yield cap
        cap._check_branch_complete()
    finally:
        for attn, wrapper in reversed(installed):
            unwrap_processor(attn, wrapper)
        for h in handles:
            h.remove()
        cap.model = None


class StopForward(Exception):
    """Raised by :func:`stop_after` to end a forward once the needed layer has run."""


@contextmanager
def stop_after(model, layer: int):
    """Abort the transformer forward right after block ``layer`` (saves the remaining blocks, the output head and
    anything after). The forward raises :class:`StopForward`; :func:`run_until` wraps the try/except."""
    transformer = resolve_transformer(model)
    blocks = adapter_for(transformer).blocks(transformer)
    _normalise_layers([layer], len(blocks), type(transformer).__name__)

    def hook(m, a, o):
        raise StopForward(layer)

    h = blocks[layer][1].register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def run_until(model, layer: int, *args, **kwargs) -> None:
    """Call ``model(*args, **kwargs)`` but stop after block ``layer``."""
    with stop_after(model, layer):
        try:
            resolve_transformer(model)(*args, **kwargs)
        except StopForward:
            return
    raise RuntimeError(f"the forward finished without reaching layer {layer}")
