"""The Python steps of benchmarks/gpu_check.sh: the machine, the built op, the test counts, the report.

Each subcommand records what it finds in the check's JSON file (see
benchmarks/_results.py) and sets the exit status that the shell script
counts as the step's result::

    python benchmarks/gpu_check.py environment --json PATH --mode gpu|cpu-smoke [--arch-file F]
    python benchmarks/gpu_check.py extension   --json PATH --mode gpu|cpu-smoke
    python benchmarks/gpu_check.py junit       --json PATH --mode gpu|cpu-smoke --xml FILE
    python benchmarks/gpu_check.py report      --json PATH --mode gpu|cpu-smoke

Runs from a checkout with nothing installed: the checkout is put on
sys.path, as for the benchmark scripts.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from _results import cpu_model, load, missing_figures, record  # noqa: E402

MODES = ("gpu", "cpu-smoke")


def _version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # absent, or broken: either way not usable here
        return None


def environment(json_path: str, mode: str, arch_file: Optional[str]) -> int:
    """Record the machine and library versions; on a GPU run, write the GPU's arch to ``arch_file``.

    Returns 1 on a GPU run without a CUDA GPU and a CUDA build of torch
    (there is nothing to check then), else 0.
    """
    import torch

    from torch_logme._toolkit import find_toolkit, nvcc_release

    toolkit = find_toolkit()
    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "gpu_capability": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda_toolkit": toolkit.home,
        "cuda_toolkit_found": toolkit.explain(),
        "nvcc": nvcc_release(toolkit.home) if toolkit.home else None,
        "ninja": shutil.which("ninja"),
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_capability"] = f"{major}.{minor}"
    record(json_path, "environment", env)
    for key in ("gpu", "gpu_capability", "torch", "cuda", "nvcc", "cuda_toolkit_found", "ninja",
                "python", "numpy", "numba", "cpu", "cpu_count"):
        print(f"  {key}: {env[key]}")
    if mode == "gpu":
        if env["gpu"] is None or torch.version.cuda is None:
            print(f"gpu_check: needs a CUDA GPU and a CUDA build of torch (torch {torch.__version__}, "
                  f"CUDA available: {torch.cuda.is_available()})")
            return 1
        if arch_file:
            # The visible GPU's architecture only: one target, the fastest build.
            Path(arch_file).write_text(env["gpu_capability"] + "\n")
    return 0


def extension(json_path: str, mode: str) -> int:
    """Record which kernels the in-place build serves; 1 when the one this mode needs is missing."""
    import torch_logme
    from torch_logme import _extension

    kernels = {"cpu_kernel": torch_logme.extension_available("cpu"),
               "cuda_kernel": torch_logme.extension_available("cuda"),
               "library": str(getattr(importlib.util.find_spec("torch_logme._C"), "origin", None)),
               "load_error": _extension.load_error()}
    record(json_path, "build", kernels)
    print(f"  compiled op: CPU kernel {kernels['cpu_kernel']}, CUDA kernel {kernels['cuda_kernel']} "
          f"({kernels['library']}{'; ' + kernels['load_error'] if kernels['load_error'] else ''})")
    need = "cuda_kernel" if mode == "gpu" else "cpu_kernel"
    if not kernels[need]:
        print(f"gpu_check: the compiled op has no {need.split('_')[0].upper()} kernel")
        return 1
    return 0


def junit(json_path: str, mode: str, xml_path: str) -> int:
    """Record the counts of a pytest --junitxml file; 1 on any failure, or any skip on a GPU run.

    On the GPU every selected test must run: a CUDA test that skips there
    (say, because the CUDA kernel did not load) checks nothing.
    """
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    skipped: List[str] = []
    failed: List[str] = []
    if os.path.exists(xml_path):
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                failed.append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                failed.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                skipped.append(name)
            else:
                counts["passed"] += 1
    record(json_path, "tests", {**counts, "failed_tests": failed, "skipped_tests": skipped})
    print(f"  tests: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped")
    if counts["failed"] or counts["errors"] or counts["passed"] == 0:
        return 1
    if mode == "gpu" and counts["skipped"]:
        print("gpu_check: CUDA tests skipped on a GPU machine: " + ", ".join(skipped))
        return 1
    return 0


def report(json_path: str, mode: str) -> int:
    """Print the outcome of every step and every missing figure; 0 only when all is well."""
    data = load(json_path)
    steps = data.get("steps", {})
    failed = [name for name, step in steps.items() if step.get("status") != "ok"]
    missing = missing_figures(data, mode)
    record(json_path, "summary", {"failed_steps": failed, "missing_figures": missing,
                                  "ok": not failed and not missing})
    print("| step | status | seconds |")
    print("|---|---|---|")
    for name, step in steps.items():
        seconds = step.get("seconds")
        print(f"| {name} | {step.get('status')} | {'' if seconds is None else f'{seconds:.0f}'} |")
    for item in missing:
        print(f"missing figure: {item}")
    if failed or missing:
        print(f"gpu_check: FAILED ({len(failed)} step(s) failed, {len(missing)} figure(s) missing)")
        return 1
    print("gpu_check: all steps passed, every figure recorded")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["environment", "extension", "junit", "report"])
    parser.add_argument("--json", required=True, help="the check's JSON file")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--arch-file", help="environment: write the GPU's compute capability here")
    parser.add_argument("--xml", help="junit: pytest's --junitxml file")
    args = parser.parse_args(argv)
    if args.command == "environment":
        return environment(args.json, args.mode, args.arch_file)
    if args.command == "extension":
        return extension(args.json, args.mode)
    if args.command == "junit":
        if not args.xml:
            parser.error("junit needs --xml")
        return junit(args.json, args.mode, args.xml)
    return report(args.json, args.mode)


if __name__ == "__main__":
    sys.exit(main())
