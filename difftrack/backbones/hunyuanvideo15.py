"""HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, T2V): ``[video, conditions]`` inside the self-attention of 54
dual-stream blocks, CFG as separate forwards through the pipeline's ``guider`` (cond first), latents
``[B, C, F, h, w]`` given to the transformer with zero condition latents and a zero mask channel appended.

What is new for the method here, and what capture and matching mean:

* **Three condition streams after the video.** Each block's attention runs over ``[video, image, ByT5 glyph text,
  Qwen2.5-VL text]`` (the transformer reorders the condition tokens per sample: valid ones first, padding last, and
  masks padding out as keys *and* queries with a ``[B, 1, N, N]`` boolean mask). Capture keeps the video tokens only
  (the first ``F * h * w`` of the sequence); the condition length is ``image tokens + ByT5 length + text length``
  of the call (729 + 256 + 1000 in the pipeline, all present even when masked: T2V passes zero image embeddings whose
  tokens are masked). Matching is between video tokens, as for HunyuanVideo 1; the condition tokens only enter
  through the attention the video queries pay to them.
* **Attention variant.** diffusers 0.42.1 implements the dense attention only (``HunyuanVideo15AttnProcessor2_0``,
  one SDPA call); the original release's sparse SSTA / flex-block attention for 720p is not in diffusers, so
  everything here is about the dense model. The token order is frame-major, row-major (RoPE on a
  ``(frame, row, col)`` meshgrid, ``rope_axes_dim`` split 16/56/56), as the other backbones.
* **Conditioning channels.** ``in_channels = 2 C + 1``: noisy latents, condition latents (zeros for T2V) and a mask
  channel (zeros for T2V). :func:`pack_t2v` builds that input for bare calls (noised forwards, tracking).
* **VAE batch.** ``AutoencoderKLHunyuanVideo15`` (diffusers 0.42.1) fails on a batch of more than one clip (its
  mid-block attention mask is ``[B, N, N]`` against ``[B, 1, N, C]`` queries), so tracking encodes its frames one by
  one (:func:`_frames_one_by_one`); generation and analysis use batch 1 anyway.
* **CAG.** The perturbed self-attention is the SDPA swap of the other joint backbones; the ``[B, 1, N, N]`` mask is
  the outer AND of a key-padding mask with itself, handed over as that key mask (padding queries then attend the
  valid keys instead of none: they are padding, and no valid token reads them).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import (BackboneAdapter, TokenGrid, _arg, first_output, latent_grid, patch_sizes, register,
               register_family, register_frame_encoder)
from .hunyuanvideo import HunyuanVideoFamily

if TYPE_CHECKING:
    import numpy as np
    import torch


# forward(hidden_states [B, 2C+1, F, H, W], timestep [B], encoder_hidden_states [B, L, D] (Qwen2.5-VL),
#         encoder_attention_mask [B, L], timestep_r, encoder_hidden_states_2 [B, L2, D2] (ByT5),
#         encoder_attention_mask_2 [B, L2], image_embeds [B, L3, D3], ...). Every block's ``attn`` (processor
# ``HunyuanVideo15AttnProcessor2_0``) projects the video (to_q/to_k -> RMSNorm -> RoPE) and the conditions
# (add_q_proj/add_k_proj -> norm_added_q/k), concatenates [video, conditions] and calls SDPA once (native backend:
# [B, H, N, D]). Blocks return (video hidden states, condition hidden states).
def _hv15_grid(model, args, kwargs) -> TokenGrid:
    x = _arg(args, kwargs, "hidden_states", 0)
    text = _arg(args, kwargs, "encoder_hidden_states", 2).shape[1]
    text2 = kwargs.get("encoder_hidden_states_2")
    image = kwargs.get("image_embeds")
    if text2 is None or image is None:
        raise ValueError("HunyuanVideo15Transformer3DModel capture needs the encoder_hidden_states_2= and "
                         "image_embeds= keyword arguments of the transformer call (as HunyuanVideo15Pipeline passes "
                         "them)")
    return latent_grid(model, x, frame_axis=2, text_len=text + text2.shape[1] + image.shape[1], text_first=False)


def pack_t2v(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, C, F, h, w]`` -> the T2V transformer input ``[B, 2C + 1, F, h, w]``: zero condition latents and
    a zero mask channel appended, as ``HunyuanVideo15Pipeline`` builds it."""
    import torch

    B, C, F_, h, w = x.shape
    return torch.cat([x, x.new_zeros(B, C, F_, h, w), x.new_zeros(B, 1, F_, h, w)], dim=1)


register(BackboneAdapter(
    name="hunyuanvideo15",
    class_names=("HunyuanVideo15Transformer3DModel",),
    grid=_hv15_grid,
    self_attention=lambda b: b.attn,
    block_video_output=first_output,  # (video hidden states, condition hidden states)
    # the pipeline's ClassifierFreeGuidance guider: the conditional batch first, then the unconditional one
    cfg="sequential",
    sequential_cond_first=True,
    pack_input=pack_t2v,
))


@register_frame_encoder
def _frames_one_by_one(transformer, vae):
    """Tracking encodes frames one at a time: ``AutoencoderKLHunyuanVideo15``'s mid-block attention (diffusers
    0.42.1) builds a ``[B, N, N]`` causal mask against ``[B, 1, N, C]`` queries and fails for any batch above 1."""
    if type(transformer).__name__ not in ("HunyuanVideo15Transformer3DModel",) or vae is None:
        return None
    from ..tracking import vae_encode_frames

    stride = int(vae.config.spatial_compression_ratio) * patch_sizes(transformer)[1]
    return (lambda video: vae_encode_frames(vae, video, batch_size=1)), stride


@contextmanager
def guider_scale(pipe, scale: float):
    """``pipe.guider`` with ``guidance_scale=scale`` for the body (``HunyuanVideo15Pipeline.__call__`` takes no
    guidance scale: its guider holds it); the original guider is put back on exit, even when the body raises."""
    original = pipe.guider
    pipe.guider = original.new(guidance_scale=float(scale))
    try:
        yield pipe
    finally:
        pipe.guider = original


class HunyuanVideo15Family(HunyuanVideoFamily):
    """``HunyuanVideo15Pipeline``: flow matching with ``sigmas = linspace(1, 0, n + 1)[:-1]`` (as HunyuanVideo),
    Qwen2.5-VL + ByT5 text, CFG weight held by the ``guider`` component."""

    name = "hunyuanvideo15"
    pipeline_classes = ("HunyuanVideo15Pipeline",)
    takes_negative_prompt = True

    def default_size(self, pipe, temporal: int, spatial: int) -> tuple[int, int, int]:
        """``num_frames`` of ``__call__`` (121) and the pipeline's own default height x width: the 16:9 bucket of
        ``transformer.config.target_size`` (480x848 for the 480p checkpoints)."""
        import inspect

        T = int(inspect.signature(type(pipe).__call__).parameters["num_frames"].default)
        h, w = pipe.default_aspect_ratio[1], pipe.default_aspect_ratio[0]
        H, W = pipe.video_processor.calculate_default_height_width(h, w, pipe.target_size)
        return T, int(H), int(W)

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        """Qwen2.5-VL and ByT5 embeddings with their masks, and the zero image embeddings of T2V."""
        import torch

        pe, mask, pe2, mask2 = pipe.encode_prompt(prompt=prompt, device=device, dtype=dtype)
        image = torch.zeros(1, pipe.vision_num_semantic_tokens, pipe.vision_states_dim, device=device, dtype=dtype)
        return dict(encoder_hidden_states=pe, encoder_attention_mask=mask, encoder_hidden_states_2=pe2,
                    encoder_attention_mask_2=mask2, image_embeds=image)

    def cfg_weight(self, guidance_scale: float, call_kwargs: dict) -> tuple[float, bool]:
        """The guider's weight: CFG (a second, unconditional forward) when it is above 1."""
        return guidance_scale, guidance_scale > 1.0

    def call(self, pipe, guidance_scale: float, *args, **kwargs):
        """``pipe(*args, **kwargs)`` with its guider set to ``guidance_scale`` (:func:`guider_scale`)."""
        with guider_scale(pipe, guidance_scale):
            return pipe(*args, **kwargs)

register_family(HunyuanVideo15Family())
