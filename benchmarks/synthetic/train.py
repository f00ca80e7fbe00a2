"""Train vicrop-tiny: a small LLaVA-1.5-architecture model, from scratch, on synthetic small-detail VQA (or,
with `--family qwen2_5_vl`, vicrop-tiny-qwen: the same data in Qwen2.5-VL's architecture).

    python -m benchmarks.synthetic.train --out vicrop_jax/models/vicrop-tiny                 # the shipped model
    python -m benchmarks.synthetic.train --recipe 2 --out runs/vicrop-tiny-v2               # benchmark version 2
    python -m benchmarks.synthetic.train --family qwen2_5_vl --steps 6000 --out vicrop_jax/models/vicrop-tiny-qwen

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
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

import vicrop_jax
from benchmarks.synthetic.evaluate import by_layer, layer_analysis
from vicrop_jax.families import LLAVA, QWEN2_5_VL, Family
from vicrop_jax.families.qwen2_5_vl import image_tokens, rope_positions
from vicrop_jax.nn._config import MAP_LAYER_KEY
from vicrop_jax.nn.qwen_vit import VisionPatches, vision_patches
from vicrop_jax.testing.checkpoints import (
    QWEN_SPECIAL_TOKENS, init_llava_params, init_qwen_params, llava_hf_config, qwen_hf_config,
    write_llava_checkpoint, write_qwen_checkpoint,
)
from vicrop_jax._tokenizer import Tokenizer
from vicrop_jax.preprocessing import preprocess
from vicrop_jax.prompts import GENERAL_QUESTION, llava_prompt, qwen2_5_vl_prompt
from vicrop_jax.qwen_preprocessing import preprocess_qwen
from vicrop_jax.testing.synthetic import BACKGROUNDS, RELATIVE_BOX_SIDES, SHAPES, make_record, make_scene

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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a training run draws: question types and aspects (shares), extra images, the vocabulary."""

    type_mix: dict[str, float]
    aspect_mix: dict[str, float]
    max_extra_images: int
    words: tuple[str, ...]


RECIPES = {
    1: Recipe({"single": 1.0}, {"square": 1.0}, 1, tuple(WORDS)),
    2: Recipe({"single": 0.55, "two_region": 0.15, "distractor": 0.15, "counting": 0.15},
              {"square": 0.6, "landscape": 0.2, "portrait": 0.2}, 2, tuple(WORDS + VERSION_2_WORDS)),
}
TEXT_LENGTH = 40  # prompt and answer tokens besides the image positions, at most


def model_hf_config() -> dict:
    return llava_hf_config(
        image_size=112, width=192, vision_width=128, vocab_size=64, vision_layers=1, text_layers=4, num_heads=4,
        num_kv_heads=4, intermediate_factor=3, vision_feature_layer=-2,
    )


QWEN_TEMPLATE_WORDS = "system You are a helpful assistant . user".split()  # Qwen's chat template, besides specials


def qwen_model_hf_config(words: list[str]) -> dict:
    """vicrop-tiny-qwen: a vision tower of depth 0 (patch embedding and merger: each LM image token is local to
    its 28 x 28 pixels, as vicrop-tiny's are to their patch), then the Qwen2 decoder at vicrop-tiny's size."""
    vocab_size = -(-(len(QWEN_SPECIAL_TOKENS) + len(words)) // 32) * 32
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
    def batch(self, samples: list[Sample], num_images: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        """(ids [B, T], lengths [B], the model's other inputs) of samples of `num_images` images each."""


@dataclasses.dataclass(frozen=True)
class LlavaTrainer(Trainer):
    """vicrop-tiny: `llava_prompt` + " " + the answer + EOS, each `<image>` expanded; inputs (pixels [B,I,H,W,C],)."""

    family = LLAVA
    hf_config = staticmethod(lambda words: model_hf_config())
    init_params = staticmethod(init_llava_params)
    write_checkpoint = staticmethod(write_llava_checkpoint)

    def sample(self, question, answer, images):
        ids = self.tokenizer.encode(llava_prompt(question, len(images)) + " " + answer) + [self.tokenizer.eos_id]
        image_id = self.config.image_token_id
        ids = [t for token in ids for t in ([token] * self.config.tokens_per_image if token == image_id else [token])]
        return ids, [preprocess(im, self.image_config) for im in images]

    def batch(self, samples, num_images):
        ids = np.full((len(samples), num_images * self.config.tokens_per_image + TEXT_LENGTH),
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

    def batch(self, samples, num_images):
        patches = max(sum(len(image.patches) for image in images) for _, images in samples)
        rows = -(-patches // PATCH_STEP) * PATCH_STEP
        length = rows // self.config.merge_unit + TEXT_LENGTH
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


class Batches:
    """Training batches drawn on a background thread: (image count, ids [B,T], lengths [B], model inputs), made
    by the trainer."""

    def __init__(self, trainer: Trainer, batch_size: int, seed: int, steps: int, recipe: Recipe):
        self.trainer, self.recipe = trainer, recipe
        self.batch_size, self.rng, self.index, self.steps = batch_size, np.random.default_rng(seed), 0, steps
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
        return self.trainer.sample(question, answer, images)

    def _draw(self, shares: dict[str, float]) -> str:
        """One key by its share (no draw where there is one key, so recipe 1 draws as the shipped run did)."""
        return next(iter(shares)) if len(shares) == 1 else str(self.rng.choice(list(shares), p=list(shares.values())))

    def _fill(self) -> None:
        step = 0
        while True:
            num_images = 1 + step % (1 + self.recipe.max_extra_images)
            progress = min(1.0, step / (RAMP * self.steps))
            samples = [self._sample(num_images, progress) for _ in range(self.batch_size)]
            self.queue.put((num_images, *self.trainer.batch(samples, num_images)))
            step += 1

    def next(self):
        return self.queue.get()


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
                        help="1: the shipped model's data; 2: every question type and aspect of benchmark version 2")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="parameter init and crop positions")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--calibration-scenes", type=int, default=256, help="scenes that choose the map layer")
    parser.add_argument("--save-every", type=int, default=1000, help="also write the checkpoint every N steps")
    args = parser.parse_args()
    train(TRAINERS[args.family], args)


def train(trainer_class: type[Trainer], args: argparse.Namespace) -> None:
    start = time.perf_counter()
    recipe = RECIPES[args.recipe]
    words = trainer_class.words(recipe)
    hf_config = trainer_class.hf_config(words)
    params = trainer_class.init_params(hf_config, args.seed)
    out = trainer_class.write_checkpoint(Path(args.out), hf_config, params, words)
    trainer = trainer_class.from_folder(out)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, min(200, args.steps // 4), args.steps,
                                                  args.learning_rate * 0.02)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = optimizer.init(params)
    step_fn = make_train_step(trainer.module, optimizer)
    batches = Batches(trainer, args.batch_size, args.seed, args.steps, recipe)
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
