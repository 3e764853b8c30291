import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_cogvideox(rope: bool = False, layers: int = 2, seed: int = 0):
    """diffusers' test-sized CogVideoXTransformer3DModel (2 heads x 16; 3D RoPE needs head_dim divisible by 16)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=8, num_layers=layers, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=rope,
    ).eval()


def tiny_inputs(batch=2, frames=2, seed=0, rope=False, model=None, cfg=False):
    """Inputs of one call; ``cfg=True``: a CFG batch as the pipelines build it, the latents of the first half
    duplicated (``torch.cat([latents] * 2)``) with different text embeddings per half."""
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(batch, frames, 4, 8, 8, generator=g)
    if cfg:
        x = torch.cat([x[: batch // 2]] * 2)
    e = torch.randn(batch, 8, 8, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    kw = dict(hidden_states=x, encoder_hidden_states=e, timestep=t, return_dict=False)
    if rope:
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 4)),
                                                         grid_size=(4, 4), temporal_size=frames)
    return kw


@pytest.fixture
def tiny():
    return tiny_cogvideox


def with_schema(original: dict, schema: str) -> dict:
    """What writing a result record read from ``original`` must give back: ``"schema"`` first, then every key of
    ``original`` in its order. A file that already names a schema must name this one (files written before the
    records existed have none)."""
    assert original.get("schema", schema) == schema, f"file says schema {original.get('schema')!r}, record {schema!r}"
    return {"schema": schema, **{k: v for k, v in original.items() if k != "schema"}}


def processors(model) -> dict:
    """``{module name: attention processor}`` of every attention module of ``model`` (``attn_processors`` without
    diffusers' ``AttentionMixin``, which ``CosmosTransformer3DModel`` lacks)."""
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
