"""Key-mapping tables per tower: Flax path -> (HF key, transform). Composite models join them."""

from __future__ import annotations

from typing import Any  # configs: vicrop_jax.nn's frozen dataclasses, read by attribute (no import cycle)

from weights_conversion.core import CONV2D, IDENTITY, LINEAR, Table, dense, layer_norm

# transformers 5 writes LLaVA in the layout of the published llava-hf checkpoints; other layouts
# (its in-memory module names, older vision-tower nesting) are renamed onto it when read.
LLAVA_KEY_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("lm_head.", "language_model.lm_head."),
)


def clip_vision_table(config: Any, flax_prefix: tuple[str, ...], hf_prefix: str) -> Table:
    table: Table = {
        flax_prefix + ("embeddings", "patch_embedding", "kernel"): (
            f"{hf_prefix}.embeddings.patch_embedding.weight", CONV2D,
        ),
        flax_prefix + ("embeddings", "class_embedding"): (f"{hf_prefix}.embeddings.class_embedding", IDENTITY),
        flax_prefix + ("embeddings", "position_embedding", "embedding"): (
            f"{hf_prefix}.embeddings.position_embedding.weight", IDENTITY,
        ),
        **layer_norm(flax_prefix + ("pre_layrnorm",), f"{hf_prefix}.pre_layrnorm"),
        **layer_norm(flax_prefix + ("post_layernorm",), f"{hf_prefix}.post_layernorm"),
    }
    for i in range(config.num_layers):
        fp, hp = flax_prefix + (f"layers_{i}",), f"{hf_prefix}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table |= dense(fp + ("self_attn", proj), f"{hp}.self_attn.{proj}")
        table |= dense(fp + ("mlp", "fc1"), f"{hp}.mlp.fc1") | dense(fp + ("mlp", "fc2"), f"{hp}.mlp.fc2")
        table |= layer_norm(fp + ("layer_norm1",), f"{hp}.layer_norm1")
        table |= layer_norm(fp + ("layer_norm2",), f"{hp}.layer_norm2")
    return table


def llama_table(config: Any, flax_prefix: tuple[str, ...], hf_model: str, hf_head: str) -> Table:
    """hf_model: prefix of the decoder (`...model`), hf_head: key of the LM head weight."""
    table: Table = {
        flax_prefix + ("embed_tokens", "embedding"): (f"{hf_model}.embed_tokens.weight", IDENTITY),
        flax_prefix + ("norm", "weight"): (f"{hf_model}.norm.weight", IDENTITY),
    }
    if not config.tie_word_embeddings:
        table[flax_prefix + ("lm_head", "kernel")] = (hf_head, LINEAR)
    for i in range(config.num_layers):
        fp, hp = flax_prefix + (f"layers_{i}",), f"{hf_model}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            table |= dense(fp + ("self_attn", proj), f"{hp}.self_attn.{proj}", config.attention_bias)
        table |= dense(fp + ("self_attn", "o_proj"), f"{hp}.self_attn.o_proj", config.output_bias)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table |= dense(fp + ("mlp", proj), f"{hp}.mlp.{proj}", config.mlp_bias)
        table[fp + ("input_layernorm", "weight")] = (f"{hp}.input_layernorm.weight", IDENTITY)
        table[fp + ("post_attention_layernorm", "weight")] = (f"{hp}.post_attention_layernorm.weight", IDENTITY)
    return table


def llava_table(config: Any) -> Table:
    return (
        clip_vision_table(config.vision, ("vision_tower",), "vision_tower")
        | dense(("multi_modal_projector", "linear_1"), "multi_modal_projector.linear_1", config.projector_bias)
        | dense(("multi_modal_projector", "linear_2"), "multi_modal_projector.linear_2", config.projector_bias)
        | llama_table(config.text, ("language_model",), "language_model.model", "language_model.lm_head.weight")
    )
