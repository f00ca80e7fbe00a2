"""Image features into the token sequence, as transformers' `masked_scatter` does, with static shapes."""

import jax
import jax.numpy as jnp


def merge_image_features(
    token_embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array, image_token_id: int
) -> jax.Array:
    """Put image_features [B,M,D] at the image-token positions of token_embeds [B,T,D], in order."""
    is_image = input_ids == image_token_id
    feature_index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, feature_index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(token_embeds.dtype), token_embeds)
