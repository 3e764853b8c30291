"""The embedded default model: a small text-to-video DiT built from diffusers' own ``CogVideoXTransformer3DModel``.

* **Transformer**: ``diffusers.CogVideoXTransformer3DModel`` (the class of CogVideoX-2B/5B) with full 3D attention
  over ``[text, video]`` tokens, 2B-style 3D sin-cos positions (no RoPE), 12 blocks of 3 heads x 64.
* **No VAE**: a fixed invertible patching (``pixel_unshuffle`` by 2) turns a 64x64 RGB frame into a 32x32x12
  "latent"; the transformer's 2x2 patch then gives 16x16 tokens per frame, each covering 4x4 pixels. 13 frames,
  no temporal compression (latent frame f is video frame f).
* **Text encoder**: a closed-vocabulary tokenizer for the world's prompts and a small embedding + transformer
  encoder (``WorldTextEncoder``), trained jointly. Unknown words raise ``ValueError``.
* **Scheduler**: ``CogVideoXDDIMScheduler`` configured like CogVideoX-2B (v-prediction, zero-terminal-SNR,
  ``snr_shift_scale=3``, "trailing" spacing).

``MiniVideoPipeline`` is a ``diffusers.DiffusionPipeline``: ``save_pretrained`` / ``from_pretrained`` work as for any
diffusers pipeline, and ``load_default()`` loads the committed weights from inside the package, offline.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXTransformer3DModel, DiffusionPipeline,
                       DPMSolverMultistepScheduler, ModelMixin, UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

from . import checks as _checks
from . import world as _world

WEIGHTS_DIR = Path(__file__).parent / "weights" / "mini-cogvideox"
PATCH = 2  # pixel_unshuffle factor of the fixed invertible patching
FRAMES, HEIGHT, WIDTH = 13, 64, 64
TEXT_LEN = 24
# classifier-free guidance weights MiniVideoPipeline accepts (checks.check_guidance_scale, the one rule of every entry
# point): <= 1 runs without CFG (as in diffusers), > 1 with CFG; far above the trained range (6) the prediction
# explodes (1e30 gives a black video), so larger values are refused
GUIDANCE_SCALE_RANGE = _checks.GUIDANCE_SCALE_RANGE


def world_vocabulary() -> list[str]:
    """Every word the world's prompts use (index 0 = padding)."""
    words = ["<pad>", "a", "and", "on", "moving", "background", "still", "drifting", "scene", ",", "camera",
             "panning", "zooming", "in", "out", "rotating", "clockwise", "counterclockwise"]
    words += list(_world.COLOURS) + list(_world.SHAPES) + list(_world.DIRECTIONS)
    return list(dict.fromkeys(words))


def transformer_config() -> dict:
    """Config of the embedded transformer (a CogVideoX-2B layout, scaled down)."""
    return dict(num_attention_heads=3, attention_head_dim=64, in_channels=3 * PATCH * PATCH,
                out_channels=3 * PATCH * PATCH, time_embed_dim=192, text_embed_dim=128, num_layers=12,
                sample_width=WIDTH // PATCH, sample_height=HEIGHT // PATCH, sample_frames=FRAMES, patch_size=2,
                temporal_compression_ratio=1, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=False,
                flip_sin_to_cos=True, freq_shift=0, activation_fn="gelu-approximate", norm_elementwise_affine=True,
                norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0)


def scheduler_config() -> dict:
    """CogVideoX-2B's scheduler settings."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=3.0)


FEW_STEP_SCHEDULERS = ("dpm++", "unipc")


def few_step_scheduler(kind: str = "dpm++", config: dict | None = None) -> SchedulerMixin:
    """A multistep ODE solver on the embedded model's own noise schedule, for sampling in fewer steps.

    ``kind``: ``"dpm++"`` (``DPMSolverMultistepScheduler``, DPM-Solver++ 2M) or ``"unipc"``
    (``UniPCMultistepScheduler``, bh2). ``config``: the ``CogVideoXDDIMScheduler`` config the model was trained with
    (default :func:`scheduler_config`). CogVideoX's schedule (``snr_shift_scale``, zero terminal SNR) has no switch in
    these classes, so its betas are handed over as ``trained_betas``; every training-time ``alphas_cumprod`` is kept
    (within float32 rounding) except the last, which zero terminal SNR makes 0 and the solvers need positive
    (``rescale_betas_zero_snr`` sets it to 2**-24, as diffusers does for zero-SNR models). Both solve the same
    probability-flow ODE as DDIM (eta 0), so their samples approach the DDIM sample of the same noise as steps grow.
    Use: ``pipe.scheduler = few_step_scheduler("dpm++", pipe.scheduler.config)``.
    """
    classes = {"dpm++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
    if kind not in classes:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(FEW_STEP_SCHEDULERS)}")
    cfg = dict(scheduler_config() if config is None else config)
    if cfg.get("prediction_type") != "v_prediction":
        raise ValueError(f"prediction_type={cfg.get('prediction_type')!r}; the embedded model predicts 'v_prediction'")
    ddim = CogVideoXDDIMScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    ac = ddim.alphas_cumprod.double()
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    return classes[kind](num_train_timesteps=len(ac), trained_betas=betas.tolist(), prediction_type="v_prediction",
                         timestep_spacing=cfg.get("timestep_spacing", "trailing"), rescale_betas_zero_snr=True,
                         final_sigmas_type="zero")


class WorldTextEncoder(ModelMixin, ConfigMixin):
    """Closed-vocabulary text encoder: ``tokenize`` then ``forward``.

    Args:
        vocab: the word list (index 0 is padding).
        max_length: tokens per prompt (prompts are padded to exactly this length, as CogVideoX pads to 226).
        dim: output embedding size (the transformer's ``text_embed_dim``).
    """

    @register_to_config
    def __init__(self, vocab: list[str] | None = None, max_length: int = TEXT_LEN, dim: int = 128,
                 num_layers: int = 2, num_heads: int = 4):
        super().__init__()
        vocab = list(vocab or world_vocabulary())
        self.word_to_id = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.Embedding(len(vocab), dim)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim * 4, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """``long [B, max_length]`` token ids; raises ``ValueError`` naming an unknown word or a too-long prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = []
        for p in prompts:
            words = re.findall(r"[a-z]+|,", p.lower())
            unknown = [w for w in words if w not in self.word_to_id]
            if unknown:
                raise ValueError(f"unknown word(s) {unknown} in prompt {p!r}; the embedded model knows only: "
                                 f"{sorted(w for w in self.word_to_id if w != '<pad>')}")
            if len(words) > self.config.max_length:
                raise ValueError(f"prompt {p!r} has {len(words)} words; at most {self.config.max_length} allowed")
            row = [self.word_to_id[w] for w in words]
            ids.append(row + [0] * (self.config.max_length - len(row)))
        return torch.tensor(ids, dtype=torch.long, device=self.embed.weight.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, L]`` -> ``[B, L, dim]``."""
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        return self.norm(self.encoder(x))


def pixels_to_latents(video: torch.Tensor) -> torch.Tensor:
    """``float [B, T, 3, H, W]`` in ``[0, 1]`` -> ``[B, T, 12, H/2, W/2]`` in ``[-1, 1]`` (fixed invertible patching)."""
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"video must be [B, T, 3, H, W]; got {tuple(video.shape)}")
    B, T, C, H, W = video.shape
    if H % (2 * PATCH) or W % (2 * PATCH):
        raise ValueError(f"frame size {H}x{W} must be divisible by {2 * PATCH} (patching x transformer patch)")
    x = F.pixel_unshuffle(video.reshape(B * T, C, H, W) * 2 - 1, PATCH)
    return x.reshape(B, T, C * PATCH * PATCH, H // PATCH, W // PATCH)


def latents_to_pixels(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pixels_to_latents`: ``[B, T, 12, h, w]`` -> ``[B, T, 3, 2h, 2w]`` in ``[0, 1]``."""
    B, T, C, h, w = latents.shape
    x = F.pixel_shuffle(latents.reshape(B * T, C, h, w), PATCH)
    return ((x + 1) / 2).reshape(B, T, 3, h * PATCH, w * PATCH)


def video_uint8_to_latents(video: np.ndarray, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> latents ``[1, T, 12, H/2, W/2]``."""
    v = torch.from_numpy(np.ascontiguousarray(video)).to(device=device, dtype=dtype).permute(0, 3, 1, 2) / 255.0
    return pixels_to_latents(v.unsqueeze(0))


def is_image_to_video(transformer) -> bool:
    """Whether ``transformer`` takes the first frame as conditioning: input channels ``[noisy latents, first-frame
    latents padded with zeros]``, twice its output channels (the layout of ``CogVideoXImageToVideoPipeline``)."""
    c = transformer.config
    return int(c.in_channels) == 2 * int(c.out_channels)


def image_condition(first: torch.Tensor, frames: int) -> torch.Tensor:
    """The conditioning channels of an image-to-video transformer: first-frame latents ``first [B, C, h, w]`` at
    frame 0, zeros at the other ``frames - 1`` frames -> ``[B, frames, C, h, w]``."""
    if first.ndim != 4 or frames < 1:
        raise ValueError(f"first-frame latents must be [B, C, h, w] and frames >= 1; got {tuple(first.shape)}, "
                         f"frames={frames}")
    cond = first.new_zeros((first.shape[0], frames) + tuple(first.shape[1:]))
    cond[:, 0] = first
    return cond


def to_image_to_video(pipe: "MiniVideoPipeline") -> "MiniVideoPipeline":
    """The text-to-video pipeline as an image-to-video one: the transformer's input channels doubled for the
    first-frame conditioning (:func:`image_condition`), the new input weights zero, so that at first it computes
    exactly what the text-to-video model computes. Text encoder and scheduler are shared."""
    if is_image_to_video(pipe.transformer):
        raise ValueError("the pipeline's transformer is already image-to-video (in_channels = 2 x out_channels)")
    cfg = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    cfg["in_channels"] = 2 * int(cfg["out_channels"])
    sd = pipe.transformer.state_dict()
    w = sd["patch_embed.proj.weight"]  # [D, C, p, p]: a Conv2d patch embedding (no temporal patch)
    sd["patch_embed.proj.weight"] = torch.cat([w, torch.zeros_like(w)], 1)
    tr = CogVideoXTransformer3DModel(**cfg)
    tr.load_state_dict(sd)
    return MiniVideoPipeline(tr.to(device=w.device, dtype=w.dtype), pipe.text_encoder, pipe.scheduler)


@dataclass
class MiniVideoPipelineOutput(BaseOutput):
    """``frames``: ``uint8 [B, T, H, W, 3]``."""

    frames: np.ndarray


class MiniVideoPipeline(DiffusionPipeline):
    """Prompt -> video with the embedded mini CogVideoX, classifier-free guidance as in ``CogVideoXPipeline``
    (batch ``[uncond, cond]``)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: CogVideoXTransformer3DModel, text_encoder: WorldTextEncoder,
                 scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], negative_prompt: list[str] | None, do_cfg: bool) -> torch.Tensor:
        """Text embeddings ``[B, L, D]``, or ``[2B, L, D]`` ordered ``[uncond, cond]`` under CFG."""
        cond = self.text_encoder(self.text_encoder.tokenize(prompt))
        if not do_cfg:
            return cond
        neg = negative_prompt if negative_prompt is not None else [""] * len(prompt)
        return torch.cat([self.text_encoder(self.text_encoder.tokenize(neg)), cond])

    def rotary_embedding(self, frames: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """3D RoPE tensors as ``CogVideoXPipeline`` builds them, or ``None`` for a sin-cos transformer."""
        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        p = cfg.patch_size
        cos, sin = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), (h // p, w // p)),
                                           grid_size=(h // p, w // p), temporal_size=frames, device=device)
        return cos, sin

    def check_inputs(self, num_frames: int, height: int, width: int, num_inference_steps: int,
                     guidance_scale: float) -> None:
        """Raise ``ValueError`` naming the bad value and what is allowed (nothing is rounded or corrected):
        ``num_frames >= 2``; ``height`` / ``width`` positive multiples of the token stride (patching x transformer
        patch: 4 px for the embedded model); ``num_inference_steps >= 1``; ``guidance_scale`` finite in
        :data:`GUIDANCE_SCALE_RANGE`."""
        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if not is_int(num_frames) or num_frames < 2:
            raise ValueError(f"num_frames={num_frames!r}; at least 2 frames are needed (an int >= 2)")
        s = PATCH * int(self.transformer.config.patch_size)
        for name, v in (("height", height), ("width", width)):
            if not is_int(v) or v < s or v % s:
                near = max(s, round(v / s) * s) if isinstance(v, (int, float)) and math.isfinite(v) else s
                raise ValueError(f"{name}={v!r} (requested {height}x{width}); allowed: a positive multiple of {s} px "
                                 f"(pixel patching {PATCH} x transformer patch {s // PATCH}), e.g. {near}")
        if not is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}; must be an int >= 1")
        _checks.check_guidance_scale(guidance_scale)

    def _image_condition(self, image, batch: int, frames: int, height: int, width: int, device):
        """``[B, T, C, h, w]`` conditioning channels of an image-to-video transformer, or ``None`` (text-to-video)."""
        i2v = is_image_to_video(self.transformer)
        if image is None:
            if i2v:
                raise ValueError("this transformer is image-to-video (in_channels = 2 x out_channels): pass image= "
                                 "(the first frames, uint8 [H, W, 3] or [B, H, W, 3])")
            return None
        if not i2v:
            raise ValueError("image= given, but this transformer is text-to-video; allowed: image=None "
                             "(or an image-to-video pipeline from difftrack.mini.to_image_to_video)")
        img = np.asarray(image)
        img = img[None] if img.ndim == 3 else img
        if img.dtype != np.uint8 or img.ndim != 4 or img.shape[1:] != (height, width, 3) or len(img) not in (1, batch):
            raise ValueError(f"image must be uint8 [{height}, {width}, 3] or [B={batch}, {height}, {width}, 3]; got "
                             f"{img.dtype} {img.shape}")
        img = np.array(np.broadcast_to(img, (batch,) + img.shape[1:]))  # a writable copy for torch
        first = torch.cat([video_uint8_to_latents(f[None], device=device)[:, 0] for f in img])
        return image_condition(first, frames)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "np", callback_on_step_end=None, progress: bool = True,
                 image: np.ndarray | None = None):
        """Generate videos.

        Args:
            prompt: one prompt or a list (world vocabulary only).
            num_frames, height, width: video size; height and width positive multiples of 4 (the token stride;
                other sizes raise ``ValueError``, nothing is rounded).
            num_inference_steps: denoising steps (the paper uses 50; how far 10-15 steps of DDIM or of
                :func:`few_step_scheduler` land from 50 DDIM steps is measured in ``results/scheduler_study.json``).
            guidance_scale: classifier-free guidance weight (> 1 enables CFG, batch ``[uncond, cond]``); finite, in
                :data:`GUIDANCE_SCALE_RANGE` ``[0, 50]``.
            generator: seeds the initial noise (drawn on the CPU, so results match across devices).
            output_type: ``"np"`` for ``uint8 [B, T, H, W, 3]``, ``"latent"`` for the final latents.
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": ...})`` after each step, as in diffusers.
            image: the first frames, ``uint8 [H, W, 3]`` or ``[B, H, W, 3]``: required by an image-to-video
                transformer (:func:`to_image_to_video`), refused by a text-to-video one.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = None if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        self.check_inputs(num_frames, height, width, num_inference_steps, guidance_scale)
        device = self._execution_device
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0
        emb = self.encode_prompt(prompts, negs, do_cfg).to(dtype)
        B = len(prompts)
        cond = self._image_condition(image, B, num_frames, height, width, device)
        if cond is not None and do_cfg:
            cond = torch.cat([cond] * 2)
        shape = (B, num_frames, 3 * PATCH * PATCH, height // PATCH, width // PATCH)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        rope = self.rotary_embedding(num_frames, height // PATCH, width // PATCH, device)
        timesteps = self.scheduler.timesteps
        dpm = isinstance(self.scheduler, CogVideoXDPMScheduler)  # its step() carries the previous x0, as in CogVideoX
        old_x0 = None
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            x = torch.cat([latents] * 2) if do_cfg else latents
            if cond is not None:
                x = torch.cat([x, cond], 2)
            tt = t.expand(x.shape[0])
            out = self.transformer(hidden_states=x.to(dtype), encoder_hidden_states=emb, timestep=tt,
                                   image_rotary_emb=rope, return_dict=False)[0].float()
            if do_cfg:
                u, c = out.chunk(2)
                out = u + guidance_scale * (c - u)
            if dpm:
                latents, old_x0 = self.scheduler.step(out, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                                      generator=generator, return_dict=False)
            else:
                latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})
        if output_type == "latent":
            return MiniVideoPipelineOutput(frames=latents)
        video = latents_to_pixels(latents).clamp(0, 1)
        frames = (video * 255 + 0.5).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
        return MiniVideoPipelineOutput(frames=frames)


def build_untrained(seed: int = 0) -> MiniVideoPipeline:
    """The embedded architecture with random weights (the paper's "untrained" control)."""
    torch.manual_seed(seed)
    return MiniVideoPipeline(CogVideoXTransformer3DModel(**transformer_config()),
                             WorldTextEncoder(world_vocabulary(), dim=transformer_config()["text_embed_dim"]),
                             CogVideoXDDIMScheduler(**scheduler_config()))


def load_default(device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 weights: str | Path | None = None) -> MiniVideoPipeline:
    """Load the committed embedded model from inside the package (offline), or the saved ``MiniVideoPipeline``
    folder ``weights`` (a training round's candidate); ``dtype`` as :func:`difftrack.checks.check_dtype`
    (``"bf16"``, ``"float16"``, ``torch.float32`` ...)."""
    dtype = _checks.as_torch_dtype(dtype)
    folder = Path(weights) if weights is not None else WEIGHTS_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"embedded weights missing at {folder} (no model_index.json); train them with "
                                f"scripts/train_mini.py")
    pipe = MiniVideoPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    return pipe.to(device)
