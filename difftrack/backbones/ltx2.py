"""LTX-2 (``LTX2VideoTransformer3DModel``, the audio+video model of ``LTX2Pipeline``): captured on its **video
stream** only (CFG as one batch ``[uncond, cond]``, the first call of each step); no pipeline family (not run by
VideoRunner), no tracking, no CAG.

What is new for the method here, and what capture and matching mean:

* **An audio stream beside the video.** Every ``LTX2VideoTransformerBlock`` runs a video self-attention ``attn1``
  over the video tokens only, an audio self-attention ``audio_attn1`` over the audio tokens only, text
  cross-attentions for each, and audio-to-video / video-to-audio cross-attentions. Capture wraps ``attn1`` alone:
  q/k are the video tokens' (post-RMSNorm, post-RoPE), matching is between video frames as for LTX-Video; the
  audio stream's attentions are left untouched (never wrapped, never recorded), and the block features are the
  video hidden states of the block's ``(video, audio)`` output. Audio reaches the video tokens only through the
  a2v cross-attention, which is not a frame-to-frame attention and is not matched.
* **Extra guidance calls per step.** ``LTX2Pipeline`` calls the transformer on ``[uncond, cond]`` (CFG), then, at the
  same timestep, for spatio-temporal guidance (``stg_scale``: the video self-attention of the STG blocks skipped)
  and for modality isolation (``modality_scale``: a2v / v2a off). Only the first call of each step (the model
  itself, CFG pair) is captured (``first_call_only``); the guidance calls see perturbed models.
* **Patchified input.** ``hidden_states`` is ``[B, N, C]``; the grid comes from the call's ``num_frames`` /
  ``height`` / ``width`` (latent sizes, patch 1 in the released models). Calls whose video tokens are not that
  grid (keyframe / conditioning tokens appended, ``LTX2ConditionPipeline``) are refused. Tracking needs
  per-frame latents of a video VAE and an image-free transformer call, and CAG a single-call loop shape: both are
  refused, with the allowed backbones named.
"""
from __future__ import annotations

from . import BackboneAdapter, first_output, register
from .ltxvideo import patchified_grid

# forward(hidden_states [B, N, C], audio_hidden_states [B, Na, Ca], encoder_hidden_states,
#         audio_encoder_hidden_states, timestep, audio_timestep, sigma, audio_sigma, encoder_attention_mask,
#         audio_encoder_attention_mask, num_frames, height, width, fps, audio_num_frames, video_coords, ...)
register(BackboneAdapter(
    name="ltx2",
    class_names=("LTX2VideoTransformer3DModel",),
    grid=patchified_grid((10, 11, 12), "LTX-2"),
    self_attention=lambda b: b.attn1,  # the video self-attention; audio_attn1 is never wrapped
    block_video_output=first_output,  # (video hidden states, audio hidden states)
    cfg="batched",
    first_call_only=True,  # STG and modality-isolation calls at the same timestep are skipped
    trackable=False,  # patchified [B, N, C] input: no per-frame latents
    cag_attention=None,
))
