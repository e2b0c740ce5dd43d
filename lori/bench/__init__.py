"""``lori bench``: the kernel, memory and storage benchmark suites in one run, on your own
machine (they ship with the package; ``pip install "lori-kernels[bench]"`` adds PEFT,
pytest-benchmark and matplotlib, which they compare against and plot with).

Each suite writes ``<table>_<device>.csv`` (one row per measurement, with device name,
torch/triton/CUDA versions, commit and date) and ``<suite>_<device>.json`` (the same rows
under the environment and the settings of the run) into the results directory; then the
PNG plots are drawn from every results file there and the tables printed as markdown.

Modules: ``common`` (environment, timing, results files), ``kernels``, ``memory``,
``storage``, ``interference``, ``roofline`` (one ``run(device, quick=, full=, backends=) -> {table: rows}``
each) and ``report`` (markdown tables and PNG plots from the results files). The
pytest-benchmark suites over the same cases are the checkout's ``benchmarks/test_*.py``.
``interference`` measures no speed but the LoRI paper's claims in miniature (merging and
continual learning on toy tasks, minutes of training): it runs only when named,
``--suite interference``, not with ``all``. ``roofline`` measures nothing either: it predicts
each backend's layer time on an H100 SXM and an H200 from its kernel plan (pure arithmetic,
seconds), into ``roofline*_model.csv`` whatever the device. ``serving`` (many adapters in one
batch against PEFT's mixed batch) runs only when named, ``--suite serving``.

Wired into ``lori`` as ``lori bench``; also ``python -m lori.bench``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from lori.bench.common import RESULTS

__all__ = ["SUITES", "add_arguments", "run"]

log = logging.getLogger(__name__)

SUITES = ("kernels", "memory", "storage", "interference", "roofline", "serving")
ALL = ("kernels", "memory", "storage", "roofline")  # --suite all: speed, memory, storage and the roofline model
DEFAULT_RESULTS = RESULTS


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lori bench``."""
    parser.add_argument(
        "--suite",
        choices=[*SUITES, "all"],
        default="all",
        help=f"which suite to run (default: all = {', '.join(ALL)}; interference, LoRA against LoRI merged and in "
        "continual learning on toy tasks, a few minutes on a CPU, runs only when named)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small smoke shapes, a few seconds per suite; numbers not meaningful"
    )
    parser.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        default=None,
        help=f"results directory (default: {DEFAULT_RESULTS}, under the working directory; its quick/ subdirectory "
        "with --quick)",
    )
    parser.add_argument(
        "--backends",
        type=_names,
        metavar="NAMES",
        default=None,
        help="lori_linear backends to time, comma-separated (default: every one that runs on the device; "
        "the Triton backends are timed on the CPU only when named, as they run there in its interpreter)",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: cuda if present)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="kernels: every combination of shape, M, r and sparsity (default: a star around the centre case)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: draw the plots and print the tables of --results"
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen suites, write their results, plots and print the markdown tables."""
    import torch

    from lori.bench import common, report
    from lori_kernels.backends import BACKENDS

    unknown = sorted(set(args.backends or ()) - set(BACKENDS))
    if unknown:
        log.error("--backends: unknown %s; choose from %s", unknown, ", ".join(BACKENDS))
        return 2
    results = args.results or (DEFAULT_RESULTS / "quick" if args.quick else DEFAULT_RESULTS)
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: no CUDA device here")
        return 2
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if not args.report_only:
        for name in ALL if args.suite == "all" else (args.suite,):
            log.info("suite %s on %s%s", name, device.type, " (quick)" if args.quick else "")
            settings = {"quick": args.quick, "full": args.full, "backends": args.backends, "device": device.type}
            if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: say how busy it was
                settings["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
            options = dict(quick=args.quick, full=args.full, backends=args.backends)
            if name == "kernels":  # the long suite: its rows are written after every case
                options["progress"] = lambda rows: common.write_csv(f"kernels_{device.type}", rows, results)
            suite = importlib.import_module(f"lori.bench.{name}")
            tables = suite.run(device, **options)
            label = getattr(suite, "RESULTS_LABEL", device.type)  # what the results are of: the device, or a model
            for table, rows in tables.items():
                if rows:
                    log.info("wrote %s", common.write_csv(f"{table}_{label}", rows, results))
            environment = common.environment(device)
            document = {"suite": name, "environment": environment, "settings": settings, "tables": tables}
            log.info("wrote %s", common.write_json(f"{name}_{label}", document, results))
    for path in report.plots(results):
        log.info("wrote %s", path)
    print(report.markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lori bench", description="kernel, memory and storage benchmarks")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return run(args)
