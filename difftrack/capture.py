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
transformer calls through the backbone's step key (:attr:`BackboneAdapter.step_key`; by default the largest value of
a scalar or per-token timestep): a new key starts a new step, an equal key is the same step (Wan calls the
transformer twice per step), a noisier one starts a new run at step 0. Mochi's timestep rises along the loop and
SkyReels-V2's diffusion forcing gives one level per frame; their keys say so (``docs/conventions.md``). Use
:meth:`Capture.set_step` to set steps by hand.

Classifier-free guidance of batched backbones (CogVideoX, LTX: one batch ``[uncond, cond]``) is recognised from
the call itself, not guessed from the batch size: the pipelines duplicate the latents for the two halves
(``torch.cat([latents] * 2)``), so a call is a CFG call when its batch is even and both halves of
``hidden_states`` are bit-identical. A batch of different videos (several prompts with ``guidance_scale <= 1``) is
kept whole. When that evidence changes within one run (two videos started from the same noise look like a CFG
pair at step 0 only) capture raises and asks for ``cfg=True`` / ``cfg=False``.

Multi-expert pipelines (Wan 2.2 A14B: ``transformer`` for the high-noise steps, ``transformer_2`` for the
low-noise ones, :class:`difftrack.backbones.Experts`): pass the pipeline and every expert is captured (``experts=``
picks some). Each step is recorded from the expert that ran it, and the names carry the expert:
``transformer_2.blocks.17.attn.q``; ``cache.q(17, step=49)`` reads the expert that ran step 49
(:attr:`Capture.step_experts`). Steps are counted over both experts' calls, so step indices are the pipeline's. A
requested step run by an expert that is not captured raises, naming that expert, before its forward. With a single
transformer the names stay ``blocks.17.attn.q``. (A bare expert, ``capture(pipe.transformer_2, ...)``, sees only its
own calls: its steps count from its first call, not from the pipeline's first step.)
Completeness is checked: when a run ends (the context's exit, or the start of the next run), every requested
(layer, step) must have been recorded, or :class:`difftrack.hooks.IncompleteRunError` names what is missing and why
(:class:`difftrack.hooks.Coverage`, shared with CAG). diffusers hooks that skip blocks or reuse earlier steps (the
caches of ``enable_cache``, LayerSkip, ...) are refused before the first forward
(:func:`~difftrack.hooks.check_diffusers_hooks`).

One capture holds one generation: with ``store=True``, a second run over the same steps (a new run at step 0, or the
same ``(name, step)`` captured twice) raises ``ValueError`` instead of overwriting what was captured; use one
capture per generation, or ``cache.clear()`` between them. With ``store=False`` the callbacks see every run
(``Capture.runs`` counts them). Nested captures (and CAG processors) may be exited in any order: each context removes
exactly the wrapper it installed.
"""
from __future__ import annotations

import collections.abc as _abc
import dataclasses
import inspect
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .checks import as_torch_dtype
from .backbones import BackboneAdapter, TokenGrid, adapter_for, resolve_transformer
from .backbones import experts as find_experts
from .hooks import (Coverage, IncompleteRunError, SDPAIntercept, check_attention_backend,  # noqa: F401 (re-exported)
                    check_diffusers_hooks, eager_compile, processor_wrapper_class, scheduler_steps, set_processor,
                    unwrap_processor)

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
        expert: the transformer that ran it (``"transformer"``; Wan 2.2 also ``"transformer_2"``).
    """

    layer: int
    step: int
    timestep: float | None
    q: torch.Tensor
    k: torch.Tensor
    grid: TokenGrid
    expert: str = "transformer"

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
    """Block output features of the video tokens: ``features [B, frames, rows, cols, C]``, of ``expert``."""

    layer: int
    step: int
    timestep: float | None
    features: torch.Tensor
    grid: TokenGrid
    expert: str = "transformer"


class _CapturingProcessor:
    """Wraps an attention processor; subclasses copy the wrapped class's ``__call__`` signature so that diffusers'
    ``Attention`` keeps passing the same keyword arguments (it drops those not in the signature)."""

    def __init__(self, inner, layer: int, owner: "Capture", expert: str = "transformer"):
        self.inner, self.layer, self.owner, self.expert = inner, layer, owner, expert

    def _run(self, *args, **kwargs):
        if not self.owner._active("qk"):
            return self.inner(*args, **kwargs)
        if self.owner.adapter.per_sample_attention:  # one SDPA call per batch row: gather them, then hand over
            rows = []
            watch = SDPAIntercept(lambda call: rows.append((call["query"], call["key"])), every=True)
        else:
            watch = SDPAIntercept(lambda call: self.owner._on_sdpa(self.layer, call["query"], call["key"],
                                                                   self.expert))
        with watch:
            out = self.inner(*args, **kwargs)
        if not watch.handled:
            raise RuntimeError(
                f"no scaled_dot_product_attention call was seen in layer {self.layer}'s processor "
                f"{type(self.inner).__name__}; capture needs the native SDPA attention backend")
        if self.owner.adapter.per_sample_attention:
            self.owner._on_sdpa_rows(self.layer, rows, self.expert)
        return out


def _rises(key: tuple[float, ...], last: tuple[float, ...]) -> bool:
    """Whether step key ``key`` starts a new generation after ``last``: some entry got noisier (keys of another
    length, e.g. another window of frames, compare by their largest entry)."""
    if len(key) != len(last):
        return max(key) > max(last)
    return any(a > b for a, b in zip(key, last))


def _wrap(proc, layer: int, owner: "Capture", expert: str = "transformer") -> _CapturingProcessor:
    return processor_wrapper_class(_CapturingProcessor, type(proc), "Capturing")(proc, layer, owner, expert)


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


def _normalise_steps(steps, num_steps: int | None, resolvable: bool = False) -> set[int] | None:
    """The requested steps; negative ones resolved against ``num_steps``, or kept negative when ``resolvable`` (the
    run's length is read from the pipeline's scheduler at its first transformer call, :meth:`Capture._start_run`)."""
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
        elif s < 0 and not resolvable:
            raise ValueError(f"step {s}: negative steps count from the end of the run; pass num_steps=, or the "
                             f"pipeline (with its scheduler) instead of its transformer so that capture reads the "
                             f"run's length")
        out.add(s)
    return out


class Capture:
    """What a :func:`capture` context records. Keys: ``(name, step)`` with names ``blocks.{l}.attn.q``,
    ``blocks.{l}.attn.k`` and ``blocks.{l}.out`` (block output features); on a multi-expert pipeline the names
    start with the expert: ``transformer_2.blocks.{l}.attn.q``.

    Attributes (besides the settings): ``experts`` the captured expert names, ``step_experts`` ``{step: expert}``
    the expert that ran each step seen, ``timesteps`` ``{step: timestep}``."""

    def __init__(self, model: nn.Module, adapter: BackboneAdapter, layers: list[int], steps: set[int] | None,
                 what: tuple[str, ...], branch: str, cfg: bool | None, store: bool, on_qk, on_features,
                 device, dtype, experts: tuple[str, ...] = ("transformer",), prefixed: bool = False,
                 expert_rule: str = "", num_steps: int | None = None, scheduler=None, whats: tuple[str, ...] = ()):
        self.model, self.adapter, self.layers, self.steps = model, adapter, layers, steps
        self._steps_asked, self.num_steps, self._scheduler = steps, num_steps, scheduler
        # the completeness record of the current run (checked when it ends: a new run, or the context's exit)
        self.coverage = Coverage("capture", whats, layers,
                                 None if steps is None or any(s < 0 for s in steps) else steps, num_steps)
        self.what, self.branch, self.cfg, self.store = what, branch, cfg, store
        self.on_qk, self.on_features, self.device, self.dtype = on_qk, on_features, device, dtype
        self.experts, self.prefixed, self.expert_rule = tuple(experts), prefixed, expert_rule
        self.step_experts: dict[int, str] = {}
        self.data: dict[tuple[str, int], torch.Tensor] = {}
        self.timesteps: dict[int, float | None] = {}
        self.grid: TokenGrid | None = None
        self.step = -1
        self._last_t = None
        self._last_key: tuple[float, ...] | None = None
        self._call_in_step = 0
        self._manual_step: int | None = None
        self.runs = 0
        self._cfg_now: bool = False  # whether the current (batched) call is a CFG [uncond, cond] pair
        self._batch_now: int | None = None  # its batch size as the pre-forward hook saw it
        self._cfg_run: dict[int, bool] = {}  # batch size -> CFG decision seen in this run

    # ---------------------------------------------------------------- bookkeeping
    def set_step(self, step: int | None) -> None:
        """Fix the step index of the following calls (``None`` returns to counting from timesteps). The steps
        set by hand are the run: ``num_steps`` is not checked against their count."""
        if step is not None and self.steps is not None and any(s < 0 for s in self.steps):
            raise ValueError(f"set_step() with negative requested steps {sorted(self.steps)}: steps set by hand need "
                             f"non-negative steps, or num_steps= to resolve them")
        self.coverage.num_steps = None
        self._manual_step = step

    def _pre_forward_of(self, expert: str):
        """The forward pre-hook of the expert named ``expert`` (every expert of the pipeline gets one, captured or
        not, so that steps are counted over the whole loop)."""
        def pre(module, args, kwargs):
            self._pre_forward(module, args, kwargs)
            self._expert_ran(expert)
        return pre

    def _expert_ran(self, expert: str) -> None:
        self.step_experts[self.step] = expert
        self.coverage.ran_by(self.step, expert if self.prefixed else None, captured=expert in self.experts)
        if expert not in self.experts and self.steps is not None and self.step in self.steps:
            raise ValueError(f"step {self.step} was requested, but the pipeline runs it with {expert!r}, which is not "
                             f"captured (experts={list(self.experts)}; {self.expert_rule}); allowed: capture "
                             f"{expert!r} too (experts=None captures every expert) or request only steps that "
                             f"{', '.join(map(repr, self.experts))} runs")

    def name(self, layer: int, kind: str, expert: str | None = None) -> str:
        """Key name of ``kind`` (``"q"``, ``"k"``, ``"features"``) at block ``layer`` of ``expert`` (multi-expert
        captures: ``"transformer_2.blocks.3.attn.q"``; else ``"blocks.3.attn.q"``)."""
        base = f"blocks.{layer}.out" if kind == "features" else f"blocks.{layer}.attn.{kind}"
        return f"{expert}.{base}" if self.prefixed else base

    def _pre_forward(self, module, args, kwargs):
        check_diffusers_hooks(module, "capture", "at a transformer call")  # e.g. added by a guider for its forward
        self.grid = self.adapter.grid(module, args, kwargs)
        t = kwargs.get("timestep")
        if t is None:
            params = list(inspect.signature(type(module).forward).parameters)[1:]  # drop self
            i = params.index("timestep") if "timestep" in params else None
            t = args[i] if i is not None and len(args) > i else None
        # the adapter's step key (default: the max over per-token timesteps; Wan 2.2 TI2V's clean first frame holds
        # 0); ``tv``, the recorded timestep, is the call's largest timestep value
        key = self.adapter.step_key(t)
        tv = None if t is None else (float(t.max()) if isinstance(t, torch.Tensor) else float(t))
        last = self._last_key
        if self._manual_step is not None:
            if self._manual_step != self.step:
                self._call_in_step = 0
            else:
                self._call_in_step += 1
            self.step = self._manual_step
        elif last is None or (key is not None and _rises(key, last)):
            if last is not None:
                self.runs += 1
                self._cfg_run.clear()
                if self.store and self.data:
                    raise ValueError(
                        f"a second generation started inside one capture (timestep {tv:g} after {self._last_t:g}: "
                        f"step 0 again after step {self.step}); it would overwrite the {len(self.data)} captured "
                        f"tensors. Allowed: one generation per capture, or cache.clear() between generations, or "
                        f"store=False with callbacks")
            self._check_branch_complete()
            if self._last_t is not None:
                self.coverage.check()  # the run that just ended (store=False: one check per run)
                self.coverage.reset()
            self._start_run(tv)
            self.step, self._call_in_step = 0, 0
        elif key == last:
            self._call_in_step += 1
        else:
            self._check_branch_complete()
            self.step, self._call_in_step = self.step + 1, 0
        self._last_t, self._last_key = tv, key
        self.timesteps[self.step] = tv
        self.coverage.call(self.step, tv)
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

    def _start_run(self, first_t: float | None) -> None:
        """A run starts: resolve negative steps against its real length -- read from the pipeline's scheduler
        (:func:`difftrack.hooks.scheduler_steps`, its timesteps from the first call's on), else ``num_steps`` (the
        caller's, checked against the run's own count when it ends) -- and refuse a ``num_steps`` the scheduler
        contradicts, before anything is recorded."""
        asked = self._steps_asked
        n = scheduler_steps(self._scheduler, first_t) if self._scheduler is not None else None
        if n is not None and self.num_steps is not None and n != self.num_steps:
            raise ValueError(f"capture was given num_steps={self.num_steps}, but the pipeline's scheduler runs {n} "
                             f"step(s) from timestep {first_t:g}; pass num_steps={n} (or leave it out)")
        if asked is None or all(s >= 0 for s in asked):
            return
        n = n if n is not None else self.num_steps
        if n is None:
            raise ValueError(f"capture cannot resolve the negative steps {sorted(s for s in asked if s < 0)}: the "
                             f"first timestep {first_t} is not in the scheduler's timesteps (was set_timesteps "
                             f"called for this run?); pass num_steps=")
        bad = [s for s in asked if not -n <= s < n]
        if bad:
            raise ValueError(f"steps {sorted(bad)} out of range for this run of {n} denoising steps; allowed "
                             f"0..{n - 1} (or -{n}..-1 from the end)")
        self.steps = {s % n for s in asked}
        self.coverage.steps = set(self.steps)

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

    def _on_sdpa_rows(self, layer: int, rows: list[tuple[torch.Tensor, torch.Tensor]],
                      expert: str = "transformer") -> None:
        """Per-row SDPA calls (``per_sample_attention``): row ``i`` attends over ``[video, its valid text]``
        (``q, k [1, H, N_video + L_i, D]``). The selected CFG rows are joined along the batch with their text when
        every selected row has the same text length; otherwise (``branch="all"`` with prompts of different lengths)
        only their video tokens are kept (``grid.text_len = 0``)."""
        g = self.grid
        if len(rows) != self._batch_now:
            raise RuntimeError(f"layer {layer}: {len(rows)} per-row attention calls for a batch of {self._batch_now}")
        chosen = self._select(torch.arange(len(rows))).tolist()
        lens = {rows[i][0].shape[2] for i in chosen}
        if len(lens) == 1:
            n = lens.pop()
            q, k = (torch.cat([rows[i][j] for i in chosen]) for j in (0, 1))
            grid = dataclasses.replace(g, text_len=n - g.num_video, text_first=False)
        else:
            q, k = (torch.cat([rows[i][j][:, :, :g.num_video] for i in chosen]) for j in (0, 1))
            grid = dataclasses.replace(g, text_len=0)
        self._on_sdpa(layer, q, k, expert, grid=grid, selected=True)

    def _on_sdpa(self, layer: int, q: torch.Tensor, k: torch.Tensor, expert: str = "transformer",
                 grid: TokenGrid | None = None, selected: bool = False) -> None:
        if not selected:
            q, k = self._select(q), self._select(k)
        ev = QKEvent(layer, self.step, self.timesteps.get(self.step), q, k, grid or self.grid, expert)
        self.coverage.mark(f"q/k ({self.branch})", layer, self.step)
        if self.store:
            if "q" in self.what:
                self._put((self.name(layer, "q", expert), self.step), self._keep(ev.q_video))
            if "k" in self.what:
                self._put((self.name(layer, "k", expert), self.step), self._keep(ev.k_video))
        if self.on_qk is not None:
            self.on_qk(ev)

    def _on_block(self, layer: int, output, expert: str = "transformer") -> None:
        if not self._active("features"):
            return
        h = self._select(self.adapter.block_video_output(output, self.grid))
        g = self.grid
        f = h.reshape(h.shape[0], g.frames, g.rows, g.cols, h.shape[-1])
        self.coverage.mark(f"features ({self.branch})", layer, self.step)
        if self.store:
            self._put((self.name(layer, "features", expert), self.step), self._keep(f))
        if self.on_features is not None:
            self.on_features(FeatureEvent(layer, self.step, self.timesteps.get(self.step), f, g, expert))

    # ---------------------------------------------------------------- access
    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        if key not in self.data:
            name, step = key
            have_steps = sorted({s for n, s in self.data if n == name})
            raise KeyError(f"{name!r} at step {step} was not captured; captured steps for it: {have_steps}; "
                           f"captured names: {sorted({n for n, _ in self.data})}")
        return self.data[key]

    def _get(self, layer: int, kind: str, step: int | None, expert: str | None) -> torch.Tensor:
        if expert is not None and expert not in self.experts:
            raise ValueError(f"expert={expert!r} was not captured; captured experts: {list(self.experts)}")
        if not self.prefixed:
            names = [self.name(layer, kind)]
        elif expert is not None:
            names = [self.name(layer, kind, expert)]
        elif step is not None and step in self.step_experts:  # the expert that ran the step
            names = [self.name(layer, kind, self.step_experts[step])]
        else:
            names = [self.name(layer, kind, e) for e in self.experts]
        if step is None:
            steps = sorted((s, n) for n, s in self.data if n in names)
            if not steps:
                raise KeyError(f"{' / '.join(map(repr, names))} was not captured; captured: "
                               f"{sorted({n for n, _ in self.data})}")
            step, names = steps[-1][0], [steps[-1][1]]
        return self[names[0], step]

    def q(self, layer: int, step: int | None = None, expert: str | None = None) -> torch.Tensor:
        """Query of the video tokens, ``[B, heads, frames, rows, cols, head_dim]`` (latest step if ``None``; on a
        multi-expert pipeline from the expert that ran ``step``, unless ``expert`` names one)."""
        return self._get(layer, "q", step, expert)

    def k(self, layer: int, step: int | None = None, expert: str | None = None) -> torch.Tensor:
        """Key of the video tokens, ``[B, heads, frames, rows, cols, head_dim]`` (as :meth:`q`)."""
        return self._get(layer, "k", step, expert)

    def features(self, layer: int, step: int | None = None, expert: str | None = None) -> torch.Tensor:
        """Block output of the video tokens, ``[B, frames, rows, cols, channels]`` (as :meth:`q`)."""
        return self._get(layer, "features", step, expert)

    def keys(self):
        return list(self.data)

    def clear(self) -> None:
        self.data.clear()


@contextmanager
def capture(model, layers: int | str | Sequence[int | str] | None = None, steps: int | Iterable[int] | None = None,
            what: Sequence[str] = ("q", "k"), branch: str = "cond", num_steps: int | None = None,
            cfg: bool | None = None, store: bool = True, on_qk: Callable[[QKEvent], None] | None = None,
            on_features: Callable[[FeatureEvent], None] | None = None, device=None, dtype=None,
            experts: str | Sequence[str] | None = None):
    """Record query/key (and block features) of selected layers and denoising steps.

    Args:
        model: a supported diffusers transformer, or a pipeline with ``.transformer``.
        layers: block indices (0-based, flat list; HunyuanVideo: dual-stream blocks first), names such as
            ``"blocks.17"``, or ``None`` / ``"all"`` for every block.
        steps: denoising loop indices (``None`` = every step the run has). Negative ones count from the end of the
            run: with a pipeline, its length is read from the pipeline's scheduler at the first transformer call;
            with a bare transformer, ``num_steps`` is needed.
        what: any of ``"q"``, ``"k"``, ``"features"``.
        branch: ``"cond"`` (default), ``"uncond"`` or ``"all"`` classifier-free-guidance branch.
        num_steps: number of denoising steps, to validate ``steps`` and resolve negative ones; the run must have
            that many (checked against the scheduler at the first call, and against the run's count at exit).
        cfg: whether the batch is ``[uncond, cond]``; ``None`` (default) decides per call from the inputs: an even
            batch whose two halves of ``hidden_states`` are bit-identical (the pipelines' duplicated latents) is a
            CFG pair, any other batch is kept whole (batched backbones; see the module docstring).
        store: keep copies in the returned :class:`Capture` (set ``False`` with callbacks to keep nothing).
        on_qk, on_features: callbacks receiving :class:`QKEvent` / :class:`FeatureEvent` during the forward.
        device, dtype: where and how to keep stored copies (default: as captured).
        experts: on a multi-expert pipeline (Wan 2.2: ``"transformer"``, ``"transformer_2"``), the experts to
            capture (``None``: all; ``layers`` index the blocks of each). ``steps=None`` then means the steps the
            captured experts run; a step requested by index that another expert runs raises before that expert's
            forward. A bare transformer or a one-transformer pipeline has the one expert ``"transformer"``.

    Yields:
        :class:`Capture`.

    Raises (before the first forward) :class:`difftrack.hooks.UnsupportedHookError` when the transformer carries a
    diffusers hook that skips or reuses work (caches, LayerSkip, ...) and ``ValueError`` for an attention backend that
    bypasses torch SDPA; (when a run ends, at exit or when the next run starts) :class:`IncompleteRunError` naming
    every requested (layer, step) not recorded and why. A transformer compiled with ``torch.compile`` runs eagerly while the
    context is open (:func:`difftrack.hooks.eager_compile`).
    """
    ex = find_experts(model)
    chosen = ex.check(experts, "experts")
    transformer = ex.models[chosen[0]]
    adapter = adapter_for(transformer)
    blocks = {e: adapter_for(ex.models[e]).blocks(ex.models[e]) for e in chosen}
    layer_ids = _normalise_layers(layers, min(len(b) for b in blocks.values()), type(transformer).__name__)
    scheduler = getattr(model, "scheduler", None)  # a pipeline's: the run's real length
    step_ids = _normalise_steps(steps, num_steps, resolvable=scheduler is not None)
    what = tuple([what] if isinstance(what, str) else what)
    bad = [w for w in what if w not in WHAT]
    if bad:
        raise ValueError(f"unknown capture target(s) {bad}; allowed: {WHAT}")
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; allowed: {BRANCHES}")
    for m in ex.models.values():  # an expert that is not captured still counts the steps
        check_diffusers_hooks(m, "capture")
    dtype = None if dtype is None else as_torch_dtype(dtype)  # the one dtype rule (difftrack.checks.check_dtype)
    want_qk = bool({"q", "k"} & set(what)) or on_qk is not None
    want_feat = "features" in what or on_features is not None
    whats = ((f"q/k ({branch})",) if want_qk else ()) + ((f"features ({branch})",) if want_feat else ())
    if want_qk:
        check_attention_backend([(l, adapter.self_attention(blocks[e][l][1])) for e in chosen for l in layer_ids],
                                "capture")
    cap = Capture(transformer, adapter, layer_ids, step_ids, what, branch, cfg, store, on_qk, on_features,
                  device, dtype, chosen, ex.several, ex.rule, num_steps, scheduler, whats)
    installed: list[tuple[nn.Module, object]] = []  # (attention, our wrapper)
    handles = []
    eager = eager_compile()
    eager.__enter__()  # a compiled transformer runs eagerly: our hooks and processors run exactly
    try:
        for e, model_e in ex.models.items():  # every expert counts steps; the chosen ones are captured
            handles.append(model_e.register_forward_pre_hook(cap._pre_forward_of(e), with_kwargs=True))
        for e in chosen:
            for l in layer_ids:
                block = blocks[e][l][1]
                if want_qk:
                    attn = adapter.self_attention(block)
                    wrapper = _wrap(attn.processor, l, cap, e)
                    installed.append((attn, wrapper))
                    set_processor(attn, wrapper)
                if want_feat:
                    handles.append(block.register_forward_hook(lambda m, a, o, l=l, e=e: cap._on_block(l, o, e)))
        yield cap
        cap._check_branch_complete()
        cap.coverage.check()
    finally:
        for attn, wrapper in reversed(installed):
            unwrap_processor(attn, wrapper)
        for h in handles:
            h.remove()
        cap.model = None
        eager.__exit__(None, None, None)


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
