"""ViCrop's strategies as values: the map methods rel-att, grad-att and pure-grad, and the baselines.

Each is a frozen, hashable dataclass holding its options; jitted programs take it as a static argument, so
each combination of options compiles once. A map method carries both of its implementations side by side:
`whole_prompt_map` (any family: full forwards of the question's prompts) and `prefix_map` (families that share
a prefix of text and the image between prompts: the prefix encoded and prefilled once, each prompt running only
its suffix). A new method subclasses `MapMethod` and defines `whole_prompt_map`; the inherited `prefix_map` then
runs it after the shared prefix. Names are turned into values once, by `method_from_name`.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import time
import types
import typing
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from vicrop_jax.families import PromptArrays
from vicrop_jax.families._base import ImageFeatures
from vicrop_jax.prompts import GENERAL_QUESTION
from vicrop_jax.vicrop.boxes import Box, center_box, grow_box, outside_mass, random_box, select_boxes
from vicrop_jax.vicrop.maps import (
    PrefixMap, QuestionPass, QuestionPrefill, StaticModel, attention_and_gradient, attention_times_gradient,
    captured_attention, high_pass_mask, prefill_prefix, prompt_run, run_plain, score, split_prompt, suffix_run,
)
from vicrop_jax.vicrop.strategy import Answer, Cost, Record, Search, Strategy, default_map_layer
from vicrop_jax.vicrop.zoom import Focus, ZoomSearch


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoCrop(Strategy):
    """The original image only."""

    name: ClassVar[str] = "none"

    def run(self, engine, records):
        start = time.perf_counter()
        plain = engine.plain_answers([r.image for r in records], [r.question for r in records])
        share = (time.perf_counter() - start) / len(records)
        return [Answer(p.text, p.text, (), None, {"total": share}, cost=p.cost) for p in plain]

    def host_boxes(self, engine, record):
        return Search((), None, Cost())


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedCrop(Strategy, abc.ABC):
    """A baseline whose crop box comes without a map."""

    @abc.abstractmethod
    def box(self, image_size: tuple[int, int], base_size: int, bbox, seed: int) -> Box:
        """The crop box (left, top, right, bottom) for an image of `image_size`."""

    def boxes(self, image_size: tuple[int, int], base_size: int, bbox, seed: int) -> list[Box]:
        """The crop boxes: one, unless the baseline crops several regions."""
        return [self.box(image_size, base_size, bbox, seed)]

    def host_boxes(self, engine, record):
        return Search(tuple(self.boxes(record.image.size, engine.base_size, record.bbox, record.seed)), None, Cost())


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroundTruth(FixedCrop):
    """The dataset's ground-truth box, grown to at least the model resolution; given a list of boxes, a crop of
    each."""

    name: ClassVar[str] = "gt"
    needs_box: ClassVar[bool] = True

    def box(self, image_size, base_size, bbox, seed):
        if bbox is None:
            raise ValueError("method 'gt' needs the ground-truth box: pass bbox=(x1, y1, x2, y2)")
        return grow_box(bbox, image_size, base_size)

    def boxes(self, image_size, base_size, bbox, seed):
        several = bbox is not None and len(bbox) > 0 and not np.isscalar(bbox[0])
        return [self.box(image_size, base_size, b, seed) for b in bbox] if several else super().boxes(
            image_size, base_size, bbox, seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomCrop(FixedCrop):
    """A box of the model resolution at a random position (seeded)."""

    name: ClassVar[str] = "random"

    def box(self, image_size, base_size, bbox, seed):
        return random_box(image_size, base_size, np.random.default_rng(seed))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CenterCrop(FixedCrop):
    """A box of the model resolution at the image centre."""

    name: ClassVar[str] = "center"

    def box(self, image_size, base_size, bbox, seed):
        return center_box(image_size, base_size)


class Geometry(enum.Enum):
    """Where a map's grid lies on the image: stretched over all of it, as the published box selection does
    ("paper"), or on the part the image processor keeps ("exact"; LLaVA's CLIP keeps the centre square)."""

    PAPER = "paper"
    EXACT = "exact"


AUTO_REGIONS = "auto"
# regions="auto" adds a second box when more than this share of the map's positive mass lies outside the first
# box's cells: fitted on vicrop-tiny's calibration scenes (`benchmarks/synthetic/evaluate.py --calibrate`).
SECOND_REGION_MASS = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class MapMethod(Strategy, abc.ABC):
    """A map read out of the model picks the crops. `layer` None means the model's default map layer (filled in
    by `resolved`); `heads` None means the mean over all heads.

    regions: K boxes from the one map, each by the paper's rule with the earlier boxes' cells suppressed, all K
    crops appended in map order (1: the paper's), or "auto": a second box only when the map's mass outside
    the first passes `second_region_mass`. gate: crop only when the plain answer's first token is less
    probable than this (None: always crop). geometry: `Geometry` or its value.
    """

    layer: int | None = None
    heads: tuple[int, ...] | None = None
    qformer_layer: int = 2  # InstructBLIP: the Q-Former cross-attention layer, over cross-attention layers only
    general_question: str = GENERAL_QUESTION
    regions: int | str = 1
    second_region_mass: float = SECOND_REGION_MASS
    gate: float | None = None
    geometry: Geometry | str = Geometry.PAPER
    low_memory: ClassVar[bool] = False  # compile with the memory-optimised CPU scheduler (whole-model gradients)
    candidate_names: ClassVar[tuple[str, ...]] = ()  # maps a method makes besides its own (method="auto")
    map_prompts: ClassVar[int] = 2  # the prompts whose forward the map needs: the question's, then the general one's
    backward_passes: ClassVar[int] = 0

    @property
    def most_crops(self) -> int:
        return max(self.crop_counts)

    @property
    def crop_counts(self) -> tuple[int, ...]:
        """The numbers of crops an answer may take: one program prefills each count's prompt."""
        return (1, 2) if self.regions == AUTO_REGIONS else (self.regions,)

    @property
    def program_method(self) -> MapMethod:
        """The method as its device programs see it: the gate acts on the host, so it compiles nothing."""
        return dataclasses.replace(self, gate=None)

    def resolved(self, model) -> MapMethod:
        """The method with its default layer filled in and its options checked against the model."""
        config = model.config
        layer = default_map_layer(model) if self.layer is None else int(self.layer)
        heads = None if self.heads is None else tuple(int(h) for h in self.heads)
        method = dataclasses.replace(self, layer=layer, heads=heads, qformer_layer=int(self.qformer_layer),
                                     regions=_checked_regions(self.regions), geometry=_geometry(self.geometry),
                                     gate=_checked_gate(self.gate),
                                     second_region_mass=_share("second_region_mass", self.second_region_mass))
        if not 0 <= layer < config.text.num_layers:
            raise ValueError(f"layer {layer} is out of range: this model has LM layers 0..{config.text.num_layers - 1}")
        if heads is not None and (not heads or any(not 0 <= h < config.text.num_heads for h in heads)):
            raise ValueError(f"heads {list(heads)} invalid: LM heads are 0..{config.text.num_heads - 1}")
        model.family.check_map_options(config, method)
        return method

    def run(self, engine, records):
        """The device pipeline over the records it can run, the host path for the others; with a gate, the plain
        answers first and the method without its gate for the records below it."""
        if self.gate is not None:
            return _gated(engine, records, self)
        on_device = [engine.on_device(r) for r in records]
        by_device = iter(engine.pipeline_answers(self, [r for r, d in zip(records, on_device) if d]))
        by_host = iter(super().run(engine, [r for r, d in zip(records, on_device) if not d]))
        return [next(by_device) if d else next(by_host) for d in on_device]

    def host_boxes(self, engine, record):
        importance, cost = engine.map(record, self)
        frame = engine.map_frame(record.image.size, self)
        boxes = select_boxes(importance, record.image.size, engine.base_size, max(self.crop_counts), frame)
        if len(self.crop_counts) > 1:
            wanted = outside_mass(importance, boxes[0], record.image.size, frame) > self.second_region_mass
            boxes = boxes[: self.crop_counts[int(wanted)]]
        return Search(tuple(boxes), importance, cost)

    def importance(self, engine, record):
        return engine.map(record, self)[0]

    def map_cost(self, question_length: int, general_length: int) -> Cost:
        """The map's model passes as the published procedure runs them, each prompt whole (a shared prefix or a
        reused question pass makes the program cheaper than counted)."""
        lengths = (question_length, general_length)[: self.map_prompts]
        return Cost(len(lengths), sum(lengths), 0, self.backward_passes)

    def high_pass(self, image: PIL.Image.Image, resolution: int) -> np.ndarray | None:
        """A host-side input the map needs besides the prompts (pure-grad's mask), or None."""
        return None

    @abc.abstractmethod
    def whole_prompt_map(self, static: StaticModel, params: Any, pixels: jax.Array, question: PromptArrays,
                         general: PromptArrays, high_pass) -> jax.Array:
        """The map [gh, gw] of one image (pixels [H,W,3]) from full forwards of the prompts."""

    def prefix_map(self, static: StaticModel, params: Any, pixels: jax.Array, question: PromptArrays,
                   general: PromptArrays, high_pass, cache_length: int,
                   prefilled: QuestionPrefill | None = None) -> PrefixMap:
        """The map after the shared prefix, encoded and prefilled once into a cache of `cache_length` slots (or
        taken from the plain answer's pass, `prefilled`, where a gate ran it)."""
        original, cache, _ = _prefix(static, params, pixels, question, cache_length, prefilled)
        importance = self.whole_prompt_map(static, params, pixels, question, general, high_pass)
        return PrefixMap(importance, original, cache, None)

    def attention(self, static: StaticModel, params: Any, pixels: jax.Array, prompt: PromptArrays) -> jax.Array:
        """The plain attention map [gh, gw] of one prompt (rel-att's numerator or denominator)."""
        read, _ = captured_attention(static.module, params, prompt_run(static.family, pixels, prompt, self))
        return static.family.attention_map(static.config, read, prompt.length - 1, prompt, self)


def _gated(engine, records: list[Record], method: MapMethod) -> list[Answer]:
    """A gate around a map method: the plain answers of all records, then the method (its gate removed) for
    those whose plain answer is less sure than the gate, in batches padded to a power of two. Where the engine
    can, it continues from the plain pass instead (`Engine.continued_gate`)."""
    continued = engine.continued_gate(method, records)
    if continued is not None:
        return continued
    start = time.perf_counter()
    plain = engine.plain_answers([r.image for r in records], [r.question for r in records])
    share = (time.perf_counter() - start) / len(records)
    answers = [Answer(p.text, p.text, (), None, {"total": share}, p.confidence, cost=p.cost) for p in plain]
    crop = [i for i, p in enumerate(plain) if p.confidence < method.gate]
    cropped = method.program_method.run(dataclasses.replace(engine, power_of_two_batches=True),
                                        [records[i] for i in crop]) if crop else []
    for i, result in zip(crop, cropped):
        answers[i] = dataclasses.replace(result, confidence=plain[i].confidence, cost=plain[i].cost + result.cost,
                                         timings={**result.timings, "total": share + result.timings["total"]})
    return answers


def _checked_regions(regions) -> int | str:
    if regions == AUTO_REGIONS:
        return regions
    if isinstance(regions, bool) or not isinstance(regions, (int, np.integer)) or regions < 1:
        raise ValueError(f"regions must be a positive number of crops or {AUTO_REGIONS!r}, got {regions!r}")
    return int(regions)


def _geometry(geometry) -> Geometry:
    try:
        return Geometry(geometry)
    except ValueError:
        raise ValueError(f"unknown geometry {geometry!r}; choose one of "
                         f"{', '.join(g.value for g in Geometry)}") from None


def _share(name: str, value) -> float:
    """A number in [0, 1] (numpy scalars too; NaN refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    return float(value)


def _checked_gate(gate) -> float | None:
    """None, or a probability: the plain answer's first token at or above it skips the crop."""
    return None if gate is None else _share("gate", gate)


def _prefix(static: StaticModel, params, pixels, question: PromptArrays, cache_length: int,
            prefilled: QuestionPrefill | None = None):
    """(the original's features, the shared prefix in a cache of `cache_length` slots, the question's split).
    A prefilled question's cache serves as the prefix's: a suffix overwrites the slots after the prefix, and
    causality hides those it does not reach."""
    if prefilled is not None:
        split = split_prompt(static, question, [prefilled.features])
        return prefilled.features, prefilled.cache.padded(cache_length), split
    original = static.family.original_features(static.module, params, pixels, question)
    split = split_prompt(static, question, [original])
    return original, prefill_prefix(static.module, params, original.features, split.prefix, cache_length), split


def _both(question: PromptArrays, general: PromptArrays) -> PromptArrays:
    return jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), question, general)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelAtt(MapMethod):
    """rel-att: the question's attention map over the general prompt's."""

    name: ClassVar[str] = "rel_att"

    def whole_prompt_map(self, static, params, pixels, question, general, high_pass):
        maps = jax.vmap(lambda prompt: self.attention(static, params, pixels, prompt))(_both(question, general))
        return maps[0] / maps[1]

    def prefix_map(self, static, params, pixels, question, general, high_pass, cache_length, prefilled=None):
        """The question's and the general prompt's suffixes after the prefix; with a plain answer's pass
        (`prefilled`), the general prompt's alone."""
        original, cache, _ = _prefix(static, params, pixels, question, cache_length, prefilled)
        if prefilled is not None:
            split = split_prompt(static, general, [original])
            read, _ = captured_attention(static.module, params, suffix_run(cache, split, (self.layer,)))
            general_map = static.family.attention_map(static.config, read, split.suffix.length - 1, general, self)
            return PrefixMap(prefilled.attention / general_map, original, cache,
                             QuestionPass(prefilled.logits, cache))

        def one(prompt):
            split = split_prompt(static, prompt, [original])
            run = suffix_run(cache, split, (self.layer,))
            read, (logits, new_cache) = captured_attention(static.module, params, run)
            importance = static.family.attention_map(static.config, read, split.suffix.length - 1, prompt, self)
            return importance, logits, new_cache

        maps, logits, caches = jax.vmap(one)(_both(question, general))
        question_pass = QuestionPass(logits[0], jax.tree_util.tree_map(lambda c: c[0], caches))
        return PrefixMap(maps[0] / maps[1], original, cache, question_pass)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradAtt(MapMethod):
    """grad-att: head means of A * relu(dS/dA) of the question alone (no ratio)."""

    name: ClassVar[str] = "grad_att"
    map_prompts: ClassVar[int] = 1
    backward_passes: ClassVar[int] = 1
    clip_negative: bool = True  # the relu on the gradients

    def whole_prompt_map(self, static, params, pixels, question, general, high_pass):
        run = prompt_run(static.family, pixels, question, self)
        read, _ = attention_times_gradient(static.module, params, run, self.clip_negative)
        return static.family.attention_map(static.config, read, question.length - 1, question, self)

    def prefix_map(self, static, params, pixels, question, general, high_pass, cache_length, prefilled=None):
        """dS/dA of the last row depends on the suffix computation only: no backward pass through the prefix."""
        original, cache, split = _prefix(static, params, pixels, question, cache_length, prefilled)
        run = suffix_run(cache, split, (self.layer,))
        read, (logits, new_cache) = attention_times_gradient(static.module, params, run, self.clip_negative)
        importance = static.family.attention_map(static.config, read, split.suffix.length - 1, question, self)
        return PrefixMap(importance, original, cache, QuestionPass(logits, new_cache))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PureGrad(MapMethod):
    """pure-grad: the ratio of the pixel-gradient norms of the question and the general prompt, high-passed."""

    name: ClassVar[str] = "pure_grad"
    low_memory: ClassVar[bool] = True
    backward_passes: ClassVar[int] = 2

    def high_pass(self, image, resolution):
        return high_pass_mask(image, resolution).astype(np.float32)

    def whole_prompt_map(self, static, params, pixels, question, general, high_pass):
        def gradient(prompt):
            def scored(x):
                logits, _ = run_plain(static.module, params, prompt_run(static.family, x, prompt, self))
                return score(logits)

            return jax.grad(scored)(pixels)

        # one prompt at a time: a backward pass keeps every layer's activations, two at once would double the peak
        gradients = jax.lax.map(gradient, _both(question, general))
        return static.family.pixel_gradient_map(static.config, gradients, high_pass, question)

    def prefix_map(self, static, params, pixels, question, general, high_pass, cache_length, prefilled=None):
        """The prefix forward runs once (`jax.vjp`); for one prompt after the other, the suffix gives a cotangent
        on the prefix's features and cache, pulled back to the pixels through that forward (a plain answer's
        pass, which holds no such pullback, is not used)."""
        module = static.module

        def prefix(x):
            """(the original's features, the prefix's cache), and the original's token grid beside them."""
            original = static.family.original_features(module, params, x, question)
            split = split_prompt(static, question, [original])
            cache = prefill_prefix(module, params, original.features, split.prefix, split.prefix.ids.shape[0])
            return (original.features, cache), original.grid

        (features, cache), pullback, grid = jax.vjp(prefix, pixels, has_aux=True)
        original = ImageFeatures(features, grid)

        def prompt_gradients(prompt):
            def scored(features, cache):
                split = split_prompt(static, prompt, [ImageFeatures(features, grid)])
                logits, new_cache = run_plain(module, params, suffix_run(cache.padded(cache_length), split))
                return score(logits), (logits, new_cache)

            cotangents, outputs = jax.grad(scored, argnums=(0, 1), has_aux=True)(features, cache)
            return pullback(cotangents)[0], outputs

        # One prompt at a time: a single cotangent of the prefix cache and one backward pass live at once.
        gradients, (logits, caches) = jax.lax.map(prompt_gradients, _both(question, general))
        question_pass = QuestionPass(logits[0], jax.tree_util.tree_map(lambda c: c[0], caches))
        importance = static.family.pixel_gradient_map(static.config, gradients, high_pass, question)
        return PrefixMap(importance, original, cache.padded(cache_length), question_pass)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ByConfidence(MapMethod):
    """method="auto": rel-att's and grad-att's maps from the same passes (the question's forward with its
    gradient gives rel-att's numerator and grad-att's map; the general prompt's forward the denominator), a
    crop from each, and the answer whose first token is the more probable. Costs grad-att's map, one more
    forward and one more answer prefill than a single method."""

    name: ClassVar[str] = "auto"
    candidate_names: ClassVar[tuple[str, ...]] = ("rel_att", "grad_att")
    backward_passes: ClassVar[int] = 1
    clip_negative: bool = True

    def host_boxes(self, engine, record):
        raise ValueError(f"method {self.name!r} chooses between its maps' answers on the device: it has no single "
                         f"box on the host path (use device_pipeline=True, or one of its map methods "
                         f"{', '.join(self.candidate_names)})")

    def _maps(self, static, reads, prompts, rows) -> jax.Array:
        """[2, gh, gw]: rel-att's and grad-att's maps from the readers (question's attention, its gradient-weighted
        attention, the general prompt's attention) at the given query rows."""
        family, config = static.family, static.config
        (read, weighted, general_read), (question, general), (row, general_row) = reads, prompts, rows
        rel = (family.attention_map(config, read, row, question, self)
               / family.attention_map(config, general_read, general_row, general, self))
        return jnp.stack([rel, family.attention_map(config, weighted, row, question, self)])

    def whole_prompt_map(self, static, params, pixels, question, general, high_pass):
        run = lambda prompt: prompt_run(static.family, pixels, prompt, self)  # noqa: E731
        read, weighted, _ = attention_and_gradient(static.module, params, run(question), self.clip_negative)
        general_read, _ = captured_attention(static.module, params, run(general))
        return self._maps(static, (read, weighted, general_read), (question, general),
                          (question.length - 1, general.length - 1))

    def prefix_map(self, static, params, pixels, question, general, high_pass, cache_length, prefilled=None):
        """Both maps after the shared prefix: the question's suffix with its gradient, the general one's forward."""
        original, cache, split = _prefix(static, params, pixels, question, cache_length, prefilled)
        general_split = split_prompt(static, general, [original])
        read, weighted, (logits, new_cache) = attention_and_gradient(
            static.module, params, suffix_run(cache, split, (self.layer,)), self.clip_negative)
        general_read, _ = captured_attention(static.module, params, suffix_run(cache, general_split, (self.layer,)))
        importance = self._maps(static, (read, weighted, general_read), (question, general),
                                (split.suffix.length - 1, general_split.suffix.length - 1))
        return PrefixMap(importance, original, cache, QuestionPass(logits, new_cache))


STRATEGIES: tuple[type[Strategy], ...] = (
    RelAtt, GradAtt, PureGrad, ByConfidence, NoCrop, GroundTruth, RandomCrop, CenterCrop, Focus, ZoomSearch,
)
STRATEGY_NAMES = tuple(strategy.name for strategy in STRATEGIES)
MAP_METHOD_NAMES = tuple(s.name for s in STRATEGIES if issubclass(s, MapMethod))


def option_names(strategy: type[Strategy]) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(strategy))


UNSET = "none"  # the text of an optional option left at None (`heads=none`)


def option_value(name: str, value: Any, kind: Any, source: str = "option") -> Any:
    """An option given as text (or as the int/float/bool a harness made of it) as the option's type: int, float,
    bool, str, an enum's value, a tuple (`heads=[0,5]`), or None for an optional one (UNSET); of a union
    (`regions`: int or "auto"), the first type that reads it. `source` names where it was given, for the error."""
    text = str(value).strip()
    kinds = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if type(None) in kinds and text.lower() == UNSET:
        return None
    for base in (k for k in kinds if k is not type(None)):
        if base is bool:
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            continue
        if base is str:
            return text
        try:
            if base in (int, float) or (isinstance(base, type) and issubclass(base, enum.Enum)):
                return base(text)
            if typing.get_origin(base) is tuple:
                element = typing.get_args(base)[0]
                return tuple(element(part) for part in text.strip("[]()").replace(",", " ").split())
        except ValueError:
            continue
    raise ValueError(f"{source} {name}={value!r} is not a valid {kind} value (tuples take a list: heads=[0,5])")


def typed_options(strategy: type[Strategy], options: dict[str, Any], source: str = "option") -> dict[str, Any]:
    """Options given as text (`vicrop-jax eval --option`, lmms-eval's model_args) as the strategy's types; a name
    the strategy does not take is refused with the ones it takes."""
    unknown = sorted(set(options) - set(option_names(strategy)))
    if unknown:
        valid = ", ".join(option_names(strategy)) or "none"
        raise ValueError(f"method {strategy.name!r} takes no option {', '.join(unknown)} (its options: {valid})")
    hints = typing.get_type_hints(strategy)
    return {name: option_value(name, value, hints[name], source) for name, value in options.items()}


def strategy_class(name: str) -> type[Strategy]:
    """The strategy a name stands for; an unknown name is refused with the valid ones."""
    for strategy in STRATEGIES:
        if strategy.name == name:
            return strategy
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")


def method_from_name(name: str, **options) -> Strategy:
    """The one place where a method's name becomes a value (the API's `method=`, the CLI, result files)."""
    strategy = strategy_class(name)
    unknown = sorted(set(options) - set(option_names(strategy)))
    if unknown:
        valid = ", ".join(option_names(strategy)) or "none"
        raise ValueError(f"method {name!r} takes no option {', '.join(unknown)} (its options: {valid})")
    return strategy(**options)


def resolve_method(model, method: str | Strategy, **options) -> Strategy:
    """A method given by name (with its options) or as a value (options replace its fields), ready to run."""
    if isinstance(method, str):
        strategy = method_from_name(method, **options)
    elif isinstance(method, Strategy):
        strategy = dataclasses.replace(method, **options) if options else method
    else:
        raise ValueError(f"method must be a name ({', '.join(STRATEGY_NAMES)}) or a Strategy value, got {method!r}")
    return strategy.resolved(model)
