"""LTX-Video: captured (video-only self-attention, CFG as one batch); no pipeline family (not run by VideoRunner)."""
from __future__ import annotations

from . import BackboneAdapter, TokenGrid, _arg, _check_tokens, patch_sizes, register

# forward(hidden_states [B, N, C] already patchified by the pipeline, encoder_hidden_states, timestep,
#         encoder_attention_mask, num_frames, height, width, ...): ``num_frames/height/width`` are the latent sizes
# before patchifying (the released models use patch 1x1x1, so they equal the token grid). ``attn1`` is the
# video-only self-attention (RMSNorm across heads, RoPE before the head split); text by cross-attention ``attn2``.
# CFG is one batch [uncond, cond]. Calls with ``video_coords`` instead of sizes (LTXConditionPipeline, which can
# append conditioning tokens) have no regular grid and are refused.
def patchified_grid(positions: tuple[int, int, int], what: str):
    """``(model, args, kwargs) -> TokenGrid`` of a call on patchified latents ``hidden_states [B, N, C]`` whose
    ``num_frames`` / ``height`` / ``width`` arguments (latent sizes, at ``positions`` when positional) give the grid;
    ``what`` names the call in the errors (a missing size, or video tokens that are not that grid)."""
    def grid(model, args, kwargs) -> TokenGrid:
        x = _arg(args, kwargs, "hidden_states", 0)  # [B, N, C]
        f, h, w = (kwargs.get(k, args[i] if len(args) > i else None)
                   for i, k in zip(positions, ("num_frames", "height", "width")))
        if f is None or h is None or w is None:
            raise ValueError(f"{what} capture needs the num_frames=, height=, width= arguments of the transformer "
                             f"call (calls with video_coords only, as in the condition pipelines, are not supported)")
        pt, p = patch_sizes(model)
        g = TokenGrid(frames=int(f) // pt, rows=int(h) // p, cols=int(w) // p, text_len=0, text_first=False,
                      stride=p)
        return _check_tokens(g, x.shape[1], type(model).__name__)
    return grid


_ltx_grid = patchified_grid((4, 5, 6), "LTX-Video")


register(BackboneAdapter(
    name="ltxvideo",
    class_names=("LTXVideoTransformer3DModel",),
    grid=_ltx_grid,
    cfg="batched",
    trackable=False,  # patchified [B, N, C] input: no per-frame latents
    cag_attention=None,
))
