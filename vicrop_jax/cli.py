"""Command line: `vicrop-jax demo`, `vicrop-jax convert`, `vicrop-jax eval` and `vicrop-jax score`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from vicrop_jax.evaluation.metrics import METRICS
from vicrop_jax.vicrop.methods import MAP_METHOD_NAMES, SECOND_REGION_MASS, STRATEGY_NAMES


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEMO_SEED, DEMO_INDEX = 2, 25  # a held-out synthetic scene (training used seed 0, evaluation seed 1)


def run_demo(args: argparse.Namespace) -> int:
    import vicrop_jax
    from vicrop_jax.testing.synthetic import make_record

    model = vicrop_jax.load(args.model, check_finite=True)
    record = make_record(DEMO_SEED, args.index)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record.image.save(out / "demo_image.png")
    for attempt in ("first call (compiles)", "second call (compiled)"):
        start = time.perf_counter()
        result = vicrop_jax.answer(model, record.image, record.question, args.method)
        print(f"{attempt}: {time.perf_counter() - start:.2f} s")
    overlay_path = out / "demo_map.png"
    vicrop_jax.viz.overlay(record.image, result.importance, result.bbox, overlay_path)
    print(f"image:                {out / 'demo_image.png'} ({record.image.width} px, synthetic scene {args.index})")
    print(f"question:             {record.question}")
    print(f"true answer:          {record.answer!r} (box {record.bbox}, {record.relative_size:.1%} of the image side)")
    print(f"answer without crop:  {result.original_answer!r}")
    print(f"answer with ViCrop:   {result.answer!r} ({args.method}, crop box {result.bbox})")
    print(f"map overlay:          {overlay_path}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    import vicrop_jax
    from vicrop_jax._loading import dtype_name, save_hf_checkpoint, save_orbax_checkpoint

    start = time.perf_counter()
    model = vicrop_jax.load(args.source, dtype=args.dtype, allow_pickle=args.allow_pickle, check_finite=True)
    if args.format == "orbax":
        save_orbax_checkpoint(model, args.out)
    else:
        shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20)
        save_hf_checkpoint(model, args.out, max_shard_bytes=shard)
    dtype = dtype_name(model.module.param_dtype)
    print(f"converted {args.source} -> {args.out} ({args.format}, {dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def regions_argument(text: str) -> int | str:
    """--regions: a positive number of crops or "auto"."""
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of crops or 'auto', got {text!r}")
    return count


def run_eval(args: argparse.Namespace) -> int:
    from vicrop_jax.evaluation.runner import EvalSettings, evaluate

    names = [field.name for field in dataclasses.fields(EvalSettings)]
    given = {name: getattr(args, name) for name in names}
    return evaluate(EvalSettings(**{**given, "options": tuple(given["options"])}))


def run_score(args: argparse.Namespace) -> int:
    from vicrop_jax.evaluation.scoring import score

    return score(args.results, args.format)


def add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a benchmark (batched, resumable, data-parallel)",
        description="Answer every record of a benchmark with ViCrop and append one JSONL line per record. "
        "Rerunning the same command resumes. Exit status: 0 all answered, 1 some records failed, 2 bad input.",
    )
    evaluate.add_argument("--data", type=Path, required=True, help="JSON list, JSONL, or the TextVQA json")
    evaluate.add_argument("--images", type=Path, required=True, help="folder the records' image paths are in")
    evaluate.add_argument("--model", required=True, help="checkpoint folder or cached repo id")
    evaluate.add_argument("--method", default="rel_att", choices=STRATEGY_NAMES)
    evaluate.add_argument("--out", type=Path, required=True, help="results JSONL (appended; resumed)")
    evaluate.add_argument("--metric", default="auto", choices=("auto", *METRICS),
                          help="auto: vqa for lists of human answers, pope for yes/no labels, else gqa")
    evaluate.add_argument("--batch-size", type=int, default=8, help="rounded up to a multiple of the devices")
    evaluate.add_argument("--dataset-format", default="auto", choices=("auto", "records", "textvqa"))
    evaluate.add_argument("--dataset-name", help="dataset column of the tables (default: from the data file)")
    evaluate.add_argument("--high-res", action="store_true", help="tile images above 1024 px for the map")
    evaluate.add_argument("--limit", type=int, help="only the first N records")
    evaluate.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: the checkpoint's own")
    evaluate.add_argument("--max-new-tokens", type=int, default=20)
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the random baseline (plus record index)")
    evaluate.add_argument("--layer", type=int, help="LM layer of the map (default: the paper's)")
    evaluate.add_argument("--qformer-layer", type=int, default=2, help="InstructBLIP cross-attention layer")
    evaluate.add_argument("--regions", type=regions_argument, default=1,
                          help="crops per question from one map (default 1, the paper's), or 'auto': a second "
                               "one where the map's mass outside the first calls for it")
    evaluate.add_argument("--second-region-mass", type=float, default=SECOND_REGION_MASS,
                          help="--regions auto: the share of the map's mass outside the first box above which a "
                               "second box is cropped (default fitted on vicrop-tiny's calibration scenes)")
    evaluate.add_argument("--gate", type=float,
                          help="crop only when the plain answer's first token is less probable than this")
    evaluate.add_argument("--geometry", choices=("paper", "exact"), default="paper",
                          help="paper: the map stretched over the whole image; exact: on the part the image "
                               "processor keeps (LLaVA: the centre square)")
    evaluate.add_argument("--option", dest="options", action="append", default=[], metavar="NAME=VALUE",
                          help="another option of the method (repeatable), e.g. focus: checks=4, zoom_search: "
                               "node_budget=32 or threshold_decrease=[0.1,0.2]")
    evaluate.add_argument("--process-index", type=int, help="this process's share: records i %% count == index")
    evaluate.add_argument("--process-count", type=int, help="number of processes sharing the run")
    evaluate.add_argument("--allow-outside-images", action="store_true",
                          help="read image paths that leave --images (absolute, '..', links out)")
    evaluate.add_argument("--distributed", action="store_true",
                          help="call jax.distributed.initialize() to take the process index and count from it")
    evaluate.set_defaults(run=run_eval)


def add_score_parser(commands) -> None:
    score = commands.add_parser("score", help="tables of accuracy from eval result files (merged)")
    score.add_argument("results", nargs="+", help="result JSONL files (or a multi-process run's --out name)")
    score.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    score.set_defaults(run=run_score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vicrop-jax", description=__doc__)
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="compile every program afresh instead of reading JAX's persistent compilation cache "
                             "($XDG_CACHE_HOME/vicrop_jax/jax-compilation-cache)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="answer a question about a generated scene, without and with ViCrop")
    demo.add_argument("--model", default="vicrop-tiny",
                      help="the embedded model (default), a LLaVA checkpoint folder or a cached repo id")
    demo.add_argument("--index", type=int, default=DEMO_INDEX, help="which generated scene")
    demo.add_argument("--method", default="rel_att", choices=MAP_METHOD_NAMES)
    demo.add_argument("--out", default="vicrop_demo_out", help="folder for the image and outputs")
    demo.set_defaults(run=run_demo)
    convert = commands.add_parser(
        "convert", help="convert a checkpoint once (Orbax: no conversion at load, restored per device slice)")
    convert.add_argument("source", help="HF checkpoint folder or cached repo id")
    convert.add_argument("out", help="output folder")
    convert.add_argument("--format", choices=("orbax", "hf"), default="orbax",
                         help="orbax: Flax layout, no transposes at load time; hf: transformers' safetensors")
    convert.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: the checkpoint's own")
    convert.add_argument("--max-shard-mb", type=float, help="shard HF output above this size")
    convert.add_argument("--allow-pickle", action="store_true", help="read pytorch_model*.bin (runs torch.load)")
    convert.set_defaults(run=run_convert)
    add_eval_parser(commands)
    add_score_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_compilation_cache:
        import jax

        jax.config.update("jax_enable_compilation_cache", False)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        return _failed(args.command, str(error))
    except OSError as error:  # a read-only or full disk, a folder where a file was expected
        return _failed(args.command, f"{error.filename or ''}: {error.strerror or error}")


def _failed(command: str, why: str) -> int:
    """The error in one write, line end included: a library thread logging at the same time (Orbax's failed
    reads) cannot land between the message and its newline."""
    sys.stderr.write(f"vicrop-jax {command}: error: {why}\n")
    sys.stderr.flush()
    return 2


if __name__ == "__main__":
    sys.exit(main())
