"""Finding the CUDA toolkit for the build (torch_logme/_toolkit.py, used by setup.py).

Each test lays out fake toolkits in tmp_path: shell scripts stand in for
nvcc and answer ``--version`` and ``--dryrun`` as the real one does, so the
lookup is tested without CUDA, on any machine.
"""
from __future__ import annotations

import os
import stat
import sys
import types
from pathlib import Path

import pytest

from torch_logme import _toolkit

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake nvcc is a POSIX shell script")


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def make_toolkit(home: Path, release: str = "12.4", lib: str = "lib64", cudart: str = "libcudart.so") -> Path:
    """A folder with what the build needs: bin/nvcc, include/cuda_runtime.h, <lib>/<cudart>."""
    # Like the real nvcc, the fake one names its own folder under --dryrun.
    _script(home / "bin" / "nvcc", f"""
case " $* " in
  *" --dryrun "*) echo "#\\$ _HERE_={home}/bin" >&2 ;;
  *" --version "*) echo "Cuda compilation tools, release {release}, V{release}.1" ;;
esac
""")
    (home / "include").mkdir(parents=True, exist_ok=True)
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / lib).mkdir(parents=True, exist_ok=True)
    (home / lib / cudart).write_text("")
    return home


def make_wrapper(folder: Path, real_nvcc: Path) -> Path:
    """folder/bin/nvcc, a script that runs the real one, beside a lib/ without libcudart."""
    _script(folder / "bin" / "nvcc", f'exec "{real_nvcc}" "$@"\n')
    (folder / "lib").mkdir(parents=True, exist_ok=True)  # as /usr/local/lib: torch would link here
    return folder / "bin"


def test_wrapper_on_path_leads_to_the_real_toolkit(tmp_path):
    real = make_toolkit(tmp_path / "cuda-12.4")
    wrapper_bin = make_wrapper(tmp_path / "usr-local", real / "bin" / "nvcc")
    found = _toolkit.find_toolkit(environ={}, path=str(wrapper_bin), fallbacks=[])
    assert found.home == str(real)
    assert "runs" in found.source and str(wrapper_bin / "nvcc") in found.source
    # torch's guess, the folder above the wrapper, was looked at and turned down.
    assert len(found.rejected) == 1
    guess, why = found.rejected[0]
    assert Path(guess) == (tmp_path / "usr-local").resolve() and "libcudart.so" in why


def test_use_toolkit_replaces_torchs_guess(tmp_path):
    real = make_toolkit(tmp_path / "cuda-12.4")
    wrapper_bin = make_wrapper(tmp_path / "usr-local", real / "bin" / "nvcc")
    # torch's guess for this PATH: the folder above nvcc.
    cpp_extension = types.SimpleNamespace(CUDA_HOME=str(tmp_path / "usr-local"))
    env: dict = {}
    ready, message = _toolkit.use_toolkit(cpp_extension, "12.1", env, path=str(wrapper_bin), fallbacks=[])
    assert ready, message
    assert cpp_extension.CUDA_HOME == str(real) and env["CUDA_HOME"] == str(real)
    assert "not torch's guess" in message


def test_symlinked_nvcc_is_followed(tmp_path):
    real = make_toolkit(tmp_path / "cuda-12.4")
    (tmp_path / "bin").mkdir()
    os.symlink(real / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    found = _toolkit.find_toolkit(environ={}, path=str(tmp_path / "bin"), fallbacks=[])
    assert Path(found.home) == real.resolve() and found.rejected == []


def test_cuda_home_wins_and_a_bad_one_is_reported(tmp_path):
    real = make_toolkit(tmp_path / "cuda-12.4")
    other = make_toolkit(tmp_path / "cuda-12.6")
    on_path = str(other / "bin")
    assert _toolkit.find_toolkit(environ={"CUDA_HOME": str(real)}, path=on_path).home == str(real)
    assert _toolkit.find_toolkit(environ={"CUDA_PATH": str(real)}, path=on_path).home == str(real)
    # A CUDA_HOME that lacks the library: no silent switch to the nvcc on PATH.
    bad = tmp_path / "bad"
    make_toolkit(bad, cudart="libcudart.so.12")  # pip's nvidia packages ship only the versioned name
    found = _toolkit.find_toolkit(environ={"CUDA_HOME": str(bad)}, path=on_path)
    assert found.home is None
    assert "CUDA_HOME is set" in found.explain() and "libcudart.so" in found.explain()
    assert _toolkit.HOW_TO_FIX in found.explain()


def test_fallback_folders_and_lib_instead_of_lib64(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    real = make_toolkit(tmp_path / "cuda", lib="lib")
    found = _toolkit.find_toolkit(environ={}, path=str(empty), fallbacks=[str(tmp_path / "missing"), str(real)])
    assert found.home == str(real) and found.source == str(real)
    assert found.rejected[0][0] == str(tmp_path / "missing")


def test_nothing_found_says_what_to_set(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    found = _toolkit.find_toolkit(environ={}, path=str(empty), fallbacks=[])
    assert found.home is None and "CUDA_HOME" in found.explain()
    cpp_extension = types.SimpleNamespace(CUDA_HOME=None)
    ready, message = _toolkit.use_toolkit(cpp_extension, "12.1", {}, path=str(empty), fallbacks=[])
    assert not ready and "CUDA_HOME" in message and cpp_extension.CUDA_HOME is None


def test_problems_of_a_candidate(tmp_path):
    assert _toolkit.toolkit_problems(str(make_toolkit(tmp_path / "ok"))) == []
    assert _toolkit.toolkit_problems(str(tmp_path / "absent")) == [f"{tmp_path / 'absent'} is not a folder"]
    partial = tmp_path / "partial"
    (partial / "lib64").mkdir(parents=True)
    problems = _toolkit.toolkit_problems(str(partial))
    assert len(problems) == 3 and all(p.startswith("no ") for p in problems)


def test_release_and_major_version_mismatch(tmp_path):
    real = make_toolkit(tmp_path / "cuda-13.0", release="13.0")
    assert _toolkit.nvcc_release(str(real)) == "13.0"
    assert _toolkit.nvcc_release(str(tmp_path / "absent")) is None
    assert _toolkit.cuda_mismatch("13.0", "13.2") is None
    assert _toolkit.cuda_mismatch("13.0", None) is None  # CPU torch: nothing to build for
    message = _toolkit.cuda_mismatch("13.0", "12.1")
    assert "CUDA 12.x" in message and "TORCH_LOGME_CUDA=0" in message
    cpp_extension = types.SimpleNamespace(CUDA_HOME="/somewhere")
    ready, why = _toolkit.use_toolkit(cpp_extension, "12.1", {}, path=str(real / "bin"), fallbacks=[])
    assert not ready and "CUDA 12.x" in why and cpp_extension.CUDA_HOME == "/somewhere"
