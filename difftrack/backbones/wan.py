"""Wan 2.1/2.2: self-attention over the video tokens only (text by cross-attention), CFG as separate forwards
(cond first), latents ``[B, C, F, h, w]`` normalised by the VAE's ``latents_mean`` / ``latents_std``."""
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
        """WanPipeline's ``vae_scale_factor_*``: the VAE's ``scale_factor_temporal`` / ``scale_factor_spatial``."""
        return (int(vae_config.get("scale_factor_temporal") or 4), int(vae_config.get("scale_factor_spatial") or 8),
                None)


register_family(WanFamily())
