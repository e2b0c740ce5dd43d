"""The ``lori`` command line: ``train``, ``extract-masks``, ``merge``, ``export``,
``import``, ``eval``, ``bench``, ``demo``.

``lori train`` runs alone or under a launcher: ``torchrun --nproc_per_node=N -m lori.cli
train ...`` or ``accelerate launch -m lori.cli train ...``.

A command that fails exits non-zero with one line on stderr that names the file or
option at fault (``--debug`` or ``LORI_DEBUG=1``: the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path

__all__ = ["main"]

# The files ``save_pretrained`` writes for a model: what ``lori merge --fold`` may replace.
_MODEL_FILE = re.compile(r"(generation_)?config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _pair(text: str) -> tuple[int, int]:
    try:
        bo, br = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'bo,br' (e.g. 32,32), got {text!r}") from None
    return bo, br


def _mesh(text: str) -> tuple[int, int]:
    try:
        replicate, shard = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'replicate x shard' (e.g. 8x8), got {text!r}") from None
    return replicate, shard


def _import_dropout(text: str) -> float | None:
    """A dropout probability in [0, 1), or ``peft``: the PEFT config's (None)."""
    if text.lower() == "peft":
        return None
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0.0 <= p < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1) or 'peft', got {text!r}")
    return p


def _names(text: str) -> tuple[str, ...]:
    return tuple(n for n in text.split(",") if n)


def _optional(kind):
    """An option type that also takes ``none`` (the field's ``None``)."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


# Fields whose option is spelled out: "--r" is ambiguous to torchrun's own parser.
_FLAGS = {"r": "--rank"}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of a config dataclass, typed and documented from the field; a
    field that is itself a config dataclass (``TrainConfig.adapter``) adds its fields'
    options instead. An option not given is absent from the parsed arguments (``_given``),
    so that a recipe's defaults apply under the options given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, help_text = hints[f.name], f.metadata.get("help", "")
        if dataclasses.is_dataclass(hint):
            _add_dataclass_options(parser, hint, skip=_NOT_TRAINING)
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if not required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{help_text} (default: {default})"
        options = dict(dest=f.name, default=argparse.SUPPRESS, required=required, help=help_text)
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        kind = {int: int, float: float, str: str}.get(hint)
        args = typing.get_args(hint)
        if kind is None and args:
            kind = next((t for t in (int, float, str) if t in args), None)
        if f.name == "block":
            kind = _pair
        elif f.name == "mesh":
            kind = _mesh
        elif f.name == "target_modules":
            kind = _names
        if type(None) in args and kind is not None:
            kind = _optional(kind)
        parser.add_argument(flag, type=kind, **options)


# LoRIConfig fields that are not training options (mask extraction has its own command).
_NOT_TRAINING = ("sparsity",)


def _given(cls, args: argparse.Namespace) -> dict:
    """The fields of the config dataclass ``cls`` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _train(args: argparse.Namespace) -> int:
    from lori.config import LoRIConfig
    from lori.train import TrainConfig, train

    cfg = TrainConfig.from_recipe(args.recipe, adapter=_given(LoRIConfig, args), **_given(TrainConfig, args))
    if args.plan:
        from lori.train.plan import memory_plan

        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(memory_plan(cfg, world_size, gpu_memory=args.gpu_memory).table())
        return 0
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("lori").info(
            "final loss %.4f after %d steps; adapter at %s", result["losses"][-1], result["steps"], result["adapter"]
        )
    return 0


def _check_output(output: str, inputs: list[str], owned=None, what: str = "") -> None:
    """Refuse, before anything is loaded, an ``--output`` that is, holds or lies inside
    one of the inputs, or that its writer would refuse: a directory for a file (``owned``
    None), or a directory holding files that are not ``owned`` by the writer."""
    from lori.errors import OutputError
    from lori.files import check_output_dir, check_output_file

    out = Path(output).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if path == out or out in path.parents or path in out.parents:
            raise OutputError(f"--output {output} would write over or into the input {given}; choose another output")
    if owned is None:
        check_output_file(output)
    else:
        check_output_dir(output, owned, what=what)


def _extract_masks(args: argparse.Namespace) -> int:
    from lori.checkpoint import load_lori
    from lori.masks import extract_masks, save_masks
    from lori.recipes import recipe

    _check_output(args.output, [args.adapter])
    preset = recipe(args.recipe)["masks"]
    block = args.block or preset.get("block")
    model = load_lori(_base_model(args.model), args.adapter)
    save_masks(extract_masks(model, args.sparsity, block=block, rule=args.rule or preset["rule"]), args.output)
    logging.getLogger("lori").info("masks -> %s", args.output)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lori.checkpoint import ADAPTER_FILES, save_lori
    from lori.files import is_writer, write_directory
    from lori.merge import merge

    owned, what = (_MODEL_FILE.fullmatch, "model") if args.fold else (ADAPTER_FILES, "LoRI adapter")
    _check_output(args.output, [args.model, *args.adapters], owned, what)
    model = merge(
        _base_model(args.model), args.adapters, weights=args.weights, combination=args.combination, fold=args.fold
    )
    if not args.fold:
        save_lori(model, args.output)
    elif is_writer():
        with write_directory(args.output, owned, what=what) as out:
            model.save_pretrained(out.staging_dir())
        logging.getLogger("lori").info("merged model -> %s", args.output)
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from lori.checkpoint import ADAPTER_FILES, load_lori, save_lori
    from lori.peft_interop import PEFT_FILES, export_peft

    peft = args.format == "peft"
    _check_output(
        args.output, [args.adapter], *((PEFT_FILES, "PEFT adapter") if peft else (ADAPTER_FILES, "LoRI adapter"))
    )
    model = load_lori(_base_model(args.model), args.adapter)
    dtype = getattr(torch, args.dtype)
    if peft:
        export_peft(model, args.output, dtype=dtype)
    else:
        save_lori(model, args.output, dtype=dtype)
    return 0


def _import(args: argparse.Namespace) -> int:
    from lori.checkpoint import ADAPTER_FILES, save_lori
    from lori.peft_interop import import_peft

    _check_output(args.output, [p for p in (args.adapter, args.masks) if p], ADAPTER_FILES, "LoRI adapter")
    model = import_peft(_base_model(args.model), args.adapter, args.masks, block=args.block, dropout=args.dropout)
    save_lori(model, args.output)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from lori.checkpoint import load_lori
    from lori.data import load_examples
    from lori.evaluate import evaluate

    examples = load_examples(args.data)
    model = _base_model(args.model)
    if args.adapter:
        load_lori(model, args.adapter)
    figures = evaluate(model, AutoTokenizer.from_pretrained(args.model), examples)
    print(json.dumps(figures))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lori.demo import run_demo

    figures = run_demo(args.workdir, processes=args.processes, progress=not args.no_progress)
    ok = figures["lori_s"]["exact_match"] > figures["base"]["exact_match"]
    logging.getLogger("lori").info("demo %s", "passed" if ok else "FAILED: LoRI-S did not beat the base model")
    return 0 if ok else 1


def _base_model(path: str):
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no model directory at {path} (a local Hugging Face model with config.json)")
    return AutoModelForCausalLM.from_pretrained(path)


def build_parser() -> argparse.ArgumentParser:
    from lori.merge import COMBINATIONS
    from lori.recipes import MASK_RULES, RECIPES
    from lori.train import TrainConfig

    parser = _Parser(prog="lori", description="LoRI adapters: training, masks, evaluation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="on failure, the traceback (also LORI_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a LoRI adapter (LoRI-D; LoRI-S with --masks)")
    train.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="lori",
        help="defaults under the options given: 'lori' (the library's) or 'paper' (the original LoRI code's: element "
        "masks, constant lr, per-tensor clipping, sequence-averaged loss; see README) (default: lori)",
    )
    _add_dataclass_options(train, TrainConfig)
    train.add_argument(
        "--plan",
        action="store_true",
        help="print the memory one rank would hold (the model built on meta from its config.json: no weights or data "
        "read) and exit",
    )
    train.add_argument("--world-size", type=int, default=None, help="ranks for --plan (default: $WORLD_SIZE or 1)")
    train.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: --plan says whether it fits")
    train.set_defaults(run=_train)

    masks = commands.add_parser("extract-masks", help="masks of a trained adapter by global top-k of block norms")
    masks.add_argument("--model", required=True, help="base model directory")
    masks.add_argument("--adapter", required=True, help="adapter directory (lori_config.json + adapter.safetensors)")
    masks.add_argument("--sparsity", type=float, default=0.9, help="fraction of blocks dropped (default: 0.9)")
    masks.add_argument(
        "--block", type=_pair, default=None, help="mask block bo,br (default: the adapter's; 1,1: elements)"
    )
    masks.add_argument(
        "--rule",
        choices=MASK_RULES,
        default=None,
        help="'exact': round((1-s)*N) kept, ties broken by position; 'original': the original LoRI code's, "
        "int((1-s)*N) and every tie of the last kept (default: the recipe's)",
    )
    masks.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="lori",
        help="'paper': element masks (--block 1,1) by the original rule; 'lori': the adapter's block, exact "
        "(default: lori)",
    )
    masks.add_argument("--output", required=True, help="masks file (.safetensors)")
    masks.set_defaults(run=_extract_masks)

    merge = commands.add_parser(
        "merge", help="combine adapters (LoRI or PEFT) into one LoRI adapter, or fold them into the base model"
    )
    merge.add_argument("--model", required=True, help="base model directory")
    merge.add_argument("--adapters", required=True, nargs="+", help="adapter directories (LoRI or PEFT)")
    merge.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="one per adapter (default: the original LoRI scripts': up to 3 adapters 0.5 per LoRI-D and 0.4 per "
        "LoRI-S, 4 or more 0.4 and 0.3)",
    )
    merge.add_argument("--combination", choices=COMBINATIONS, default="cat", help="as PEFT's (default: cat)")
    merge.add_argument("--fold", action="store_true", help="write the base model with the merge folded in")
    merge.add_argument("--output", required=True, help="output directory (LoRI adapter, or model with --fold)")
    merge.set_defaults(run=_merge)

    export = commands.add_parser("export", help="write a LoRI adapter as a PEFT LoRA adapter, or compact in a dtype")
    export.add_argument("--model", required=True, help="base model directory")
    export.add_argument("--adapter", required=True, help="LoRI adapter directory")
    export.add_argument(
        "--format", choices=["peft", "lori"], default="peft", help="PEFT LoRA adapter or compact LoRI (default: peft)"
    )
    export.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="dtype of B (and PEFT's A)"
    )
    export.add_argument("--output", required=True, help="directory to write")
    export.set_defaults(run=_export)

    imp = commands.add_parser("import", help="a PEFT LoRA (or original LoRI) adapter as a LoRI adapter")
    imp.add_argument("--model", required=True, help="base model directory")
    imp.add_argument("--adapter", required=True, help="PEFT adapter directory")
    imp.add_argument("--masks", default=None, help="masks file of an original LoRI-S adapter (torch.save or ours)")
    imp.add_argument("--block", type=_pair, default=None, help="block of the imported B (default: 1,1 with masks)")
    imp.add_argument(
        "--dropout",
        type=_import_dropout,
        default=0.0,
        help="dropout of the imported adapter when it trains on: a probability, or 'peft' for the PEFT config's "
        "lora_dropout (default: 0, the paper's recipe)",
    )
    imp.add_argument("--output", required=True, help="LoRI adapter directory to write")
    imp.set_defaults(run=_import)

    ev = commands.add_parser("eval", help="held-out loss and exact-match accuracy (prints JSON)")
    ev.add_argument("--model", required=True, help="base model directory (with its tokenizer)")
    ev.add_argument("--adapter", default=None, help="adapter directory (none: the base model)")
    ev.add_argument("--data", required=True, help="prompt/response file")
    ev.set_defaults(run=_eval)

    from lori import bench as bench_command  # light: the suites load only when the command runs

    bench = commands.add_parser("bench", help="kernel, memory and storage benchmarks: CSV + JSON + PNG, markdown")
    bench_command.add_arguments(bench)
    bench.set_defaults(run=bench_command.run)

    demo = commands.add_parser("demo", help="the LoRI recipe end to end on a tiny Llama, on the CPU")
    demo.add_argument("--workdir", default="demo_output", help="where the demo writes (default: demo_output)")
    demo.add_argument("--processes", type=int, default=2, help="training processes (torchrun, gloo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.debug or os.environ.get("LORI_DEBUG") == "1":
        return args.run(args)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"lori {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure: one line, the traceback only when asked for
        print(f"lori {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(error: Exception) -> str:
    """The error's message on one line; its type too unless it is one of the expected ones."""
    from lori.errors import LoRIError

    text = " ".join(str(error).split()) or "(no message)"
    if isinstance(error, (LoRIError, ValueError, FileNotFoundError, TypeError)):
        return text
    return f"{type(error).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
