"""Wan 2.1/2.2: self-attention over the video tokens only (text by cross-attention), CFG as separate forwards
(cond first), latents ``[B, C, F, h, w]`` normalised by the VAE's ``latents_mean`` / ``latents_std``.

Wan 2.2 TI2V-5B is the same ``WanTransformer3DModel`` in a ``WanPipeline`` with ``expand_timesteps=True`` and the
Wan 2.2 VAE (``AutoencoderKLWan(is_residual=True, patch_size=2, scale_factor_spatial=16, z_dim=48)``: 16x16x4
compression, so with the transformer's 2x2 patch a token covers 32x32 pixels). What is new for the method:

* **Per-token timesteps.** The pipeline passes ``timestep [B, N]``, one value per video token (``mask[:, ::2, ::2] *
  t``). In text-to-video every token holds the step's ``t``; in image-to-video (``WanImageToVideoPipeline`` with
  ``expand_timesteps``) the first latent frame is the clean image latent and its tokens hold 0. The *step* is the
  denoising loop index as everywhere, its recorded timestep the largest per-token value (the noisy tokens' ``t``;
  :func:`difftrack.backbones.max_timestep`). Bare forwards of the library (``analyze_exact``, ``DiffTracker``) pass
  the per-token form too (:meth:`WanFamily.timestep_input`), every token at the step's ``t``.
* **Matching.** Unchanged: the first latent frame is frame 0 of the clip (video frame 0, then 4 video frames per
  latent frame). In image-to-video it is the clean conditioning latent (timestep 0), so matches to it compare a
  noisy frame with a clean one; capture records it like any frame.
"""
from __future__ import annotations

from . import BackboneAdapter, PipelineFamily, block_list, call_grid, register, register_family

# forward(hidden_states [B, C, F, H, W], timestep [B] (Wan 2.2 TI2V: [B, N]), encoder_hidden_states, ...).
# ``WanTransformerBlock.attn1`` is the self-attention over the video tokens only (RMSNorm across heads, then RoPE);
# text (and the I2V image tokens) enter through the cross-attention ``attn2``. The processor hands [B, N, H, D]
# to ``dispatch_attention_fn``, whose native backend permutes to [B, H, N, D] before torch SDPA. Blocks return the
# video hidden states as a plain tensor. The pipelines call the transformer once per branch, cond first, then
# uncond (pipeline_wan.py, pipeline_wan_i2v.py).
register(BackboneAdapter(
    name="wan",
    class_names=("WanTransformer3DModel",),
    grid=call_grid(frame_axis=2),  # hidden_states [B, C, F, H, W]; no text tokens in the self-attention
    blocks=block_list("blocks"),
    cfg="sequential",  # cond first
))




class WanFamily(PipelineFamily):
    name = "wan"
    pipeline_classes = ("WanPipeline",)
    takes_negative_prompt = True

    def geometry(self, transformer_config: dict, vae_config: dict):
        """WanPipeline's ``vae_scale_factor_*``: the VAE's ``scale_factor_temporal`` / ``scale_factor_spatial`` (Wan
        2.2 VAE: 4 and 16)."""
        return (int(vae_config.get("scale_factor_temporal") or 4), int(vae_config.get("scale_factor_spatial") or 8),
                None)

    def timestep_input(self, pipe, t, x):
        """``[B]``; with ``expand_timesteps`` (Wan 2.2 TI2V) ``[B, N]``, every video token at ``t``, as the
        pipeline's text-to-video loop builds it (``mask[0][0][:, ::2, ::2] * t`` flattened, mask all ones)."""
        if not getattr(pipe.config, "expand_timesteps", False):
            return super().timestep_input(pipe, t, x)
        import torch

        mask = torch.ones(x.shape[2:], dtype=torch.float32, device=x.device)  # [F, h, w] latents
        return (mask[:, ::2, ::2] * t.to(x.device)).flatten()[None].expand(x.shape[0], -1)


register_family(WanFamily())
