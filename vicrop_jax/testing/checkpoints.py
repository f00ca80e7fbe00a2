"""Small LLaVA and Qwen2.5-VL checkpoints in Hugging Face format, written without torch or transformers.

The embedded models' training script (`benchmarks/synthetic/train.py`) writes vicrop-tiny and vicrop-tiny-qwen
with these, and the tests build their word-level tokenizers with them. The folders hold what a real checkpoint
holds (config.json, safetensors, tokenizer.json, preprocessor_config.json) and transformers loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

from vicrop_jax.families.qwen2_5_vl import QWEN2_5_VL
from vicrop_jax.nn.llava import Llava, LlavaConfig
from vicrop_jax.nn.qwen2_5_vl import QwenVL, QwenVLConfig
from weights_conversion.core import flax_to_hf
from weights_conversion.qwen2_5_vl_table import qwen2_5_vl_table
from weights_conversion.safetensors_io import write_checkpoint
from weights_conversion.tables import llava_table

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The Qwen processor's pixel bounds around 224 x 224: with min_pixels = max_pixels = 224**2, smart_resize's float
# rounding at the bounds sends 11% of square sides (100 to 1500 px) to 196 or 252 px; one merge unit (28 x 28 px)
# of margin on each side makes every square image 224 x 224 (16 x 16 patches, 8 x 8 LM tokens).
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 224 * 224 - 28 * 28, 224 * 224 + 28 * 28


def llava_hf_config(image_size: int = 112, width: int = 64, vocab_size: int = 96, *, vision_width: int | None = None,
                   vision_layers: int = 3, text_layers: int = 3, num_heads: int = 4, num_kv_heads: int = 2,
                   intermediate_factor: int = 2, vision_feature_layer: int = -2) -> dict:
    """A LLaVA-1.5-shaped config dict, as transformers writes it, at toy size."""
    vision_width = vision_width or width
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_id": SPECIAL_TOKENS.index("<image>"),
        "image_seq_length": (image_size // 14) ** 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": vision_feature_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_act": "quick_gelu", "hidden_size": vision_width,
            "intermediate_size": intermediate_factor * vision_width, "num_hidden_layers": vision_layers,
            "num_attention_heads": num_heads, "image_size": image_size, "patch_size": 14, "num_channels": 3,
            "layer_norm_eps": 1e-5, "projection_dim": vision_width,
        },
        "text_config": {
            "model_type": "llama", "hidden_act": "silu", "hidden_size": width,
            "intermediate_size": intermediate_factor * width, "num_hidden_layers": text_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": width // num_heads,
            "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 4, "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "pretraining_tp": 1,
        },
    }


def word_level_tokenizer(words: list[str], vocab_size: int) -> Tokenizer:
    """Specials, then `words`, then filler words up to vocab_size; splits on whitespace/punctuation, adds BOS."""
    vocab = SPECIAL_TOKENS + words
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


def write_word_tokenizer(folder: Path, words: list[str], vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json of `word_level_tokenizer`."""
    word_level_tokenizer(words, vocab_size).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 2048,
    }, indent=2))


def write_llava_checkpoint(folder: str | Path, hf_config: dict, params, words: list[str]) -> Path:
    """Params of `Llava` as a Hugging Face LLaVA folder (config, safetensors, word tokenizer, CLIP processor)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlavaConfig.from_hf_config(hf_config)
    write_checkpoint(flax_to_hf(llava_table(config), params), folder)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_word_tokenizer(folder, words, config.text.vocab_size)
    size = config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }, indent=2))
    return folder


def init_llava_params(hf_config: dict, seed: int):
    """Fresh Flax parameters of the LLaVA described by `hf_config`."""
    config = LlavaConfig.from_hf_config(hf_config)
    ids = np.full((1, config.tokens_per_image + 1), config.image_token_id, np.int32)
    pixels = np.zeros((1, 1, config.image_size, config.image_size, 3), np.float32)
    return Llava(config).init(jax.random.PRNGKey(seed), ids, pixels)["params"]


# Qwen2.5-VL's special tokens (its chat template and image markers, `<|video_pad|>` for the config's
# video_token_id), then the word-level model's unknown token; no BOS, as Qwen's tokenizer has none.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<unk>"]
QWEN_PAD, QWEN_EOS = "<|endoftext|>", "<|im_end|>"


def qwen_hf_config(*, width: int = 192, vocab_size: int = 64, text_layers: int = 4, num_heads: int = 4,
                   num_kv_heads: int = 2, intermediate_factor: int = 3, mrope_section=(6, 9, 9),
                   rope_theta: float = 1000000.0, vision_width: int = 128, vision_layers: int = 0,
                   vision_heads: int = 4, window_size: int = 112, fullatt_block_indexes=()) -> dict:
    """A Qwen2.5-VL config dict, as transformers 5 writes it, at toy size (patch 14, merge 2, float32). A vision
    tower of depth 0 is the patch embedding and the merger: each LM image token is the merger's output of its 2x2
    patches, local to its 28x28-pixel block."""
    token = QWEN_SPECIAL_TOKENS.index
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": "float32",
        "image_token_id": token("<|image_pad|>"),
        "video_token_id": token("<|video_pad|>"),
        "vision_start_token_id": token("<|vision_start|>"),
        "vision_end_token_id": token("<|vision_end|>"),
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen2_5_vl_text", "hidden_act": "silu", "hidden_size": width,
            "intermediate_size": intermediate_factor * width, "num_hidden_layers": text_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "vocab_size": vocab_size,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "layer_types": ["full_attention"] * text_layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                "mrope_section": list(mrope_section)},
            "bos_token_id": None, "eos_token_id": token(QWEN_EOS), "pad_token_id": token(QWEN_PAD),
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": text_layers,
            "attention_dropout": 0.0, "use_cache": True,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "hidden_act": "silu", "depth": vision_layers,
            "hidden_size": vision_width, "intermediate_size": intermediate_factor * vision_width,
            "num_heads": vision_heads, "out_hidden_size": width, "in_channels": 3, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": window_size,
            "fullatt_block_indexes": list(fullatt_block_indexes), "tokens_per_second": 4,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
    }


def qwen_word_tokenizer(words: list[str], vocab_size: int) -> Tokenizer:
    """Qwen's specials, then `words` (each once), then filler words up to vocab_size; splits on whitespace and
    punctuation (so the chat template's newlines vanish), adds no BOS."""
    vocab = QWEN_SPECIAL_TOKENS + [w for w in dict.fromkeys(words) if w not in QWEN_SPECIAL_TOKENS]
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} tokens (specials and words) do not fit a vocabulary of {vocab_size}")
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return backend


def write_qwen_checkpoint(folder: str | Path, hf_config: dict, params, words: list[str],
                          min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS) -> Path:
    """Params of `QwenVL` as a Hugging Face Qwen2.5-VL folder: config, safetensors, a word tokenizer with Qwen's
    special tokens (EOS <|im_end|>), and the Qwen2-VL image processor config as transformers 5 writes it, its
    pixel bounds by default around 224 x 224 (a square image is 16 x 16 patches, 8 x 8 LM tokens; other aspects
    keep theirs at about as many pixels)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = QwenVLConfig.from_hf_config(hf_config)
    write_checkpoint(flax_to_hf(qwen2_5_vl_table(config), params), folder)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    qwen_word_tokenizer(words, config.text.vocab_size).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": QWEN_EOS,
        "pad_token": QWEN_PAD, "unk_token": "<unk>", "add_bos_token": False, "model_max_length": 32768,
    }, indent=2))
    vision = config.vision
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }, indent=2))
    return folder


def init_qwen_params(hf_config: dict, seed: int):
    """Fresh Flax parameters of the Qwen2.5-VL described by `hf_config`."""
    config = QwenVLConfig.from_hf_config(hf_config)
    return QwenVL(config).init(jax.random.PRNGKey(seed), *QWEN2_5_VL.init_inputs(config))["params"]
