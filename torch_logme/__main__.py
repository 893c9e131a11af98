"""Command-line interface: ``python -m torch_logme <command>`` or ``torch-logme <command>``.

Commands:
    demo    rank feature extractors on the bundled digits data and check the
            ranking against linear-probe accuracy.

Each command is a ``_add_<name>(subparsers)`` function that registers its
parser and sets ``func``, a callable taking the parsed arguments and returning
the exit status; add new commands to ``_COMMANDS``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional


def _run_demo(args: argparse.Namespace) -> int:
    # Imported here so that `--help` and other commands do not pay for it.
    from torch_logme.demo import run_demo

    run_demo(seed=args.seed, device=args.device, compare_reference=not args.no_reference)
    return 0


def _add_demo(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "demo",
        help="rank feature extractors on the bundled UCI digits by LogME",
        description=(
            "Score several deterministic feature extractors of the UCI handwritten digits "
            "with LogME, compare with the NumPy reference, and check the ranking against "
            "the test accuracy of a linear probe (Kendall's tau)."
        ),
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random extractors and the split (default: 0)")
    p.add_argument(
        "--no-reference", action="store_true", help="skip the NumPy reference implementation and its timing"
    )
    p.set_defaults(func=_run_demo)


_COMMANDS: list[Callable[["argparse._SubParsersAction"], None]] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="torch-logme", description="LogME transferability scores in PyTorch."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
