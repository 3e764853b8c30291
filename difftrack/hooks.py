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
"""
from __future__ import annotations

import inspect
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
