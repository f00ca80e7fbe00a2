"""InstructBLIP (Vicuna): BLIP resize, query placeholders in front of the prompt, a Q-Former that reads the prompt
(so no prefix is shared), maps from the LM's attention to the query tokens times the Q-Former's cross-attention."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from vicrop_jax._tokenizer import Tokenizer
from vicrop_jax.families._base import Family, PromptArrays, ReadAttention, image_attention
from vicrop_jax.nn.decoding import pad_prompt
from vicrop_jax.nn.instructblip import InstructBlip, InstructBlipConfig
from vicrop_jax.nn.llama import ATTENTION_PROBS
from vicrop_jax.nn.qformer import CROSS_ATTENTION_PROBS
from vicrop_jax.prompts import instructblip_prompt
from weights_conversion.instructblip_table import INSTRUCTBLIP_KEY_ALIASES, instructblip_table

QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"
QFORMER_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class InstructBlipFamily(Family):
    def init_inputs(self, config: InstructBlipConfig) -> tuple[np.ndarray, ...]:
        qformer_text = (np.zeros((1, 1), np.int32), np.ones((1, 1), np.int32))
        return super().init_inputs(config) + qformer_text

    def read_extra_tokenizer(self, folder: Path) -> Tokenizer:
        return Tokenizer.from_folder(folder / QFORMER_TOKENIZER_FOLDER)

    def prompt(self, question: str, num_images: int = 1) -> str:
        return instructblip_prompt(question)

    def prompt_inputs(self, model, prompt: str, num_images: int):
        """The query placeholders of all images first, then the tokenized prompt (BOS included), as transformers'
        processor builds them; the Q-Former reads the same prompt with its own tokenizer, padded to a bucket."""
        config = model.config
        ids = [config.image_token_id] * config.tokens_per_image * num_images + model.tokenizer.encode(prompt)
        padded, length = pad_prompt(model.extra_tokenizer.encode(prompt), bucket=QFORMER_BUCKET)
        mask = (np.arange(len(padded)) < length).astype(np.int32)
        return ids, (np.tile(padded, (num_images, 1)), np.tile(mask, (num_images, 1)))

    def prompt_problem(self, model, prompt: str) -> str | None:
        tokens, limit = len(model.extra_tokenizer.encode(prompt)), model.config.qformer.max_position_embeddings
        return f"question too long: {tokens} Q-Former tokens, model allows {limit}" if tokens > limit else None

    def check_map_options(self, config: InstructBlipConfig, method) -> None:
        count = config.qformer.num_cross_attention_layers
        if not 0 <= method.qformer_layer < count:
            raise ValueError(
                f"qformer_layer {method.qformer_layer} is out of range: this Q-Former has cross-attention "
                f"layers 0..{count - 1} (counted over cross-attention layers only)"
            )

    def map_features(self, module, pixels, prompt: PromptArrays, method):
        qformer_ids, qformer_mask = prompt.image_text
        return module.encode_images(pixels[None], qformer_ids[None], qformer_mask[None], (method.qformer_layer,))

    def attention_map(self, config: InstructBlipConfig, read: ReadAttention, query_row, prompt: PromptArrays,
                      method):
        """(LM row to the 32 query tokens) @ (Q-Former cross-attention from the queries to the patches, CLS
        dropped), both head means."""
        lm = image_attention(read(ATTENTION_PROBS), query_row, prompt, config.image_token_id,
                             config.num_query_tokens, 0, method.heads)
        qformer = read(CROSS_ATTENTION_PROBS)[:, :, 1:].mean(0)
        grid = config.vision.grid_size
        return (lm @ qformer).reshape(grid, grid).astype(jnp.float32)


INSTRUCTBLIP = InstructBlipFamily(
    name="instructblip", config_class=InstructBlipConfig, module_class=InstructBlip,
    conversion_table=instructblip_table, default_map_layer=15, key_aliases=INSTRUCTBLIP_KEY_ALIASES,
)
