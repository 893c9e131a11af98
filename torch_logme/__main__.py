"""Command-line interface: ``python -m torch_logme <command>`` or ``torch-logme <command>``.

Commands:
    demo    rank feature extractors on the bundled digits data and check the
            ranking against linear-probe accuracy.
    rank    rank models by transferability scores of their saved features.
    evaluate
            check scores against fine-tuning results (weighted Kendall tau and
            other rank correlations) from two CSV files.

Each command is a ``_add_<name>(subparsers)`` function that registers its
parser and sets ``func``, a callable taking the parsed arguments and returning
the exit status; add new commands to ``_COMMANDS``.
"""
from __future__ import annotations

import argparse
import json
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


def _run_rank(args: argparse.Namespace) -> int:
    import torch

    from torch_logme.ranking import InputFileError, rank_files
    from torch_logme.registry import DEFAULT_SCORE

    try:
        ranking, files = rank_files(
            args.features, args.labels, args.score or [DEFAULT_SCORE], device=args.device,
            dtype=torch.float32 if args.dtype == "float32" else torch.float64,
        )
    except (InputFileError, ValueError, TypeError, OSError, RuntimeError) as err:
        # Bad files are the user's to fix: one line that names the file, no traceback.
        print(f"torch-logme rank: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        out = ranking.to_dict()
        for row in out["ranking"]:
            row["file"] = files[row["model"]]
        print(json.dumps(out, indent=2))
    else:
        print(ranking)
    return 0


def _add_rank(subparsers: "argparse._SubParsersAction") -> None:
    from torch_logme.registry import DEFAULT_SCORE, SCORES

    p = subparsers.add_parser(
        "rank",
        help="rank models by transferability scores of their features (.npy, .npz or .pt files)",
        description=(
            "Score the features of several models on one set of labels and print the models "
            "best first (ranked by the first --score). Each model is named after its file's stem "
            "(with its suffix when two files differ only in that); the labels file is never a model. "
            "A file holds one array, features [N, D]; leep and nce read source-class "
            "probabilities [N, Cs] instead (nce uses their argmax). An .npz or .pt file may hold "
            "both, as arrays named 'features' and 'probs'. The labels file holds class ids [N] "
            "(one array, or one named 'labels', 'targets' or 'y')."
        ),
    )
    p.add_argument("features", nargs="+", metavar="FEATURES", help="one file per model: .npy, .npz or .pt")
    p.add_argument("--labels", required=True, metavar="LABELS", help="file of class ids [N]: .npy, .npz or .pt")
    p.add_argument(
        "--score", action="extend", nargs="+", choices=list(SCORES), metavar="NAME",
        help=f"score(s) to compute, repeatable; the first ranks (default: {DEFAULT_SCORE}). "
        f"One of: {', '.join(SCORES)}",
    )
    p.add_argument("--json", action="store_true", help="print the ranking as JSON instead of a table")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="compute precision (default: float64)")
    p.set_defaults(func=_run_rank)


def _run_evaluate(args: argparse.Namespace) -> int:
    from torch_logme.evaluation import evaluate_files
    from torch_logme.ranking import InputFileError

    smaller, larger = args.smaller_is_better or [], args.larger_is_better or []
    both = sorted(set(smaller) & set(larger))
    if both:
        print(f"torch-logme evaluate: error: {', '.join(both)}: given to both --smaller-is-better and "
              "--larger-is-better", file=sys.stderr)
        return 1
    direction = {**{s: False for s in smaller}, **{s: True for s in larger}}
    try:
        evaluation = evaluate_files(args.scores, args.ground_truth, larger_is_better=direction)
    except (InputFileError, ValueError, TypeError, OSError) as err:
        # As for `rank`: bad files are the user's to fix, so one line that names the file, no traceback.
        print(f"torch-logme evaluate: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        out = evaluation.to_dict()
        out["files"] = {"scores": args.scores, "ground_truth": args.ground_truth}
        print(json.dumps(out, indent=2))
    else:
        print(evaluation)
    return 0


def _add_evaluate(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="check transferability scores against fine-tuning results (two CSV files)",
        description=(
            "For each score, measure how well it orders the models as their fine-tuned accuracy does: "
            "weighted Kendall tau (as scipy.stats.weightedtau), Kendall's tau-b, Spearman's rho, and "
            "whether it picks the best model (top1). SCORES.csv has a header row with the columns "
            "task (optional), model, then one column per score; GROUND_TRUTH.csv has task (optional), "
            "model and one value column, e.g. accuracy. Both files have a task column, or neither; "
            "with one, the table also gives the mean over tasks. A registered score (see rank --score) "
            "follows its own direction, any other column is taken as larger is better."
        ),
    )
    p.add_argument("scores", metavar="SCORES.csv", help="columns: task (optional), model, one column per score")
    p.add_argument("ground_truth", metavar="GROUND_TRUTH.csv", help="columns: task (optional), model, accuracy")
    p.add_argument("--smaller-is-better", action="extend", nargs="+", metavar="NAME",
                   help="score column(s) where a smaller value predicts a better model")
    p.add_argument("--larger-is-better", action="extend", nargs="+", metavar="NAME",
                   help="score column(s) where a larger value predicts a better model (the default "
                        "for any score that is not registered)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=_run_evaluate)


_COMMANDS: list[Callable[["argparse._SubParsersAction"], None]] = [_add_demo, _add_rank, _add_evaluate]


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
