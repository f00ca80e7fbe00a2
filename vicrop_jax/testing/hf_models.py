"""Tiny random Hugging Face checkpoints, written with transformers' own `save_pretrained`.

They go through the same loading path as a real checkpoint: config.json, (sharded) safetensors,
tokenizer.json built with `tokenizers`, preprocessor_config.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BlipImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from vicrop_jax.testing.checkpoints import CLIP_MEAN, CLIP_STD, SPECIAL_TOKENS, word_level_tokenizer

WORDS = (
    "USER ASSISTANT : . , ? ! Answer the question using a single word or phrase What is color of "
    "Write general description image shape digit letter red green blue yellow small large left right "
    "top bottom in on and there how many Question Short Yes No Is"
).split()
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")


def noise_image(width: int = 150, height: int = 110, seed: int = 0) -> Image.Image:
    """A random RGB image: maps and answers of random models on it are far from uniform."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), np.uint8))


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
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=16,
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


PROCESSOR_LAYOUTS = ("image_processor", "processor", "both")


def _save_processor(folder: Path, image_processor, tokenizers: dict, processor_class, layout: str, **options):
    """What transformers writes for the processor: `image_processor` (preprocessor_config.json, as every checkpoint
    published before transformers 5), `processor` (processor_config.json with the image processor nested, as
    `processor.save_pretrained` writes in transformers 5) or `both`."""
    if layout not in PROCESSOR_LAYOUTS:
        raise ValueError(f"layout must be one of {PROCESSOR_LAYOUTS}, got {layout!r}")
    if layout in ("processor", "both"):
        processor_class(image_processor=image_processor, **tokenizers, **options).save_pretrained(folder)
    if layout in ("image_processor", "both"):
        image_processor.save_pretrained(folder)
        for name, tokenizer in tokenizers.items():
            tokenizer.save_pretrained(folder if name == "tokenizer" else folder / name)


def save_llava(folder: Path, config: LlavaConfig, seed: int = 0, max_shard_size: str | None = None,
               layout: str = "image_processor"):
    """Random-weight LLaVA saved as a HF checkpoint; returns the eager float32 torch model."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    _save_processor(folder, image_processor, {"tokenizer": make_tokenizer(config.text_config.vocab_size)},
                    LlavaProcessor, layout, patch_size=config.vision_config.patch_size,
                    vision_feature_select_strategy=config.vision_feature_select_strategy)
    return model


QFORMER_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
BLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
BLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make_qformer_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer ([CLS] text [SEP]) for the Q-Former's reading of the prompt."""
    vocab = QFORMER_SPECIAL + [w.lower() for w in dict.fromkeys(WORDS + ["Question", "Short"])]
    vocab += [f"q{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in QFORMER_SPECIAL])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )


def instructblip_config(*, image_size: int = 28, num_query_tokens: int = 4, num_kv_heads: int = 2):
    vision = InstructBlipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=14, initializer_range=0.02,  # the default 1e-10 makes features ~0
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=80, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        cross_attention_frequency=1, pad_token_id=0, initializer_range=0.3,  # non-uniform cross-attention
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, vocab_size=128, initializer_range=0.2, bos_token_id=1,
        eos_token_id=2, pad_token_id=4,
    )
    return InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=num_query_tokens,
        image_token_index=IMAGE_TOKEN_ID,
    )


def save_instructblip(folder: Path, config, seed: int = 0, layout: str = "image_processor"):
    """Random-weight InstructBLIP-Vicuna with both tokenizers and the BLIP processor config."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the queries to zero; random ones make tests sharper
        model.query_tokens.normal_()
    model.save_pretrained(folder)
    size = config.vision_config.image_size
    image_processor = BlipImageProcessor(size={"height": size, "width": size}, image_mean=BLIP_MEAN, image_std=BLIP_STD)
    tokenizers = {"tokenizer": make_tokenizer(config.text_config.vocab_size),
                  "qformer_tokenizer": make_qformer_tokenizer(config.qformer_config.vocab_size)}
    _save_processor(folder, image_processor, tokenizers, InstructBlipProcessor, layout,
                    num_query_tokens=config.num_query_tokens)
    return model


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<unk>"]
QWEN_WORDS = WORDS + "system You are helpful assistant user".split()


def make_qwen_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen2.5-VL's special tokens (no BOS, as Qwen's)."""
    vocab = QWEN_SPECIAL + list(dict.fromkeys(QWEN_WORDS))
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")


def qwen2_5_vl_config(*, width: int = 32, num_heads: int = 4, num_kv_heads: int = 2, text_layers: int = 2,
                      mrope_section=(2, 1, 1), vision_width: int = 32, vision_heads: int = 2, depth: int = 3,
                      fullatt_block_indexes=(1,), window_size: int = 56, vocab_size: int = 128,
                      out_hidden_size: int | None = None, initializer_range: float = 0.2) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL-shaped config at toy size (patch 14, merge 2, windows of `window_size` pixels). The large
    default `initializer_range` keeps a toy model's attention far from uniform; wide, deep configs need the
    checkpoints' own 0.02, or their attention saturates (ratios of 1e-30 / 1e30 in rel-att)."""
    token = QWEN_SPECIAL.index
    text = dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=text_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, vocab_size=vocab_size, initializer_range=initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
        bos_token_id=None, eos_token_id=token("<|im_end|>"), pad_token_id=token("<|endoftext|>"),
    )
    vision = dict(
        depth=depth, hidden_size=vision_width, intermediate_size=2 * vision_width, num_heads=vision_heads,
        out_hidden_size=out_hidden_size or width, fullatt_block_indexes=list(fullatt_block_indexes),
        window_size=window_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        initializer_range=initializer_range,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=token("<|image_pad|>"),
                            video_token_id=token("<unk>"), vision_start_token_id=token("<|vision_start|>"),
                            vision_end_token_id=token("<|vision_end|>"))


def save_qwen2_5_vl(folder: Path, config: Qwen2_5_VLConfig, seed: int = 0, max_shard_size: str | None = None,
                    max_pixels: int = 64 * 28 * 28):
    """Random-weight Qwen2.5-VL with its tokenizer and image processor (preprocessor_config.json: the video
    processor of processor_config.json needs torchvision); returns the eager float32 torch model."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=max_pixels).save_pretrained(folder)
    make_qwen_tokenizer(config.text_config.vocab_size).save_pretrained(folder)
    return model
