"""One interface over the backbones the notebooks and scripts drive: the embedded model or a diffusers pipeline.

A :class:`VideoRunner` wraps a pipeline and answers the questions the analysis (notebooks 01-03,
:mod:`difftrack.analysis`) and tracking (notebook 04, :class:`difftrack.tracking.DiffTracker`) ask of it, in the
backbone's own calling conventions:

* geometry: default video size ``(frames, height, width)``, pixels per token (``stride``), video frames per latent
  frame (``temporal``), and which video frame each latent frame stands for (:meth:`VideoRunner.frame_index`);
* :meth:`VideoRunner.generate`: prompt -> ``uint8 [T, H, W, 3]`` with the pipeline's own ``__call__`` (so a
  surrounding :func:`difftrack.capture.capture` sees the real denoising loop, CFG layout included);
* :meth:`VideoRunner.encode_video`: a video -> clean latents in the transformer's layout (the embedded model's
  patching, or the pipeline's VAE encoding the clip **as a video**, as the paper's real-video analysis);
* :meth:`VideoRunner.cond`: the conditional-branch keyword arguments of a transformer call for a prompt
  (``encoder_hidden_states`` plus HunyuanVideo's pooled projections, attention mask and guidance);
* :meth:`VideoRunner.noised_forwards`: a clean video forward-noised to each selected step of a ``num_steps``
  schedule (the scheduler's own ``add_noise`` / ``scale_noise``), one conditional forward per step.

Supported pipelines (``_class_name`` in ``model_index.json``): ``MiniVideoPipeline`` (the embedded model),
``CogVideoXPipeline`` (2B sin-cos and 5B RoPE), ``WanPipeline``, ``HunyuanVideoPipeline``, ``HunyuanVideo15Pipeline``
and ``Cosmos2VideoToWorldPipeline`` (world videos and tracking only: it generates from a conditioning image).
:func:`load_pipeline` takes ``"embedded"`` or a local folder of any of them (nothing is downloaded).

Latent frames and video frames (VAE backbones compress time by ``r = 4``): latent frame ``k >= 1`` encodes video
frames ``r(k-1)+1 .. rk``; it is pinned to its last frame ``rk`` (:meth:`VideoRunner.frame_index`), and a point
counts as visible in latent frame ``k`` only when it is visible in all ``r`` frames it encodes (the published
confidence-score rule, shared reference section 4.4; :func:`latent_visibility`). The embedded model has ``r = 1``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checks as _checks
from .backbones import (adapter_for, compute_dtype, experts, family_for, family_of_class, patch_sizes,  # noqa: F401
                        pipeline_families, resolve_transformer, scheduler_add_noise)

PIPELINES = pipeline_families()  # {pipeline class: family}, from difftrack.backbones
DTYPES = _checks.DTYPES  # canonical names; every spelling of checks.DTYPE_ALIASES is accepted
_dtype = _checks.as_torch_dtype


def check_num_steps(num_steps, name: str = "num_steps") -> int:
    """``num_steps`` as an int >= 1 (numpy integers accepted); ``ValueError`` naming it otherwise."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"{name}={num_steps!r}; allowed: an int >= 1 (the number of denoising steps)")
    return int(num_steps)


def pipeline_class(model: str) -> str:
    """``_class_name`` of a local diffusers folder (``"MiniVideoPipeline"`` for ``"embedded"``); ``ValueError``
    naming what is allowed when it is neither."""
    if model == "embedded":
        return "MiniVideoPipeline"
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model={model!r} is neither 'embedded' nor a local diffusers pipeline folder with "
                         f"model_index.json (nothing is downloaded)")
    from .fileio import read_json

    data = read_json(index, "diffusers pipeline index", hint=f"model={model!r} needs a valid model_index.json "
                                                             f"(as written by save_pretrained)")
    if not isinstance(data, dict):
        raise ValueError(f"{str(index)!r} holds a {type(data).__name__}; expected a JSON object with '_class_name'")
    return data.get("_class_name", "")


def load_pipeline(model: str = "embedded", device: str = "cpu", dtype="float32"):
    """The notebooks' ``model`` parameter: ``"embedded"`` (the committed mini CogVideoX) or a local diffusers folder
    holding one of :data:`PIPELINES` (written by ``save_pretrained``, or a downloaded CogVideoX / Wan /
    HunyuanVideo checkpoint). Loaded offline (``local_files_only``), moved to ``device`` in ``dtype``."""
    from . import mini

    dt = _dtype(dtype)  # checks.check_dtype: "float32"/"fp32", "float16"/"fp16"/"half", "bfloat16"/"bf16", torch dtypes
    cls = pipeline_class(model)
    if cls not in PIPELINES:
        raise ValueError(f"{model} holds a {cls or 'pipeline without _class_name'}; allowed pipelines: "
                         f"{sorted(PIPELINES)}")
    if model == "embedded":
        return mini.load_default(device=device, dtype=dt)
    return family_of_class(cls).load(str(Path(model).expanduser()), dt).to(device)


def model_tag(model: str, dtype: str = "float32") -> str:
    """Short file-system-safe name of a model choice, used to keep caches of different models apart."""
    import hashlib

    if model == "embedded":
        base = "embedded"
    else:
        p = Path(model).expanduser().resolve()
        base = f"{p.name}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
    dtype = _checks.check_dtype(dtype)  # one name per dtype: "bf16" and torch.bfloat16 share "bfloat16"'s caches
    return base if dtype == "float32" else f"{base}-{dtype}"


def latent_visibility(visible: np.ndarray, temporal: int, latent_frames: int) -> np.ndarray:
    """Visibility per latent frame from per-video-frame visibility.

    Args:
        visible: ``bool [n, T]``.
        temporal: video frames per latent frame ``r`` (1: identity).
        latent_frames: ``F = (T - 1) // r + 1``.

    Returns:
        ``bool [n, F]``: frame 0 as is; latent frame ``k >= 1`` visible when all of video frames ``r(k-1)+1 .. rk``
        are (the published code's 4-frame AND rule, which it uses in the confidence score only; its accuracy scores
        every video frame against the per-frame visibility).
    """
    visible = np.asarray(visible, bool)
    if visible.ndim != 2:
        raise ValueError(f"visible must be [n, T]; got shape {visible.shape}")
    T = visible.shape[1]
    if temporal < 1 or (T - 1) // temporal + 1 != latent_frames:
        raise ValueError(f"{T} video frames with temporal compression {temporal} give {(T - 1) // max(temporal, 1) + 1}"
                         f" latent frames, not {latent_frames}; allowed T = {temporal} * (F - 1) + 1 .. ")
    if temporal == 1:
        return visible.copy()
    out = [visible[:, 0]]
    for k in range(1, latent_frames):
        out.append(visible[:, temporal * (k - 1) + 1: temporal * k + 1].all(1))
    return np.stack(out, 1)


class VideoRunner:
    """A pipeline plus the conventions of its backbone (see the module docstring).

    Args:
        pipe: a pipeline of a registered family (:func:`difftrack.backbones.pipeline_families`: the embedded
            ``MiniVideoPipeline``, ``CogVideoXPipeline``, ``WanPipeline``, ``HunyuanVideoPipeline``,
            ``SkyReelsV2Pipeline``, ``SkyReelsV2DiffusionForcingPipeline``, ``MochiPipeline``).
        guidance_embed: HunyuanVideo's embedded guidance scale for conditional forwards (the pipeline's default 6).
    """

    def __init__(self, pipe, guidance_embed: float = 6.0):
        cls = type(pipe).__name__
        self.family = family_for(pipe)
        self.pipe, self.kind = pipe, self.family.name
        self.transformer = resolve_transformer(pipe)
        self.adapter = adapter_for(self.transformer)
        self.num_layers = len(self.adapter.blocks(self.transformer))
        self.experts = experts(pipe)  # Wan 2.2 A14B: transformer (high noise) and transformer_2 (low noise)
        counts = {n: len(adapter_for(m).blocks(m)) for n, m in self.experts.models.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"{cls}: its experts have different block counts {counts}; the analysis tables need one "
                             f"layer axis (allowed: experts of one architecture, as Wan 2.2 A14B)")
        self.guidance_embed = float(guidance_embed)
        pt, self.patch = patch_sizes(self.transformer)
        self.temporal, self.vae_spatial = self.family.compression(pipe)
        if pt != 1:
            raise ValueError(f"temporal patch size {pt} ({cls}): one token frame per latent frame is needed "
                             f"(CogVideoX 1.0, Wan, HunyuanVideo layouts; not CogVideoX 1.5)")

    # ------------------------------------------------------------------ geometry
    @property
    def stride(self) -> int:
        """Pixels per token side (VAE or patching factor x transformer patch)."""
        return self.vae_spatial * self.patch

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (:func:`difftrack.backbones.compute_dtype`: not the float32 of the
        modules ``from_pretrained`` keeps in float32)."""
        return compute_dtype(self.transformer)

    def default_size(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` the pipeline generates by default (CogVideoX: from the transformer config;
        Wan / HunyuanVideo: the ``__call__`` defaults; embedded: 13 x 64 x 64)."""
        return self.family.default_size(self.pipe, self.temporal, self.vae_spatial)

    def resolve_size(self, size=None) -> tuple[int, int, int]:
        """:meth:`check_size` of ``size``, or of :meth:`default_size` when ``size`` is ``None`` or empty."""
        return self.check_size(self.default_size() if size is None or len(size) == 0 else size)

    def check_size(self, size) -> tuple[int, int, int]:
        """Validate ``(frames, height, width)``: ``frames = r k + 1`` and sides divisible by the token stride."""
        try:
            T, H, W = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(f"size={size!r}; allowed: (frames, height, width) integers") from None
        r, s = self.temporal, self.stride
        if T < 2 or (T - 1) % r:
            raise ValueError(f"frames={T}; {type(self.pipe).__name__} needs at least 2 frames and frames - 1 divisible "
                             f"by its temporal compression {r} (e.g. {max(1, round((T - 1) / r)) * r + 1})")
        if H % s or W % s or H < s or W < s:
            raise ValueError(f"height x width {H}x{W} is not a positive multiple of the token stride {s} px; "
                             f"allowed e.g. {max(s, round(H / s) * s)}x{max(s, round(W / s) * s)}")
        return T, H, W

    def latent_frames(self, T: int) -> int:
        return (int(T) - 1) // self.temporal + 1

    def frame_index(self, T: int) -> np.ndarray:
        """``int [F]``: the video frame each latent frame is pinned to (``0, r, 2r, ...``)."""
        return np.arange(self.latent_frames(T)) * self.temporal

    def to_latent_frames(self, tracks: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth ``(tracks [n, T, 2], visible [n, T])`` of the video -> the same per latent frame
        (``[n, F, 2]``, ``[n, F]``, see :func:`latent_visibility`)."""
        T = tracks.shape[1]
        F = self.latent_frames(T)
        return tracks[:, self.frame_index(T)], latent_visibility(visible, self.temporal, F)

    def timesteps(self, num_steps: int) -> list[float]:
        """The scheduler timesteps of a ``num_steps`` schedule set the pipeline's way."""
        self._set_timesteps(num_steps)
        return [float(t) for t in self.pipe.scheduler.timesteps]

    def _set_timesteps(self, num_steps: int) -> None:
        check_num_steps(num_steps)
        self.family.set_timesteps(self.pipe.scheduler, num_steps, self.device)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str, seed: int, num_steps: int, guidance_scale: float = 6.0, size=None,
                 negative_prompt: str = "") -> np.ndarray:
        """One video from the pipeline's own ``__call__``; returns ``uint8 [T, H, W, 3]``.

        ``guidance_scale`` is CFG for CogVideoX / Wan / the embedded model (batched or sequential, as the pipeline
        does it) and the embedded guidance for HunyuanVideo (one call per step, as its pipeline by default)."""
        _checks.check_guidance_scale(guidance_scale)
        g = torch.Generator().manual_seed(int(seed))
        return self.family.generate(self.pipe, prompt, self.resolve_size(size), num_steps, guidance_scale, g,
                                    negative_prompt)

    # ------------------------------------------------------------------ conditioning and latents
    @torch.no_grad()
    def cond(self, prompt: str) -> dict:
        """Keyword arguments of a conditional transformer call for ``prompt`` (batch 1)."""
        return self.family.cond(self.pipe, prompt, self.device, self.dtype, self.guidance_embed)

    @torch.no_grad()
    def encode_video(self, video: np.ndarray) -> torch.Tensor:
        """Clean latents of ``uint8 [T, H, W, 3]`` in the transformer's input layout (batch 1, float32):
        ``[1, F, C, h, w]`` for CogVideoX layouts, ``[1, C, F, h, w]`` for Wan / HunyuanVideo. VAE backbones encode
        the clip as one video (``F = (T-1)/r + 1``) and scale as their pipeline decodes."""
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"video must be uint8 [T, H, W, 3]; got {video.dtype} {video.shape}")
        self.check_size(video.shape[:3])
        return self.family.encode_video(self.pipe, video, self.device)

    def transformer_at(self, t) -> torch.nn.Module:
        """The transformer the pipeline calls at timestep ``t`` (its one transformer, or the Wan 2.2 expert whose
        side of the boundary ``t`` is on)."""
        return self.experts.models[self.experts.at(t)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0`` forward-noised to timestep ``t`` by the pipeline's scheduler, the family's way
        (:meth:`PipelineFamily.add_noise`: the scheduler's own rule, Mochi's sigmas, Cosmos' EDM inputs)."""
        return self.family.add_noise(self.pipe.scheduler, x0, noise, t)

    def forward_kwargs(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        """Keyword arguments of one transformer call on latents ``x`` (layout of :meth:`encode_video`) at scheduler
        timestep ``t``: conditioning channels packed by the adapter (:meth:`BackboneAdapter.pack`), the timestep as
        the family builds it (:meth:`PipelineFamily.timestep_input`)."""
        kw = dict(hidden_states=self.adapter.pack(x.to(self.dtype)),
                  timestep=self.family.timestep_input(self.pipe, t, x).to(self.device),
                  return_dict=False, **cond)
        kw.update(self.family.rope_kwargs(self.pipe, self.transformer, x, self.vae_spatial, self.device))
        return kw

    @torch.no_grad()
    def noised_forwards(self, video: np.ndarray, prompt: str, num_steps: int, steps=None, noise_seed: int = 0,
                        cap=None) -> list[float]:
        """Forward-noise ``video`` to each of ``steps`` (default all) of a ``num_steps`` schedule and run one
        conditional transformer forward per step, by the transformer the pipeline uses at that step's timestep
        (:meth:`transformer_at`); ``cap`` (a :class:`difftrack.capture.Capture`) gets ``set_step(s)`` before each.
        Returns the schedule's timesteps (all ``num_steps``)."""
        x0 = self.encode_video(video)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(noise_seed))).to(x0.device)
        cond = self.cond(prompt)
        self._set_timesteps(num_steps)
        ts = self.pipe.scheduler.timesteps
        for s in (range(num_steps) if steps is None else steps):
            t = ts[s].to(self.device)
            xt = self.add_noise(x0, noise, t)
            if cap is not None:
                cap.set_step(int(s))
            self.transformer_at(t)(**self.forward_kwargs(self.family.model_input(self.pipe, xt, x0), t, cond))
        return [float(t) for t in ts]


def as_runner(pipe_or_runner) -> VideoRunner:
    return pipe_or_runner if isinstance(pipe_or_runner, VideoRunner) else VideoRunner(pipe_or_runner)
