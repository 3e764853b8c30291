"""SkyReels-V2 (text-to-video and diffusion forcing): Wan's layout -- self-attention over the video tokens only (text
by cross-attention), CFG as separate forwards (cond first), latents ``[B, C, F, h, w]`` of the Wan VAE.

``SkyReelsV2Transformer3DModel.forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
enable_diffusion_forcing, fps, ...)``. ``blocks[i].attn1`` is the self-attention; ``SkyReelsV2AttnProcessor`` hands
``[B, N, H, D]`` (QK RMSNorm across heads, then RoPE) to ``dispatch_attention_fn``, whose native backend calls torch
SDPA once, with the block-causal mask of ``num_frame_per_block > 1`` as ``attn_mask`` (a frame always sees its own
block). Blocks return the video hidden states as a plain tensor.

What is new for the method is **diffusion forcing** (``SkyReelsV2DiffusionForcingPipeline``): the transformer gets
one noise level per latent frame (``timestep [B, F]``, ``enable_diffusion_forcing=True``) and the loop walks a
*step matrix* whose rows give every frame its level.

* **Synchronous** (``ar_step=0``, the pipeline's default, any ``causal_block_size``): every row puts all frames at
  the same timestep, ``num_inference_steps`` rows, two calls per row with CFG. Capture, analysis, tracking and CAG
  mean exactly what they mean for Wan: step ``i`` = row ``i`` = the ``i``-th timestep of the schedule.
* **Asynchronous** (``ar_step > 0``): earlier frame blocks run ahead of later ones, so one call holds frames at
  several levels and the matrix has more rows than steps. Capture counts a step per row (its key is the whole
  per-frame vector, :func:`frame_levels`; the recorded timestep is the noisiest frame's), so matches between two
  frames then compare frames at *different* noise levels; the row's levels are the pipeline's
  ``callback_on_step_end`` ``t``. CAG refuses it (:meth:`SkyReelsV2DFFamily.check_cag_call`): its schedule is over
  ``num_inference_steps`` steps, not over rows. Long videos (``overlap_history`` with ``num_frames >
  base_num_frames``) run several windows, each a full schedule; capture sees each window as a new generation (use
  ``store=False`` with callbacks), CAG refuses them.

The runners (:class:`difftrack.runners.VideoRunner`, ``DiffTracker``) call the diffusion-forcing transformer as the
synchronous loop does: ``timestep [B, F]`` with every frame at ``t``, ``enable_diffusion_forcing=True`` and the
``fps`` embedding of the pipeline's default 24 fps (``fps=[1]``) where the config injects it.

diffusers 0.42.1's SkyReels-V2 pipelines call ``ftfy.fix_text`` on every prompt whether or not the ``ftfy`` package
is installed (a ``NameError`` without it; Wan's pipelines check first). The families therefore encode prompts with
:func:`encode_prompt` (the same T5 code, through Wan's guarded cleaning) and call the pipeline with
``prompt_embeds`` / ``negative_prompt_embeds``; do the same when calling a SkyReels-V2 pipeline without ``ftfy``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import BackboneAdapter, block_list, call_grid, register, register_family
from .wan import WanFamily

if TYPE_CHECKING:
    import torch


def frame_levels(t) -> tuple[float, ...] | None:
    """Step key of a SkyReels-V2 call: the per-frame timesteps of ``timestep [B, F]`` (the largest over the batch
    per frame), or ``(t,)`` for a scalar / ``[B]`` timestep."""
    import torch

    if t is None:
        return None
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        return tuple(float(v) for v in t.amax(0))
    return (float(t.max()) if isinstance(t, torch.Tensor) else float(t),)


def encode_prompt(pipe, prompt: str | list[str], device=None, max_sequence_length: int = 512) -> torch.Tensor:
    """``[B, 512, D]`` T5 embeddings of ``prompt`` as the SkyReels-V2 pipelines compute them (their
    ``_get_t5_prompt_embeds`` is a copy of ``WanPipeline``'s), without their unconditional ``ftfy`` call."""
    from diffusers import WanPipeline

    return WanPipeline._get_t5_prompt_embeds(pipe, prompt=prompt, max_sequence_length=max_sequence_length,
                                             device=device)


register(BackboneAdapter(
    name="skyreels_v2",
    class_names=("SkyReelsV2Transformer3DModel",),
    grid=call_grid(frame_axis=2),  # hidden_states [B, C, F, H, W]; no text tokens in the self-attention
    blocks=block_list("blocks"),
    cfg="sequential",  # cond first (pipeline_skyreels_v2*.py)
    step_key=frame_levels,
))


class SkyReelsV2Family(WanFamily):
    """``SkyReelsV2Pipeline`` (text-to-video): Wan's loop (``timestep [B]``, cond then uncond), the Wan VAE."""

    name = "skyreels_v2"
    pipeline_classes = ("SkyReelsV2Pipeline",)

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        """The T5 embeddings of ``prompt`` (:func:`encode_prompt`)."""
        return dict(encoder_hidden_states=encode_prompt(pipe, prompt, device).to(dtype))

    def prompt_kwargs(self, pipe, prompt: str, negative_prompt: str) -> dict:
        """``prompt_embeds`` / ``negative_prompt_embeds`` from :func:`encode_prompt` (no ``ftfy`` needed)."""
        dev = pipe._execution_device
        return dict(prompt=None, prompt_embeds=encode_prompt(pipe, prompt, dev),
                    negative_prompt_embeds=encode_prompt(pipe, negative_prompt, dev))


class SkyReelsV2DFFamily(SkyReelsV2Family):
    """``SkyReelsV2DiffusionForcingPipeline``: per-frame timesteps; the library runs its synchronous loop."""

    name = "skyreels_v2_df"
    pipeline_classes = ("SkyReelsV2DiffusionForcingPipeline",)

    def timestep_input(self, pipe, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B, F]``: every latent frame of ``x [B, C, F, h, w]`` at ``t`` (a synchronous row)."""
        return t.reshape(1, 1).expand(x.shape[0], x.shape[2])

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        """The text embeddings plus ``enable_diffusion_forcing=True`` and, where the config injects it, the 24 fps
        embedding index the pipeline passes by default (``fps=[1]``; 16 fps would be ``[0]``)."""
        kw = super().cond(pipe, prompt, device, dtype, guidance_embed)
        kw["enable_diffusion_forcing"] = True
        if pipe.transformer.config.inject_sample_info:
            kw["fps"] = [1]
        return kw

    def check_cag_call(self, call_kwargs: dict) -> None:
        """CAG follows ``num_inference_steps`` steps of one schedule: asynchronous diffusion forcing (``ar_step >
        0``) and long videos in several windows (``overlap_history`` with ``num_frames > base_num_frames``) are
        refused."""
        ar = call_kwargs.get("ar_step", 0)
        if ar:
            raise ValueError(f"ar_step={ar!r}: asynchronous diffusion forcing puts frames at different noise levels "
                             f"and runs more loop rows than steps, which CAG's step schedule cannot follow; "
                             f"allowed: ar_step=0 (synchronous)")
        n, base = call_kwargs.get("num_frames", 97), call_kwargs.get("base_num_frames", 97)
        if call_kwargs.get("overlap_history") is not None and base is not None and n > base:
            raise ValueError(f"num_frames={n} > base_num_frames={base} with overlap_history: a long video runs "
                             f"several windows, each a full schedule, which CAG cannot follow; allowed: num_frames "
                             f"<= base_num_frames")


register_family(SkyReelsV2Family())
register_family(SkyReelsV2DFFamily())
