"""Packaging for torch_logme, with the optional compiled fixed-point op (csrc/).

The package is pure Python plus one optional library, ``torch_logme._C``: the
fixed point in C++ (CPU) and, when nvcc is found, CUDA. Without it the
package runs the same fixed point in plain torch ops.

The library is built only when torch can be imported while setup.py runs:
install with ``pip install --no-build-isolation`` (see the README), after
torch. Under pip's default build isolation the build environment has no
torch (pyproject.toml does not ask for one: that would build against a
fresh multi-GB download instead of the torch installed), and setup.py says
that it builds the pure-Python package only.

Build-time environment variables:

- ``TORCH_LOGME_NO_EXTENSION=1``: build no library (pure-Python install).
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
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
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


def _extension_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the compiled op, or ([], {}) when it is not built."""
    if _flag("TORCH_LOGME_NO_EXTENSION") == "1":
        _say("TORCH_LOGME_NO_EXTENSION is set: no compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say(
            "torch is not importable here (pip's build isolation, or torch not installed yet): building "
            "the pure-Python package without the compiled op; install torch first, then this package with "
            "`pip install --no-build-isolation`, to compile it"
        )
        return [], {}
    if not _has_cxx_compiler():
        _say("no C++ compiler found: no compiled extension (the pure-torch path will run)")
        return [], {}

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
            _say(f"{why_not}: building the CPU kernel only")

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
    _say(f"building the compiled fixed point for CPU{' and CUDA' if with_cuda else ''}")
    use_ninja = shutil.which("ninja") is not None  # else torch warns, then builds without it
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extension_build()

setup(
    name="torch_logme",
    version="0.1.0",
    description=(
        "LogME transferability scores in PyTorch: batched over classes, on any device, "
        "exact against the published code"
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
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
