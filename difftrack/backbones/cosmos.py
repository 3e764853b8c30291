"""Cosmos-Predict2 (``Cosmos2VideoToWorldPipeline``; ``CosmosTransformer3DModel``, the backbone of HeFT): video-only
self-attention (text by cross-attention), CFG as separate forwards (cond first), latents ``[B, C, F, h, w]``
normalised by the Wan VAE's ``latents_mean`` / ``latents_std``, EDM-style sigmas.

What is new for the method here, and what capture and matching mean:

* **Conditioning frames.** Video2World generates from a conditioning image or clip: its first latent frame(s) are
  the clean encoded frames, marked by a condition-mask channel (1) and given their own tiny timestep
  (``sigma_conditioning``); the pipeline puts them back after every step. Capture in the pipeline's loop records
  every latent frame alike, the conditioning frame(s) as frame 0.., so matches from a conditioning frame are matches
  from a clean frame; the step's timestep is the largest of the per-frame timesteps (the noisy frames'). Bare
  forwards (noised real videos, tracking) mark **no** frame as conditioning: condition mask 0 and the step's
  timestep for every frame (:func:`pack_no_condition`), the text-to-world use of the same weights.
* **Padding mask.** ``concat_padding_mask`` appends a padding channel (resized to the latent size); the pipeline
  passes zeros (no padded pixels), and so do bare forwards here (``padding_mask`` of :meth:`CosmosFamily.cond`).
* **Noising.** The transformer takes ``c_in (x0 + sigma eps) = (1 - t) x0 + t eps`` with ``t = sigma / (sigma + 1)``
  and that ``t`` as its timestep ``[B, 1, F, 1, 1]`` (or ``[B]``), not the scheduler's timestep
  (:meth:`CosmosFamily.add_noise`, :meth:`CosmosFamily.timestep_input`, :func:`edm_time`).
* **CAG** perturbs ``attn1`` (video only) in the conditional call; the pipeline combines ``c + w (c - u)`` on
  x0 predictions, so the hooks fold ``s / (w + 1)`` (:meth:`CosmosFamily.cfg_weight`) and the guided x0 is
  ``u + (w + 1)(c - u) + s (c - p)``; the conditioning frames are put back by the pipeline as always.
* **Generation** needs a conditioning image (``image=`` / ``video=``) and NVIDIA's guardrail (``cosmos_guardrail``,
  which the pipeline requires under the NVIDIA Open Model License). Analysis of generated videos from a prompt alone
  is refused (:meth:`CosmosFamily.generate`); without ``cosmos_guardrail`` the loader installs a checker that
  refuses every ``__call__`` (:class:`GuardrailMissing`), so only analysis of given videos and tracking run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import BackboneAdapter, PipelineFamily, call_grid, register, register_family

if TYPE_CHECKING:
    import torch


def pack_no_condition(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, C, F, h, w]`` -> ``[B, C + 1, F, h, w]`` with a zero condition-mask channel: what the transformer
    concatenates itself from ``condition_mask`` zeros (no conditioning frame)."""
    import torch

    return torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)


def edm_time(scheduler, t: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep ``t' = sigma / (sigma + 1)`` (float32 0-d) of scheduler timestep ``t``, ``sigma``
    its (EDM) sigma in the scheduler's set schedule, as ``Cosmos2VideoToWorldPipeline`` computes it."""
    sigma = scheduler.sigmas[scheduler.index_for_timestep(t.to(scheduler.timesteps.device))]
    return (sigma / (sigma + 1)).float()


# forward(hidden_states [B, C, F, H, W], timestep [B] or [B, 1, F, 1, 1], encoder_hidden_states [B, L, D], ...,
#         fps, condition_mask [B, 1, F, H, W], padding_mask [1, 1, H', W']). ``CosmosTransformerBlock.attn1`` is the
# video-only self-attention (q/k -> RMSNorm per head -> RoPE, one SDPA call through the native backend, no mask);
# text enters by ``attn2``. Blocks return the video hidden states (Transfer's control blocks a tuple, not covered).
register(BackboneAdapter(
    name="cosmos",
    class_names=("CosmosTransformer3DModel",),
    grid=call_grid(frame_axis=2),  # the condition-mask and padding channels change C only
    cfg="sequential",  # Cosmos2VideoToWorldPipeline: the conditional call, then the unconditional one
    sequential_cond_first=True,
    pack_input=pack_no_condition,
))


class GuardrailMissing:
    """Stands in for ``cosmos_guardrail.CosmosSafetyChecker`` when that package is not installed: the pipeline can be
    built (for analysis of given videos and tracking, which never call it) but every ``__call__`` is refused."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        raise RuntimeError("Cosmos2VideoToWorldPipeline generation needs NVIDIA's guardrail (pip install "
                           "cosmos_guardrail; the NVIDIA Open Model License requires it); without it difftrack "
                           "runs only analysis of given videos and tracking on Cosmos")

    check_video_safety = check_text_safety


class CosmosFamily(PipelineFamily):
    """``Cosmos2VideoToWorldPipeline``: T5 text (512 tokens, by cross-attention), Wan VAE (4x temporal, 8x spatial),
    sigmas ``linspace(0, 1, n)`` mapped by the scheduler (Karras, ``sigma_max = 80``)."""

    name = "cosmos"
    pipeline_classes = ("Cosmos2VideoToWorldPipeline",)
    takes_negative_prompt = True
    prompt_to_video = False

    def load(self, path: str, dtype):
        """Offline; the real guardrail when ``cosmos_guardrail`` is installed, else :class:`GuardrailMissing`."""
        import diffusers
        from diffusers.utils import is_cosmos_guardrail_available

        kw = {} if is_cosmos_guardrail_available() else dict(safety_checker=GuardrailMissing())
        pipe = diffusers.Cosmos2VideoToWorldPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                                     **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def geometry(self, transformer_config: dict, vae_config: dict):
        """The pipeline's ``vae_scale_factor_*``: ``2 ** sum(temperal_downsample)`` and
        ``2 ** len(temperal_downsample)`` of the Wan VAE."""
        down = vae_config.get("temperal_downsample") or [False, True, True]
        return 2 ** sum(bool(d) for d in down), 2 ** len(down), None

    def set_timesteps(self, scheduler, num_steps: int, device) -> None:
        """``sigmas = linspace(0, 1, n)`` (float64) as ``Cosmos2VideoToWorldPipeline`` passes them."""
        import torch

        scheduler.set_timesteps(sigmas=torch.linspace(0, 1, num_steps, dtype=torch.float64), device=device)

    def add_noise(self, scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - t') x0 + t' eps`` (``c_in`` times the EDM ``x0 + sigma eps``), ``t'`` of :func:`edm_time`."""
        tm = edm_time(scheduler, t).to(x0.device)
        return (1 - tm) * x0 + tm * eps

    def timestep_input(self, pipe, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B]``: ``t'`` of :func:`edm_time` under the pipeline's scheduler, not ``t`` itself."""
        return edm_time(pipe.scheduler, t).reshape(1).expand(x.shape[0])

    def generate(self, pipe, prompt, size, num_steps, guidance_scale, generator, negative_prompt=""):
        raise ValueError("Cosmos2VideoToWorldPipeline generates from a conditioning image or clip (image= / video=), "
                         "not from a prompt alone; allowed here: analysis of given videos (videos_per_family=0, "
                         "exact_per_family >= 1) and tracking")

    def cfg_weight(self, guidance_scale: float, call_kwargs: dict) -> tuple[float, bool]:
        """The pipeline combines ``c + w (c - u) = u + (w + 1)(c - u)`` (on its x0 predictions, an affine map of
        the transformer's outputs): the weight on ``c - u`` is ``w + 1``; CFG runs when ``w > 1``."""
        return guidance_scale + 1.0, guidance_scale > 1.0

    def cond(self, pipe, prompt: str, device, dtype, guidance_embed: float) -> dict:
        """T5 embeddings, the pipeline's default ``fps`` (16) and a zero padding mask."""
        import inspect

        import torch

        e = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                               device=device)[0]
        fps = int(inspect.signature(type(pipe).__call__).parameters["fps"].default)
        return dict(encoder_hidden_states=e.to(dtype), fps=fps,
                    padding_mask=torch.zeros(1, 1, 1, 1, device=device, dtype=dtype))


register_family(CosmosFamily())
