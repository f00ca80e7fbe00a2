"""LLaVA-1.5: CLIP resize + center crop, `<image>` markers expanded in the prompt, a shared `[BOS, image]` prefix,
maps from the LM's attention to the image positions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vicrop_jax.families._base import Family, PromptArrays, ReadAttention, expand_image_markers, image_attention
from vicrop_jax.nn.llama import ATTENTION_PROBS
from vicrop_jax.nn.llava import Llava, LlavaConfig
from vicrop_jax.prompts import llava_prompt
from weights_conversion.tables import LLAVA_KEY_ALIASES, llava_table

IMAGE_MARKER = "<image>"


@dataclasses.dataclass(frozen=True)
class LlavaFamily(Family):
    def prompt(self, question: str, num_images: int = 1) -> str:
        return llava_prompt(question, num_images)

    def prompt_inputs(self, model, prompt: str, num_images: int):
        """Each `<image>` marker of the prompt becomes one position per visual token; no extra image inputs."""
        counts = [model.config.tokens_per_image] * num_images
        return expand_image_markers(model.tokenizer.encode(prompt), model.config.image_token_id, counts,
                                    IMAGE_MARKER, "llava_prompt"), ()

    def prefix_tokens(self, model) -> int:
        return self.prompt_inputs(model, IMAGE_MARKER, 1)[0].index(model.config.image_token_id)

    def processor_box(self, box: jax.Array) -> jax.Array:
        """CLIP resizes the shortest edge and center-crops a square: the box's centered square is what it keeps."""
        width, height = box[2] - box[0], box[3] - box[1]
        side = jnp.minimum(width, height)
        left = box[0] + (width - side) // 2
        top = box[1] + (height - side) // 2
        return jnp.stack([left, top, left + side, top + side])

    def attention_map(self, config: LlavaConfig, read: ReadAttention, query_row, prompt: PromptArrays, method):
        """The LM layer's attention from the query row to the image's patches (CLS dropped where it is kept)."""
        patches = image_attention(read(ATTENTION_PROBS), query_row, prompt, config.image_token_id,
                                  config.vision.num_patches, int(config.keep_cls_feature), method.heads)
        grid = config.vision.grid_size
        return patches.reshape(grid, grid).astype(jnp.float32)


LLAVA = LlavaFamily(name="llava", config_class=LlavaConfig, module_class=Llava, conversion_table=llava_table,
                    default_map_layer=14, key_aliases=LLAVA_KEY_ALIASES)
