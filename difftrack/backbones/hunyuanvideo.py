"""HunyuanVideo (T2V, I2V): ``[video, text]`` inside the self-attention, embedded guidance (one call per step), latents
``[B, C, F, h, w]``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import BackboneAdapter, PipelineFamily, block_list, call_grid, first_output, register, register_family

if TYPE_CHECKING:
    import torch.nn as nn

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
def _hunyuan_blocks(m) -> list[tuple[str, nn.Module]]:
    return block_list("transformer_blocks")(m) + block_list("single_transformer_blocks")(m)


register(BackboneAdapter(
    name="hunyuanvideo",
    class_names=("HunyuanVideoTransformer3DModel",),
    grid=call_grid(frame_axis=2, text_pos=2, text_first=False),
    blocks=_hunyuan_blocks,
    self_attention=lambda b: b.attn,
    block_video_output=first_output,  # (video hidden states, text hidden states)
    # embedded guidance: one call of batch 1 per step; with true_cfg_scale > 1 the pipeline calls the transformer
    # again for the negative prompt, after the positive one (pipeline_hunyuan_video.py, also the I2V pipelines)
    cfg="sequential",
    sequential_cond_first=True,
))




class HunyuanVideoFamily(PipelineFamily):
    name = "hunyuanvideo"
    pipeline_classes = ("HunyuanVideoPipeline",)

    def set_timesteps(self, scheduler, num_steps: int, device) -> None:
        """``HunyuanVideoPipeline`` passes ``sigmas = linspace(1, 0, n + 1)[:-1]``."""
        import numpy as np

        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device=device)

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        """Prompt embeddings, pooled projections, attention mask and the embedded guidance (``x 1000``)."""
        import torch

        pe, pooled, mask = pipe.encode_prompt(prompt=prompt, device=device)
        return dict(encoder_hidden_states=pe.to(dtype), pooled_projections=pooled.to(dtype),
                    encoder_attention_mask=mask,
                    guidance=torch.tensor([guidance_embed * 1000.0], device=device, dtype=dtype))

    def cfg_weight(self, guidance_scale: float, call_kwargs: dict) -> tuple[float, bool]:
        """``guidance_scale`` is embedded guidance here: the CFG weight is ``true_cfg_scale``, and there is an
        unconditional branch only with it above 1 and a negative prompt."""
        weight = float(call_kwargs.get("true_cfg_scale", 1.0))
        has_neg = call_kwargs.get("negative_prompt") is not None or call_kwargs.get("negative_prompt_embeds") is not None
        return weight, weight > 1.0 and has_neg


register_family(HunyuanVideoFamily())
