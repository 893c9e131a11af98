"""Packaging: one version source, the sdist's contents, the build's warning and record, --version and `info`.

The slow, end-to-end checks (build the sdist and the wheel, install each in a
fresh environment, compile the op, run the commands from outside the source
tree) are .ci/package.sh; these are the fast ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import torch_logme
from torch_logme import info as info_module
from torch_logme.__main__ import main
from torch_logme.info import BUILD_RECORD, collect_info, format_info

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and environments a working tree may hold; never part of the source.
_JUNK = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", ".venv", ".ci-venv",
         ".ci-venv-oldest", ".whl", ".gl", "site"}


def _source_files() -> list[str]:
    """The files of the checkout, as a clean clone has them (git's list when there is one)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        files = [f for f in out.splitlines() if (ROOT / f).is_file()]
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not (set(rel.parts) & _JUNK) and not rel.parts[0].endswith(".egg-info") \
                and path.suffix not in (".so", ".pyc", ".pyd"):
            found.append(rel.as_posix())
    return found


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout with no build outputs: no stale egg-info whose file list setuptools would reuse."""
    copy = tmp_path_factory.mktemp("checkout")
    for rel in _source_files():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, copy / rel)
    return copy


@pytest.fixture(scope="module")
def sdist(checkout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, built as `python -m build --sdist` would (setuptools' PEP 517 backend), without torch."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "TORCH_LOGME_NO_EXTENSION": "1"}
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def _members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
    top = members[0].name.split("/")[0]
    return {m.name[len(top) + 1:]: m for m in members if m.isfile()}


def test_sdist_has_every_source_header_and_data_file(checkout: Path, sdist: Path) -> None:
    names = set(_members(sdist))
    csrc = sorted(p.relative_to(checkout).as_posix() for p in (checkout / "csrc").rglob("*") if p.is_file())
    assert {"csrc/fixed_point.h", "csrc/fixed_point.cpp", "csrc/cpu/fixed_point_cpu.cpp",
            "csrc/cuda/fixed_point_cuda.cu"} <= set(csrc)
    assert not set(csrc) - names, "csrc/ files missing from the sdist (MANIFEST.in)"
    # Everything a clean clone has goes in, but CI's scripts and the git settings.
    wanted = {f for f in _source_files() if not f.startswith(".")}
    assert not wanted - names, f"missing from the sdist (add them to MANIFEST.in): {sorted(wanted - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc", ".pyd", ".o"))]


def test_sdist_metadata_has_the_one_version_and_the_urls(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()  # type: ignore[union-attr]
    fields = re.findall(r"^([A-Za-z-]+): (.*)$", pkg_info, re.MULTILINE)
    meta: dict[str, list[str]] = {}
    for key, value in fields:
        meta.setdefault(key, []).append(value)
    assert meta["Name"] == ["torch-logme"]
    assert meta["Version"] == [torch_logme.__version__]
    # setuptools >= 69.3 normalises the file name (PEP 625); older releases keep the project's spelling.
    assert sdist.name in {f"{stem}-{torch_logme.__version__}.tar.gz" for stem in ("torch_logme", "torch-logme")}
    urls = dict(u.split(", ", 1) for u in meta["Project-URL"])
    assert set(urls) == {"Homepage", "Documentation", "Source", "Issues", "Upstream LogME"}
    assert meta["Author"] == ["torch_logme maintainers"]


def test_the_version_has_one_source() -> None:
    """Only torch_logme/_version.py spells the version; setup.py and the package read it."""
    literal = re.compile(r"""^\s*(__version__\s*=|version\s*=\s*["'])""", re.MULTILINE)
    holders = [p.relative_to(ROOT).as_posix() for p in [ROOT / "setup.py", *(ROOT / "torch_logme").rglob("*.py")]
               if literal.search(p.read_text(encoding="utf-8"))]
    assert holders == ["torch_logme/_version.py"]
    assert re.search(rf'BUILD_RECORD = "{re.escape(BUILD_RECORD)}"', (ROOT / "setup.py").read_text())


def _setup_without_torch(checkout: Path, *commands: str,
                         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """setup.py run as pip's isolated build runs it: torch cannot be imported."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
            "runpy.run_path('setup.py', run_name='__main__')")
    base = {k: v for k, v in os.environ.items()
            if k not in ("TORCH_LOGME_NO_EXTENSION", "TORCH_LOGME_REQUIRE_EXTENSION")}
    return subprocess.run([sys.executable, "-c", code, *commands], cwd=checkout, capture_output=True, text=True,
                          timeout=120, env={**base, **(env or {})})


def test_a_build_without_torch_warns_and_records_why(checkout: Path, tmp_path: Path) -> None:
    proc = _setup_without_torch(checkout, "egg_info", "--egg-base", str(tmp_path), "build_ext", "--inplace")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: the compiled op (torch_logme._C) is NOT built" in proc.stderr
    assert "torch is not importable" in proc.stderr and "--no-build-isolation" in proc.stderr
    record = json.loads((tmp_path / "torch_logme.egg-info" / BUILD_RECORD).read_text())
    assert record["compiled"] is False and record["kernels"] == []
    assert "torch is not importable" in record["reason"] and "--no-build-isolation" in record["fix"]
    # Metadata alone (pip's first steps, the sdist) compiles nothing: no warning there.
    quiet = _setup_without_torch(checkout, "egg_info", "--egg-base", str(tmp_path))
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr
    # ... and the warning becomes an error when the op is required.
    strict = _setup_without_torch(checkout, "build_ext", "--inplace", env={"TORCH_LOGME_REQUIRE_EXTENSION": "1"})
    assert strict.returncode != 0 and "TORCH_LOGME_REQUIRE_EXTENSION=1" in strict.stderr


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"torch_logme {torch_logme.__version__} (torch {torch.__version__},")


def test_info_json_matches_extension_available(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"torch_logme", "python", "platform", "torch", "numpy", "install", "extension", "gpus", "extras",
            "hints"} <= set(data)
    assert data["torch_logme"] == torch_logme.__version__
    ext = data["extension"]
    for device in ("cpu", "cuda"):
        assert ext["in_use"][device] == torch_logme.extension_available(device)
        assert ext["in_use"][device] == (ext["kernels"][device] and not ext["disabled_by_env"])
    assert set(data["extras"]) == {"numba", "scipy", "torchmetrics", "lightning", "timm", "transformers",
                                   "torchvision", "pillow", "matplotlib"}
    assert isinstance(data["gpus"]["cuda_available"], bool) and isinstance(data["gpus"]["devices"], list)
    assert data["install"]["location"] == str(Path(torch_logme.__file__).resolve().parent)


def test_info_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_LOGME_DISABLE_EXTENSION", raising=False)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"torch_logme {torch_logme.__version__}\n")
    for line in ("compiled op (torch_logme._C)", "in use on:", "CUDA available:", "optional packages", "numba:"):
        assert line in text
    if not torch_logme.extension_available("cpu"):
        assert "\nhint: " in text


def test_info_when_the_op_is_disabled_in_a_fresh_process() -> None:
    """`python -m torch_logme info --json` with the op turned off; it imports none of the optional packages."""
    env = {**os.environ, "TORCH_LOGME_DISABLE_EXTENSION": "1", "PYTHONPATH": str(ROOT)}
    optional = ("torchvision", "timm", "transformers", "lightning", "torchmetrics", "numba", "scipy", "matplotlib")
    code = ("import runpy, sys\n"
            "sys.argv = ['torch_logme', 'info', '--json']\n"
            "try:\n    runpy.run_module('torch_logme', run_name='__main__')\n"
            "except SystemExit as stop:\n    assert not stop.code, stop.code\n"
            f"print('imported:', *[m for m in {optional!r} if m in sys.modules], file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "imported:"
    data = json.loads(proc.stdout)
    ext = data["extension"]
    assert ext["disabled_by_env"] is True and ext["in_use"] == {"cpu": False, "cuda": False}
    if ext["loaded"]:
        assert any("TORCH_LOGME_DISABLE_EXTENSION" in h for h in data["hints"])
    assert "hint:" in format_info(data)


def test_info_survives_failing_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    monkeypatch.setattr(info_module, "_version_of", boom)
    monkeypatch.setattr(info_module, "_distribution", boom)
    data = collect_info()
    assert "probe exploded" in data["gpus"]["error"] and "probe exploded" in data["install"]["error"]
    assert "probe exploded" in data["extras"]["scipy"]["error"]
    text = format_info(data)
    assert "could not be read: RuntimeError: probe exploded" in text
    json.dumps(data)


def _fake_info(**extension: object) -> dict:
    ext = {"built": False, "library": None, "loaded": False, "load_error": None, "disabled_by_env": False,
           "disable_env": "TORCH_LOGME_DISABLE_EXTENSION", "disable_env_value": None,
           "kernels": {"cpu": False, "cuda": False}, "in_use": {"cpu": False, "cuda": False}}
    ext.update(extension)
    record = {"compiled": False, "kernels": [], "reason": "torch is not importable in the build environment",
              "fix": "...", "cuda_reason": None, "torch": None, "torch_cuda": None}
    return {"torch_logme": "9.9", "python": {}, "platform": {}, "torch": {"version": "2.13.0+cpu", "cuda": None},
            "numpy": None, "extras": {}, "gpus": {"cuda_available": False, "devices": [], "mps_available": False},
            "install": {"kind": "installed", "location": "/x/site-packages/torch_logme", "build_record": record},
            "extension": ext}


def test_info_hints_say_why_and_how_to_rebuild() -> None:
    text = format_info(_fake_info())
    assert "not compiled: torch is not importable" in text
    hint = text.splitlines()[-1]
    assert hint.startswith("hint: The compiled op is not built") and "torch is not importable" in hint
    assert "--no-build-isolation" in hint and "--no-cache-dir" in hint
    broken = format_info(_fake_info(built=True, library="/x/_C.so", load_error="undefined symbol: foo"))
    assert "no: undefined symbol: foo" in broken and "hint: The compiled op failed to load" in broken
    assert "not compiled then; the op was built later" in broken  # a stale record is not taken as the state
    moved = _fake_info(built=True, library="/x/_C.so", load_error="undefined symbol: foo")
    moved["install"]["build_record"] = {"compiled": True, "kernels": ["cpu"], "torch": "2.12.0+cpu"}
    assert "It was built for torch 2.12.0+cpu; this is torch 2.13.0+cpu." in format_info(moved)
    fine = _fake_info(built=True, loaded=True, kernels={"cpu": True, "cuda": False},
                      in_use={"cpu": True, "cuda": False})
    fine["install"]["build_record"] = {"compiled": True, "kernels": ["cpu"], "torch": "2.13.0+cpu"}
    assert "hint:" not in format_info(fine)
    fine["gpus"]["cuda_available"] = True
    assert "hint: The compiled op has no CUDA kernel" in format_info(fine)


def _fake_distribution(tmp_path: Path, record: dict, version: str) -> Path:
    """An installed-looking site folder: torch_logme/__init__.py and its .dist-info with a build record."""
    site = tmp_path / "site"
    (site / "torch_logme").mkdir(parents=True)
    (site / "torch_logme" / "__init__.py").write_text("")
    info = site / f"torch_logme-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch-logme\nVersion: {version}\n")
    (info / "RECORD").write_text(f"torch_logme/__init__.py,,\ntorch_logme-{version}.dist-info/METADATA,,\n")
    (info / BUILD_RECORD).write_text(json.dumps(record))
    return site


def test_info_reads_the_record_of_the_copy_imported_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    record = {"compiled": False, "kernels": [], "reason": "no C++ compiler found"}
    site = _fake_distribution(tmp_path, record, torch_logme.__version__)
    dist = importlib.metadata.PathDistribution(next(site.glob("*.dist-info")))
    monkeypatch.setattr(info_module, "_distribution", lambda: dist)
    monkeypatch.setattr(info_module, "_package_file", lambda: (site / "torch_logme" / "__init__.py").resolve())
    install = info_module._install()
    assert install["kind"] == "installed" and install["build_record"] == record
    # A source tree that shadows the installed copy: its record says nothing about what runs.
    monkeypatch.setattr(info_module, "_package_file", lambda: (tmp_path / "elsewhere" / "__init__.py"))
    install = info_module._install()
    assert install["kind"] == "source" and install["build_record"] is None and "shadows" in install["note"]
