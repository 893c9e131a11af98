"""What is installed and what runs: ``python -m torch_logme info`` (or ``torch-logme info``).

``collect_info()`` gathers, as a dict of plain values (JSON-ready):

- the versions of torch_logme, torch, numpy and Python, and the platform;
- where torch_logme is imported from, and how it was installed (a wheel or an
  sdist in site-packages, an editable install, or a source tree on
  ``sys.path`` with no installed metadata);
- the compiled op (``torch_logme._C``): whether it is built, whether it
  loaded (and the error when it did not), which device types it has kernels
  for, whether ``TORCH_LOGME_DISABLE_EXTENSION`` turns it off, and so where
  it is in use (``extension_available(device)``);
- what the build recorded about the op (setup.py writes
  ``torch_logme_build.json`` into the package metadata: pip hides the
  build's output, so this is where a user learns why the op was left out);
- CUDA and MPS, the visible GPUs, torch's CUDA version;
- the optional packages the extras bring, with their installed versions
  (read from their metadata: none of them is imported).

``format_info(info)`` turns that dict into the text the command prints; it
ends with hints (also ``info["hints"]``) when the op is not in use. Every probe is guarded: a probe
that fails gives an ``"error"`` entry, never an exception.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import unquote, urlparse

__all__ = ["BUILD_RECORD", "EXTRAS", "collect_info", "format_info"]

#: The build record's file name in the package metadata (written by setup.py).
BUILD_RECORD = "torch_logme_build.json"
#: The distribution's name (setup.py) and its other spelling (pip reads both as one).
_DIST_NAMES = ("torch-logme", "torch_logme")
#: Optional packages that the extras install (setup.py's extras_require), by distribution name.
EXTRAS = ("numba", "scipy", "torchmetrics", "lightning", "timm", "transformers", "torchvision", "pillow",
          "matplotlib")
_DEVICE_TYPES = ("cpu", "cuda")


def _guard(probe: Callable[[], Any]) -> Any:
    """``probe()``, or ``{"error": "..."}`` when it raises: ``info`` must never fail."""
    try:
        return probe()
    except Exception as err:  # noqa: BLE001 - any failure is reported, not raised
        return {"error": f"{type(err).__name__}: {err}"}


def _version_of(name: str) -> Optional[str]:
    """The installed version of a distribution, from its metadata (nothing is imported); None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_file() -> Path:
    import torch_logme

    return Path(torch_logme.__file__).resolve()


def _distribution() -> Optional[importlib.metadata.Distribution]:
    for name in _DIST_NAMES:
        try:
            return importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _editable_root(dist: importlib.metadata.Distribution) -> Optional[Path]:
    """The project folder of an editable install (PEP 610 direct_url.json), else None."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    direct = json.loads(text)
    if not direct.get("dir_info", {}).get("editable"):
        return None
    url = urlparse(direct.get("url", ""))
    return Path(unquote(url.path)) if url.scheme == "file" else None


def _owns(dist: importlib.metadata.Distribution, init: Path) -> bool:
    """Whether the distribution's own files include the imported ``torch_logme/__init__.py``."""
    for entry in dist.files or ():
        if entry.as_posix().endswith("torch_logme/__init__.py"):
            try:
                return Path(str(dist.locate_file(entry))).resolve() == init
            except OSError:
                return False
    return False


def _install() -> Dict[str, Any]:
    """How the imported torch_logme is installed, and the build record of that install if any.

    Installed metadata counts only when it belongs to the copy that is
    imported: a source tree on ``sys.path`` (PYTHONPATH, the current folder)
    can shadow an installed distribution, whose record would then be wrong.
    """
    from torch_logme import __version__

    init = _package_file()
    out: Dict[str, Any] = {"location": str(init.parent), "kind": "source", "distribution": None,
                           "distribution_version": None, "build_record": None}
    dist = _distribution()
    if dist is None:
        out["note"] = "no installed package metadata: a source tree on sys.path"
        return out
    out["distribution"], out["distribution_version"] = dist.metadata["Name"], dist.version
    root = _editable_root(dist)
    base = Path(str(dist.locate_file(""))).resolve()  # the folder that holds the metadata folder
    if root is not None and (root / "torch_logme" / "__init__.py").resolve() == init:
        out["kind"], out["project"] = "editable", str(root)
    elif (base / "setup.py").is_file() and (base / "torch_logme" / "__init__.py").resolve() == init:
        # An .egg-info left in the source tree by a build there (or `setup.py develop`).
        out["note"] = "build record: the last metadata build in this source tree"
    elif _owns(dist, init):
        out["kind"] = "installed"
    else:
        where = f"editable from {root}" if root is not None else "elsewhere"
        out["note"] = (f"the installed {dist.metadata['Name']} {dist.version} ({where}) is not the copy imported: "
                       "a source tree on sys.path shadows it")
        return out
    if dist.version != __version__:
        out["note"] = f"the metadata says version {dist.version}, the package {__version__}: a stale install"
        return out
    text = dist.read_text(BUILD_RECORD)
    if text:
        out["build_record"] = json.loads(text)
    return out


def _extension() -> Dict[str, Any]:
    """The compiled op: built, loaded, kernels per device type, disabled, in use (extension_available)."""
    from torch_logme import _extension as ext

    spec = importlib.util.find_spec(ext._LIBRARY)
    library = spec.origin if spec is not None else None
    out: Dict[str, Any] = {
        "built": library is not None, "library": library, "loaded": False, "load_error": None,
        "disabled_by_env": ext._disabled(), "disable_env": ext.DISABLE_ENV,
        "disable_env_value": os.environ.get(ext.DISABLE_ENV),
        "kernels": {d: False for d in _DEVICE_TYPES}, "in_use": {d: False for d in _DEVICE_TYPES},
    }
    if library is None:
        return out
    with warnings.catch_warnings(record=True) as caught:  # the load failure is reported here instead
        warnings.simplefilter("always")
        out["loaded"] = ext.load()
    if not out["loaded"]:
        out["load_error"] = ext.load_error() or "; ".join(str(w.message) for w in caught) or "unknown"
        return out
    for device in _DEVICE_TYPES:
        out["kernels"][device] = ext.has_kernel(device)
        out["in_use"][device] = ext.extension_available(device)
    return out


def _torch() -> Dict[str, Any]:
    import torch

    out: Dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                           "hip": getattr(torch.version, "hip", None), "threads": torch.get_num_threads()}
    out["cudnn"] = _guard(lambda: torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return out


def _gpus() -> Dict[str, Any]:
    import torch

    out: Dict[str, Any] = {"cuda_available": bool(torch.cuda.is_available()), "devices": []}
    if out["cuda_available"]:
        for index in range(torch.cuda.device_count()):
            def device(i: int = index) -> Dict[str, Any]:
                props = torch.cuda.get_device_properties(i)
                return {"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1)}
            out["devices"].append(_guard(device))
    mps = getattr(torch.backends, "mps", None)
    out["mps_available"] = bool(mps is not None and mps.is_available())
    return out


def collect_info() -> Dict[str, Any]:
    """Versions, the install, the compiled op's state, devices and optional packages, as a JSON-ready dict."""
    from torch_logme import __version__

    info: Dict[str, Any] = {
        "torch_logme": __version__,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": _guard(lambda: {"system": platform.system(), "machine": platform.machine(),
                                    "platform": platform.platform()}),
        "torch": _guard(_torch),
        "numpy": _guard(lambda: _version_of("numpy")),
        "install": _guard(_install),
        "extension": _guard(_extension),
        "gpus": _guard(_gpus),
        "extras": {name: _guard(partial(_version_of, name)) for name in EXTRAS},
    }
    info["hints"] = _guard(partial(_hints, info))
    return info


def _rebuild(install: Dict[str, Any]) -> str:
    """How to build the op for this install: the command depends on how the package was installed."""
    kind = install.get("kind")
    if kind == "editable":
        return (f"cd {install.get('project')} && pip install setuptools wheel && "
                "pip install --no-build-isolation -e .")
    if kind == "source":
        root = Path(str(install.get("location", "."))).parent
        return f"cd {root} && python setup.py build_ext --inplace (needs setuptools)"
    from torch_logme import __version__

    return ("pip install setuptools wheel && pip install --no-build-isolation --no-cache-dir --force-reinstall "
            f"--no-deps <the torch_logme {__version__} sdist or source folder>")


def _hints(info: Dict[str, Any]) -> List[str]:
    """What to do when the compiled op is not in use (empty when it serves every device present)."""
    ext, install, gpus = info.get("extension", {}), info.get("install", {}), info.get("gpus", {})
    if "error" in ext:
        return []
    record = install.get("build_record") if isinstance(install, dict) else None
    record = record if isinstance(record, dict) else {}
    now = info.get("torch", {}).get("version")
    hints = []
    if not ext.get("built"):
        why = f" The build recorded why: {record['reason']}." if record.get("reason") else ""
        hints.append("The compiled op is not built, so the pure-torch fixed point runs (same results, slower)."
                     f"{why} To build it, with torch installed: {_rebuild(install)}")
    elif not ext.get("loaded"):
        built_for = record.get("torch")
        mismatch = (f" It was built for torch {built_for}; this is torch {now}." if built_for and built_for != now
                    else "")
        hints.append(f"The compiled op failed to load.{mismatch} Rebuild it against this torch: {_rebuild(install)}")
    elif ext.get("disabled_by_env"):
        hints.append(f"The compiled op is built but turned off by {ext.get('disable_env')}="
                     f"{ext.get('disable_env_value')}: unset it to use it.")
    elif isinstance(gpus, dict) and gpus.get("cuda_available") and not ext.get("kernels", {}).get("cuda"):
        why = f" The build recorded why: {record['cuda_reason']}." if record.get("cuda_reason") else ""
        hints.append("The compiled op has no CUDA kernel: CUDA tensors use the pure-torch fixed point."
                     f"{why} To build it: install the CUDA toolkit (nvcc) of torch's CUDA "
                     f"{info.get('torch', {}).get('cuda')}, then {_rebuild(install)}")
    return hints


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def format_info(info: Dict[str, Any]) -> str:
    """The text of ``torch-logme info``: one fact a line, then hints when the op is not in use."""
    lines: List[str] = []

    def row(name: str, value: Any) -> None:
        lines.append(f"  {name + ':':<18}{value}")

    def failed(part: Any) -> bool:
        if isinstance(part, dict) and "error" in part:
            lines.append(f"  (could not be read: {part['error']})")
            return True
        return False

    lines.append(f"torch_logme {info.get('torch_logme')}")
    install = info.get("install", {})
    if not failed(install):
        kind = {"installed": "installed package", "editable": f"editable install of {install.get('project')}",
                "source": "source tree, not installed"}.get(install.get("kind"), install.get("kind"))
        row("location", f"{install.get('location')} ({kind})")
        if install.get("note"):
            row("note", install["note"])
    py = info.get("python", {})
    row("python", f"{py.get('version')} ({py.get('implementation')}, {py.get('executable')})")
    plat = info.get("platform", {})
    if not failed(plat):
        row("platform", plat.get("platform"))
    tinfo = info.get("torch", {})
    if not failed(tinfo):
        built_for = [f"CUDA {tinfo['cuda']}" if tinfo.get("cuda") else "no CUDA"]
        if tinfo.get("hip"):
            built_for.append(f"ROCm/HIP {tinfo['hip']}")
        row("torch", f"{tinfo.get('version')} ({', '.join(built_for)}; CPU threads: {tinfo.get('threads')})")
    row("numpy", info.get("numpy") or "not installed")

    lines.append("compiled op (torch_logme._C)")
    ext = info.get("extension", {})
    if not failed(ext):
        row("built", f"yes: {ext.get('library')}" if ext.get("built") else "no")
        if ext.get("built"):
            row("loaded", "yes" if ext.get("loaded") else f"no: {ext.get('load_error')}")
        kernels = [d for d, k in ext.get("kernels", {}).items() if k]
        row("kernels", ", ".join(kernels) or "none")
        env = ext.get("disable_env")
        row("disabled", f"yes, by {env}={ext.get('disable_env_value')}" if ext.get("disabled_by_env")
            else f"no ({env} {'=' + repr(ext.get('disable_env_value')) if ext.get('disable_env_value') else 'unset'})")
        in_use = [d for d, k in ext.get("in_use", {}).items() if k]
        row("in use on", ", ".join(in_use) if in_use else "nothing: the pure-torch fixed point runs everywhere")
    record = install.get("build_record") if isinstance(install, dict) else None
    if isinstance(record, dict):
        if record.get("compiled"):
            text = f"compiled for {', '.join(record.get('kernels') or [])} against torch {record.get('torch')}"
        elif isinstance(ext, dict) and ext.get("built"):
            text = "not compiled then; the op was built later (e.g. setup.py build_ext --inplace)"
        else:
            text = f"not compiled: {record.get('reason')}"
        row("at build time", text)
        if record.get("compiled") and record.get("cuda_reason"):
            row("no CUDA kernel", record["cuda_reason"])

    lines.append("devices")
    gpus = info.get("gpus", {})
    if not failed(gpus):
        row("CUDA available", _yes(gpus.get("cuda_available")))
        for dev in gpus.get("devices", []):
            if "error" in dev:
                row("GPU", f"(could not be read: {dev['error']})")
            else:
                row(f"GPU {dev['index']}", f"{dev['name']} (capability {dev['capability']}, "
                                           f"{dev['memory_gib']} GiB)")
        row("MPS available", _yes(gpus.get("mps_available")))

    lines.append("optional packages")
    for name, version in info.get("extras", {}).items():
        row(name, version if isinstance(version, str) else ("not installed" if version is None else version))

    hints = _guard(partial(_hints, info))
    if isinstance(hints, list) and hints:
        lines.append("")
        lines.extend(f"hint: {h}" for h in hints)
    return "\n".join(lines)
