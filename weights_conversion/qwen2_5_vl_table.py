"""Key-mapping tables of Qwen2.5-VL: Flax path -> (HF key, transform).

transformers 5.24 `save_pretrained` of `Qwen2_5_VLForConditionalGeneration` writes the layout of the published
Qwen checkpoints (`visual.*`, `model.layers.*`, `model.embed_tokens.weight`, `model.norm.weight`,
`lm_head.weight`), undoing its in-memory module names (`model.visual.*`, `model.language_model.*`) on the way
out; the written layout is canonical here, and `QWEN_KEY_ALIASES` renames the in-memory one onto it when read.
`hf_prefix` is a tower's prefix without the trailing dot ("" for a bare `Qwen2_5_VisionTransformerPretrainedModel`
state dict).
"""

from __future__ import annotations

from typing import Any  # configs: vicrop_jax.nn's frozen dataclasses, read by attribute (no import cycle)

from weights_conversion.core import IDENTITY, Table, Transform, dense
from weights_conversion.tables import llama_table

QWEN_KEY_ALIASES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
)


def conv3d_as_dense(config: Any) -> Transform:
    """torch Conv3d weight [D, C, T, P, P] <-> Dense kernel [C*T*P*P, D]: the kernel covers the whole patch, and a
    row of pixel_values is that patch flattened channel-major, so the convolution is one matmul."""
    shape = (config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
    return Transform(
        "conv3d_as_dense",
        lambda w: w.reshape(w.shape[0], -1).T,
        lambda k: k.T.reshape(k.shape[1], *shape),
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def qwen_vision_table(config: Any, flax_prefix: tuple[str, ...], hf_prefix: str) -> Table:
    key = lambda name: _join(hf_prefix, name)  # noqa: E731
    table: Table = {
        flax_prefix + ("patch_embed", "proj", "kernel"): (key("patch_embed.proj.weight"), conv3d_as_dense(config)),
        flax_prefix + ("merger", "ln_q", "weight"): (key("merger.ln_q.weight"), IDENTITY),
        # transformers' merger.mlp is a Sequential: 0 Linear, 1 GELU, 2 Linear
        **dense(flax_prefix + ("merger", "mlp_0"), key("merger.mlp.0")),
        **dense(flax_prefix + ("merger", "mlp_2"), key("merger.mlp.2")),
    }
    for i in range(config.depth):
        fp, hp = flax_prefix + (f"blocks_{i}",), key(f"blocks.{i}")
        table[fp + ("norm1", "weight")] = (f"{hp}.norm1.weight", IDENTITY)
        table[fp + ("norm2", "weight")] = (f"{hp}.norm2.weight", IDENTITY)
        table |= dense(fp + ("attn", "qkv"), f"{hp}.attn.qkv") | dense(fp + ("attn", "proj"), f"{hp}.attn.proj")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table |= dense(fp + ("mlp", proj), f"{hp}.mlp.{proj}")
    return table


def qwen2_5_vl_table(config: Any) -> Table:
    """The whole model (`QwenVL`: `visual` and `language_model`), in the written layout."""
    return (
        qwen_vision_table(config.vision, ("visual",), "visual")
        | llama_table(config.text, ("language_model",), "model", "lm_head.weight")
    )
