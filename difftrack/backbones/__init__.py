"""Per-backbone adapters: every decision that depends on the backbone family lives in this package.

Three registries, filled by one module per family (``cogvideox``, ``hunyuanvideo``, ``wan``, ``ltxvideo``,
``skyreels``, ``mochi``, ``embedded``, ``hunyuanvideo15``, ``cosmos``, ``ltx2``):

* :class:`BackboneAdapter`, by transformer class name: where the blocks are, how the attention sequence is laid out,
  which CFG branch is which. The capture core (:mod:`difftrack.capture`) uses nothing else.
* :class:`PipelineFamily`, by pipeline class name: text conditioning, VAE encoding and latent layout and scaling,
  default size, the schedule's timesteps, the RoPE inputs a bare transformer call needs, how the pipeline is called.
  :class:`difftrack.runners.VideoRunner` uses nothing else.
* :class:`Experts`, by rules registered with :func:`register_experts`: the denoisers of a pipeline with several
  transformers and which one runs at a timestep (Wan 2.2 A14B's ``transformer`` / ``transformer_2``); every other
  pipeline has the one expert ``"transformer"``.

Adding a backbone means adding one module here (its adapter and, for a pipeline, its family) plus its tiny-config
test.

| backbone | class | sequence inside self-attention | CFG in the pipeline |
|---|---|---|---|
| CogVideoX-2B/5B/5B-I2V/1.5 | ``CogVideoXTransformer3DModel`` | ``[text, video]`` | one batch ``[uncond, cond]`` |
| HunyuanVideo (T2V, I2V) | ``HunyuanVideoTransformer3DModel`` | ``[video, text]``; 20 dual + 40 single blocks as one list | embedded guidance, batch 1; true CFG: separate forwards, cond first |
| Wan 2.1/2.2 | ``WanTransformer3DModel`` | ``[video]`` (text by cross-attention) | separate forwards, cond first |
| SkyReels-V2 | ``SkyReelsV2Transformer3DModel`` | ``[video]``; per-frame timesteps | separate forwards, cond first |
| Mochi 1 | ``MochiTransformer3DModel`` | ``[video, valid text]``, one SDPA per row | one batch ``[uncond, cond]`` |
| LTX-Video | ``LTXVideoTransformer3DModel`` | ``[video]`` (text by cross-attention), input already patchified | one batch ``[uncond, cond]`` |
| HunyuanVideo 1.5 (T2V) | ``HunyuanVideo15Transformer3DModel`` | ``[video, image, glyph, text]``, 54 dual-stream blocks | separate forwards through the ``guider``, cond first |
| Cosmos-Predict2 (Video2World) | ``CosmosTransformer3DModel`` | ``[video]`` (text by cross-attention) | separate forwards, cond first |
| LTX-2 (video stream) | ``LTX2VideoTransformer3DModel`` | ``[video]`` (audio in its own stream), patchified | one batch ``[uncond, cond]``, then STG / modality calls (not captured) |

Not covered: ``HunyuanVideoFramepackTransformer3DModel`` (history tokens are prepended to the video and the text is
cropped per call, so there is no fixed grid), Wan VACE/Animate, HunyuanVideo 1.5 I2V
(``HunyuanVideo15ImageToVideoPipeline``: no family, untested), Cosmos-Predict2.5 / Transfer (other processor, control
blocks), ``LTX2Pipeline`` as a pipeline family (its Gemma 3 text encoder, audio VAE and vocoder are not built here).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

# torch and numpy are imported where they are used: importing this package (the registries, the config-level
# geometry rules of :meth:`PipelineFamily.geometry`) stays torch-free for :mod:`difftrack.params`.
if TYPE_CHECKING:
    import numpy as np
    import torch
    import torch.nn as nn


@dataclass(frozen=True)
class TokenGrid:
    """Layout of one transformer call.

    Attributes:
        frames, rows, cols: latent frames and tokens per frame (video tokens are frame-major, then row-major).
        text_len: text tokens inside the self-attention sequence (0 when text enters by cross-attention).
        text_first: True when text precedes video in the sequence (CogVideoX), False when it follows (HunyuanVideo).
        stride: input pixels (or latent pixels) per token side, for mapping tokens back to pixels.
    """

    frames: int
    rows: int
    cols: int
    text_len: int = 0
    text_first: bool = True
    stride: int = 1

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    @property
    def num_video(self) -> int:
        return self.frames * self.rows * self.cols

    def video_slice(self, seq_len: int) -> slice:
        """Slice of the video tokens inside an attention sequence of ``seq_len`` tokens."""
        if seq_len == self.num_video:
            return slice(0, self.num_video)
        if seq_len != self.num_video + self.text_len:
            raise ValueError(f"attention sequence of {seq_len} tokens does not match the grid "
                             f"({self.num_video} video + {self.text_len} text tokens)")
        return slice(self.text_len, seq_len) if self.text_first else slice(0, self.num_video)

    def index(self, frame: int, row: int, col: int) -> int:
        """Flat index of token ``(frame, row, col)`` among the video tokens."""
        return (frame * self.rows + row) * self.cols + col


@dataclass
class BackboneAdapter:
    """What the capture needs to know about one transformer class.

    Attributes:
        name: short name (``"cogvideox"``).
        class_names: transformer class names handled.
        grid: ``(model, args, kwargs) -> TokenGrid`` from the forward call's inputs.
        blocks: ``model -> list[(qualified name, block module)]`` in layer order (default: the
            ``transformer_blocks`` list, :func:`block_list`).
        self_attention: ``block -> attention module`` whose processor computes the video self-attention (default:
            ``block.attn1``).
        block_video_output: ``(block output, grid) -> [B, N_video, C]`` video hidden states after the block
            (default: the output itself; :func:`first_output` for blocks returning ``(video, text)``).
        cfg: ``"batched"`` (CFG halves in one batch, ``[uncond, cond]``) or ``"sequential"`` (separate calls).
        sequential_cond_first: for ``"sequential"``, whether the conditional call comes first in a step.
        frames_first: the transformer takes latents ``[B, F, C, h, w]`` (CogVideoX) instead of ``[B, C, F, h, w]``.
        trackable: :class:`difftrack.tracking.DiffTracker` can run it (per-frame latents, a regular grid).
        rope: ``(transformer, pipe, frames, rows, cols, device) -> dict`` extra keyword arguments (RoPE tables) a
            bare transformer call needs for a ``frames x rows x cols`` token grid, as the pipeline builds them;
            ``None``: the transformer builds its own.
        trained_tokens: ``transformer -> (rows, cols)`` token grid the weights were trained at, when the config
            fixes one (CogVideoX ``sample_height x sample_width``), else ``None``.
        cag_attention: how :mod:`difftrack.guidance` perturbs the self-attention for CAG: ``"joint"`` (the
            processor computes q/k/v of ``[text, video]`` itself, CogVideoX), ``"sdpa"`` (intercept the processor's
            SDPA call), ``None`` (not supported).
        step_key: ``timestep argument -> tuple of floats`` that counts denoising steps in capture and CAG: calls with
            equal keys are one step (sequential CFG), a key with any entry larger than the last one starts a new
            generation, anything else is the next step. Larger means noisier. Default :func:`max_timestep` (the
            largest per-token value: Wan 2.2 TI2V's clean first frame holds 0).
        per_sample_attention: the processor runs one SDPA call per batch row on ``[video, that row's valid text]``
            (Mochi drops padded text tokens per row): capture collects every call of the processor, not the first.
        pack_input: ``latents [B, C, F, h, w] -> hidden_states`` of a bare transformer call whose input carries
            conditioning channels besides the latents (HunyuanVideo 1.5: zero condition latents and mask appended);
            ``None``: the latents as they are.
        first_call_only: capture only the first transformer call of each denoising step (LTX-2: its extra
            guidance calls at the same timestep, spatio-temporal guidance and modality isolation, are skipped).
    """

    name: str
    class_names: tuple[str, ...]
    grid: Callable[[nn.Module, tuple, dict], TokenGrid]
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]] = None  # default: block_list("transformer_blocks")
    self_attention: Callable[[nn.Module], nn.Module] = None  # default: the block's ``attn1``
    block_video_output: Callable[[Any, TokenGrid], Any] = None  # default: the block's output as it is
    cfg: str = "batched"
    sequential_cond_first: bool = True
    frames_first: bool = False
    trackable: bool = True
    rope: Callable | None = None
    trained_tokens: Callable | None = None
    cag_attention: str | None = "sdpa"
    step_key: Callable | None = None  # default: max_timestep
    per_sample_attention: bool = False
    pack_input: Callable | None = None
    first_call_only: bool = False

    def __post_init__(self):
        if self.cfg not in ("batched", "sequential"):
            raise ValueError(f"adapter {self.name!r}: cfg={self.cfg!r}; allowed: 'batched', 'sequential'")
        if self.cag_attention not in ("joint", "sdpa", None):
            raise ValueError(f"adapter {self.name!r}: cag_attention={self.cag_attention!r}; allowed: 'joint', "
                             "'sdpa', None")
        if self.blocks is None:
            self.blocks = block_list("transformer_blocks")
        if self.self_attention is None:
            self.self_attention = _attn1
        if self.block_video_output is None:
            self.block_video_output = _output_as_is
        if self.step_key is None:
            self.step_key = max_timestep

    def latent_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame latents ``[F, C, h, w]`` -> the transformer's ``hidden_states`` (batch 1)."""
        return self.pack(x[None] if self.frames_first else x.permute(1, 0, 2, 3)[None])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Latents in the transformer's layout -> its ``hidden_states`` (:attr:`pack_input`; as they are without)."""
        return x if self.pack_input is None else self.pack_input(x)

    def rope_kwargs(self, transformer, pipe, frames: int, rows: int, cols: int, device) -> dict:
        return {} if self.rope is None else self.rope(transformer, pipe, frames, rows, cols, device)


def max_timestep(t) -> tuple[float, ...] | None:
    """Step key of a ``timestep`` argument (scalar, ``[B]`` or per-token ``[B, N]``): ``(max,)``, ``None`` without one.

    Per-token timesteps (Wan 2.2 TI2V's ``expand_timesteps``) hold 0 for a clean conditioning frame and the step's
    ``t`` for every other token, so the maximum is the step's timestep."""
    import torch

    if t is None:
        return None
    return (float(t.max()) if isinstance(t, torch.Tensor) else float(t),)


def block_list(attr: str) -> Callable[[nn.Module], list[tuple[str, nn.Module]]]:
    """``model -> [(f"{attr}.{i}", block), ...]`` over the ``nn.ModuleList`` ``model.<attr>``."""
    def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{attr}.{i}", b) for i, b in enumerate(getattr(model, attr))]
    return blocks


def _attn1(block: nn.Module) -> nn.Module:
    return block.attn1


def _output_as_is(out, grid: TokenGrid):
    return out


def first_output(out, grid: TokenGrid):
    """Block outputs ``(video hidden states, text hidden states)``: the video part."""
    return out[0]


_REGISTRY: dict[str, BackboneAdapter] = {}


def register(adapter: BackboneAdapter) -> BackboneAdapter:
    """Register an adapter for its class names (later registrations win)."""
    for c in adapter.class_names:
        _REGISTRY[c] = adapter
    return adapter


def supported() -> list[str]:
    return sorted(_REGISTRY)


def adapters() -> list[BackboneAdapter]:
    """Every registered adapter once, in registration order."""
    return list({id(a): a for a in _REGISTRY.values()}.values())


def unwrap_compiled(module):
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) holds (``._orig_mod``), else ``module``
    (an in-place ``module.compile()`` keeps the module itself)."""
    while type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        module = module._orig_mod
    return module


def resolve_transformer(model_or_pipe) -> nn.Module:
    """The transformer of a pipeline (``pipe.transformer``) or the model itself; a ``torch.compile`` wrapper is
    unwrapped (:func:`unwrap_compiled`): hooks and processors go on the module it compiles, and capture and CAG run
    it eagerly while they are active (:func:`difftrack.hooks.eager_compile`)."""
    model = unwrap_compiled(model_or_pipe)
    if type(model).__name__ not in _REGISTRY and hasattr(model, "transformer"):
        model = model.transformer
    return unwrap_compiled(model)


def attention_heads(model: nn.Module, layers=None) -> int:
    """The fewest self-attention heads among ``layers`` (block indices; ``None``: every block) of a supported
    transformer: the head indices valid in all of them are ``0..attention_heads - 1``."""
    a = adapter_for(model)
    blocks = a.blocks(model)
    chosen = [blocks[l][1] for l in layers] if layers is not None else [b for _, b in blocks]
    return min(int(a.self_attention(b).heads) for b in chosen)


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter of ``model``'s class; ``ValueError`` naming the class and the supported ones otherwise."""
    name = type(resolve_transformer(model)).__name__
    if name not in _REGISTRY:
        raise ValueError(f"unsupported backbone {name!r}; supported transformer classes: {supported()}")
    return _REGISTRY[name]


def patch_sizes(transformer) -> tuple[int, int]:
    """``(temporal, spatial)`` patch size of a transformer config: ``patch_size`` an int (with ``patch_size_t``, 1
    when unset) or a ``(t, h, w)`` tuple (Wan)."""
    cfg = transformer.config
    ps = cfg.patch_size
    tup = isinstance(ps, (tuple, list))
    if tup and (len(ps) != 3 or ps[1] != ps[2]):
        raise ValueError(f"patch_size {tuple(ps)}: expected (t, s, s), a square spatial patch")
    return int(getattr(cfg, "patch_size_t", None) or (ps[0] if tup else 1)), int(ps[-1] if tup else ps)


def latent_grid(model, x: torch.Tensor, frame_axis: int, text_len: int = 0, text_first: bool = False) -> TokenGrid:
    """The token grid of latents ``x`` (frames on ``frame_axis``, rows and columns the last two axes) under the
    model's patch sizes (:func:`patch_sizes`)."""
    pt, p = patch_sizes(model)
    return TokenGrid(frames=x.shape[frame_axis] // pt, rows=x.shape[-2] // p, cols=x.shape[-1] // p,
                     text_len=text_len, text_first=text_first, stride=p)


def _arg(args: tuple, kwargs: dict, name: str, pos: int):
    if name in kwargs:
        return kwargs[name]
    if len(args) > pos:
        return args[pos]
    raise ValueError(f"forward call has no {name!r} argument")


def call_grid(frame_axis: int, text_pos: int | None = None, text_first: bool = False):
    """``(model, args, kwargs) -> TokenGrid`` of a transformer call on latents ``hidden_states`` (positional 0) with
    frames on ``frame_axis``; with ``text_pos``, the text ``encoder_hidden_states [B, L, D]`` (positional
    ``text_pos``) is inside the self-attention, before the video (``text_first``) or after it."""
    def grid(model, args, kwargs) -> TokenGrid:
        text_len = 0 if text_pos is None else _arg(args, kwargs, "encoder_hidden_states", text_pos).shape[1]
        return latent_grid(model, _arg(args, kwargs, "hidden_states", 0), frame_axis=frame_axis, text_len=text_len,
                           text_first=text_first)
    return grid


def _check_tokens(grid: TokenGrid, n: int, what: str) -> TokenGrid:
    if grid.num_video != n:
        raise ValueError(f"{what}: {n} video tokens in the input, but the grid {grid.frames}x{grid.rows}x{grid.cols} "
                         f"has {grid.num_video}")
    return grid




def scheduler_add_noise(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0`` forward-noised to timestep ``t`` with the scheduler's own rule: DDIM-style ``add_noise``, or flow
    matching's ``scale_noise`` (Wan, HunyuanVideo)."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(x0, eps, t.reshape(1).to(x0.device))
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, t.reshape(1).to(x0.device), eps)
    raise ValueError(f"scheduler {type(scheduler).__name__} has neither add_noise nor scale_noise; use noise='none'")


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a model computes in: diffusers' ``ModelMixin.dtype`` where it has one (it skips the modules
    ``from_pretrained(torch_dtype=...)`` keeps in float32, e.g. Wan's ``scale_shift_table``, the transformer's first
    parameter, and honours layerwise casting), else the first floating-point parameter's dtype."""
    import torch

    dt = getattr(module, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def scale_vae_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``z`` (channels on dim 1) in the transformer's scale, as the pipelines undo it before decoding:
    normalised by ``latents_mean`` / ``latents_std`` where the VAE config has them (Wan), else multiplied by
    ``scaling_factor`` (CogVideoX, HunyuanVideo)."""
    import torch

    cfg = vae.config
    shape = (1, -1) + (1,) * (z.dim() - 2)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, device=z.device).view(shape)
        std = torch.tensor(cfg.latents_std, device=z.device).view(shape)
        return (z - mean) / std
    return z * float(getattr(cfg, "scaling_factor", 1.0))


class PipelineFamily:
    """The pipeline-level conventions of one backbone family (what a transformer alone does not say).

    The defaults are those of a diffusers text-to-video pipeline with a video VAE and a transformer taking
    ``[B, C, F, h, w]`` latents (Wan, HunyuanVideo); families override what differs.

    Attributes:
        name: the family's short name (``VideoRunner.kind``).
        pipeline_classes: pipeline class names handled.
        takes_negative_prompt: whether ``__call__`` takes ``negative_prompt``.
        fixed_size: the family runs at its default size only (the embedded model), whatever size is asked.
        prompt_to_video: :meth:`generate` makes a video from a prompt alone (not Cosmos Video2World, which needs a
            conditioning image).
    """

    name = "base"
    pipeline_classes: tuple[str, ...] = ()
    takes_negative_prompt = False
    fixed_size = False
    prompt_to_video = True

    def load(self, path: str, dtype: torch.dtype):
        """The pipeline saved in the local folder ``path`` (offline), in ``dtype``, progress bars off."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline_classes[0]).from_pretrained(path, torch_dtype=dtype,
                                                                             local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def geometry(self, transformer_config: dict, vae_config: dict) -> tuple[int, int, tuple[int, int, int] | None]:
        """``(temporal, spatial, default size or None)`` from the pipeline folder's ``transformer/config.json`` and
        ``vae/config.json`` (``{}`` without a VAE), without loading anything: what :meth:`compression` and
        :meth:`default_size` give once loaded, where the configs say it (:func:`difftrack.params.model_geometry`
        reads it torch-free). Default: the VAE's ``temporal_compression_ratio`` / ``spatial_compression_ratio``
        (4 and 8 without them), no default size."""
        v = vae_config
        return int(v.get("temporal_compression_ratio", 4)), int(v.get("spatial_compression_ratio", 8)), None

    def experts_in_index(self, index: dict) -> tuple[str, ...]:
        """The expert names (:class:`Experts`) of a saved pipeline from its ``model_index.json`` dict, torch-free
        (:func:`difftrack.params.model_geometry`). Default: the one ``"transformer"``."""
        return ("transformer",)

    def compression(self, pipe) -> tuple[int, int]:
        """``(temporal, spatial)``: video frames per latent frame and pixels per latent pixel."""
        return int(getattr(pipe, "vae_scale_factor_temporal", 4)), int(getattr(pipe, "vae_scale_factor_spatial", 8))

    def default_size(self, pipe, temporal: int, spatial: int) -> tuple[int, int, int]:
        """``(frames, height, width)`` the pipeline generates by default (its ``__call__`` defaults)."""
        sig = inspect.signature(type(pipe).__call__).parameters
        return int(sig["num_frames"].default), int(sig["height"].default), int(sig["width"].default)

    def set_timesteps(self, scheduler, num_steps: int, device) -> None:
        """Set ``num_steps`` timesteps the way the pipeline does."""
        scheduler.set_timesteps(num_steps, device=device)

    def add_noise(self, scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0`` forward-noised to the schedule's timestep ``t`` (default :func:`scheduler_add_noise`: the
        scheduler's ``add_noise`` or flow matching's ``scale_noise``)."""
        return scheduler_add_noise(scheduler, x0, eps, t)

    def model_input(self, pipe, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The transformer's ``hidden_states`` for noised latents ``x`` of the clean latents ``x0`` (both batch
        first, in the layout of :meth:`encode_video`): ``x`` itself, unless the model also takes frames of the clean
        video as conditioning (an image-to-video model)."""
        return x

    def timestep_input(self, pipe, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The ``timestep`` argument of a transformer call at the schedule's timestep ``t`` on latents ``x``
        (batch first) as the pipeline builds it: ``[B]`` by default."""
        return t.reshape(1).expand(x.shape[0])

    def check_cag_call(self, call_kwargs: dict) -> None:
        """Refuse (``ValueError``) a ``__call__`` whose loop CAG's hooks cannot follow; every call is allowed by
        default."""

    def generate(self, pipe, prompt: str, size: tuple[int, int, int], num_steps: int, guidance_scale: float,
                 generator: torch.Generator, negative_prompt: str = "") -> np.ndarray:
        """One video from the pipeline's own ``__call__``: ``uint8 [T, H, W, 3]``."""
        import numpy as np

        T, H, W = size
        kw = dict(num_frames=T, height=H, width=W, num_inference_steps=num_steps, generator=generator,
                  output_type="np", **self.prompt_kwargs(pipe, prompt, negative_prompt))
        out = np.asarray(self.call(pipe, guidance_scale, **kw).frames[0], np.float32)
        return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)

    def prompt_kwargs(self, pipe, prompt: str, negative_prompt: str) -> dict:
        """The prompt arguments of :meth:`generate`'s ``__call__``: ``prompt`` (and ``negative_prompt`` where the
        pipeline takes one)."""
        return dict(prompt=prompt, negative_prompt=negative_prompt) if self.takes_negative_prompt else dict(
            prompt=prompt)

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        """Keyword arguments of a conditional transformer call for ``prompt`` (batch 1)."""
        e = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                               device=device)[0]
        return dict(encoder_hidden_states=e.to(dtype))

    def encode_video(self, pipe, video: np.ndarray, device) -> torch.Tensor:
        """Clean latents of a checked ``uint8 [T, H, W, 3]`` clip in the transformer's input layout (batch 1,
        float32): the VAE encodes the clip as one video and the latents are scaled as the pipeline decodes them.
        Default layout ``[1, C, F, h, w]``."""
        import torch

        vae = pipe.vae
        p = next(vae.parameters())
        x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # [1, 3, T, H, W]
        return scale_vae_latents(vae, vae.encode(x.to(p.device, compute_dtype(vae))).latent_dist.mode().float())  # [1,C,F,h,w]

    def rope_kwargs(self, pipe, transformer, x: torch.Tensor, spatial: int, device) -> dict:
        """Extra transformer keyword arguments for latents ``x`` (RoPE tables): by default those of the
        transformer's adapter for ``x``'s token grid (:meth:`BackboneAdapter.rope_kwargs`; none where the
        transformer builds its own)."""
        a = adapter_for(transformer)
        if a.rope is None:
            return {}
        frames, h, w = (x.shape[1] if a.frames_first else x.shape[2]), x.shape[-2], x.shape[-1]
        p = patch_sizes(transformer)[1]
        return a.rope_kwargs(transformer, pipe, frames, h // p, w // p, device)

    def cfg_weight(self, guidance_scale: float, call_kwargs: dict) -> tuple[float, bool]:
        """``(CFG weight, whether the pipeline runs an unconditional branch)`` of a ``__call__`` with
        ``guidance_scale`` and the other keyword arguments ``call_kwargs``."""
        return guidance_scale, guidance_scale > 1.0

    def call(self, pipe, guidance_scale: float, *args, **kwargs):
        """``pipe(*args, guidance_scale=guidance_scale, **kwargs)``; families whose ``__call__`` takes no guidance
        scale (HunyuanVideo 1.5: its guider holds it) set it their way."""
        return pipe(*args, guidance_scale=guidance_scale, **kwargs)


_FAMILIES: dict[str, PipelineFamily] = {}


def register_family(family: PipelineFamily) -> PipelineFamily:
    """Register a pipeline family for its pipeline class names (in registration order)."""
    for c in family.pipeline_classes:
        _FAMILIES[c] = family
    return family


def pipeline_families() -> dict[str, str]:
    """``{pipeline class name: family name}`` in registration order."""
    return {c: f.name for c, f in _FAMILIES.items()}


def family_for(pipe) -> PipelineFamily:
    """The family of ``pipe``'s class; ``ValueError`` naming the class and the supported ones otherwise."""
    return family_of_class(type(pipe).__name__)


def family_of_class(cls: str) -> PipelineFamily:
    """The family of the pipeline class named ``cls`` (see :func:`family_for`)."""
    if cls not in _FAMILIES:
        raise ValueError(f"unsupported pipeline {cls}; allowed: {sorted(_FAMILIES)} (a bare transformer has no "
                         f"text encoder or VAE: use difftrack.capture / DiffTracker with explicit inputs)")
    return _FAMILIES[cls]


@dataclass
class Experts:
    """The denoisers of one pipeline (its *experts*) and which one runs at a timestep.

    A pipeline with one transformer has one expert, ``"transformer"``. Wan 2.2 A14B (``WanPipeline`` with
    ``transformer_2`` and ``boundary_ratio``) has two: ``"transformer"`` (high noise) and ``"transformer_2"`` (low
    noise); the rule lives in :mod:`difftrack.backbones.wan`.

    Attributes:
        models: ``{name: transformer}`` in the order of the denoising loop (the name is the pipeline attribute).
        choose: ``timestep -> name`` of the expert the pipeline calls at that timestep (a number or a 0-d tensor).
        rule: the rule in words, for messages (``""`` for one expert).
        guidance_kwargs: ``{name: __call__ keyword}`` of each expert's CFG weight (a missing or ``None`` value falls
            back to ``guidance_scale``, as the pipelines do).
    """

    models: dict[str, Any]
    choose: Callable[[Any], str]
    rule: str = ""
    guidance_kwargs: dict[str, str] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.models)

    @property
    def several(self) -> bool:
        """Whether there is more than one expert (then capture names layers per expert)."""
        return len(self.models) > 1

    def at(self, timestep) -> str:
        """Name of the expert that runs at ``timestep``: a number or a tensor, compared in its own dtype as the
        pipeline compares it (a per-token timestep tensor: its maximum, the step's value)."""
        if hasattr(timestep, "numel") and timestep.numel() > 1:
            timestep = timestep.max()
        return self.choose(timestep)

    def check(self, names, what: str = "expert", none: str = "every expert") -> tuple[str, ...]:
        """``names`` (``None``: all; a name or a list of names) as a tuple of known expert names; ``ValueError``
        naming the bad value and the allowed ones (``none`` says what ``None`` means to the caller)."""
        if names is None:
            return self.names
        items = [names] if isinstance(names, str) else names
        try:
            items = list(items)
        except TypeError:
            items = [names]
        bad = [n for n in items if not isinstance(n, str) or n not in self.models]
        if bad or not items:
            raise ValueError(f"{what}={names!r}; allowed: None ({none}) or names among {list(self.names)}")
        return tuple(n for n in self.names if n in items)

    def guidance_scales(self, guidance_scale: float, call_kwargs: dict | None = None) -> dict[str, float]:
        """The CFG weight each expert's step is combined with, for a ``__call__`` with ``guidance_scale`` and the
        other keyword arguments ``call_kwargs`` (Wan 2.2: ``guidance_scale_2`` for ``transformer_2``)."""
        kw, call_kwargs = self.guidance_kwargs or {}, call_kwargs or {}
        return {n: guidance_scale if call_kwargs.get(kw.get(n)) is None else call_kwargs[kw[n]] for n in self.names}


_EXPERT_RULES: list[Callable] = []


def register_experts(fn: Callable) -> Callable:
    """Register ``fn(pipe) -> Experts | None``: the experts of a pipeline with several transformers (see
    :func:`experts`)."""
    _EXPERT_RULES.append(fn)
    return fn


def experts(model_or_pipe) -> Experts:
    """The :class:`Experts` of a pipeline (a registered multi-expert rule, e.g. Wan 2.2's two transformers), else
    the single expert ``"transformer"``: the pipeline's ``.transformer`` or the transformer itself."""
    for fn in _EXPERT_RULES:
        found = fn(model_or_pipe)
        if found is not None:
            return found
    return Experts({"transformer": resolve_transformer(model_or_pipe)}, lambda t: "transformer")


_FRAME_ENCODERS: list[Callable] = []


def register_frame_encoder(fn: Callable) -> Callable:
    """Register ``fn(transformer, vae) -> (encode, token_stride) | None``: how to turn video frames into latents for
    a transformer that needs no VAE (see :func:`frame_encoder`)."""
    _FRAME_ENCODERS.append(fn)
    return fn


def frame_encoder(transformer, vae):
    """``(encode, token_stride)`` for a transformer whose input is not a VAE's (the embedded model's patched
    pixels): ``encode(video uint8 [T, H, W, 3]) -> [T, C, h, w]``; ``None`` when no registered family claims it."""
    for fn in _FRAME_ENCODERS:
        found = fn(transformer, vae)
        if found is not None:
            return found
    return None


# one module per family; importing them registers their adapters and pipeline families (order: pipeline listing)
from . import (embedded, cogvideox, wan, hunyuanvideo, ltxvideo, skyreels, mochi,  # noqa: E402,F401
               hunyuanvideo15, cosmos, ltx2)
