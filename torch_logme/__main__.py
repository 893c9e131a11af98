"""Command-line interface: ``python -m torch_logme <command>`` or ``torch-logme <command>``.

Commands:
    demo    rank feature extractors on the bundled digits data and check the
            ranking against linear-probe accuracy.
    rank    rank models by transferability scores of their saved features.
    evaluate
            check scores against fine-tuning results (weighted Kendall tau and
            other rank correlations) from two CSV files.
    rank-models
            rank models given by zoo name (timm:, hf:, torchvision:) on an
            image folder or a text file: one forward pass per model.
    info    versions, the install, whether the compiled op is built and in
            use, GPUs and optional packages (--json for a machine).

``--version`` prints the versions of torch_logme and torch.

Each command is a ``_add_<name>(subparsers)`` function that registers its
parser and sets ``func``, a callable taking the parsed arguments and returning
the exit status; add new commands to ``_COMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional


def _run_demo(args: argparse.Namespace) -> int:
    # Imported here so that `--help` and other commands do not pay for it.
    from torch_logme.demo import run_demo

    run_demo(seed=args.seed, device=args.device, compare_reference=not args.no_reference)
    return 0


def _add_demo(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "demo",
        help="rank feature extractors on the bundled UCI digits by every score",
        description=(
            "Score 9 deterministic feature extractors of the UCI handwritten digits with every "
            "registered score on a training split, compare LogME with the NumPy reference, and "
            "check each score's ranking against the accuracy of a linear probe on the held-out "
            "split (weighted and plain Kendall tau)."
        ),
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random extractors and the split (default: 0)")
    p.add_argument(
        "--no-reference", action="store_true", help="skip the NumPy reference implementation and its timing"
    )
    p.set_defaults(func=_run_demo)


def _add_score_option(p: argparse.ArgumentParser) -> None:
    """--score, as every ranking command takes it: registered names, repeatable, the first ranks."""
    from torch_logme.registry import DEFAULT_SCORE, SCORES

    p.add_argument(
        "--score", action="extend", nargs="+", choices=list(SCORES), metavar="NAME",
        help=f"score(s) to compute, repeatable; the first ranks (default: {DEFAULT_SCORE}). "
        f"One of: {', '.join(SCORES)}",
    )


def _dtype(args: argparse.Namespace) -> Any:
    """The torch dtype that --dtype names."""
    import torch

    return torch.float32 if args.dtype == "float32" else torch.float64


def _run_rank(args: argparse.Namespace) -> int:

    from torch_logme.ranking import InputFileError, rank_files
    from torch_logme.registry import DEFAULT_SCORE

    try:
        ranking, files = rank_files(
            args.features, args.labels, args.score or [DEFAULT_SCORE], device=args.device,
            dtype=_dtype(args),
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
    _add_score_option(p)
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _layers_option(text: Optional[str]) -> object:
    """--layers: None (each model's default), "all", or a comma-separated list of layer labels."""
    if text is None or text == "default":
        return None
    if text == "all":
        return "all"
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names[0] if len(names) == 1 else names


@contextmanager
def _hub_progress_bars(shown: bool) -> Iterator[None]:
    """Hide the Hugging Face hub's and transformers' progress bars (downloads, weight loading) unless ``shown``.

    The hub reads the variable when it is first imported; transformers, once
    imported, has its own switch.
    """
    if shown:
        yield
        return
    name = "HF_HUB_DISABLE_PROGRESS_BARS"
    before = os.environ.get(name)
    os.environ[name] = "1"
    hf_logging = sys.modules.get("transformers.utils.logging")
    was_shown = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if was_shown:
        hf_logging.disable_progress_bar()  # type: ignore[union-attr]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
        if was_shown:
            hf_logging.enable_progress_bar()  # type: ignore[union-attr]


def _run_rank_models(args: argparse.Namespace) -> int:
    from torch_logme.zoo import ImageTransform, hf_model, timm_model, torchvision_model

    def fail(message: object) -> int:
        # One line, also for the messages of other libraries (the hub's span several).
        print(f"torch-logme rank-models: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1

    names = list(dict.fromkeys(args.models))
    for name in names:
        zoo, sep, ident = name.partition(":")
        if not sep or zoo not in ("timm", "hf", "torchvision") or not ident:
            return fail(f"{name!r} is not a model name: give '<zoo>:<name>' with zoo timm, hf or torchvision "
                        "(e.g. timm:resnet50, hf:bert-base-uncased, hf:/path/to/saved/model, torchvision:resnet50)")
    builders = {}
    for name in names:
        zoo, _, ident = name.partition(":")
        if zoo == "timm":
            builders[name] = timm_model(ident, pretrained=not args.no_pretrained)
        elif zoo == "hf":
            builders[name] = hf_model(ident, pretrained=not args.no_pretrained, max_length=args.max_length)
        else:
            builders[name] = torchvision_model(ident, weights=None if args.no_pretrained else "DEFAULT")
    transform = ImageTransform(args.image_size) if args.preprocess == "standard" else None
    progress = sys.stderr.isatty()
    try:
        with _hub_progress_bars(progress):
            ranking, data = _rank_files(args, builders, transform, progress)
    except (ImportError, ValueError, TypeError, OSError, RuntimeError, KeyError) as err:
        # Bad names, files or options are the user's to fix: one line, no traceback.
        return fail(f"{type(err).__name__}: {err}" if isinstance(err, KeyError) else err)
    if args.json:
        out = ranking.to_dict()
        out["data"] = {"path": str(data.path), "kind": data.kind, "samples": data.num_samples,
                       "classes": data.classes}
        print(json.dumps(out, indent=2))
    else:
        print(f"data: {data.path} ({data.num_samples} {data.kind}, {len(data.classes)} classes)")
        print(ranking)
    return 0


def _rank_files(args: argparse.Namespace, builders: dict, transform: Optional[Callable[[Any], Any]],
                progress: bool) -> tuple:

    from torch_logme.model_data import loader, read_data
    from torch_logme.model_ranking import rank_candidate_models
    from torch_logme.registry import DEFAULT_SCORE

    data = read_data(args.data, text_column=args.text_column, label_column=args.label_column,
                     transform=transform, limit=args.limit, seed=args.seed)
    ranking = rank_candidate_models(
        builders, loader(data, args.batch_size, args.workers), args.score or [DEFAULT_SCORE],
        layers=_layers_option(args.layers), pool=args.pool, aggregate=args.aggregate, device=args.device,
        dtype=_dtype(args), cache=args.cache, progress=progress,
    )
    return ranking, data


def _add_rank_models(subparsers: "argparse._SubParsersAction") -> None:
    from torch_logme.model_layers import POOLS
    from torch_logme.model_ranking import AGGREGATES

    p = subparsers.add_parser(
        "rank-models",
        help="rank pre-trained models (timm:, hf:, torchvision:) on an image folder or a text file",
        description=(
            "Run each model once over labelled data and rank the models by transferability scores of "
            "their layers, best first (by the first --score). MODEL is timm:NAME (timm.create_model, "
            "pretrained), hf:NAME_OR_PATH (transformers AutoModel with its tokenizer or image processor) or "
            "torchvision:NAME (torchvision.models.get_model, weights='DEFAULT'). The data is an image folder "
            "(one subdirectory of images per class, torchvision's ImageFolder layout) or a text file: .csv "
            "with a header, .jsonl (one JSON object per line) or .json, with a text column and a label "
            "column. Each model prepares its inputs its own way: texts with its tokenizer, images with its "
            "own preprocessing (timm's data config, the torchvision weights' transforms, the Hugging Face "
            "image processor), unless --preprocess standard. Each model's default layer is the input of its "
            "classifier (Hugging Face: its last hidden state, averaged over the tokens)."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="timm:NAME, hf:NAME_OR_PATH or torchvision:NAME")
    p.add_argument("--data", required=True, metavar="DIR_OR_FILE",
                   help="an image folder (one subdirectory per class) or a .csv / .jsonl / .json text file")
    _add_score_option(p)
    p.add_argument("--layers", default=None, metavar="SPEC",
                   help="'default' (each model's: the classifier's input; Hugging Face: the last hidden state), "
                        "'all' (every block: timm's feature stages, ResNet stages, a transformer's layers), or "
                        "comma-separated layer names such as layer3,fc:input (for every model)")
    p.add_argument("--pool", choices=list(POOLS), default="avg",
                   help="how a layer becomes [B, D]: avg (spatial / masked token mean, default), cls (first "
                        "token), flatten")
    p.add_argument("--aggregate", choices=list(AGGREGATES), default="best",
                   help="a model's row: its best layer by the first score (default), its last layer, or the "
                        "mean over its layers")
    p.add_argument("--batch-size", type=_positive, default=32, metavar="N", help="samples per batch (default: 32)")
    p.add_argument("--limit", type=_positive, default=None, metavar="N",
                   help="score a random subset of N samples (drawn with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default: 0)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the scores' statistics (default: float64)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep the pooled features in DIR and reuse them when the model and data match")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON instead of a table")
    p.add_argument("--text-column", default="text", metavar="NAME", help="text column of a text file (default: text)")
    p.add_argument("--label-column", default="label", metavar="NAME",
                   help="label column of a text file (default: label)")
    p.add_argument("--max-length", type=_positive, default=None, metavar="N",
                   help="truncate texts to N tokens (default: the model's limit)")
    p.add_argument("--preprocess", choices=["model", "standard"], default="model",
                   help="images: each model's own preprocessing (default), or for all models the standard one: "
                        "resize the shorter side to --image-size / 0.875, center crop, ImageNet mean and std")
    p.add_argument("--image-size", type=_positive, default=224, metavar="N",
                   help="the crop of --preprocess standard (default: 224)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random weights (timm pretrained=False, torchvision weights=None, Hugging Face from its "
                        "config): a baseline, or a run without downloads")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader worker processes (default: 0)")
    p.set_defaults(func=_run_rank_models)


def _run_info(args: argparse.Namespace) -> int:
    from torch_logme.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _add_info(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "info",
        help="versions, the install, the compiled op's state, GPUs and optional packages",
        description=(
            "Print the versions of torch_logme, torch, numpy and Python; where the package is installed "
            "from; whether the compiled op (torch_logme._C) is built, loaded, and in use on which devices "
            "(TORCH_LOGME_DISABLE_EXTENSION turns it off), and what its build recorded; CUDA and MPS with "
            "the visible GPUs; and the optional packages present. Ends with a hint when the op is not in use."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=_run_info)


class _VersionAction(argparse.Action):
    """--version: torch_logme's version and torch's, read when asked (not when the parser is built)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of torch_logme and torch, and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        import torch  # torch_logme imports it anyway; its own version string names the build (+cpu, +cu121)

        from torch_logme import __version__

        print(f"torch_logme {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})")
        parser.exit()


_COMMANDS: list[Callable[["argparse._SubParsersAction"], None]] = [
    _add_demo, _add_rank, _add_evaluate, _add_rank_models, _add_info,
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="torch-logme", description="LogME transferability scores in PyTorch."
    )
    parser.add_argument("--version", action=_VersionAction)
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
