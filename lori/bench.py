"""``lori bench``: the kernel, memory and storage benchmark suites in one run.

Each suite writes ``<table>_<device>.csv`` (one row per measurement, with device name,
torch/triton/CUDA versions, commit and date) and ``<suite>_<device>.json`` (the same rows
under the environment and the settings of the run) into the results directory; then the
PNG plots are drawn from every results file there and the tables printed as markdown.

The suites live in the checkout's ``benchmarks/`` package (beside ``lori/``; see
``benchmarks/__init__.py``), not in the installed library: they need peft and matplotlib
and are run from a source checkout (``pip install -e ".[dev]"``). This module loads that
package by its path, so ``lori bench`` works from any working directory.

Wired into ``lori`` as ``lori bench``; also ``python -m lori.bench``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

__all__ = ["SUITES", "add_arguments", "benchmarks_package", "run"]

log = logging.getLogger(__name__)

SUITES = ("kernels", "memory", "storage")
CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = CHECKOUT / "benchmarks" / "results"


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lori bench``."""
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all", help="which suite to run (default: all)")
    parser.add_argument(
        "--quick", action="store_true", help="small smoke shapes, a few seconds per suite; numbers not meaningful"
    )
    parser.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        default=None,
        help=f"results directory (default: {DEFAULT_RESULTS}, or its quick/ subdirectory with --quick)",
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


def benchmarks_package():
    """The checkout's ``benchmarks`` package (imported from its path; RuntimeError outside a
    source checkout)."""
    init = CHECKOUT / "benchmarks" / "__init__.py"
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(loaded.__file__).resolve() == init:
        return loaded
    if loaded is not None:
        raise RuntimeError(f"another module named 'benchmarks' is imported ({loaded.__file__}); run lori bench alone")
    if not init.is_file():
        raise RuntimeError(
            f"lori bench runs from a source checkout of lori-kernels: {init} is missing "
            "(clone the repository and pip install -e '.[dev]' there)"
        )
    spec = importlib.util.spec_from_file_location("benchmarks", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    """Run the chosen suites, write their results, plots and print the markdown tables."""
    import torch

    from lori_kernels.backends import BACKENDS

    unknown = sorted(set(args.backends or ()) - set(BACKENDS))
    if unknown:
        log.error("--backends: unknown %s; choose from %s", unknown, ", ".join(BACKENDS))
        return 2
    try:
        benchmarks_package()
    except RuntimeError as e:
        log.error("%s", e)
        return 2
    common = importlib.import_module("benchmarks.common")
    report = importlib.import_module("benchmarks.report")
    results = args.results or (DEFAULT_RESULTS / "quick" if args.quick else DEFAULT_RESULTS)
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: no CUDA device here")
        return 2
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if not args.report_only:
        for name in SUITES if args.suite == "all" else (args.suite,):
            log.info("suite %s on %s%s", name, device.type, " (quick)" if args.quick else "")
            settings = {"quick": args.quick, "full": args.full, "backends": args.backends, "device": device.type}
            if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: say how busy it was
                settings["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
            options = dict(quick=args.quick, full=args.full, backends=args.backends)
            if name == "kernels":  # the long suite: its rows are written after every case
                options["progress"] = lambda rows: common.write_csv(f"kernels_{device.type}", rows, results)
            tables = importlib.import_module(f"benchmarks.{name}").run(device, **options)
            for table, rows in tables.items():
                if rows:
                    log.info("wrote %s", common.write_csv(f"{table}_{device.type}", rows, results))
            environment = common.environment(device)
            document = {"suite": name, "environment": environment, "settings": settings, "tables": tables}
            log.info("wrote %s", common.write_json(f"{name}_{device.type}", document, results))
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


if __name__ == "__main__":
    sys.exit(main())
