"""Per-backbone adapters: where the blocks are, how the attention sequence is laid out, which CFG branch is which.

The capture core (:mod:`difftrack.capture`) knows nothing about any model; everything model-specific lives in a
:class:`BackboneAdapter` registered here by transformer class name. Adding a backbone means adding one adapter.

| backbone | class | sequence inside self-attention | CFG in the pipeline |
|---|---|---|---|
| CogVideoX-2B/5B/5B-I2V/1.5 | ``CogVideoXTransformer3DModel`` | ``[text, video]`` | one batch ``[uncond, cond]`` |
| HunyuanVideo (T2V, I2V) | ``HunyuanVideoTransformer3DModel`` | ``[video, text]``; 20 dual + 40 single blocks as one list | embedded guidance, batch 1; true CFG: separate forwards, cond first |
| Wan 2.1/2.2 | ``WanTransformer3DModel`` | ``[video]`` (text by cross-attention) | separate forwards, cond first |
| LTX-Video | ``LTXVideoTransformer3DModel`` | ``[video]`` (text by cross-attention), input already patchified | one batch ``[uncond, cond]`` |

Not covered: ``HunyuanVideoFramepackTransformer3DModel`` (history tokens are prepended to the video and the text is
cropped per call, so there is no fixed grid), HunyuanVideo 1.5, Wan VACE/Animate, LTX-2.
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


def attention_heads(model: nn.Module, layers=None) -> int:
    """The fewest self-attention heads among ``layers`` (block indices; ``None``: every block) of a supported
    transformer: the head indices valid in all of them are ``0..attention_heads - 1``."""
    a = adapter_for(model)
    blocks = a.blocks(model)
    chosen = [blocks[l][1] for l in layers] if layers is not None else [b for _, b in blocks]
    return min(int(a.self_attention(b).heads) for b in chosen)


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


def _check_tokens(grid: TokenGrid, n: int, what: str) -> TokenGrid:
    if grid.num_video != n:
        raise ValueError(f"{what}: {n} video tokens in the input, but the grid {grid.frames}x{grid.rows}x{grid.cols} "
                         f"has {grid.num_video}")
    return grid


# -------------------------------------------------------------------------------------------- HunyuanVideo
# forward(hidden_states [B, C, F, H, W], timestep, encoder_hidden_states [B, L, D], encoder_attention_mask [B, L],
#         pooled_projections, guidance, ...). Inside every block's attention the sequence is [video, text]:
# * dual-stream ``HunyuanVideoTransformerBlock.attn``: video q/k from to_q/to_k -> RMSNorm -> RoPE, text q/k from
#   add_q_proj/add_k_proj -> norm_added_q/k, concatenated after the video;
# * single-stream ``HunyuanVideoSingleTransformerBlock.attn``: cat([video, text]) projected jointly -> RMSNorm,
#   RoPE on ``[:, :-text_len]``.
# The text length is the padded prompt length (``encoder_hidden_states.shape[1]``, 256 in the pipeline; the token
# refiner keeps it); padded text tokens stay in the sequence and are masked out of the attention by
# ``encoder_attention_mask``. Both block types return ``(video hidden states, text hidden states)``.
# The token-replace I2V variant (``image_condition_type="token_replace"``, HunyuanVideo-I2V) uses the
# ``HunyuanVideoTokenReplace*`` blocks with the same ``.attn``, the same [video, text] layout and the same return
# value, so it is covered; ``latent_concat`` (SkyReels-I2V) only doubles the input channels.
def _hunyuan_grid(model, args, kwargs) -> TokenGrid:
    x = _arg(args, kwargs, "hidden_states", 0)  # [B, C, F, H, W]
    e = _arg(args, kwargs, "encoder_hidden_states", 2)  # [B, L, D]
    p, pt = model.config.patch_size, model.config.patch_size_t or 1
    return TokenGrid(frames=x.shape[2] // pt, rows=x.shape[3] // p, cols=x.shape[4] // p, text_len=e.shape[1],
                     text_first=False, stride=p)


def _hunyuan_blocks(m) -> list[tuple[str, nn.Module]]:
    return ([(f"transformer_blocks.{i}", b) for i, b in enumerate(m.transformer_blocks)]
            + [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(m.single_transformer_blocks)])


register(BackboneAdapter(
    name="hunyuanvideo",
    class_names=("HunyuanVideoTransformer3DModel",),
    blocks=_hunyuan_blocks,
    self_attention=lambda b: b.attn,
    grid=_hunyuan_grid,
    block_video_output=lambda out, g: out[0],  # (video hidden states, text hidden states)
    # embedded guidance: one call of batch 1 per step; with true_cfg_scale > 1 the pipeline calls the transformer
    # again for the negative prompt, after the positive one (pipeline_hunyuan_video.py, also the I2V pipelines)
    cfg="sequential",
    sequential_cond_first=True,
))


# ---------------------------------------------------------------------------------------------------- Wan
# forward(hidden_states [B, C, F, H, W], timestep [B] (Wan 2.2 TI2V: [B, N]), encoder_hidden_states, ...).
# ``WanTransformerBlock.attn1`` is the self-attention over the video tokens only (RMSNorm across heads, then RoPE);
# text (and the I2V image tokens) enter through the cross-attention ``attn2``. The processor hands [B, N, H, D]
# to ``dispatch_attention_fn``, whose native backend permutes to [B, H, N, D] before torch SDPA. Blocks return the
# video hidden states as a plain tensor. The pipelines call the transformer once per branch, cond first, then
# uncond (pipeline_wan.py, pipeline_wan_i2v.py).
def _wan_grid(model, args, kwargs) -> TokenGrid:
    x = _arg(args, kwargs, "hidden_states", 0)  # [B, C, F, H, W]
    pt, ph, pw = model.config.patch_size
    return TokenGrid(frames=x.shape[2] // pt, rows=x.shape[3] // ph, cols=x.shape[4] // pw, text_len=0,
                     text_first=False, stride=ph)


register(BackboneAdapter(
    name="wan",
    class_names=("WanTransformer3DModel",),
    blocks=lambda m: [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)],
    self_attention=lambda b: b.attn1,
    grid=_wan_grid,
    block_video_output=lambda out, g: out,
    cfg="sequential",
    sequential_cond_first=True,
))


# ------------------------------------------------------------------------------------------------- LTX-Video
# forward(hidden_states [B, N, C] already patchified by the pipeline, encoder_hidden_states, timestep,
#         encoder_attention_mask, num_frames, height, width, ...): ``num_frames/height/width`` are the latent sizes
# before patchifying (the released models use patch 1x1x1, so they equal the token grid). ``attn1`` is the
# video-only self-attention (RMSNorm across heads, RoPE before the head split); text by cross-attention ``attn2``.
# CFG is one batch [uncond, cond]. Calls with ``video_coords`` instead of sizes (LTXConditionPipeline, which can
# append conditioning tokens) have no regular grid and are refused.
def _ltx_grid(model, args, kwargs) -> TokenGrid:
    x = _arg(args, kwargs, "hidden_states", 0)  # [B, N, C]
    f, h, w = (kwargs.get(k, args[i] if len(args) > i else None) for i, k in ((4, "num_frames"), (5, "height"),
                                                                               (6, "width")))
    if f is None or h is None or w is None:
        raise ValueError("LTX-Video capture needs the num_frames=, height=, width= arguments of the transformer "
                         "call (calls with video_coords only, as in LTXConditionPipeline, are not supported)")
    p, pt = model.config.patch_size, model.config.patch_size_t or 1
    g = TokenGrid(frames=int(f) // pt, rows=int(h) // p, cols=int(w) // p, text_len=0, text_first=False, stride=p)
    return _check_tokens(g, x.shape[1], "LTXVideoTransformer3DModel")


register(BackboneAdapter(
    name="ltxvideo",
    class_names=("LTXVideoTransformer3DModel",),
    blocks=lambda m: [(f"transformer_blocks.{i}", b) for i, b in enumerate(m.transformer_blocks)],
    self_attention=lambda b: b.attn1,
    grid=_ltx_grid,
    block_video_output=lambda out, g: out,
    cfg="batched",
))
