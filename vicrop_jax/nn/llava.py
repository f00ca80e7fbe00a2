"""LLaVA-1.5: joins the CLIP vision tower, the projector and the LLaMA decoder.

Axis letters: B batch, I images per prompt, T tokens, M image feature positions (I * tokens
per image), D LM width. Image features replace the `<image>` token embeddings in order, as
transformers' `masked_scatter` does (see `_merge.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.nn._attention import AttentionKernel
from vicrop_jax.nn._config import MAP_LAYER_KEY, check_supported, refuse_unhandled
from vicrop_jax.nn._merge import LanguageModelMethods
from vicrop_jax.nn.clip_vit import ClipVisionConfig, ClipVisionTransformer
from vicrop_jax.nn.llama import KVCache, LlamaConfig, LlamaForCausalLM


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlavaConfig:
    vision: ClipVisionConfig
    text: LlamaConfig
    image_token_id: int
    vision_feature_layers: tuple[int, ...] = (-2,)
    keep_cls_feature: bool = False
    projector_bias: bool = True
    map_layer: int | None = None  # the checkpoint's own default map layer (config key vicrop_attention_layer)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "LlavaConfig":
        check_supported(
            hf,
            "config",
            {
                "model_type": ("llava",),
                "projector_hidden_act": ("gelu", None),
                "vision_feature_select_strategy": ("default", "full", None),
            },
        )
        # image_seq_length is what the processor expands <image> to; here it follows from the vision tower
        refuse_unhandled(hf, "config", {
            "model_type", "projector_hidden_act", "vision_feature_select_strategy", "vision_feature_layer",
            "image_token_id", "image_token_index", "text_config", "vision_config", "multimodal_projector_bias",
            MAP_LAYER_KEY, "image_seq_length", "vocab_size",
        }, {"tie_word_embeddings": (False,)})
        layers = hf.get("vision_feature_layer", -2)
        image_token_id = hf.get("image_token_id", hf.get("image_token_index"))
        if image_token_id is None:
            raise ValueError("config has neither image_token_id nor image_token_index")
        return cls(
            vision=ClipVisionConfig.from_hf_config(hf["vision_config"]),
            text=LlamaConfig.from_hf_config(hf["text_config"]),
            image_token_id=image_token_id,
            vision_feature_layers=tuple(layers) if isinstance(layers, (list, tuple)) else (layers,),
            keep_cls_feature=hf.get("vision_feature_select_strategy", "default") == "full",
            projector_bias=hf.get("multimodal_projector_bias", True),
            map_layer=hf.get(MAP_LAYER_KEY),
        )

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches + int(self.keep_cls_feature)

    @property
    def image_size(self) -> int:
        return self.vision.image_size


class LlavaProjector(nn.Module):
    width: int
    bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        self.linear_1 = nn.Dense(self.width, **kw)
        self.linear_2 = nn.Dense(self.width, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class Llava(LanguageModelMethods, nn.Module):
    config: LlavaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kernel = self.attention_kernel
        self.vision_tower = ClipVisionTransformer(c.vision, **kw, attention_kernel=kernel)
        self.multi_modal_projector = LlavaProjector(c.text.hidden_size, c.projector_bias, **kw)
        self.language_model = LlamaForCausalLM(c.text, **kw, attention_kernel=kernel)

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [n,H,W,C] -> LM-space features [n, tokens_per_image, D]."""
        c = self.config
        indices = [c.vision.hidden_state_index(layer) for layer in c.vision_feature_layers]
        hidden = self.vision_tower(pixel_values, indices)
        start = 0 if c.keep_cls_feature else 1
        features = jnp.concatenate([h[:, start:] for h in hidden], axis=-1)
        return self.multi_modal_projector(features)

    def __call__(
        self, input_ids: jax.Array, pixel_values: jax.Array, attention_layers: Sequence[int] = ()
    ) -> jax.Array:
        """Full forward without a cache: input_ids [B,T], pixel_values [B,I,H,W,C] -> logits [B,T,V]."""
        b, i = pixel_values.shape[:2]
        features = self.encode_images(pixel_values.reshape(b * i, *pixel_values.shape[2:]))
        features = features.reshape(b, i * features.shape[1], features.shape[2])
        embeds = self.embed(input_ids, features)
        cache = KVCache.zeros(self.config.text, b, input_ids.shape[1], self.dtype)
        hidden, _ = self.decode(embeds, cache, 0, attention_layers)
        return self.logits(hidden)
