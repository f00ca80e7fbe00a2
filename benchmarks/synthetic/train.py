"""Train vicrop-tiny: a small LLaVA-1.5-architecture model, from scratch, on synthetic small-detail VQA (or,
with `--family qwen2_5_vl`, vicrop-tiny-qwen: the same data in Qwen2.5-VL's architecture).

    python -m benchmarks.synthetic.train --out vicrop_jax/models/vicrop-tiny                 # the shipped model
    python -m benchmarks.synthetic.train --recipe 2 --out runs/vicrop-tiny-v2               # benchmark version 2
    python -m benchmarks.synthetic.train --family qwen2_5_vl --steps 6000 --out vicrop_jax/models/vicrop-tiny-qwen
    python -m benchmarks.synthetic.train --recipe 3 --init vicrop_jax/models/vicrop-tiny --steps 1400 --out runs/aux

CLIP ViT (112 px, patch 14: 8x8 image tokens) -> GELU projector -> LLaMA decoder (4 layers, width 192), trained
with optax AdamW on scenes of `vicrop_jax.testing.synthetic` (training seed 0; evaluation uses other seeds), by a
`RECIPES` entry: recipe 1 (the shipped model) square single-detail scenes with at most one extra image, recipe 2
every question type and aspect of version 2 with up to two. The ViT has one layer and LLaVA's
`vision_feature_layer: -2` takes the hidden state before it, so the image tokens are the CLIP patch embeddings,
local to their patch: a ViT trained from scratch with several layers learned to gather the boxed shape into a few
fixed patches, from which the decoder then read the answer (its attention on the answer box was about 0.01x the
attention elsewhere), whereas pretrained CLIP features, which LLaVA-1.5 has, stay local. The training scenes are
160 to 768 px with 5 to 35 clutter items; a curriculum starts with large boxes only (30% to 90% of the image side,
readable in the full view: a model from scratch does not start to learn on small ones), then shrinks them and mixes
in the evaluation's box sizes (half the samples from 40% of the run on).
Recipe 1: half of the batches carry one extra image (recipe 2: a third one, a third two): crops of the first at
uniformly random positions with random sides between 1x and 2x the model resolution (ViCrop's range of box sides),
so the model learns to read several images as LLaVA-1.5 does; no crop is ever chosen by attention, gradients or the
answer's boxes. One sample in five of the one-image batches asks the paper's general prompt, answered by the
background colour, so that prompt is in distribution for rel-att. Loss: cross-entropy on the answer word and EOS.
The result is written in Hugging Face LLaVA format (transformers' `LlavaForConditionalGeneration`
loads it too); its config names the map layer (`vicrop_attention_layer`): the LM layer whose attention
map's crop box holds the answer most often on calibration scenes (seed 4).
vicrop-tiny-qwen (`QwenTrainer`) draws the same scenes, crops and prompts with the same seeds: a Qwen2.5-VL
vision tower of depth 0 (patch 14, merge 2: each LM image token is the merger's output of its 28 x 28 pixels,
local as vicrop-tiny's patch embeddings are), its processor bounds at 224 x 224 (a square scene or crop is
8 x 8 LM tokens, as in vicrop-tiny; the crops' sides run from 1x to 2x 224 px, Qwen's smallest ViCrop box),
and a Qwen2 decoder of vicrop-tiny's size (4 layers, width 192, 4 heads, 2 KV heads, mrope_section (6, 9, 9));
the prompt is `qwen2_5_vl_prompt`, the answer word and <|im_end|>; written in Hugging Face Qwen2.5-VL format
(`Qwen2_5_VLForConditionalGeneration` loads it).
Recipe 3 continues training a shipped model (`--init`, its parameters, a shorter warm-up, a lower learning rate,
the curriculum's late box sizes from the first step: the model has passed it) so that it also answers the yes/no
questions of the competing zoom strategies (FOCUS, ZoomEye; `vicrop_jax.prompts`) about a view: the scene itself
or a random square crop of it (side 0.25x to 1x the scene's short side; never a crop chosen by a map), the only
image. A share of the one-image samples (`--aux-share`, 0.3, equally over the three forms) asks, of the red box:
existence ("Is there a red box in the image?": Yes if the box lies inside the view, No if the view misses it;
partial overlaps are redrawn), latent (could zooming in find one: Yes if the view meets the box) or answering
(could the single-detail question be answered: Yes if the box lies inside the view at a side of at least 0.25
of the view's, readable at 112 px). The wanted answer is drawn first, Yes or No equally, and the view redrawn
until the scene's geometry gives it, on a random stream of its own, so the other samples are recipe 1's. The
vocabulary grows by the templates' words (the spare slots first, then new rows, freshly initialised; no
existing token id changes).
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image
from tokenizers import pre_tokenizers

import vicrop_jax
from benchmarks.synthetic.evaluate import by_layer, layer_analysis
from vicrop_jax.families import LLAVA, QWEN2_5_VL, Family
from vicrop_jax.families.qwen2_5_vl import image_tokens, rope_positions
from vicrop_jax.nn._config import MAP_LAYER_KEY
from vicrop_jax.nn.qwen_vit import VisionPatches, vision_patches
from vicrop_jax.testing.checkpoints import (
    QWEN_SPECIAL_TOKENS, SPECIAL_TOKENS, init_llava_params, init_qwen_params, llava_hf_config, qwen_hf_config,
    write_llava_checkpoint, write_qwen_checkpoint,
)
from vicrop_jax._tokenizer import Tokenizer
from vicrop_jax.preprocessing import preprocess
from vicrop_jax.prompts import (
    ANSWERING_QUESTION, EXISTENCE_QUESTION, GENERAL_QUESTION, LATENT_QUESTION, NO_WORD, YES_WORD, llava_prompt,
    qwen2_5_vl_prompt,
)
from vicrop_jax.qwen_preprocessing import preprocess_qwen
from vicrop_jax.testing.synthetic import (
    BACKGROUNDS, QUESTION, RELATIVE_BOX_SIDES, SHAPES, SyntheticRecord, make_record, make_scene,
)

TRAIN_SEED = 0
CALIBRATION_SEED = 4  # scenes that choose the map layer (evaluation uses seed 1)
WORDS = (
    "USER ASSISTANT : . ? Answer the question using a single word or phrase What shape is in red blue box "
    "Write general description of image"
).split() + list(SHAPES) + list(BACKGROUNDS)
VERSION_2_WORDS = "Are shapes and same yes no How many boxes hold 0 1 2 3 4".split()
GENERAL_FRACTION = 0.2
TRAIN_IMAGE_SIDES = (160, 768)
TRAIN_CLUTTER = (5, 35)
# Curriculum: "easy" boxes, readable in the full view, start the learning; over the first 40% of the steps
# their sides shrink from 30-90% to 12-45% of the image side and their share falls from all to half.
EASY_START, EASY_END = (0.3, 0.9), (0.12, 0.45)
EASY_FRACTION_END, RAMP = 0.5, 0.4
MULTI_BOX_LARGEST = 0.4  # easy boxes of the types with several boxes stay small enough to fit apart
TEXT_LENGTH = 40  # prompt and answer tokens besides the image positions, at most (recipes 1 and 2)
LEARNING_RATE, WARMUP_STEPS = 1e-3, 200
# Continuing a trained model: its Adam moments start again at zero, after a short warm-up, at a lower peak that
# leaves what it has learnt (the ViCrop answers) in place.
FINE_TUNE_LEARNING_RATE, FINE_TUNE_WARMUP_STEPS = 3e-4, 50


def split_words(*texts: str) -> list[str]:
    """The words the tokenizers' Whitespace pre-tokenizer splits `texts` into, each once, in order."""
    split = pre_tokenizers.Whitespace().pre_tokenize_str
    return list(dict.fromkeys(word for text in texts for word, _ in split(text)))


# The zoom strategies' yes/no questions about a view (recipe 3), of the single-detail question and its red box.
AUX_TARGET = "red box"
AUX_QUESTIONS: dict[str, Callable[[str], str]] = {
    "existence": lambda question: EXISTENCE_QUESTION.format(target=AUX_TARGET),
    "latent": lambda question: LATENT_QUESTION.format(target=AUX_TARGET),
    "answering": lambda question: ANSWERING_QUESTION.format(question=question),
}
AUX_WORDS = [w for w in split_words(*(ask(QUESTION.format(colour="red")) for ask in AUX_QUESTIONS.values()),
                                    YES_WORD, NO_WORD) if w not in WORDS]
AUX_TEXT_LENGTH = 72  # the latent question with its prompt and answer: 54 LLaVA text tokens, 65 Qwen ones
VIEW_SIDES = (0.25, 1.0)  # a random view's side, of the scene's short side
WHOLE_VIEW_SHARE = 0.25  # candidate views that are the whole scene
READABLE_SIDE = 0.25  # the box side, of the view's, from which its shape reads at 112 px
VIEW_CANDIDATES = 4096  # random views drawn at once, of which the first with the wanted answer is taken


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a training run draws: question types and aspects (shares), extra images, the vocabulary, the share
    of one-image samples that ask a zoom strategy's yes/no question about a view, the batches' text positions."""

    type_mix: dict[str, float]
    aspect_mix: dict[str, float]
    max_extra_images: int
    words: tuple[str, ...]
    aux_share: float = 0.0
    text_length: int = TEXT_LENGTH


RECIPES = {
    1: Recipe({"single": 1.0}, {"square": 1.0}, 1, tuple(WORDS)),
    2: Recipe({"single": 0.55, "two_region": 0.15, "distractor": 0.15, "counting": 0.15},
              {"square": 0.6, "landscape": 0.2, "portrait": 0.2}, 2, tuple(WORDS + VERSION_2_WORDS)),
    3: Recipe({"single": 1.0}, {"square": 1.0}, 1, tuple(WORDS + AUX_WORDS), aux_share=0.3,
              text_length=AUX_TEXT_LENGTH),
}


def padded_vocab_size(tokens: int) -> int:
    """A vocabulary of `tokens` rounded up to a multiple of 32 (spare filler slots fill the rest)."""
    return -(-tokens // 32) * 32


def model_hf_config(vocab_size: int = 64) -> dict:
    return llava_hf_config(
        image_size=112, width=192, vision_width=128, vocab_size=vocab_size, vision_layers=1, text_layers=4,
        num_heads=4, num_kv_heads=4, intermediate_factor=3, vision_feature_layer=-2,
    )


QWEN_TEMPLATE_WORDS = "system You are a helpful assistant . user".split()  # Qwen's chat template, besides specials


def qwen_model_hf_config(words: list[str]) -> dict:
    """vicrop-tiny-qwen: a vision tower of depth 0 (patch embedding and merger: each LM image token is local to
    its 28 x 28 pixels, as vicrop-tiny's are to their patch), then the Qwen2 decoder at vicrop-tiny's size."""
    vocab_size = padded_vocab_size(len(QWEN_SPECIAL_TOKENS) + len(words))
    return qwen_hf_config(width=192, vocab_size=vocab_size, text_layers=4, num_heads=4, num_kv_heads=2,
                          intermediate_factor=3, mrope_section=(6, 9, 9), vision_width=128, vision_layers=0)


Sample = tuple[list[int], Any]  # a sample's ids (prompt, answer, end token), its images as the model reads them


@dataclasses.dataclass(frozen=True)
class Trainer(abc.ABC):
    """What a model family brings to training (one subclass per family, picked at the command line): its
    checkpoint (config, fresh parameters, writer), the model's inputs of a sample and of a batch, read back from
    the folder it wrote as the model will be loaded. Batches are (ids [B, T], lengths [B], inputs): the model is
    `module.apply(params, ids, *inputs)`, with shapes fixed per image count (one program each); the ids are
    right-padded, and causal attention keeps the pads out of every real position."""

    family: ClassVar[Family]
    hf_config: ClassVar[Callable[[list[str]], dict]]  # the vocabulary -> config.json
    init_params: ClassVar[Callable[[dict, int], Any]]  # (config.json, seed) -> parameters
    write_checkpoint: ClassVar[Callable[[Path, dict, Any, list[str]], Path]]  # (folder, config, params, words)
    template_words: ClassVar[tuple[str, ...]] = ()  # the prompt template's words, beyond the recipe's
    config: Any
    tokenizer: Tokenizer
    image_config: Any

    @classmethod
    def words(cls, recipe: Recipe) -> list[str]:
        """The tokenizer's words: the recipe's, then those of the prompt template it lacks."""
        return list(recipe.words) + [w for w in dict.fromkeys(cls.template_words) if w not in recipe.words]

    @classmethod
    def from_folder(cls, folder: Path) -> "Trainer":
        hf_config = json.loads((folder / "config.json").read_text())
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        return cls(cls.family.read_config(hf_config), Tokenizer.from_folder(folder),
                   cls.family.read_image_config(processor))

    @property
    def module(self):
        return self.family.module_class(self.config)

    @property
    def resolution(self) -> int:
        """The model's input side, and the smallest crop box of ViCrop."""
        return self.family.crop_size(self.config)

    @abc.abstractmethod
    def sample(self, question: str, answer: str, images: list[Image.Image]) -> Sample:
        """A sample's ids (its prompt, answer and end token, image placeholders expanded) and processed images."""

    @abc.abstractmethod
    def batch(self, samples: list[Sample], num_images: int,
              text_length: int = TEXT_LENGTH) -> tuple[np.ndarray, np.ndarray, tuple]:
        """(ids [B, T], lengths [B], the model's other inputs) of samples of `num_images` images each, T their
        image positions and `text_length`."""


@dataclasses.dataclass(frozen=True)
class LlavaTrainer(Trainer):
    """vicrop-tiny: `llava_prompt` + " " + the answer + EOS, each `<image>` expanded; inputs (pixels [B,I,H,W,C],)."""

    family = LLAVA
    hf_config = staticmethod(lambda words: model_hf_config(padded_vocab_size(len(SPECIAL_TOKENS) + len(words))))
    init_params = staticmethod(init_llava_params)
    write_checkpoint = staticmethod(write_llava_checkpoint)

    def sample(self, question, answer, images):
        ids = self.tokenizer.encode(llava_prompt(question, len(images)) + " " + answer) + [self.tokenizer.eos_id]
        image_id = self.config.image_token_id
        ids = [t for token in ids for t in ([token] * self.config.tokens_per_image if token == image_id else [token])]
        return ids, [preprocess(im, self.image_config) for im in images]

    def batch(self, samples, num_images, text_length=TEXT_LENGTH):
        ids = np.full((len(samples), num_images * self.config.tokens_per_image + text_length),
                      self.config.text.pad_token_id, np.int32)
        for row, (sample_ids, _) in zip(ids, samples):
            row[: len(sample_ids)] = sample_ids
        lengths = np.array([len(s[0]) for s in samples], np.int32)
        pixels = np.stack([np.stack(s[1]) for s in samples]).astype(np.float32)
        return ids, lengths, (pixels,)


PATCH_STEP = 64  # a Qwen batch's patch rows are padded to a multiple of this (16 LM tokens); square images fill it


@dataclasses.dataclass(frozen=True)
class QwenTrainer(Trainer):
    """vicrop-tiny-qwen: `qwen2_5_vl_prompt` + the answer + <|im_end|>, each `<|image_pad|>` expanded to its image's
    merged tokens; inputs (VisionPatches [B, N, ...], rotary positions [B, 3, T]), N the batch's patch rows rounded
    up to PATCH_STEP (num_images * 256 for square images and crops at 224 x 224)."""

    family = QWEN2_5_VL
    hf_config = staticmethod(qwen_model_hf_config)
    init_params = staticmethod(init_qwen_params)
    write_checkpoint = staticmethod(write_qwen_checkpoint)
    template_words = tuple(QWEN_TEMPLATE_WORDS)

    def sample(self, question, answer, images):
        processed = [preprocess_qwen(im, self.image_config) for im in images]
        tokens = [image_tokens(self.config, image.grid) for image in processed]
        ids, _ = self.family.prompt_inputs(self, qwen2_5_vl_prompt(question, len(images)) + answer, len(images),
                                           tokens)  # the trainer reads as the model does: tokenizer and config
        return ids + [self.tokenizer.eos_id], processed

    def batch(self, samples, num_images, text_length=TEXT_LENGTH):
        patches = max(sum(len(image.patches) for image in images) for _, images in samples)
        rows = -(-patches // PATCH_STEP) * PATCH_STEP
        length = rows // self.config.merge_unit + text_length
        ids = np.zeros((len(samples), length), np.int32)  # <|endoftext|>, Qwen's pad
        positions = np.zeros((len(samples), 3, length), np.int32)
        layouts = []
        for row, position, (sample_ids, images) in zip(ids, positions, samples):
            row[: len(sample_ids)] = sample_ids
            position[:, : len(sample_ids)] = rope_positions(self.config, sample_ids, [im.grid for im in images])[0]
            layouts.append(vision_patches([im.patches for im in images], [im.grid for im in images],
                                          self.config.vision, rows))
        lengths = np.array([len(s[0]) for s in samples], np.int32)
        return ids, lengths, (VisionPatches(*(np.stack(leaves) for leaves in zip(*layouts))), positions)


TRAINERS: dict[str, type[Trainer]] = {"llava": LlavaTrainer, "qwen2_5_vl": QwenTrainer}


def random_views(rng: np.random.Generator, size: tuple[int, int], count: int) -> np.ndarray:
    """`count` candidate views (x1, y1, x2, y2) [count, 4] of a scene of `size`: square crops at uniformly random
    positions, their sides uniform in VIEW_SIDES of the short side, or (WHOLE_VIEW_SHARE of them) the scene."""
    width, height = size
    short = min(width, height)
    sides = rng.integers(int(np.ceil(VIEW_SIDES[0] * short)), int(VIEW_SIDES[1] * short) + 1, count)
    x, y = (rng.integers(0, extent - sides + 1) for extent in size)
    views = np.stack([x, y, x + sides, y + sides], axis=1)
    views[rng.random(count) < WHOLE_VIEW_SHARE] = (0, 0, width, height)
    return views


def aux_answers(form: str, views: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Each view's answer to the `form` question about `box`, by geometry: 1 Yes, 0 No, -1 redrawn (existence's
    partial overlaps, neither answer holding)."""
    x1, y1, x2, y2 = box
    inside = (views[:, 0] <= x1) & (views[:, 1] <= y1) & (views[:, 2] >= x2) & (views[:, 3] >= y2)
    meets = (views[:, 0] < x2) & (views[:, 2] > x1) & (views[:, 1] < y2) & (views[:, 3] > y1)
    if form == "existence":
        return np.where(inside, 1, np.where(meets, -1, 0))
    if form == "latent":
        return meets.astype(int)
    readable = min(x2 - x1, y2 - y1) >= READABLE_SIDE * (views[:, 2] - views[:, 0])
    return (inside & readable).astype(int)


class AuxQuestion(NamedTuple):
    form: str  # a key of AUX_QUESTIONS
    question: str
    answer: str  # YES_WORD or NO_WORD
    view: Image.Image


def aux_question(rng: np.random.Generator, record: SyntheticRecord) -> AuxQuestion:
    """A zoom strategy's yes/no question about a view of the scene, the answer drawn
    first (Yes or No equally) and the view redrawn until the geometry gives it. Where no candidate gives it (a box
    too small to read in any view, or one every view meets), the scene answers the other, which the whole scene,
    among the candidates, or another view gives."""
    form = list(AUX_QUESTIONS)[rng.integers(len(AUX_QUESTIONS))]
    wanted = int(rng.integers(2))
    views = random_views(rng, record.image.size, VIEW_CANDIDATES)
    answers = aux_answers(form, views, record.bbox)
    if not (answers == wanted).any():
        wanted = 1 - wanted
    view = views[np.argmax(answers == wanted)]
    return AuxQuestion(form, AUX_QUESTIONS[form](record.question), YES_WORD if wanted else NO_WORD,
                       record.image.crop(tuple(int(v) for v in view)))


AUX_STREAM = 1  # the auxiliary questions' random stream, beside the seed, apart from the other samples' draws


class Batches:
    """Training batches drawn on a background thread: (image count, ids [B,T], lengths [B], model inputs), made
    by the trainer. `curriculum_passed` (fine-tuning a model that has been through it) draws the curriculum's
    late box sizes from the first step."""

    def __init__(self, trainer: Trainer, batch_size: int, seed: int, steps: int, recipe: Recipe,
                 curriculum_passed: bool = False):
        self.trainer, self.recipe, self.curriculum_passed = trainer, recipe, curriculum_passed
        self.batch_size, self.rng, self.index, self.steps = batch_size, np.random.default_rng(seed), 0, steps
        self.aux_rng = np.random.default_rng([seed, AUX_STREAM])
        self.queue: queue.Queue = queue.Queue(maxsize=6)
        threading.Thread(target=self._fill, daemon=True).start()

    def _sample(self, num_images: int, progress: float) -> Sample:
        easy = self.rng.random() < 1.0 - (1.0 - EASY_FRACTION_END) * progress
        easy_sides = tuple(a + (b - a) * progress for a, b in zip(EASY_START, EASY_END))
        question_type, aspect = self._draw(self.recipe.type_mix), self._draw(self.recipe.aspect_mix)
        sides = easy_sides if easy else RELATIVE_BOX_SIDES
        if question_type != "single":
            sides = (min(sides[0], MULTI_BOX_LARGEST / 2), min(sides[1], MULTI_BOX_LARGEST))
        record = make_scene(TRAIN_SEED, self.index, question_type, aspect, image_sides=TRAIN_IMAGE_SIDES,
                            relative_box_sides=sides, clutter=TRAIN_CLUTTER)
        self.index += 1
        images = [record.image]
        question, answer = record.question, record.answer
        width, height = record.image.size
        for _ in range(num_images - 1):
            side = min(width, height, int(round(self.trainer.resolution * self.rng.uniform(1.0, 2.0))))
            x, y = (int(v) for v in self.rng.integers(0, (width - side + 1, height - side + 1)))
            images.append(record.image.crop((x, y, x + side, y + side)))
        if num_images == 1 and self.rng.random() < GENERAL_FRACTION:
            question, answer = GENERAL_QUESTION, record.background
        if num_images == 1 and self.aux_rng.random() < self.recipe.aux_share:
            aux = aux_question(self.aux_rng, record)
            question, answer, images = aux.question, aux.answer, [aux.view]
        return self.trainer.sample(question, answer, images)

    def _draw(self, shares: dict[str, float]) -> str:
        """One key by its share (no draw where there is one key, so recipe 1 draws as the shipped run did)."""
        return next(iter(shares)) if len(shares) == 1 else str(self.rng.choice(list(shares), p=list(shares.values())))

    def _fill(self) -> None:
        step = 0
        while True:
            num_images = 1 + step % (1 + self.recipe.max_extra_images)
            progress = 1.0 if self.curriculum_passed else min(1.0, step / (RAMP * self.steps))
            samples = [self._sample(num_images, progress) for _ in range(self.batch_size)]
            self.queue.put((num_images, *self.trainer.batch(samples, num_images, self.recipe.text_length)))
            step += 1

    def next(self):
        return self.queue.get()


FILLER = re.compile(r"w\d+")  # the word-level tokenizers' spare slots
VOCAB_MATRICES = {("language_model", "embed_tokens", "embedding"): 0, ("language_model", "lm_head", "kernel"): 1}
# (parameter path: its token axis), of both families


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A trained model to continue from: its parameters (flattened paths) and its tokenizer's vocabulary."""

    params: dict[tuple[str, ...], np.ndarray]
    vocab: dict[str, int]
    words: list[str]  # the vocabulary in id order, without special tokens and spare fillers

    @classmethod
    def read(cls, trainer_class: type[Trainer], folder: Path) -> "Checkpoint":
        """The checkpoint in `folder`, loaded by the trainer's family as the library loads it."""
        model = vicrop_jax.load(folder, family=trainer_class.family)
        tokenizer = model.tokenizer.backend
        vocab = tokenizer.get_vocab()
        specials = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
        words = [w for w in sorted(vocab, key=vocab.get) if w not in specials and not FILLER.fullmatch(w)]
        return cls(flatten_dict(jax.device_get(model.params)), vocab, words)

    def extended_words(self, words: list[str]) -> list[str]:
        """The checkpoint's words, then those of `words` it lacks: every word it knows keeps its id."""
        return self.words + [w for w in words if w not in self.words]

    def params_like(self, fresh, vocab: dict[str, int]):
        """The trained parameters in the shapes of `fresh` (its vocabulary `vocab`, grown from the checkpoint's):
        each known token keeps its embedding and lm_head rows, a new word's rows (a former spare slot or a new
        one) are the fresh ones."""
        known = {t: i for t, i in self.vocab.items() if not FILLER.fullmatch(t)}
        moved = [t for t, i in known.items() if vocab.get(t) != i]
        if moved:
            raise ValueError(f"tokens {moved} would change ids: the vocabulary must only grow")
        rows = np.array(sorted(known.values()))
        params = {}
        for path, value in flatten_dict(fresh).items():
            trained = np.asarray(self.params[path])
            if path in VOCAB_MATRICES:
                value, axis = np.array(value), VOCAB_MATRICES[path]
                np.swapaxes(value, 0, axis)[rows] = np.swapaxes(trained, 0, axis)[rows]
            elif trained.shape != value.shape:
                raise ValueError(f"{'/'.join(path)}: {trained.shape} in the checkpoint, {value.shape} in the model")
            else:
                value = trained
            params[path] = value
        return unflatten_dict(params)


def make_train_step(module, optimizer: optax.GradientTransformation):
    def loss_fn(params, ids, lengths, inputs):
        """Cross-entropy of the answer word and the end token, the last two tokens of each sample."""
        positions = lengths[:, None] + jnp.arange(-3, -1)
        logits = jnp.take_along_axis(module.apply({"params": params}, ids, *inputs), positions[..., None], axis=1)
        targets = jnp.take_along_axis(ids, positions + 1, axis=1)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        answer_correct = jnp.argmax(logits[:, 0], -1) == targets[:, 0]
        return losses.mean(), answer_correct.mean()

    @jax.jit
    def step(params, opt_state, ids, lengths, inputs):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, lengths, inputs)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    return step


def choose_map_layer(folder, count: int) -> None:
    """Name in config.json the LM layer whose attention leads ViCrop's box selection to the answer most
    often on calibration scenes, as the paper chose layer 14 of LLaVA-1.5 by where attention falls."""
    records = [make_record(CALIBRATION_SEED, i) for i in range(count)]
    analysis = by_layer(layer_analysis(vicrop_jax.load(folder), [(r.image, r.question, r.bbox) for r in records]))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config[MAP_LAYER_KEY] = int(np.argmax(analysis["box_hit_rate"]))
    config_path.write_text(json.dumps(config, indent=2))
    print("by layer: median attention ratio " + ", ".join(f"{m:.2f}" for m in analysis["median_attention_ratio"])
          + "; attention crop holds the answer " + ", ".join(f"{h:.0%}" for h in analysis["box_hit_rate"])
          + f"; map layer {config[MAP_LAYER_KEY]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="vicrop_jax/models/vicrop-tiny")
    parser.add_argument("--family", choices=sorted(TRAINERS), default="llava",
                        help="llava: vicrop-tiny's architecture; qwen2_5_vl: vicrop-tiny-qwen's")
    parser.add_argument("--recipe", type=int, choices=sorted(RECIPES), default=1,
                        help="1: the shipped model's data; 2: every question type and aspect of benchmark version 2; "
                             "3: recipe 1 and the zoom strategies' yes/no questions about views (with --init)")
    parser.add_argument("--init", help="continue training this checkpoint (its family's) instead of a fresh model")
    parser.add_argument("--aux-share", type=float,
                        help="share of one-image samples asking a yes/no question about a view (default: the "
                             "recipe's, 0.3 in recipe 3)")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float,
                        help=f"peak (default {LEARNING_RATE}, with --init {FINE_TUNE_LEARNING_RATE})")
    parser.add_argument("--seed", type=int, default=0, help="parameter init and crop positions")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--calibration-scenes", type=int, default=256, help="scenes that choose the map layer")
    parser.add_argument("--save-every", type=int, default=1000, help="also write the checkpoint every N steps")
    args = parser.parse_args()
    if args.aux_share and not set(AUX_WORDS) <= set(RECIPES[args.recipe].words):
        parser.error(f"--aux-share needs the yes/no questions' words: recipe {args.recipe} lacks them (use 3)")
    train(TRAINERS[args.family], args)


def train(trainer_class: type[Trainer], args: argparse.Namespace) -> None:
    start = time.perf_counter()
    recipe = RECIPES[args.recipe]
    if args.aux_share is not None:
        recipe = dataclasses.replace(recipe, aux_share=args.aux_share)
    init = Checkpoint.read(trainer_class, Path(args.init)) if args.init else None  # before --out may overwrite it
    words = trainer_class.words(recipe) if init is None else init.extended_words(trainer_class.words(recipe))
    hf_config = trainer_class.hf_config(words)
    params = trainer_class.init_params(hf_config, args.seed)
    out = trainer_class.write_checkpoint(Path(args.out), hf_config, params, words)
    trainer = trainer_class.from_folder(out)
    if init is not None:
        params = init.params_like(params, trainer.tokenizer.backend.get_vocab())
        print(f"continuing {args.init}: {len(words) - len(init.words)} new words, vocabulary "
              f"{hf_config['text_config']['vocab_size']}", flush=True)
    peak = args.learning_rate or (LEARNING_RATE if init is None else FINE_TUNE_LEARNING_RATE)
    warmup = min(WARMUP_STEPS if init is None else FINE_TUNE_WARMUP_STEPS, args.steps // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, args.steps, peak * 0.02)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = optimizer.init(params)
    step_fn = make_train_step(trainer.module, optimizer)
    batches = Batches(trainer, args.batch_size, args.seed, args.steps, recipe, curriculum_passed=init is not None)
    history: dict[int, list] = {n: [] for n in range(1, 2 + recipe.max_extra_images)}
    for step in range(1, args.steps + 1):
        num_images, ids, lengths, inputs = batches.next()
        params, opt_state, loss, accuracy = step_fn(params, opt_state, ids, lengths, inputs)
        history[num_images].append((float(loss), float(accuracy)))
        if step % args.log_every == 0:
            recent = "  ".join(f"{n} image(s): loss {np.mean(h[-args.log_every // 3:], axis=0)[0]:.3f} "
                               f"acc {np.mean(h[-args.log_every // 3:], axis=0)[1]:.3f}" for n, h in history.items())
            print(f"step {step}  {time.perf_counter() - start:6.0f} s  {recent}", flush=True)
        if step % args.save_every == 0 and step < args.steps:
            trainer_class.write_checkpoint(out, hf_config, jax.device_get(params), words)
    trainer_class.write_checkpoint(out, hf_config, jax.device_get(params), words)
    choose_map_layer(out, args.calibration_scenes)
    print(f"trained {args.steps} steps in {(time.perf_counter() - start) / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
