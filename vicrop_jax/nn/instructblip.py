"""InstructBLIP (Vicuna): joins the EVA ViT, the Q-Former, the language projection and the LLaMA decoder.

Axis letters: B batch, I images per prompt, T tokens, Q query tokens per image, M image feature
positions (I * Q), D LM width.

How the query embeddings reach the LM (transformers 5.24): the input ids hold `num_query_tokens`
placeholder tokens (`image_token_index` of the config) per image, and the projected Q-Former outputs
replace their embeddings in order (`masked_scatter`; here `merge_image_features`). The processor puts
the placeholders before BOS, so the input_ids our pipeline builds are

    [image_token_id] * num_query_tokens * n_images + tokenizer(prompt)      # tokenizer adds BOS

e.g. `Question: {q} Short answer:` with (original, crop) gives [32 x <image>; 32 x <image>; BOS; text].
Each image goes through the ViT and the Q-Former on its own, with the same instruction
(the Q-Former's own tokenization of the prompt, no placeholders).
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
from vicrop_jax.nn.eva_vit import EvaVisionConfig, EvaVisionTransformer
from vicrop_jax.nn.llama import KVCache, LlamaConfig, LlamaForCausalLM
from vicrop_jax.nn.qformer import QFormerConfig, QFormerModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstructBlipConfig:
    vision: EvaVisionConfig
    qformer: QFormerConfig
    text: LlamaConfig
    num_query_tokens: int
    image_token_id: int
    map_layer: int | None = None  # the checkpoint's own default map layer (config key vicrop_attention_layer)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "InstructBlipConfig":
        check_supported(hf, "config", {"model_type": ("instructblip",)})
        text_type = hf.get("text_config", {}).get("model_type")
        if text_type != "llama":
            raise ValueError(
                f"InstructBLIP with a {text_type!r} language model is not supported: vicrop_jax implements only "
                "the Vicuna (LLaMA) variants (e.g. Salesforce/instructblip-vicuna-7b), not FlanT5 or OPT."
            )
        refuse_unhandled(hf, "config", {
            "model_type", "text_config", "vision_config", "qformer_config", "num_query_tokens", "image_token_id",
            "image_token_index", MAP_LAYER_KEY,
        }, {"use_decoder_only_language_model": (True,), "tie_word_embeddings": (False,)})
        image_token_id = hf.get("image_token_id", hf.get("image_token_index"))
        if image_token_id is None:
            raise ValueError(
                "config has no image_token_index: transformers 5 places the query embeddings at image-token "
                "placeholders; use a checkpoint whose config and tokenizer define the <image> token."
            )
        vision = EvaVisionConfig.from_hf_config(hf["vision_config"])
        qformer = QFormerConfig.from_hf_config(hf["qformer_config"])
        return cls(
            vision=vision,
            # transformers overrides the stored value with the vision width when it builds the config
            qformer=dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size),
            text=LlamaConfig.from_hf_config(hf["text_config"]),
            num_query_tokens=hf.get("num_query_tokens", 32),
            image_token_id=image_token_id,
            map_layer=hf.get(MAP_LAYER_KEY),
        )

    @property
    def tokens_per_image(self) -> int:
        return self.num_query_tokens

    @property
    def image_size(self) -> int:
        return self.vision.image_size


class InstructBlip(LanguageModelMethods, nn.Module):
    config: InstructBlipConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kernel = self.attention_kernel
        self.vision_model = EvaVisionTransformer(c.vision, **kw, attention_kernel=kernel)
        self.query_tokens = self.param(
            "query_tokens", nn.initializers.zeros, (1, c.num_query_tokens, c.qformer.hidden_size), self.param_dtype
        )
        self.qformer = QFormerModel(c.qformer, **kw, attention_kernel=kernel)
        self.language_projection = nn.Dense(c.text.hidden_size, **kw)
        self.language_model = LlamaForCausalLM(c.text, **kw, attention_kernel=kernel)

    def encode_images(
        self,
        pixel_values: jax.Array,
        qformer_input_ids: jax.Array,
        qformer_attention_mask: jax.Array,
        cross_attention_layers: Sequence[int] = (),
    ) -> jax.Array:
        """pixel_values [n,H,W,C], instruction ids/mask [n,Tq] -> LM-space features [n, num_query_tokens, D]."""
        image_embeds = self.vision_model(pixel_values)
        queries = jnp.broadcast_to(self.query_tokens, (pixel_values.shape[0], *self.query_tokens.shape[1:]))
        hidden = self.qformer(queries, qformer_input_ids, qformer_attention_mask, image_embeds, cross_attention_layers)
        return self.language_projection(hidden[:, : self.config.num_query_tokens])

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array,
        qformer_input_ids: jax.Array,
        qformer_attention_mask: jax.Array,
        attention_layers: Sequence[int] = (),
        cross_attention_layers: Sequence[int] = (),
    ) -> jax.Array:
        """Full forward without a cache: input_ids [B,T], pixel_values [B,I,H,W,C], instruction [B,Tq] -> logits.

        Every image of a prompt is encoded with that prompt's instruction; returns logits [B,T,V].
        """
        b, i = pixel_values.shape[:2]
        features = self.encode_images(
            pixel_values.reshape(b * i, *pixel_values.shape[2:]),
            jnp.repeat(qformer_input_ids, i, axis=0),
            jnp.repeat(qformer_attention_mask, i, axis=0),
            cross_attention_layers,
        )
        features = features.reshape(b, i * features.shape[1], features.shape[2])
        embeds = self.embed(input_ids, features)
        cache = KVCache.zeros(self.config.text, b, input_ids.shape[1], self.dtype)
        hidden, _ = self.decode(embeds, cache, 0, attention_layers)
        return self.logits(hidden)
