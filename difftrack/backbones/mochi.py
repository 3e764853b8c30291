"""Mochi 1: asymmetric joint attention (``[video, valid text]`` per batch row), CFG as one batch ``[uncond, cond]``,
latents ``[B, C, F, h, w]`` of a VAE compressing 6x in time and 8x in space, timesteps that *rise* along the loop.

``MochiTransformer3DModel.forward(hidden_states [B, C, F, H, W], encoder_hidden_states [B, L, D], timestep [B],
encoder_attention_mask [B, L], ...)``. Each ``transformer_blocks[i].attn1`` is a joint attention of two streams of
different widths (video ``num_heads * head_dim``, text ``pooled_projection_dim``): the video stream's q/k/v come from
``to_q/k/v`` (RMSNorm, then RoPE), the text stream's from ``add_q/k/v_proj`` (RMSNorm, no RoPE), both projected to the
same heads. ``MochiAttnProcessor2_0`` then runs **one SDPA call per batch row** on ``[video, that row's non-padded
text tokens]`` (it drops the padding rather than masking it) and pads the result back. Blocks return ``(video, text)``.

What capture and matching mean here:

* **Capture** collects the per-row SDPA calls of a processor (``per_sample_attention``) and joins the selected CFG
  rows along the batch: q/k are the post-norm, post-RoPE video tokens followed by that row's valid text tokens
  (``grid.text_len`` = the row's number of valid prompt tokens, text after the video). Where the selected rows have
  prompts of different lengths (``branch="all"``), only their video tokens are kept (``text_len = 0``).
* **Matching** uses the video stream only, as for every backbone. The text stream is narrower before projection but
  shares the heads of the attention, so the attention-to-text scores of the analysis are the joint softmax's, over
  the valid text tokens only (the padding never enters Mochi's attention).
* **Steps**: the scheduler runs with ``invert_sigmas=True`` and the pipeline passes ``t = 1000 (1 - sigma)``, so the
  timestep grows from ~0 (noise) to ~1000 (data). The step key is ``-t`` (larger = noisier, :func:`rising_timestep`);
  recorded timesteps are the raw ``t``. Noising for exact analysis follows the same convention
  (:meth:`MochiFamily.add_noise`).
* **CAG** is not supported: its perturbed attention replaces one SDPA call over a fixed ``[video, text]`` sequence,
  and Mochi's rows have sequences of different lengths (refused by :func:`difftrack.guidance.apply_cag`).
"""
from __future__ import annotations

import inspect
from functools import reduce
from typing import TYPE_CHECKING

from . import BackboneAdapter, PipelineFamily, block_list, call_grid, first_output, register, register_family

if TYPE_CHECKING:
    import torch

THRESHOLD_NOISE = 0.025  # MochiPipeline's linear-quadratic sigma schedule (pipeline_mochi.py)


def rising_timestep(t) -> tuple[float, ...] | None:
    """Step key of a Mochi call: ``(-t,)`` (Mochi's timestep grows as the noise falls)."""
    import torch

    if t is None:
        return None
    return (-(float(t.max()) if isinstance(t, torch.Tensor) else float(t)),)


register(BackboneAdapter(
    name="mochi",
    class_names=("MochiTransformer3DModel",),
    grid=call_grid(frame_axis=2),  # text length per row comes from the per-row SDPA calls
    blocks=block_list("transformer_blocks"),
    block_video_output=first_output,  # (video hidden states, text hidden states)
    cfg="batched",  # one batch [uncond, cond]
    cag_attention=None,
    step_key=rising_timestep,
    per_sample_attention=True,
))


class MochiFamily(PipelineFamily):
    name = "mochi"
    pipeline_classes = ("MochiPipeline",)
    takes_negative_prompt = True

    def geometry(self, transformer_config: dict, vae_config: dict):
        """The VAE's ``temporal_expansions`` / ``spatial_expansions`` products (6 and 8; ``MochiPipeline`` fixes the
        same numbers) and the pipeline's default 19 x 480 x 848."""
        t = reduce(lambda a, b: a * b, vae_config.get("temporal_expansions", (1, 2, 3)), 1)
        s = reduce(lambda a, b: a * b, vae_config.get("spatial_expansions", (2, 2, 2)), 1)
        return int(t), int(s), (19, 480, 848)

    def compression(self, pipe) -> tuple[int, int]:
        """``MochiPipeline.vae_temporal_scale_factor`` / ``vae_spatial_scale_factor``."""
        return int(pipe.vae_temporal_scale_factor), int(pipe.vae_spatial_scale_factor)

    def default_size(self, pipe, temporal: int, spatial: int) -> tuple[int, int, int]:
        """``num_frames`` of ``__call__`` (19) and ``pipe.default_height`` x ``pipe.default_width`` (480 x 848)."""
        frames = inspect.signature(type(pipe).__call__).parameters["num_frames"].default
        return int(frames), int(pipe.default_height), int(pipe.default_width)

    def set_timesteps(self, scheduler, num_steps: int, device) -> None:
        """The pipeline's ``linear_quadratic_schedule(num_steps, 0.025)`` sigmas (inverted by the scheduler)."""
        import numpy as np
        from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

        scheduler.set_timesteps(sigmas=np.array(linear_quadratic_schedule(num_steps, THRESHOLD_NOISE)), device=device)

    def add_noise(self, scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``s x0 + (1 - s) eps`` with ``s = t / num_train_timesteps``: with ``invert_sigmas`` the scheduler's sigma
        at timestep ``t`` is the data fraction ``s`` (0 at the first step: pure noise)."""
        s = (t.reshape(1).to(x0.device).float() / float(scheduler.config.num_train_timesteps)).to(x0.dtype)
        return s * x0 + (1 - s) * eps

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        """T5 prompt embeddings and their attention mask (``[1, 256]``; padding is dropped inside the attention)."""
        pe, mask = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                      device=device)[:2]
        return dict(encoder_hidden_states=pe.to(dtype), encoder_attention_mask=mask)


register_family(MochiFamily())
