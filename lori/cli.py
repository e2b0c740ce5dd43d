"""The ``lori`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from lori.demo import run_demo

    figures = run_demo(
        steps=args.steps, sparsity=args.sparsity, dropout=args.dropout, seed=args.seed,
        backend=args.backend, progress=not args.no_progress,
    )
    ok = figures["a_backends_identical"] and figures["test_loss_lori_s"] < 0.1 * figures["test_loss_base"]
    logging.getLogger("lori").info("demo %s", "passed" if ok else "FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lori", description="LoRI adapters: fused kernels and tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run the LoRI recipe (LoRI-D -> mask -> LoRI-S) on one layer on the CPU"
    )
    demo.add_argument("--steps", type=int, default=150, help="training steps per stage")
    demo.add_argument("--sparsity", type=float, default=0.9, help="fraction of B's blocks dropped")
    demo.add_argument("--dropout", type=float, default=0.0, help="adapter input dropout")
    demo.add_argument("--seed", type=int, default=0, help="model-wide seed")
    demo.add_argument("--backend", default="auto", help="lori_linear backend")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stdout
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
