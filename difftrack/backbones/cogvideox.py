"""CogVideoX (2B sin-cos, 5B RoPE, 5B-I2V; 1.5 captured but not run by VideoRunner): ``[text, video]`` inside the
self-attention, CFG as one batch ``[uncond, cond]``, latents ``[B, F, C, h, w]``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import BackboneAdapter, PipelineFamily, call_grid, first_output, patch_sizes, register, register_family

if TYPE_CHECKING:
    import numpy as np
    import torch


register(BackboneAdapter(
    name="cogvideox",
    class_names=("CogVideoXTransformer3DModel",),
    grid=call_grid(frame_axis=1, text_pos=1, text_first=True),  # forward(hidden_states [B, F, C, H, W], [B, L, D])
    block_video_output=first_output,  # (hidden_states, encoder_hidden_states)
    cfg="batched",
    frames_first=True,
    cag_attention="joint",
    rope=lambda tr, pipe, frames, rows, cols, device: _rope(tr, pipe, frames, rows, cols, device),
    trained_tokens=lambda tr: _trained_tokens(tr),
))


def _rope(tr, pipe, frames: int, rows: int, cols: int, device) -> dict:
    """3D RoPE for a ``frames x rows x cols`` token grid, built as ``CogVideoXPipeline`` builds it (the embedded
    pipeline's own ``rotary_embedding``); nothing for sin-cos positions."""
    cfg = tr.config
    if not cfg.use_rotary_positional_embeddings:
        return {}
    p = patch_sizes(tr)[1]
    if hasattr(pipe, "rotary_embedding"):  # MiniVideoPipeline
        return dict(image_rotary_emb=pipe.rotary_embedding(frames, rows * p, cols * p, device))
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    crops = get_resize_crop_region_for_grid((rows, cols), cfg.sample_width // p, cfg.sample_height // p)
    return dict(image_rotary_emb=get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                                         grid_size=(rows, cols), temporal_size=frames, device=device))


def _trained_tokens(tr):
    sh, sw = getattr(tr.config, "sample_height", None), getattr(tr.config, "sample_width", None)
    return (sh // patch_sizes(tr)[1], sw // patch_sizes(tr)[1]) if sh and sw else None




def _sample_size(frames, height, width, temporal: int, spatial: int) -> tuple[int, int, int]:
    """``(T, H, W)`` in pixels of a transformer sample size in latents (``T`` = 49 without ``sample_frames``)."""
    T = (int(frames) - 1) // temporal * temporal + 1 if frames else 49
    return int(T), int(height) * spatial, int(width) * spatial


class CogVideoXFamily(PipelineFamily):
    name = "cogvideox"
    pipeline_classes = ("CogVideoXPipeline",)
    takes_negative_prompt = True

    def geometry(self, transformer_config: dict, vae_config: dict):
        """CogVideoXPipeline's ``vae_scale_factor_*``: the VAE's ``temporal_compression_ratio`` and
        ``2 ** (len(block_out_channels) - 1)``; the default size from the transformer config's sample size."""
        temporal = int(vae_config.get("temporal_compression_ratio", 4))
        boc = vae_config.get("block_out_channels")
        spatial = 2 ** (len(boc) - 1) if boc else 8
        c = transformer_config
        has = c.get("sample_frames") and c.get("sample_height") and c.get("sample_width")
        return temporal, spatial, (_sample_size(c["sample_frames"], c["sample_height"], c["sample_width"], temporal,
                                                spatial) if has else None)

    def default_size(self, pipe, temporal: int, spatial: int) -> tuple[int, int, int]:
        """From the transformer config (``sample_frames`` / ``sample_height`` / ``sample_width`` in latents)."""
        cfg = pipe.transformer.config
        return _sample_size(cfg.sample_frames, cfg.sample_height, cfg.sample_width, temporal, spatial)

    def encode_video(self, pipe, video: np.ndarray, device) -> torch.Tensor:
        """``[1, F, C, h, w]`` (the transformer's frame-major layout)."""
        return super().encode_video(pipe, video, device).permute(0, 2, 1, 3, 4).contiguous()

    def rope_kwargs(self, pipe, transformer, x: torch.Tensor, spatial: int, device) -> dict:
        """The 3D RoPE tables the pipeline builds (5B), none for sin-cos positions (2B)."""
        if not transformer.config.use_rotary_positional_embeddings:
            return {}
        F_, _, _, h, w = x.shape
        return dict(image_rotary_emb=pipe._prepare_rotary_positional_embeddings(h * spatial, w * spatial, F_, device))


register_family(CogVideoXFamily())
