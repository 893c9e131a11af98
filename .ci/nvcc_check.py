"""Compile-only check of the CUDA kernel (csrc/cuda/*.cu) with nvcc; no GPU needed.

CI has no GPU and installs a CPU build of torch, so setup.py builds only the
C++ kernel there. This compiles the CUDA source to an object file, with
torch's include paths and the flags torch's extension builder passes, so a
CUDA syntax or type error fails CI. Without nvcc it says so and passes.

    python .ci/nvcc_check.py                  # arch from TORCH_CUDA_ARCH_LIST, else 9.0
    python .ci/nvcc_check.py -Xptxas=-v       # extra nvcc flags, e.g. register usage
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def arch_flags() -> list[str]:
    """-gencode flags for TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX"), default 9.0 (H100)."""
    flags = []
    for arch in re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").strip()):
        if not arch:
            continue
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def find_cuda_home() -> str | None:
    """The CUDA toolkit setup.py would build with (torch_logme/_toolkit.py), or None.

    torch's own lookup (cpp_extension.CUDA_HOME) is None in a CPU build of
    torch, which is what CI installs; and where nvcc on PATH is a wrapper
    script, its guess is wrong anyway.
    """
    sys.path.insert(0, str(ROOT))
    from torch_logme._toolkit import find_toolkit

    toolkit = find_toolkit()
    print(f"nvcc check: {toolkit.explain()}")
    return toolkit.home


def main(extra: list[str]) -> int:
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("nvcc check: nvcc not found (set CUDA_HOME), skipped")
        return 0
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    import torch

    includes = [f"-I{p}" for p in [*cpp_extension.include_paths("cpu"), os.path.join(cuda_home, "include")]]
    # The flags torch's BuildExtension gives nvcc (private list, so with a fallback).
    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"])
    flags = [
        *common, "-O3", "-std=c++20", "-Xcompiler", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", *arch_flags(),
        # A CPU build of torch lacks this generated header; on Linux it only
        # sets a Windows export macro, so skipping it changes nothing here.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *extra,
    ]
    with tempfile.TemporaryDirectory() as out:
        for src in SOURCES:
            start = time.perf_counter()
            cmd = [nvcc, "-c", str(src), "-o", os.path.join(out, src.stem + ".o"), *includes, *flags]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(" ".join(cmd), file=sys.stderr)
                print(done.stdout + done.stderr, file=sys.stderr)
                print(f"nvcc check: FAILED to compile {src.relative_to(ROOT)}", file=sys.stderr)
                return 1
            if done.stderr.strip():  # warnings: shown, not fatal
                print(done.stderr, file=sys.stderr)
            print(f"nvcc check: {src.relative_to(ROOT)} compiles ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
