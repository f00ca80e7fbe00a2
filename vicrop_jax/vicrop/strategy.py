"""What every way of answering a question is: a `Strategy` value, and the `Cost` of the model work it did."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """How a question is answered: its `name` is what the API, the CLI and result files call it."""

    name: ClassVar[str]

    def resolved(self, model) -> "Strategy":
        """The strategy with its model-dependent defaults filled in and its options checked against the model."""
        return self


@dataclasses.dataclass(frozen=True)
class Cost:
    """The model work of a strategy's answer, as its published procedure runs it: prompt passes (each a prefill
    of one prompt over its images; a backward pass counted apart), the tokens those prompts hold (image tokens
    included, each prompt whole even where a prefix is shared or a pass reused), and the answer tokens decoded.
    The answer from the original alone, which every `Answer` carries for comparison, is not counted (but for
    method none, where it is the answer)."""

    passes: int = 0
    prefill_tokens: int = 0
    decoded_tokens: int = 0
    backward_passes: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def default_map_layer(model) -> int:
    """The checkpoint's own map layer where its config names one (`vicrop_attention_layer`, chosen by where its
    attention falls, as the paper chose its layers), else the family's for the model's depth
    (`Family.default_layer`)."""
    if model.config.map_layer is not None:
        return model.config.map_layer
    return model.family.default_layer(model.config.text.num_layers)
