"""The embedded mini model (:mod:`difftrack.mini`): a ``CogVideoXTransformer3DModel`` (its transformer adapter is
CogVideoX's) in a ``MiniVideoPipeline`` without a VAE: a fixed invertible patching maps pixels to latents."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import PipelineFamily, patch_sizes, register_family, register_frame_encoder

if TYPE_CHECKING:
    import numpy as np
    import torch

PIXEL_PATCH = 2  # mini.PATCH (tests compare): the fixed pixel patching in front of the transformer's own patch


class EmbeddedFamily(PipelineFamily):
    name = "embedded"
    pipeline_classes = ("MiniVideoPipeline",)
    fixed_size = True  # 64x64: the notebooks' size parameters do not apply

    def load(self, path: str, dtype: torch.dtype):
        from ..mini import MiniVideoPipeline

        return MiniVideoPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)

    def geometry(self, transformer_config: dict, vae_config: dict):
        """No VAE: one latent frame per video frame, ``PIXEL_PATCH`` pixels per latent pixel; the default size is the
        transformer config's sample size."""
        c = transformer_config
        try:
            default = (int(c["sample_frames"]), int(c["sample_height"]) * PIXEL_PATCH,
                       int(c["sample_width"]) * PIXEL_PATCH)
        except (KeyError, TypeError, ValueError):
            default = None
        return 1, PIXEL_PATCH, default

    def compression(self, pipe) -> tuple[int, int]:
        from .. import mini

        return 1, mini.PATCH

    def default_size(self, pipe, temporal: int, spatial: int) -> tuple[int, int, int]:
        from .. import mini

        return mini.FRAMES, mini.HEIGHT, mini.WIDTH

    def generate(self, pipe, prompt: str, size: tuple[int, int, int], num_steps: int, guidance_scale: float,
                 generator: torch.Generator, negative_prompt: str = "") -> np.ndarray:
        T, H, W = size
        return pipe(prompt, num_frames=T, height=H, width=W, num_inference_steps=num_steps,
                    guidance_scale=guidance_scale, generator=generator, progress=False).frames[0]

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        te = pipe.text_encoder
        return dict(encoder_hidden_states=te(te.tokenize([prompt]).to(device)).to(dtype))

    def model_input(self, pipe, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """An image-to-video embedded model (:func:`difftrack.mini.to_image_to_video`) gets the clean first frame
        as conditioning channels: ``[B, F, 2C, h, w]``; a text-to-video one ``x`` as it is."""
        from .. import mini

        if not mini.is_image_to_video(pipe.transformer):
            return x
        import torch

        return torch.cat([x, mini.image_condition(x0[:, 0].to(x.dtype), x0.shape[1])], 2)

    def encode_video(self, pipe, video: np.ndarray, device) -> torch.Tensor:
        """``[1, F, C, h, w]`` by the fixed patching (no VAE)."""
        from ..mini import video_uint8_to_latents

        return video_uint8_to_latents(video, device=device)


register_family(EmbeddedFamily())


@register_frame_encoder
def _patched_pixels(transformer, vae):
    """A bare transformer in the embedded layout (CogVideoX class, ``3 * PATCH^2`` output channels and as many input
    channels, or twice as many for an image-to-video model; no VAE) takes the fixed pixel patching: ``(encode, PATCH x transformer patch)``."""
    from .. import mini

    cfg = transformer.config
    if type(transformer).__name__ != "CogVideoXTransformer3DModel" or vae is not None or \
            cfg.out_channels != 3 * mini.PATCH * mini.PATCH or cfg.in_channels not in (cfg.out_channels,
                                                                                       2 * cfg.out_channels):
        return None
    p = patch_sizes(transformer)[1]
    return (lambda video: mini.video_uint8_to_latents(video)[0]), mini.PATCH * p  # [T, 12, H/2, W/2]
