"""Tiny random pipelines of the real diffusers classes, built entirely offline (no Hub, no downloads).

``build_tiny_pipeline(kind)`` returns a working ``CogVideoXPipeline``, ``WanPipeline`` (Wan 2.1; Wan 2.2 TI2V:
``"wan22_ti2v"``; Wan 2.2's two experts: ``"wan22"``), ``HunyuanVideoPipeline``, ``SkyReelsV2Pipeline`` /
``SkyReelsV2DiffusionForcingPipeline``, ``MochiPipeline``, ``HunyuanVideo15Pipeline`` or
``Cosmos2VideoToWorldPipeline`` whose every component (tokenizers included) is constructed in code from a config,
with random weights. They run a full denoising loop and VAE decode on CPU in about a second per step or less
(HunyuanVideo 1.5: ~0.7 s per transformer call, its 1000 + 256 + 729 condition tokens are fixed by the pipeline) and
round-trip through
``save_pretrained`` / ``from_pretrained``. They exist to test the capture against the real pipelines' calling
conventions (CFG layout, number of transformer calls per step, keyword names, dtypes), not to generate anything.

Sizes (:func:`tiny_size`): 9 frames of 32x32 pixels -> 3 latent frames of 4x4 -> 3 x 2 x 2 tokens (patch 2); Wan 2.2
TI2V (16x spatial VAE) 9 frames of 64x64, Mochi (6x temporal VAE) 13 frames of 32x32, to the same 3 x 2 x 2 tokens.

Tokenizers are small closed vocabularies (:data:`WORDS`) built with the ``tokenizers`` library:

* ``cogvideox``, ``wan``, ``wan22_ti2v``, ``skyreels_v2*``, ``mochi``: ``T5Tokenizer`` (a Unigram model with
  whole-word pieces plus single letters, so any lower-case ASCII prompt tokenizes).
* ``hunyuanvideo``: a word-level ``PreTrainedTokenizerFast`` for the Llama encoder (it knows every word of diffusers'
  default HunyuanVideo prompt template, plus its three special tokens) and a character-level ``CLIPTokenizer``. The
  template prefix is not 95 tokens long with this tokenizer, so pass :func:`hunyuan_prompt_template` as
  ``prompt_template=`` to crop it correctly (the default template also runs, it just crops differently).
* ``hunyuanvideo15``: a word-level tokenizer with Qwen2's chat tokens whose chat template puts the prompt at token
  108, where the pipeline's hard-coded crop starts (:func:`_qwen_tokenizer`), and diffusers' ``ByT5Tokenizer``
  (byte-level, no files). HunyuanVideo 1.5 tokens: 2 x 2 per frame (16x VAE, patch 1).
* ``cosmos``: the T5 tokenizer above; a test-only pass-through safety checker (:class:`PassThroughSafetyChecker`;
  ``cosmos_guardrail`` cannot be installed offline) and no padding-mask channel (diffusers resizes it with
  torchvision, not installed here).
"""
from __future__ import annotations

import inspect
import string
from pathlib import Path

import torch

KINDS = ("cogvideox", "wan", "hunyuanvideo", "wan22_ti2v", "skyreels_v2", "skyreels_v2_df", "mochi", "hunyuanvideo15",
         "cosmos")
# multi-expert pipelines, built by build_tiny_pipeline too but kept out of KINDS (the single-transformer cases)
EXPERT_KINDS = ("wan22",)
# Wan 2.2 A14B T2V's boundary_ratio: with the tiny scheduler (flow matching, shift 5) a 2-step run has timesteps
# 1000 (transformer) and 24 (transformer_2); 4 steps: 1000, 910 (transformer) and 717, 24 (transformer_2)
WAN22_BOUNDARY_RATIO = 0.875
WORDS = ("a red green blue yellow white black circle square triangle star moving left right up down on still "
         "background drifting scene camera panning zooming in out rotating and the of with").split()
FRAMES, HEIGHT, WIDTH = 9, 32, 32
_SIZES = {"wan22_ti2v": (9, 64, 64), "mochi": (13, 32, 32)}  # 3 latent frames of 4x4 with their VAEs


def tiny_size(kind: str) -> tuple[int, int, int]:
    """``(frames, height, width)`` of ``kind``'s tiny pipeline: 3 x 2 x 2 tokens (3 latent frames of 4 x 4)."""
    return _SIZES.get(kind, (FRAMES, HEIGHT, WIDTH))


def _t5_tokenizer(extra_words=()):
    from transformers import T5Tokenizer

    words = list(dict.fromkeys(list(WORDS) + list(extra_words)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [("\u2581", -5.0)] + [(c, -8.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5_config(vocab_size: int, d_model: int, umt5: bool = False):
    from transformers import T5Config, UMT5Config

    cls = UMT5Config if umt5 else T5Config
    return cls(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
               num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _t5_text(umt5: bool = False):
    """``(tokenizer, encoder)``: the tiny T5 tokenizer and text encoder (``d_model`` 16, seed 0): ``T5EncoderModel``
    (CogVideoX, Cosmos) or, with ``umt5``, ``UMT5EncoderModel`` (the Wan-like pipelines)."""
    from transformers import T5EncoderModel, UMT5EncoderModel

    tok = _t5_tokenizer()
    torch.manual_seed(0)
    return tok, (UMT5EncoderModel if umt5 else T5EncoderModel)(_t5_config(len(tok), 16, umt5=umt5)).eval()


# ---------------------------------------------------------------------------------------------- CogVideoX
def _cogvideox():
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    tok, text_encoder = _t5_text()
    torch.manual_seed(1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    torch.manual_seed(2)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=WIDTH // 8, sample_height=HEIGHT // 8,
        sample_frames=FRAMES, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226).eval()
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True, snr_shift_scale=3.0, clip_sample=False,
                                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       set_alpha_to_one=True)
    return CogVideoXPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)


# ---------------------------------------------------------------------------------------------------- Wan
def _wan_vae(**over):
    """A tiny ``AutoencoderKLWan`` (seed 1): Wan 2.1's layout, ``over`` replacing keyword arguments."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1)
    kw = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    return AutoencoderKLWan(**{**kw, **over}).eval()


def _wan_transformer(cls, channels: int = 16, seed: int = 2, **extra):
    """A tiny Wan-layout transformer of class ``cls`` (seed 2; Wan, SkyReels-V2; Wan 2.2's second expert: 4)."""
    torch.manual_seed(seed)
    return cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=channels,
               out_channels=channels, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
               rope_max_seq_len=32, **extra).eval()


def _wan(experts: int = 1):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tok, text_encoder = _t5_text(umt5=True)
    kw = dict(tokenizer=tok, text_encoder=text_encoder, vae=_wan_vae(),
              transformer=_wan_transformer(WanTransformer3DModel), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    if experts == 1:
        return WanPipeline(**kw)
    # Wan 2.2 A14B layout: a second expert (other random weights) for the low-noise steps, boundary at t = 875
    return WanPipeline(**kw, transformer_2=_wan_transformer(WanTransformer3DModel, seed=4),
                       boundary_ratio=WAN22_BOUNDARY_RATIO)


def _wan22_ti2v():
    """Wan 2.2 TI2V-5B layout: the Wan 2.2 VAE (residual, 2x2 patchified input, 16x spatial, 48 latent channels)
    and ``expand_timesteps=True`` (per-token timesteps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tok, text_encoder = _t5_text(umt5=True)
    vae = _wan_vae(base_dim=8, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                   scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                   latents_std=[1.0] * 48)
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae,
                       transformer=_wan_transformer(WanTransformer3DModel, 48),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), expand_timesteps=True)


# ------------------------------------------------------------------------------------------ SkyReels-V2
def _skyreels(df: bool):
    """``SkyReelsV2Pipeline`` (``df=False``) or ``SkyReelsV2DiffusionForcingPipeline`` (the fps embedding injected,
    as the diffusion-forcing call passes ``fps``); the Wan VAE; a flow UniPC scheduler (shift 8, the T2V value)."""
    from diffusers import (SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel,
                           UniPCMultistepScheduler)

    tok, text_encoder = _t5_text(umt5=True)
    cls = SkyReelsV2DiffusionForcingPipeline if df else SkyReelsV2Pipeline
    return cls(tokenizer=tok, text_encoder=text_encoder, vae=_wan_vae(),
               transformer=_wan_transformer(SkyReelsV2Transformer3DModel, inject_sample_info=df),
               scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=8.0))


# ------------------------------------------------------------------------------------------------- Mochi
def _mochi():
    """Mochi 1 layout: asymmetric streams (video 2 x 16, text 8 wide), the Mochi VAE (6x temporal, 8x spatial;
    32 channels: its group norms have 32 groups), the inverted-sigma flow scheduler of the release."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from transformers import T5EncoderModel

    tok = _t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(_t5_config(len(tok), 16)).eval()
    torch.manual_seed(1)
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             latent_channels=12, layers_per_block=(1,) * 5, add_attention_block=(False,) * 5).eval()
    torch.manual_seed(2)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=8,
        in_channels=12, text_embed_dim=16, time_embed_dim=4, max_sequence_length=256).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    return MochiPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                         transformer=transformer)


# ------------------------------------------------------------------------------------------- HunyuanVideo
_LLAMA_SPECIALS = ["<unk>", "<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _words_of(text: str) -> list[str]:
    """The lower-cased words and punctuation of ``text`` (the tiny word-level tokenizers' pre-tokenization)."""
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def _word_level(specials: list[str], words: list[str]):
    """``(tokenizers.Tokenizer, vocab)``: a lower-casing word-level model over ``specials``, then ``words``,
    :data:`WORDS` and single characters (any lower-case ASCII prompt tokenizes)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {sp: i for i, sp in enumerate(specials)}
    for w in list(words) + list(WORDS) + list(string.ascii_lowercase + string.digits + string.punctuation):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    return tk, vocab


def _llama_tokenizer():
    """Word-level tokenizer with Llama-3's chat special tokens and every word of the default HunyuanVideo template."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    text = DEFAULT_PROMPT_TEMPLATE["template"]
    for sp in _LLAMA_SPECIALS:
        text = text.replace(sp, " ")
    tk, vocab = _word_level(_LLAMA_SPECIALS, _words_of(text))
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<pad>", unk_token="<unk>")


def _clip_tokenizer():
    """Character-level CLIP BPE (no merges): every lower-case ASCII prompt tokenizes."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def hunyuan_prompt_template(tokenizer=None) -> dict:
    """diffusers' default HunyuanVideo prompt template with ``crop_start`` counted for the tiny Llama tokenizer
    (the real Llama-3 tokenizer gives 95; this word-level one gives fewer)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    tokenizer = tokenizer or _llama_tokenizer()
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    return {"template": DEFAULT_PROMPT_TEMPLATE["template"], "crop_start": len(tokenizer(prefix).input_ids)}


def _lm_size(tok) -> dict:
    """The tiny decoder-LM text encoders' size (Llama, Qwen2.5-VL). HunyuanVideo (1 and 1.5) pipelines read
    ``hidden_states[-3]`` (``num_hidden_layers_to_skip=2``): at least 2 layers."""
    return dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, pad_token_id=tok.pad_token_id)


def _hunyuanvideo():
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tok, tok2 = _llama_tokenizer(), _clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = LlamaModel(LlamaConfig(**_lm_size(tok), max_position_embeddings=512,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok2), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tok2.bos_token_id, eos_token_id=tok2.eos_token_id,
        pad_token_id=tok2.pad_token_id, projection_dim=8)).eval()
    torch.manual_seed(2)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    torch.manual_seed(3)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tok, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tok2)


# --------------------------------------------------------------------------------------- HunyuanVideo 1.5
QWEN_CROP = 108  # HunyuanVideo15Pipeline.prompt_template_encode_start_idx (hard-coded in its __init__)
_QWEN_SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fill|>"]


def _qwen_tokenizer():
    """Word-level tokenizer with Qwen2's chat special tokens and a chat template whose system part (everything
    before the user's prompt) is exactly :data:`QWEN_CROP` tokens, as Qwen2.5-VL's tokenizer makes it for
    HunyuanVideo 1.5's system message: the pipeline's hard-coded ``crop_start=108`` then crops exactly the template
    (filler tokens ``<|fill|>`` make up the difference)."""
    from diffusers import HunyuanVideo15Pipeline
    from transformers import PreTrainedTokenizerFast

    system = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    tk, _ = _word_level(_QWEN_SPECIALS, _words_of(system) + ["system", "user", "assistant"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    head = "<|im_start|>system {{ messages[0]['content'] }}<|im_end|> "
    n = len(tok(f"<|im_start|>system {system}<|im_end|> <|im_start|>user ").input_ids)
    if n > QWEN_CROP:
        raise RuntimeError(f"the tiny Qwen template prefix has {n} tokens, more than {QWEN_CROP}")
    tok.chat_template = (head + "<|fill|>" * (QWEN_CROP - n) + "<|im_start|>user {{ messages[1]['content'] }}"
                         "<|im_end|> {% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    return tok


def _hunyuanvideo15():
    from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5EncoderModel

    tok, tok2 = _qwen_tokenizer(), ByT5Tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(  # 3D (mrope) positions: sections of head_dim / 2
        **_lm_size(tok), max_position_embeddings=2048, bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})).eval()
    torch.manual_seed(1)
    text_encoder_2 = T5EncoderModel(_t5_config(len(tok2), 16)).eval()  # ByT5: 256 bytes + specials
    torch.manual_seed(2)
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 5,
                                      layers_per_block=1, spatial_compression_ratio=16,
                                      temporal_compression_ratio=4).eval()
    torch.manual_seed(3)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v").eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    return HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tok, transformer=transformer, vae=vae,
                                  scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tok2,
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0))


# ------------------------------------------------------------------------------------- Cosmos-Predict2
class PassThroughSafetyChecker:
    """Test-only stand-in for ``cosmos_guardrail.CosmosSafetyChecker`` (not installable offline) that lets every
    prompt and video pass, as diffusers' own Cosmos tests do. For the tiny random pipelines only: a pipeline loaded
    by :mod:`difftrack.backbones.cosmos` without the guardrail refuses generation instead."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video):
        return video


def _cosmos():
    from diffusers import Cosmos2VideoToWorldPipeline, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
    tok, text_encoder = _t5_text()
    vae = _wan_vae()  # Wan 2.1's VAE layout (seed 1)
    torch.manual_seed(2)
    # in_channels: 16 latent channels + the condition-mask channel. concat_padding_mask=False: the released
    # checkpoints append a padding channel too, which diffusers 0.42.1 resizes with torchvision (not installed here)
    transformer = CosmosTransformer3DModel(
        in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(16, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=False, extra_pos_embed_type=None).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    return Cosmos2VideoToWorldPipeline(text_encoder=text_encoder, tokenizer=tok, transformer=transformer, vae=vae,
                                       scheduler=scheduler, safety_checker=PassThroughSafetyChecker())


_BUILDERS = {"cogvideox": _cogvideox, "wan": _wan, "hunyuanvideo": _hunyuanvideo, "wan22_ti2v": _wan22_ti2v,
             "skyreels_v2": lambda: _skyreels(df=False), "skyreels_v2_df": lambda: _skyreels(df=True),
             "mochi": _mochi, "wan22": lambda: _wan(experts=2), "hunyuanvideo15": _hunyuanvideo15, "cosmos": _cosmos}


def build_tiny_pipeline(kind: str, path: str | Path | None = None):
    """A tiny random pipeline of the real diffusers classes, built offline.

    Args:
        kind: one of :data:`KINDS` (sizes: :func:`tiny_size`) or :data:`EXPERT_KINDS` (``"wan22"``: a
            ``WanPipeline`` with two experts, ``transformer`` and ``transformer_2`` of other random weights,
            ``boundary_ratio`` :data:`WAN22_BOUNDARY_RATIO`, as Wan 2.2 A14B).
        path: if given, the pipeline is also written there with ``save_pretrained`` (reload it with the pipeline
            class's ``from_pretrained(path)``).

    Returns:
        the pipeline (fp32, CPU, progress bar off).
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; allowed: {sorted(_BUILDERS)}")
    pipe = _BUILDERS[kind]()
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(str(path))
    return pipe


def build_tiny_modular_pipeline(kind: str = "wan", pipe=None, guider=None, guider_2=None):
    """A tiny ``WanModularPipeline`` (blocks: diffusers' Wan text-to-video denoise and VAE decode steps) on the
    components of the tiny ``WanPipeline`` of :func:`build_tiny_pipeline`, built offline.

    The modular text-encoder step is left out: diffusers 0.42.1's ``WanTextEncoderStep`` calls ``ftfy``
    unconditionally (a ``NameError`` without that package), so pass ``prompt_embeds`` / ``negative_prompt_embeds``
    ``[B, 512, 16]`` from the standard pipeline's ``encode_prompt(..., max_sequence_length=512)``.

    Args:
        kind: ``"wan"`` or ``"wan22"`` (diffusers' Wan 2.2 denoise step: ``transformer`` with ``guider`` at
            ``t >= boundary_ratio * num_train_timesteps``, ``transformer_2`` with ``guider_2`` below; the modular
            config's ``boundary_ratio`` default 0.875 is :data:`WAN22_BOUNDARY_RATIO`).
        pipe: a tiny ``WanPipeline`` of that kind whose ``transformer`` (``transformer_2``), ``vae`` and ``scheduler``
            are shared (the same objects); ``None`` builds one with ``build_tiny_pipeline(kind)``.
        guider: the ``guider`` component (``None``: diffusers' default, ``ClassifierFreeGuidance(guidance_scale=5)``;
            Wan 2.2: 4).
        guider_2: Wan 2.2's ``guider_2`` component (``None``: diffusers' default, ``ClassifierFreeGuidance(3)``).

    Returns:
        the modular pipeline (fp32, CPU, progress bar off). Call it with ``prompt_embeds``,
        ``negative_prompt_embeds``, ``num_frames``, ``height``, ``width``, ``num_inference_steps``, ``generator`` and
        ``output="latents"`` (``[B, 16, 3, 4, 4]``) or ``output="videos"``.
    """
    if kind not in ("wan", "wan22"):
        raise ValueError(f"unknown tiny modular pipeline kind {kind!r}; allowed: ['wan', 'wan22']")
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from diffusers.modular_pipelines.wan.decoders import WanVaeDecoderStep
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep
    from diffusers.modular_pipelines.wan.modular_blocks_wan22 import Wan22CoreDenoiseStep

    pipe = build_tiny_pipeline(kind) if pipe is None else pipe
    two = getattr(pipe, "transformer_2", None) is not None
    if type(pipe).__name__ != "WanPipeline" or two != (kind == "wan22"):
        raise ValueError(f"pipe must be a tiny WanPipeline of kind {kind!r} (build_tiny_pipeline({kind!r})); got "
                         f"{type(pipe).__name__}{' with transformer_2' if two else ''}")
    denoise = Wan22CoreDenoiseStep if two else WanCoreDenoiseStep
    blocks = SequentialPipelineBlocks.from_blocks_dict({"denoise": denoise, "decode": WanVaeDecoderStep})
    modular = blocks.init_pipeline()
    components = dict(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler)
    if two:
        components["transformer_2"] = pipe.transformer_2
        if modular.config.boundary_ratio != pipe.config.boundary_ratio:
            raise ValueError(f"the modular Wan 2.2 step's boundary_ratio {modular.config.boundary_ratio} differs "
                             f"from the pipeline's {pipe.config.boundary_ratio}")
    if guider is not None:
        components["guider"] = guider
    if guider_2 is not None:
        components["guider_2"] = guider_2
    modular.update_components(**components)
    todo = list(modular._blocks.sub_blocks.values())  # (.blocks is a copy)
    while todo:  # the denoising loop is nested (ModularPipeline.set_progress_bar_config only sees the top level)
        b = todo.pop()
        if hasattr(b, "set_progress_bar_config"):
            b.set_progress_bar_config(disable=True)
        todo.extend(getattr(b, "sub_blocks", {}).values())
    return modular
