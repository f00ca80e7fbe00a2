"""What LLaVA and InstructBLIP share once image features exist: merging them into the token sequence
(as transformers' `masked_scatter` does, with static shapes) and the language-model entry points."""

from typing import Sequence

import jax
import jax.numpy as jnp

from vicrop_jax.nn.llama import KVCache


def merge_image_features(
    token_embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array, image_token_id: int
) -> jax.Array:
    """Put image_features [B,M,D] at the image-token positions of token_embeds [B,T,D], in order."""
    is_image = input_ids == image_token_id
    feature_index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, feature_index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(token_embeds.dtype), token_embeds)


class LanguageModelMethods:
    """The methods decoding and ViCrop call on a composite model with `language_model` and `config`."""

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return self.language_model.embed(input_ids)

    def embed(self, input_ids: jax.Array, image_features: jax.Array) -> jax.Array:
        """input_ids [B,T] with image placeholders, image_features [B,M,D] -> input embeddings [B,T,D]."""
        token_embeds = self.language_model.embed(input_ids)
        return merge_image_features(token_embeds, input_ids, image_features, self.config.image_token_id)

    def decode(
        self, inputs_embeds: jax.Array, cache: KVCache, offset=0, attention_layers: Sequence[int] = (),
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        return self.language_model(inputs_embeds, cache, offset, attention_layers, positions)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.logits(hidden)
