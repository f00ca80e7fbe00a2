"""Qwen2.5-VL: the window-attention vision tower at the image's own resolution, merged tokens in place of the
`<|image_pad|>` placeholders, and a Qwen2 decoder (the LLaMA decoder with biased q/k/v and multimodal RoPE).

Axis letters: B batch, T tokens, M merged image tokens (all images of a prompt, padded), D LM width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.nn._attention import AttentionKernel
from vicrop_jax.nn._config import MAP_LAYER_KEY, check_supported, get_rope_parameters, refuse_unhandled
from vicrop_jax.nn._merge import LanguageModelMethods
from vicrop_jax.nn.llama import KVCache, LlamaConfig, LlamaForCausalLM
from vicrop_jax.nn.qwen_vit import QwenVisionConfig, QwenVisionTransformer, VisionPatches

# Attributes of a Qwen2.5-VL config.json that belong to the composite model; before transformers 5 the text
# model's attributes sat beside them at the top level instead of in `text_config`.
COMPOSITE_KEYS = frozenset({
    "model_type", "text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id", MAP_LAYER_KEY,
})
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # metadata that may sit at either level
TEXT_KEYS = frozenset({
    "model_type", "hidden_act", "rope_parameters", "rope_theta", "rope_scaling", "vocab_size", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "max_position_embeddings", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types",
})


def qwen2_text_config(hf: Mapping[str, Any]) -> LlamaConfig:
    """A Qwen2 decoder (`text_config` of Qwen2.5-VL) as the LLaMA decoder's config: q/k/v with bias, o without,
    head_dim = hidden_size / heads, RoPE split over the (t, h, w) axes by `mrope_section`."""
    check_supported(hf, "text_config", {
        "model_type": ("qwen2_5_vl_text", "qwen2_5_vl"), "hidden_act": ("silu", None),
        "use_sliding_window": (False, None),
    })
    refuse_unhandled(hf, "text_config", TEXT_KEYS | COMPOSITE_KEYS)
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"text_config.layer_types {sorted(layer_types)} is not supported by vicrop_jax: only "
                         "full attention (use_sliding_window false, as every published Qwen2.5-VL)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type")) == "mrope":  # the name before transformers 5
        rope = {**rope, "rope_type": "default"}
        rope.pop("type", None)
    section = rope.pop("mrope_section", None)
    if section is None:
        raise ValueError("text_config.rope_parameters has no mrope_section: a Qwen2.5-VL checkpoint names how its "
                         "rotary frequencies split over the temporal, height and width axes")
    rope.setdefault("rope_theta", hf.get("rope_theta", 1000000.0))  # transformers' default for Qwen2.5-VL
    rope = get_rope_parameters({"rope_parameters": rope})
    if rope["rope_type"] != "default":
        raise ValueError(f"text_config rope type {rope['rope_type']!r} is not supported for Qwen2.5-VL (default only)")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if 2 * sum(section) != width // heads:
        raise ValueError(f"text_config mrope_section {list(section)} covers {2 * sum(section)} rotary dimensions, "
                         f"but the heads have {width // heads}")
    eos = hf.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=width, intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=width // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope["rope_theta"],
        attention_bias=True, output_bias=False, mrope_section=tuple(section),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos, max_position_embeddings=hf.get("max_position_embeddings", 32768),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenVLConfig:
    vision: QwenVisionConfig
    text: LlamaConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    map_layer: int | None = None  # the checkpoint's own default map layer (config key vicrop_attention_layer)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "QwenVLConfig":
        check_supported(hf, "config", {"model_type": ("qwen2_5_vl",)})
        if "text_config" in hf:
            refuse_unhandled(hf, "config", COMPOSITE_KEYS | {"tie_word_embeddings", *TOKEN_ID_KEYS})
            text = {**hf["text_config"]}
            if "tie_word_embeddings" in hf:  # transformers 5 writes it at the top level (Qwen2.5-VL-3B ties)
                text["tie_word_embeddings"] = hf["tie_word_embeddings"]
            # token ids given to the composite config stay there in transformers 5; the text model's own win
            text = {**{key: hf[key] for key in TOKEN_ID_KEYS if key in hf}, **text}
        else:  # the layout of the published checkpoints (transformers 4): text attributes at the top level
            text = {key: value for key, value in hf.items() if key not in COMPOSITE_KEYS - {"model_type"}}
        return cls(
            vision=QwenVisionConfig.from_hf_config(hf["vision_config"]),
            text=qwen2_text_config(text),
            image_token_id=hf.get("image_token_id", 151655),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            map_layer=hf.get(MAP_LAYER_KEY),
        )

    @property
    def merge_unit(self) -> int:
        """Patches per merged token."""
        return self.vision.spatial_merge_size**2


class QwenVL(LanguageModelMethods, nn.Module):
    config: QwenVLConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual = QwenVisionTransformer(c.vision, **kw, attention_kernel=self.attention_kernel)
        self.language_model = LlamaForCausalLM(c.text, **kw, attention_kernel=self.attention_kernel)

    def encode_images(self, patches: VisionPatches) -> jax.Array:
        """The patches of one prompt's images (`VisionPatches`, padded) -> merged LM-space features [M, D], the
        real images' tokens first, in order."""
        return self.visual(patches)

    def __call__(self, input_ids: jax.Array, patches: VisionPatches, positions: jax.Array,
                 attention_layers: Sequence[int] = ()) -> jax.Array:
        """Full forward without a cache: input_ids [B,T], each prompt's patches (leading axis B), rotary positions
        [B,3,T] -> logits [B,T,V]."""
        features = self.visual(patches)
        embeds = self.embed(input_ids, features)
        cache = KVCache.zeros(self.config.text, input_ids.shape[0], input_ids.shape[1], self.dtype)
        hidden, _ = self.decode(embeds, cache, 0, attention_layers, positions.transpose(1, 0, 2))
        return self.logits(hidden)
