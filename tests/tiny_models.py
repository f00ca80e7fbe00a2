"""Tiny random Hugging Face checkpoints, written with transformers' own `save_pretrained`.

They go through the same loading path as a real checkpoint: config.json, (sharded) safetensors,
tokenizer.json built with `tokenizers`, preprocessor_config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from vicrop_jax._demo import CLIP_MEAN, CLIP_STD, SPECIAL_TOKENS, word_level_tokenizer

WORDS = (
    "USER ASSISTANT : . , ? ! Answer the question using a single word or phrase What is color of "
    "Write general description image shape digit letter red green blue yellow small large left right "
    "top bottom in on and there how many"
).split()
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The demo's word-level tokenizer, wrapped and saved by transformers itself."""
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level_tokenizer(WORDS, vocab_size),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def llava_config(
    *,
    image_size: int = 28,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_feature_layer=-2,
    select_strategy: str = "default",
    text_layers: int = 2,
    vision_layers: int = 2,
    vocab_size: int = 128,
    rope_parameters: dict | None = None,
    head_dim: int | None = None,
    width: int = 32,
    vision_width: int = 32,
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=16,
    )
    text = LlamaConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=text_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, vocab_size=vocab_size, initializer_range=0.2, pad_token_id=4,
        bos_token_id=1, eos_token_id=2, head_dim=head_dim,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
        image_seq_length=(image_size // 14) ** 2,
    )


def save_llava(folder: Path, config: LlavaConfig, seed: int = 0, max_shard_size: str | None = None):
    """Random-weight LLaVA saved as a HF checkpoint; returns the eager float32 torch model."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    make_tokenizer(config.text_config.vocab_size).save_pretrained(folder)
    size = config.vision_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ).save_pretrained(folder)
    return model
