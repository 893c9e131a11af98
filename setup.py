"""Packaging for torch_logme, with the optional compiled fixed-point op (csrc/).

The package is pure Python plus one optional library, ``torch_logme._C``: the
fixed point in C++ (CPU) and, when nvcc is found, CUDA. Without it the
package runs the same fixed point in plain torch ops.

The library is built only when torch can be imported while setup.py runs:
install with ``pip install --no-build-isolation`` (see the README), after
torch. Under pip's default build isolation (and ``python -m build``'s) the
build environment has no torch (pyproject.toml does not ask for one: that
would build against a fresh multi-GB download instead of the torch
installed), and the package is built pure-Python.

Whenever a build of the package (a wheel, an editable or a plain install)
leaves the op out for any reason but ``TORCH_LOGME_NO_EXTENSION``, setup.py
prints a WARNING block to stderr saying why and how to fix it (pip shows it
with ``pip install -v``; ``python -m build`` always). pip hides a build's
output when it succeeds, so the outcome is also recorded in the package's
metadata (``torch_logme_build.json`` in its .dist-info or .egg-info), where
``python -m torch_logme info`` reads it.

Build-time environment variables:

- ``TORCH_LOGME_NO_EXTENSION=1``: build no library (pure-Python install).
- ``TORCH_LOGME_REQUIRE_EXTENSION=1``: fail the build, instead of warning,
  when the library cannot be built.
- ``TORCH_LOGME_CUDA=0`` / ``=1``: skip / require the CUDA kernel. By default
  it is built when the installed torch has CUDA and a CUDA toolkit of the
  same major version is found; no GPU needs to be visible.
- ``CUDA_HOME`` (or ``CUDA_PATH``): the CUDA toolkit. Default: the toolkit
  of the ``nvcc`` on PATH (also when that nvcc is a wrapper script outside
  the toolkit), else ``/usr/local/cuda``; see torch_logme/_toolkit.py.
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures, as for any torch extension
  (default: the visible GPUs, or a portable list when none is visible).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List

from setuptools import find_packages, setup
from setuptools.command.egg_info import egg_info

here = Path(__file__).parent
#: The build record's file name in the package metadata; torch_logme/info.py reads it.
BUILD_RECORD = "torch_logme_build.json"
# setup.py commands that build the package itself (a wheel, an install, an
# editable install, the library in place): only these warn that the op is left
# out. Metadata and sdist commands (egg_info, dist_info, sdist) compile nothing.
_BUILD_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel"}
# A portable default when no GPU is visible at build time: Turing to Hopper,
# plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
# The documentation site (mkdocs.yml): MkDocs, the Material theme, and the
# API reference from the docstrings.
DOCS_REQUIRES = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]


def _flag(name: str) -> str | None:
    """'1' / '0' for a set boolean environment variable, None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return "0" if value in ("0", "false", "no", "off") else "1"


def _say(message: str) -> None:
    print(f"torch_logme setup: {message}", file=sys.stderr)


def _version() -> str:
    """The version in torch_logme/_version.py, read as text: the package may not import here."""
    text = (here / "torch_logme" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("torch_logme/_version.py has no line __version__ = \"X.Y.Z\"")
    return match.group(1)


def _building() -> bool:
    """Whether this run of setup.py builds the package (not only its metadata or its sdist)."""
    return any(arg in _BUILD_COMMANDS for arg in sys.argv[1:])


def _warn(lines: List[str]) -> None:
    """A WARNING block on stderr, hard to miss in pip -v's or python -m build's output."""
    rule = "=" * 78
    for line in [rule, *lines, rule]:
        print(f"torch_logme setup: {line}", file=sys.stderr)


def _toolkit_module():
    """torch_logme/_toolkit.py, loaded by path: the package itself may not import yet."""
    name = "_torch_logme_toolkit"
    spec = importlib.util.spec_from_file_location(name, here / "torch_logme" / "_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _use_cuda_toolkit(torch, cpp_extension) -> str | None:
    """Point torch's extension builder at the real CUDA toolkit; None when ready, else why not.

    torch guesses CUDA_HOME as the folder above the nvcc on PATH. Where that
    nvcc is a wrapper script outside the toolkit the guess holds no
    libcudart, and the link fails with "cannot find -lcudart".
    """
    ready, message = _toolkit_module().use_toolkit(cpp_extension, torch.version.cuda)
    if ready:
        _say(message)
        return None
    return message


def _has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


# How to get the op once the cause is fixed: a build that can import the torch installed.
_REBUILD = (
    "install torch first, then build this package without build isolation, e.g. "
    "`pip install setuptools wheel && pip install --no-build-isolation --no-cache-dir <the sdist, the source "
    "folder, or torch-logme>` (editable: `pip install --no-build-isolation -e .`; a wheel: "
    "`python -m build --no-isolation`)"
)


def _not_built(record: Dict[str, Any], reason: str, fix: str, warn: bool = True) -> tuple[list, dict]:
    """Record why the op is left out; say so (a WARNING when building), or fail if it is required."""
    record.update(compiled=False, kernels=[], reason=reason, fix=fix)
    if not warn:
        _say(f"{reason}: no compiled op")
    elif _building():
        if _flag("TORCH_LOGME_REQUIRE_EXTENSION") == "1":
            raise RuntimeError(f"TORCH_LOGME_REQUIRE_EXTENSION=1, but the compiled op cannot be built: {reason}. "
                               f"To fix: {fix}")
        _warn([
            "WARNING: the compiled op (torch_logme._C) is NOT built into this package.",
            f"  why: {reason}",
            "  effect: the package works and gives the same results with its pure-torch fixed point, slower.",
            f"  to fix: {fix}",
            "  To make this an error instead: TORCH_LOGME_REQUIRE_EXTENSION=1. Check an install with "
            "`python -m torch_logme info`.",
        ])
    else:
        _say(f"the compiled op will not be built: {reason}")
    return [], {}


def _extension_build(record: Dict[str, Any]) -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the compiled op, or ([], {}) when it is not built; fills ``record``."""
    if _flag("TORCH_LOGME_NO_EXTENSION") == "1":
        return _not_built(record, "TORCH_LOGME_NO_EXTENSION=1 was set at build time",
                          "unset TORCH_LOGME_NO_EXTENSION, then reinstall: " + _REBUILD, warn=False)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        return _not_built(
            record,
            f"torch is not importable in the build environment ({type(err).__name__}: {err}); pip's default "
            "build isolation and `python -m build` build in a fresh environment without torch",
            _REBUILD,
        )
    record.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if not _has_cxx_compiler():
        return _not_built(record, "no C++ compiler found (none of $CXX, c++, g++, clang++ on PATH)",
                          "install one (e.g. `apt-get install g++`), then reinstall: " + _REBUILD)

    want_cuda = _flag("TORCH_LOGME_CUDA")
    with_cuda = False
    if torch.version.cuda is None:
        if want_cuda == "1":
            raise RuntimeError("TORCH_LOGME_CUDA=1, but the installed torch has no CUDA")
    elif want_cuda != "0":
        why_not = _use_cuda_toolkit(torch, cpp_extension)
        if why_not is None:
            with_cuda = True
        elif want_cuda == "1":
            raise RuntimeError(f"TORCH_LOGME_CUDA=1, but {why_not}")
        else:
            record["cuda_reason"] = why_not
            if _building():
                _warn([
                    "WARNING: the installed torch has CUDA, but the compiled op gets its CPU kernel only.",
                    f"  why: {why_not}",
                    "  effect: on CUDA tensors the pure-torch fixed point runs (same results).",
                ])
    else:
        record["cuda_reason"] = "TORCH_LOGME_CUDA=0 was set at build time"

    sources = ["csrc/fixed_point.cpp", "csrc/cpu/fixed_point_cpu.cpp"]
    cxx = ["-O3"]
    link = []
    if platform.system() == "Linux":
        # at::parallel_for is an inline OpenMP loop: without -fopenmp it runs serially.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        sources.append("csrc/cuda/fixed_point_cuda.cu")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        extension = cpp_extension.CUDAExtension(
            "torch_logme._C", sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link,
        )
    else:
        extension = cpp_extension.CppExtension(
            "torch_logme._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    record.update(compiled=True, kernels=["cpu", "cuda"] if with_cuda else ["cpu"])
    _say(f"building the compiled fixed point for CPU{' and CUDA' if with_cuda else ''}")
    use_ninja = shutil.which("ninja") is not None  # else torch warns, then builds without it
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}


def _record_command(record: Dict[str, Any]) -> type:
    """egg_info that also writes the build record into the metadata (it lands in the .dist-info)."""

    class EggInfoWithBuildRecord(egg_info):
        def run(self) -> None:
            super().run()
            text = json.dumps(record, indent=2, sort_keys=True) + "\n"
            self.write_file("torch_logme build record", os.path.join(self.egg_info, BUILD_RECORD), text)

    return EggInfoWithBuildRecord


# What this build does about the compiled op, for `python -m torch_logme info`.
build_record: Dict[str, Any] = {
    "compiled": False, "kernels": [], "reason": None, "fix": None, "cuda_reason": None,
    "torch": None, "torch_cuda": None, "python": platform.python_version(), "platform": platform.platform(),
}
ext_modules, cmdclass = _extension_build(build_record)
cmdclass["egg_info"] = _record_command(build_record)

setup(
    # The distribution's name, as the command spells it; pip and PyPI read
    # torch-logme and torch_logme as one name, and the import name is torch_logme.
    name="torch-logme",
    version=_version(),
    description=(
        "LogME transferability scores in PyTorch: batched over classes, on any device, "
        "exact against the published code"
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="torch_logme maintainers",
    license="MIT",
    url="https://github.com/torch-logme/torch_logme",
    project_urls={
        "Homepage": "https://github.com/torch-logme/torch_logme",
        "Documentation": "https://torch-logme.github.io/torch_logme/",
        "Source": "https://github.com/torch-logme/torch_logme",
        "Issues": "https://github.com/torch-logme/torch_logme/issues",
        "Upstream LogME": "https://github.com/thuml/LogME",
    },
    keywords=[
        "transferability", "transfer learning", "model selection", "LogME", "LEEP", "NCE", "H-score",
        "TransRate", "GBC", "SFDA", "NCTI", "ETran", "PARC", "pytorch", "pretrained models",
    ],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Software Development :: Libraries :: Python Modules",
    ],
    python_requires=">=3.9",
    packages=find_packages(include=["torch_logme", "torch_logme.*"]),
    package_data={"torch_logme": ["data/*.npz", "data/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch 2.4 is the oldest that builds the op and passes the tests; CI
    # runs the suite on it (.ci/run). torch 2.3 lacks
    # torch.library.register_fake, and torch.compile cannot trace the op there.
    install_requires=["torch>=2.4", "numpy>=1.22"],
    extras_require={
        # numba JIT-compiles the numpy reference so the demo and benchmarks
        # compare against the published code at its published speed (numba's
        # linear algebra needs SciPy); the reference runs without them.
        "reference": ["numba>=0.57", "scipy"],
        # Optional adapters: torch_logme.integrations.torchmetrics / .lightning.
        "torchmetrics": ["torchmetrics>=1.0"],
        "lightning": ["lightning>=2.0"],
        # Model zoos for rank_models and `rank-models` (torch_logme.zoo):
        # "timm:", "hf:", "torchvision:" names. timm brings torchvision and
        # Pillow; Pillow reads the command's image folders and feeds the
        # Hugging Face image processors. torchvision must be the build made
        # for the installed torch (a CPU-only torch needs torchvision's CPU
        # build from the same index): see the README.
        "timm": ["timm>=0.9"],
        "hf": ["transformers>=4.30", "pillow"],
        "torchvision": ["torchvision"],
        "zoo": ["timm>=0.9", "transformers>=4.30", "torchvision", "pillow"],
        # Tests run the reference both jitted and in pure Python, and the
        # adapters (both keep the installed torch; lightning brings torchmetrics);
        # scikit-learn's bundled data sets are the real-data regression cases,
        # hypothesis draws the property-based ones. transformers and Pillow
        # run the Hugging Face adapter and the rank-models command on tiny
        # offline models. Not timm nor torchvision: PyPI's torchvision is
        # built for PyPI's CUDA torch, and beside a CPU-only torch it fails to
        # import, which breaks torchmetrics and lightning too; their tests skip
        # here and run in .ci/oldest.sh, where torch and torchvision match.
        "test": [
            "pytest>=7", "numba>=0.57", "scipy", "torchmetrics>=1.0", "lightning>=2.0",
            "scikit-learn>=1.0", "hypothesis>=6", "transformers>=4.30", "pillow", "matplotlib>=3.5",
            # tests/test_docs.py builds the documentation site strictly.
            *DOCS_REQUIRES,
        ],
        "bench": ["pytest-benchmark>=4", "numba>=0.57", "scipy"],
        # Ranking.plot() and Evaluation.plot().
        "plot": ["matplotlib>=3.5"],
        # The documentation site, and the plots it shows.
        "docs": [*DOCS_REQUIRES, "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["torch-logme=torch_logme.__main__:main"]},
)
