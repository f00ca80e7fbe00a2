"""Key-mapping table of InstructBLIP (Vicuna): Flax path -> (HF key, transform).

transformers 5.24 `save_pretrained` of `InstructBlipForConditionalGeneration` writes the layout of the
published Salesforce checkpoints (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`,
`language_model.model.*`, `language_model.lm_head.weight`); that layout is canonical here. Neither needs
the aliases: they accept the `model.`-prefixed layout that transformers writes for its refactored
vision-language models (LLaVA since 4.52), should a version write InstructBLIP that way.
"""

from __future__ import annotations

from typing import Any  # configs: vicrop_jax.nn's frozen dataclasses, read by attribute (no import cycle)

from weights_conversion.core import CONV2D, IDENTITY, Table, dense, layer_norm
from weights_conversion.tables import llama_table

INSTRUCTBLIP_KEY_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.qformer.", "qformer."),
    ("model.query_tokens", "query_tokens"),
    ("model.language_projection.", "language_projection."),
    ("lm_head.", "language_model.lm_head."),
)


def eva_vision_table(config: Any, flax_prefix: tuple[str, ...], hf_prefix: str) -> Table:
    """The fused qkv maps as one Linear: kernel = W.T ([q|k|v] column blocks), bias [q_bias; 0; v_bias] as is."""
    emb = flax_prefix + ("embeddings",)
    table: Table = {
        emb + ("patch_embedding", "kernel"): (f"{hf_prefix}.embeddings.patch_embedding.weight", CONV2D),
        emb + ("patch_embedding", "bias"): (f"{hf_prefix}.embeddings.patch_embedding.bias", IDENTITY),
        emb + ("class_embedding",): (f"{hf_prefix}.embeddings.class_embedding", IDENTITY),
        emb + ("position_embedding",): (f"{hf_prefix}.embeddings.position_embedding", IDENTITY),
        **layer_norm(flax_prefix + ("post_layernorm",), f"{hf_prefix}.post_layernorm"),
    }
    for i in range(config.num_layers):
        fp, hp = flax_prefix + (f"layers_{i}",), f"{hf_prefix}.encoder.layers.{i}"
        table |= dense(fp + ("self_attn", "qkv"), f"{hp}.self_attn.qkv", config.qkv_bias)
        table |= dense(fp + ("self_attn", "projection"), f"{hp}.self_attn.projection")
        table |= dense(fp + ("mlp", "fc1"), f"{hp}.mlp.fc1") | dense(fp + ("mlp", "fc2"), f"{hp}.mlp.fc2")
        table |= layer_norm(fp + ("layer_norm1",), f"{hp}.layer_norm1")
        table |= layer_norm(fp + ("layer_norm2",), f"{hp}.layer_norm2")
    return table


def _qformer_attention(flax_prefix: tuple[str, ...], hf_prefix: str) -> Table:
    table: Table = {}
    for proj in ("query", "key", "value"):
        table |= dense(flax_prefix + ("attention", proj), f"{hf_prefix}.attention.{proj}")
    table |= dense(flax_prefix + ("output", "dense"), f"{hf_prefix}.output.dense")
    return table | layer_norm(flax_prefix + ("output", "LayerNorm"), f"{hf_prefix}.output.LayerNorm")


def qformer_table(config: Any, flax_prefix: tuple[str, ...], hf_prefix: str) -> Table:
    emb, hemb = flax_prefix + ("embeddings",), f"{hf_prefix}.embeddings"
    table: Table = {
        emb + ("word_embeddings", "embedding"): (f"{hemb}.word_embeddings.weight", IDENTITY),
        emb + ("position_embeddings", "embedding"): (f"{hemb}.position_embeddings.weight", IDENTITY),
        **layer_norm(emb + ("layernorm",), f"{hemb}.layernorm"),
    }
    for i in range(config.num_layers):
        fp, hp = flax_prefix + (f"layer_{i}",), f"{hf_prefix}.encoder.layer.{i}"
        table |= _qformer_attention(fp + ("attention",), f"{hp}.attention")
        if config.has_cross_attention(i):
            table |= _qformer_attention(fp + ("crossattention",), f"{hp}.crossattention")
        for suffix in ("", "_query"):
            table |= dense(fp + (f"intermediate{suffix}", "dense"), f"{hp}.intermediate{suffix}.dense")
            table |= dense(fp + (f"output{suffix}", "dense"), f"{hp}.output{suffix}.dense")
            table |= layer_norm(fp + (f"output{suffix}", "LayerNorm"), f"{hp}.output{suffix}.LayerNorm")
    return table


def instructblip_table(config: Any) -> Table:
    return (
        eva_vision_table(config.vision, ("vision_model",), "vision_model")
        | {("query_tokens",): ("query_tokens", IDENTITY)}
        | qformer_table(config.qformer, ("qformer",), "qformer")
        | dense(("language_projection",), "language_projection")
        | llama_table(config.text, ("language_model",), "language_model.model", "language_model.lm_head.weight")
    )
