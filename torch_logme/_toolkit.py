"""Finding the CUDA toolkit that builds the CUDA kernel (used by setup.py and .ci/nvcc_check.py).

torch guesses the toolkit (``torch.utils.cpp_extension.CUDA_HOME``) as the
folder above the ``nvcc`` found on PATH. That guess is wrong where ``nvcc``
is a wrapper script outside the toolkit (``/usr/local/bin/nvcc`` running
``/usr/local/cuda-13.0/bin/nvcc``, say): the build then links with
``-L/usr/local/lib -lcudart`` and fails with ``cannot find -lcudart``. This
module checks each candidate folder for the files the build needs, and asks
a wrapper where the real compiler lives.

It imports nothing from torch or from the rest of the package, so setup.py
can load it by path before the package is installed (or importable).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, List, Mapping, MutableMapping, Optional, Sequence, Tuple

__all__ = [
    "HOW_TO_FIX", "Toolkit", "toolkit_problems", "nvcc_home", "default_fallbacks", "find_toolkit",
    "nvcc_release", "cuda_mismatch", "use_toolkit",
]

#: What to set when no toolkit is found, for every message that says so.
HOW_TO_FIX = (
    "set CUDA_HOME to the CUDA toolkit folder (the one holding bin/nvcc, "
    "include/cuda_runtime.h and lib64/libcudart.so), e.g. CUDA_HOME=/usr/local/cuda"
)


def _lib_dir(home: str) -> str:
    # The rule torch's cpp_extension.library_paths applies on Linux: lib64
    # when it exists, else lib.
    lib64 = os.path.join(home, "lib64")
    return lib64 if os.path.isdir(lib64) else os.path.join(home, "lib")


def toolkit_problems(home: str) -> List[str]:
    """What the build needs that ``home`` lacks; empty when it is a usable toolkit.

    Args:
        home: a candidate CUDA_HOME.

    Returns:
        One short sentence per missing piece: the compiler, the runtime
        header, or the runtime library that ``-lcudart`` links against.
    """
    if not os.path.isdir(home):
        return [f"{home} is not a folder"]
    problems = []
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        problems.append(f"no {os.path.join(home, 'bin', 'nvcc')}")
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        problems.append(f"no {os.path.join(home, 'include', 'cuda_runtime.h')}")
    lib = _lib_dir(home)
    # -lcudart needs the unversioned name (or the static archive); the
    # versioned libcudart.so.N that pip's nvidia packages ship does not link.
    if not any(os.path.exists(os.path.join(lib, name)) for name in ("libcudart.so", "libcudart.a")):
        problems.append(f"no libcudart.so in {lib}")
    return problems


def nvcc_home(nvcc: str, timeout: float = 30.0) -> Optional[str]:
    """The toolkit folder of the real compiler behind ``nvcc``, which may be a wrapper.

    ``nvcc --dryrun`` prints the folder its own binary runs from
    (``#$ _HERE_=/usr/local/cuda-13.0/bin``), also when it was started through
    a wrapper script, and compiles nothing.

    Args:
        nvcc: path of an nvcc (the real one or a wrapper).
        timeout: seconds to wait for it.

    Returns:
        The folder above that ``bin``, or None when nvcc does not say.
    """
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        try:
            done = subprocess.run(
                [nvcc, "--dryrun", "-c", probe, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True, text=True, timeout=timeout,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ _HERE_=(.+)$", done.stdout + done.stderr, re.MULTILINE)
    if not match:
        return None
    return os.path.dirname(os.path.normpath(match.group(1).strip()))


@dataclass
class Toolkit:
    """Where the CUDA toolkit is, or why none was found.

    Attributes:
        home: the toolkit folder, or None.
        source: how it was found ("CUDA_HOME", "nvcc on PATH", "/usr/local/cuda", ...).
        rejected: (candidate, why) for every folder looked at and turned down.
    """

    home: Optional[str]
    source: str = ""
    rejected: List[Tuple[str, str]] = field(default_factory=list)

    def explain(self) -> str:
        """One line saying what was found, or what was tried and what to set."""
        if self.home is not None:
            return f"CUDA toolkit {self.home} (from {self.source})"
        if not self.rejected:
            return f"no CUDA toolkit found (no nvcc on PATH, no CUDA folder); {HOW_TO_FIX}"
        tried = "; ".join(f"{path}: {why}" for path, why in self.rejected)
        return f"no usable CUDA toolkit found (tried {tried}); {HOW_TO_FIX}"


def default_fallbacks() -> List[str]:
    """``/usr/local/cuda``, then the ``/usr/local/cuda-X.Y`` folders, newest first."""
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    return ["/usr/local/cuda", *versioned]


def find_toolkit(
    environ: Optional[Mapping[str, str]] = None,
    path: Optional[str] = None,
    fallbacks: Optional[Sequence[str]] = None,
) -> Toolkit:
    """Find the CUDA toolkit to build with.

    The first usable one of: ``CUDA_HOME``, ``CUDA_PATH``; the toolkit of the
    ``nvcc`` on PATH (the folder above it, following symbolic links, else
    the folder that nvcc reports when it is a wrapper); ``/usr/local/cuda``;
    the newest ``/usr/local/cuda-X.Y``. A folder set in ``CUDA_HOME`` or
    ``CUDA_PATH`` that is not usable ends the search: the user chose it, so
    the build must say what is wrong with it rather than quietly use another.

    Args:
        environ: environment to read (default: os.environ).
        path: PATH to search for nvcc (default: environ's PATH).
        fallbacks: folders to try after nvcc (default: ``default_fallbacks()``).

    Returns:
        A Toolkit; its ``home`` is None when none was usable.
    """
    env = os.environ if environ is None else environ
    result = Toolkit(None)
    for name in ("CUDA_HOME", "CUDA_PATH"):
        chosen = env.get(name)
        if chosen:
            problems = toolkit_problems(chosen)
            if not problems:
                return Toolkit(chosen, name)
            result.rejected.append((chosen, f"{name} is set, but " + ", ".join(problems)))
            return result

    def consider(home: Optional[str], source: str) -> bool:
        if not home or any(home == seen for seen, _ in result.rejected):
            return False
        problems = toolkit_problems(home)
        if problems:
            result.rejected.append((home, ", ".join(problems)))
            return False
        result.home, result.source = home, source
        return True

    nvcc = shutil.which("nvcc", path=path if path is not None else env.get("PATH"))
    if nvcc is not None:
        if consider(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"nvcc on PATH ({nvcc})"):
            return result
        if consider(nvcc_home(nvcc), f"the compiler that {nvcc} runs"):
            return result
    for home in default_fallbacks() if fallbacks is None else fallbacks:
        if consider(home, home):
            return result
    return result


def _version_key(home: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", os.path.basename(home)))


def nvcc_release(home: str, timeout: float = 30.0) -> Optional[str]:
    """The CUDA release of ``home``/bin/nvcc ("13.0"), or None when it cannot be read."""
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=timeout
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_mismatch(nvcc_version: Optional[str], torch_cuda: Optional[str]) -> Optional[str]:
    """Why nvcc cannot build for this torch (a different CUDA major version), or None.

    torch's extension builder refuses a toolkit whose major version differs
    from the one torch was built with; this says so before the build starts.

    Args:
        nvcc_version: the toolkit's release ("13.0"), None when unknown.
        torch_cuda: ``torch.version.cuda`` ("12.1"), None for a CPU build.
    """
    if not nvcc_version or not torch_cuda:
        return None
    if nvcc_version.split(".")[0] == torch_cuda.split(".")[0]:
        return None
    major = torch_cuda.split(".")[0]
    return (
        f"nvcc is CUDA {nvcc_version} and torch was built with CUDA {torch_cuda}: torch builds "
        f"extensions only with a toolkit of the same major version; set CUDA_HOME to a CUDA {major}.x "
        "toolkit, or TORCH_LOGME_CUDA=0 to build the CPU kernel only"
    )


def use_toolkit(
    cpp_extension: Any,
    torch_cuda: Optional[str],
    environ: Optional[MutableMapping[str, str]] = None,
    path: Optional[str] = None,
    fallbacks: Optional[Sequence[str]] = None,
) -> Tuple[bool, str]:
    """Point torch's extension builder at the CUDA toolkit that ``find_toolkit`` finds.

    torch guesses ``cpp_extension.CUDA_HOME`` once, when it is imported, and
    its builder reads that module global for nvcc, the include folder and
    the library folder. Setting it (and ``CUDA_HOME`` in the environment,
    for anything started later) before the extension is declared fixes all
    three.

    Args:
        cpp_extension: the module ``torch.utils.cpp_extension`` (or a stand-in).
        torch_cuda: ``torch.version.cuda``.
        environ: environment to read and to set CUDA_HOME in (default: os.environ).
        path, fallbacks: as for :func:`find_toolkit`.

    Returns:
        (True, which toolkit is used) when the CUDA kernel can be built, else
        (False, why not and what to set); then nothing is changed.
    """
    env = os.environ if environ is None else environ
    toolkit = find_toolkit(env, path, fallbacks)
    if toolkit.home is None:
        return False, toolkit.explain()
    mismatch = cuda_mismatch(nvcc_release(toolkit.home), torch_cuda)
    if mismatch:
        return False, f"{mismatch} ({toolkit.explain()})"
    guess = getattr(cpp_extension, "CUDA_HOME", None)
    cpp_extension.CUDA_HOME = toolkit.home
    env["CUDA_HOME"] = toolkit.home
    note = "" if guess == toolkit.home else f", not torch's guess {guess}"
    return True, f"using the {toolkit.explain()}{note}"
