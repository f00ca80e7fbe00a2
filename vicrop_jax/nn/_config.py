"""Helpers shared by the towers' `from_hf_config` readers: refuse what we do not implement."""

from __future__ import annotations

from typing import Any, Mapping

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Optional key of a composite model's config.json: the LM layer its ViCrop maps read by default.
MAP_LAYER_KEY = "vicrop_attention_layer"


def check_supported(hf: Mapping[str, Any], where: str, allowed: Mapping[str, tuple]) -> None:
    """Raise if a config attribute that changes the computation has a value we do not implement."""
    for key, values in allowed.items():
        value = hf.get(key)
        if value not in values:
            shown = ", ".join(repr(v) for v in values if v is not None)
            raise ValueError(
                f"{where}.{key} = {value!r} is not supported by vicrop_jax (supported: {shown}). "
                "Convert a checkpoint of a supported architecture, or open an issue with the config."
            )


# Attributes of any transformers config that describe the file, training, labels or generation settings, never
# the forward pass of a pretrained model in inference (dropouts are off; decoding is greedy by design).
METADATA = frozenset({
    "_name_or_path", "_attn_implementation_autoset", "architectures", "transformers_version", "dtype", "torch_dtype",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "problem_type", "id2label", "label2id", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "initializer_range", "initializer_factor", "init_std", "use_cache", "chunk_size_feed_forward",
    "attention_dropout", "dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "classifier_dropout",
    "layerdrop", "ignore_index", "pad_token_id", "sep_token_id", "decoder_start_token_id", "vocab_file",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sep_token_id",
})
# Attributes that change the computation in general but are accepted at the values that leave it as implemented.
AT_DEFAULT = {
    "is_encoder_decoder": (False,), "is_decoder": (False,), "add_cross_attention": (False,),
    "cross_attention_hidden_size": (None,), "tie_encoder_decoder": (False,), "pruned_heads": ({},),
}


def refuse_unhandled(hf: Mapping[str, Any], where: str, handled: set[str] | frozenset[str],
                     at_default: Mapping[str, tuple] | None = None) -> None:
    """Raise on any attribute that is neither read (`handled`), nor metadata, nor at a value we implement: a new
    variant of a config must fail to load rather than load wrongly."""
    accepted = {**AT_DEFAULT, **(at_default or {})}
    for key, value in hf.items():
        if key in handled or key in METADATA or (key in accepted and value in accepted[key]):
            continue
        shown = f" (handled at {', '.join(map(repr, accepted[key]))} only)" if key in accepted else ""
        raise ValueError(
            f"{where}.{key} = {value!r} is not handled by vicrop_jax{shown}: a model with this attribute may compute "
            "something else. Convert a checkpoint of a supported architecture, or open an issue with the config."
        )


def get_rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either transformers 5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"text_config rope type {rope_type!r} is not supported by vicrop_jax "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
        )
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", 10000.0)
    return params
