"""Cross-Attention Guidance (CAG) as a diffusers guider, for modular pipelines (``WanModularPipeline``, ...).

:class:`CrossAttentionGuidance` is a ``diffusers.guiders.BaseGuidance`` that a modular pipeline accepts as its
``guider`` component in place of ``ClassifierFreeGuidance``::

    from difftrack.guiders import CrossAttentionGuidance
    pipe.update_components(guider=CrossAttentionGuidance(guidance_scale=5.0, cag_scale=1.0, layers=[13, 17, 21]))

It is built on :mod:`difftrack.guidance`: the perturbed branch uses that module's processors (:func:`apply_cag`),
its shared prefix (:class:`PrefixShare`), its step window / schedule (:class:`CAGConfig`) and its combine
(:func:`cag_combine`, evaluated in the order :func:`cag_hooks` evaluates it), so a Wan modular pipeline with this
guider gives **bitwise** the latents of :func:`generate_with_cag_diffusers` on a ``WanPipeline`` with the same
components, prompt embeddings, seed and settings (fp32, CPU; ``tests/test_guiders.py``).
"""
from __future__ import annotations

import inspect
import numbers
from contextlib import ExitStack
from typing import TYPE_CHECKING

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from .backbones import resolve_transformer
from .checks import check_guidance_scale
from .guidance import _EXPANDED, PERTURBED, CAGConfig, PrefixShare, apply_cag, cag_combine
from .hooks import Coverage

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState


class CrossAttentionGuidance(BaseGuidance):
    """CFG plus Cross-Attention Guidance, as a diffusers guider.

    Three predictions per denoising step, each ``[B, C, T, H, W]`` (the denoiser's output):

    * ``v_c``  -- conditional (prompt embeddings),
    * ``v_u``  -- unconditional (negative prompt embeddings; only while CFG is on),
    * ``v_p``  -- perturbed conditional: the same conditional input through a model whose ``layers`` let each video
      query attend only to its own latent frame (and the text), i.e. difftrack's CAG processors.

    Combined as in :mod:`difftrack.guidance`::

        v = v_u + w (v_c - v_u) + s (v_c - v_p)      (CFG on: w = guidance_scale > 1)
        v = v_c + s (v_c - v_p)                      (CFG off)

    evaluated, as :func:`~difftrack.guidance.cag_hooks` folds it into a pipeline's own CFG combine, as
    ``v_c' = cag_combine(None, v_c, v_p, 1, s / w)`` (in fp32, cast back) then ``v_u + w (v_c' - v_u)`` -- the same
    value up to float rounding, and bitwise the library's result. ``s`` is ``config.scale_at(step, num_steps)``
    (schedule and step window of :class:`~difftrack.guidance.CAGConfig`); on steps where it is 0 the guider is
    exactly ``ClassifierFreeGuidance`` (no perturbed branch is computed).

    Batch layout: the perturbed branch rides in the conditional forward as a second batch slot, ``[cond,
    perturbed]`` (``2B`` rows), which is the layout of the library's hooks for Wan's sequential CFG; the
    unconditional forward stays ``B`` rows. So the modular loop runs two denoiser forwards per step (one without
    CFG), and :meth:`prepare_inputs` yields the ``pred_cond`` and ``pred_uncond`` batches only. (A separate
    ``B``-row forward for the perturbed branch would give the same values only up to rounding: on the CPU a row's
    result depends on the batch it is computed in.)

    Wan 2.2 modular pipelines (``transformer`` and ``transformer_2``, with ``guider`` and ``guider_2``): give each
    expert its guider (e.g. the same settings with the expert's CFG weight); each perturbs the denoiser it is handed,
    so CAG covers the steps of both experts, and :meth:`forward` checks that every layer was perturbed
    (``tests/test_experts.py``).

    The CAG processors, the batch-doubling hooks and (``shared_prefix=True``) the :class:`PrefixShare` hooks are on
    the denoiser only from :meth:`prepare_models` of the conditional batch until the end of that forward: a forward
    hook registered with ``always_call=True`` restores the original processors and removes every hook also when the
    forward raises; :meth:`cleanup_models` (and the next :meth:`prepare_models`) restore them too if the forward never
    ran.

    Args:
        guidance_scale: CFG weight ``w``, a finite number in ``(0, 50]``; CFG runs when ``w > 1`` (as in
            ``WanPipeline``).
        cag_scale: ``s``, in ``[0, 20]`` (0: plain CFG); :attr:`CAGConfig.scale`.
        layers: transformer block indices whose self-attention is perturbed (required).
        variant: ``"renormalized"`` (default) or ``"zero_after_softmax"`` (:data:`difftrack.guidance.VARIANTS`).
        schedule: ``"constant"`` or ``"linear_decay"`` (a callable schedule cannot be saved in a guider config).
        cag_start_step, cag_stop_step: CAG is on for steps ``cag_start_step <= i < cag_stop_step`` (``None``: to the
            end); checked against the run's step count at the first step.
        shared_prefix: run the blocks before the first CAG layer once for the conditional and perturbed slots
            (:class:`~difftrack.guidance.PrefixShare`; the library's default). Both settings match the library run
            with the same ``shared_prefix``.
        start, stop: fractions of the steps during which CFG is on (``BaseGuidance``); outside, ``v = v_c + s (v_c -
            v_p)``.
        enabled: ``False`` gives the conditional prediction only (no CFG, no CAG).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, guidance_scale: float = 5.0, cag_scale: float = 1.0, layers: list[int] | None = None,
                 variant: str = "renormalized", schedule: str = "constant", cag_start_step: int = 0,
                 cag_stop_step: int | None = None, shared_prefix: bool = True, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True):
        if layers is None:
            raise ValueError("layers=None; CrossAttentionGuidance needs the block indices to perturb, e.g. "
                             "layers=[13, 17, 21]")
        if callable(schedule):
            raise ValueError(f"schedule={schedule!r} is a callable; allowed in a guider (its config is saved as "
                             f"JSON): 'constant' or 'linear_decay'")
        check_guidance_scale(guidance_scale, positive=True)  # the one rule (difftrack.checks); CFG runs when > 1
        if not isinstance(shared_prefix, bool):
            raise ValueError(f"shared_prefix={shared_prefix!r}; allowed: True or False")
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"{name}={v!r}; allowed: a fraction of the denoising steps in [0, 1]")
        # validates layers, scale, variant, schedule and the step window, with messages naming the allowed values
        self.cag_config = CAGConfig(layers=layers, scale=cag_scale, variant=variant, schedule=schedule,
                                    start_step=cag_start_step, stop_step=cag_stop_step)
        super().__init__(start, stop, enabled)
        self.guidance_scale = float(guidance_scale)
        self.shared_prefix = shared_prefix
        self._stack: ExitStack | None = None  # the CAG installation of the current conditional forward
        self._perturbed_slot = False  # the conditional forward of this step carries the perturbed slot
        self._coverage: Coverage | None = None  # which layers the perturbed slot of this step went through

    @classmethod
    def from_cag_config(cls, config: CAGConfig, guidance_scale: float = 5.0, shared_prefix: bool = True,
                        start: float = 0.0, stop: float = 1.0) -> "CrossAttentionGuidance":
        """The guider of a :class:`~difftrack.guidance.CAGConfig` (the library's CAG settings)."""
        if not isinstance(config, CAGConfig):
            raise ValueError(f"config must be a CAGConfig; got {type(config).__name__}")
        d = config.to_dict()  # a callable schedule raises here: it cannot be a guider config
        return cls(guidance_scale=guidance_scale, cag_scale=d["scale"], layers=d["layers"], variant=d["variant"],
                   schedule=d["schedule"], cag_start_step=d["start_step"], cag_stop_step=d["stop_step"],
                   shared_prefix=shared_prefix, start=start, stop=stop)

    # ------------------------------------------------------------------------------------------------ state
    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        # at every step, not only step 0: Wan 2.2's low-noise guider (guider_2) first runs mid-loop
        self.cag_config.check_steps(num_inference_steps)
        super().set_state(step, num_inference_steps, timestep)
        self._perturbed_slot = False

    def cag_scale_now(self) -> float:
        """``s`` at the current step (0 when disabled); needs :meth:`set_state`."""
        if not self._enabled:
            return 0.0
        if self._num_inference_steps is None:
            raise RuntimeError("CrossAttentionGuidance: call set_state(step, num_inference_steps, timestep) before "
                               "running a step")
        return self.cag_config.scale_at(self._step, self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled or not self.guidance_scale > 1.0:
            return False
        if self._num_inference_steps is None:
            return True
        n = self._num_inference_steps
        return int(self._start * n) <= self._step < int(self._stop * n)

    @property
    def num_conditions(self) -> int:
        """Denoiser forwards per step: ``pred_cond`` (with the perturbed slot when CAG is on) and, with CFG,
        ``pred_uncond``."""
        return 2 if self._is_cfg_enabled() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # ------------------------------------------------------------------------------------------------ batches
    def _identifiers(self) -> list[tuple[int, str]]:
        return list(enumerate(self._input_predictions[:self.num_conditions]))

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list["BlockState"]:
        return [self._prepare_batch(data, i, name) for i, name in self._identifiers()]

    def prepare_inputs_from_block_state(self, data: "BlockState",
                                        input_fields: dict[str, str | tuple[str, str]]) -> list["BlockState"]:
        return [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in self._identifiers()]

    # ------------------------------------------------------------------------------------------------- models
    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Before the conditional forward of a step with ``s != 0``: install the CAG processors (perturbed slot 1 of
        2), the hooks doubling the batch, and the shared prefix; all removed when that forward ends."""
        self._restore()  # leftovers of a forward that never ran
        super().prepare_models(denoiser)
        if not (self.is_conditional and self.cag_scale_now() != 0):
            return
        transformer = resolve_transformer(denoiser)
        sig = inspect.signature(transformer.forward)
        stack = ExitStack()
        try:
            state = stack.enter_context(apply_cag(transformer, self.cag_config))
            state.set_slots(2, [1])
            self._coverage = state.coverage = Coverage("CrossAttentionGuidance", (PERTURBED,),
                                                       self.cag_config.layers, steps=[self._step], verb="perturbed")
            state.current = self._step
            share = (stack.enter_context(PrefixShare(transformer, min(self.cag_config.layers)))
                     if self.shared_prefix else None)

            def double(module, args, kwargs):  # [cond] -> [cond, cond]: the second slot is the perturbed one
                self._coverage.call(self._step)
                bound = sig.bind(*args, **kwargs).arguments
                n = bound["hidden_states"].shape[0]
                for name in _EXPANDED:
                    v = bound.get(name)
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                        bound[name] = torch.cat([v, v])
                if share is not None:
                    share.rows = (2 * n, n)
                return (), dict(bound)

            def restore(module, args, kwargs, output):  # always_call: also when the forward raises
                self._restore()
                return None

            for hook in (transformer.register_forward_pre_hook(double, with_kwargs=True),
                         transformer.register_forward_hook(restore, with_kwargs=True, always_call=True)):
                stack.callback(hook.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._perturbed_slot = True

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._restore()

    def _restore(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    # ---------------------------------------------------------------------------------------------- combine
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        """Combine the step's predictions.

        Args:
            pred_cond: ``[2B, ...]`` ``[v_c, v_p]`` when CAG is on this step, else ``[B, ...]`` ``v_c``.
            pred_uncond: ``[B, ...]`` ``v_u`` when CFG is on, else ``None``.

        Returns:
            ``GuiderOutput(pred [B, ...], pred_cond = v_c [B, ...], pred_uncond)``.
        """
        cfg = self._is_cfg_enabled()
        if cfg and pred_uncond is None:
            raise ValueError("CFG is on this step but pred_uncond is None")
        s = self.cag_scale_now()
        if not self._perturbed_slot and s != 0:
            raise RuntimeError(f"CAG is on at step {self._step} (scale {s}) but the conditional forward carried no "
                               f"perturbed slot: run the denoiser between prepare_models and cleanup_models")
        if self._perturbed_slot:
            self._coverage.check()  # each layer's attention of the perturbed slot was perturbed at this step
            if pred_cond.shape[0] % 2:
                raise ValueError(f"pred_cond has {pred_cond.shape[0]} rows; expected [cond, perturbed] halves")
            v_c, v_p = pred_cond.float().chunk(2)
            folded = s / self.guidance_scale if cfg else s  # as cag_hooks: the CFG combine below multiplies by w
            guided = cag_combine(None, v_c, v_p, 1.0, folded).to(pred_cond.dtype)
            pred_cond = pred_cond.chunk(2)[0]
        else:
            guided = pred_cond
        pred = pred_uncond + self.guidance_scale * (guided - pred_uncond) if cfg else guided
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
