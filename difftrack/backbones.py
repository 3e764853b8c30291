"""Per-backbone adapters: where the blocks are, how the attention sequence is laid out, which CFG branch is which.

The capture core (:mod:`difftrack.capture`) knows nothing about any model; everything model-specific lives in a
:class:`BackboneAdapter` registered here by transformer class name. Adding a backbone means adding one adapter.

| backbone | class | sequence inside self-attention | CFG in the pipeline |
|---|---|---|---|
| CogVideoX-2B/5B/5B-I2V/1.5 | ``CogVideoXTransformer3DModel`` | ``[text, video]`` | one batch ``[uncond, cond]`` |
| HunyuanVideo | ``HunyuanVideoTransformer3DModel`` | ``[video, text]``; 20 dual + 40 single blocks as one list | embedded guidance, batch 1 |
| Wan 2.1/2.2 | ``WanTransformer3DModel`` | ``[video]`` (text by cross-attention) | separate forwards, cond first |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class TokenGrid:
    """Layout of one transformer call.

    Attributes:
        frames, rows, cols: latent frames and tokens per frame (video tokens are frame-major, then row-major).
        text_len: text tokens inside the self-attention sequence (0 when text enters by cross-attention).
        text_first: True when text precedes video in the sequence (CogVideoX), False when it follows (HunyuanVideo).
        stride: input pixels (or latent pixels) per token side, for mapping tokens back to pixels.
    """

    frames: int
    rows: int
    cols: int
    text_len: int = 0
    text_first: bool = True
    stride: int = 1

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    @property
    def num_video(self) -> int:
        return self.frames * self.rows * self.cols

    def video_slice(self, seq_len: int) -> slice:
        """Slice of the video tokens inside an attention sequence of ``seq_len`` tokens."""
        if seq_len == self.num_video:
            return slice(0, self.num_video)
        if seq_len != self.num_video + self.text_len:
            raise ValueError(f"attention sequence of {seq_len} tokens does not match the grid "
                             f"({self.num_video} video + {self.text_len} text tokens)")
        return slice(self.text_len, seq_len) if self.text_first else slice(0, self.num_video)

    def index(self, frame: int, row: int, col: int) -> int:
        """Flat index of token ``(frame, row, col)`` among the video tokens."""
        return (frame * self.rows + row) * self.cols + col


@dataclass
class BackboneAdapter:
    """What the capture needs to know about one transformer class.

    Attributes:
        name: short name (``"cogvideox"``).
        class_names: transformer class names handled.
        blocks: ``model -> list[(qualified name, block module)]`` in layer order.
        self_attention: ``block -> attention module`` whose processor computes the video self-attention.
        grid: ``(model, args, kwargs) -> TokenGrid`` from the forward call's inputs.
        block_video_output: ``(block output, grid) -> [B, N_video, C]`` video hidden states after the block.
        cfg: ``"batched"`` (CFG halves in one batch, ``[uncond, cond]``) or ``"sequential"`` (separate calls).
        sequential_cond_first: for ``"sequential"``, whether the conditional call comes first in a step.
    """

    name: str
    class_names: tuple[str, ...]
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    self_attention: Callable[[nn.Module], nn.Module]
    grid: Callable[[nn.Module, tuple, dict], TokenGrid]
    block_video_output: Callable[[Any, TokenGrid], Any]
    cfg: str = "batched"
    sequential_cond_first: bool = True


_REGISTRY: dict[str, BackboneAdapter] = {}


def register(adapter: BackboneAdapter) -> BackboneAdapter:
    """Register an adapter for its class names (later registrations win)."""
    for c in adapter.class_names:
        _REGISTRY[c] = adapter
    return adapter


def supported() -> list[str]:
    return sorted(_REGISTRY)


def resolve_transformer(model_or_pipe) -> nn.Module:
    """The transformer of a pipeline (``pipe.transformer``) or the model itself."""
    if type(model_or_pipe).__name__ not in _REGISTRY and hasattr(model_or_pipe, "transformer"):
        return model_or_pipe.transformer
    return model_or_pipe


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter of ``model``'s class; ``ValueError`` naming the class and the supported ones otherwise."""
    name = type(resolve_transformer(model)).__name__
    if name not in _REGISTRY:
        raise ValueError(f"unsupported backbone {name!r}; supported transformer classes: {supported()}")
    return _REGISTRY[name]


def _arg(args: tuple, kwargs: dict, name: str, pos: int):
    if name in kwargs:
        return kwargs[name]
    if len(args) > pos:
        return args[pos]
    raise ValueError(f"forward call has no {name!r} argument")


# ----------------------------------------------------------------------------------------------- CogVideoX
def _cog_grid(model, args, kwargs) -> TokenGrid:
    x = _arg(args, kwargs, "hidden_states", 0)  # [B, F, C, H, W]
    e = _arg(args, kwargs, "encoder_hidden_states", 1)  # [B, L, D]
    p = model.config.patch_size
    pt = model.config.patch_size_t or 1
    return TokenGrid(frames=x.shape[1] // pt, rows=x.shape[3] // p, cols=x.shape[4] // p, text_len=e.shape[1],
                     text_first=True, stride=p)


register(BackboneAdapter(
    name="cogvideox",
    class_names=("CogVideoXTransformer3DModel",),
    blocks=lambda m: [(f"transformer_blocks.{i}", b) for i, b in enumerate(m.transformer_blocks)],
    self_attention=lambda b: b.attn1,
    grid=_cog_grid,
    block_video_output=lambda out, g: out[0],  # (hidden_states, encoder_hidden_states)
    cfg="batched",
))
