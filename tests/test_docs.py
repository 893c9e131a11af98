"""Every ```python block of the README and of the documentation site runs, so none can rot.

The blocks of one page run in order in one namespace (a guide builds its
example up over several blocks), in a fresh working folder, on the CPU.
An HTML comment on the line just before a block changes how it is run:

- ``<!-- docs-test: skip (why) -->``: compiled, not run (a block that needs
  a network, a GPU or a model hub);
- ``<!-- docs-test: requires lightning -->``: runs when those modules import
  (the optional extras), else the page skips from that block on;
- ``<!-- docs-test: distributed -->``: a script for ``torchrun``; it runs in
  two processes, with the environment torchrun would give them, and must
  print the same ``... over N ranks: <score>`` as one process does.

Where a block is followed by a line saying what it prints ("It prints:")
and a ```text block, the printed lines must contain those lines, numbers
equal to 1e-4 relative: an output shown in the docs is the output one gets.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
_BLOCK = re.compile(
    r"(?:^<!--\s*docs-test:\s*(?P<directive>.*?)\s*-->\n)?^```python[^\n]*\n(?P<code>.*?)^```\n"
    r"(?:\n[^\n`]*\bprints:\n\n```text\n(?P<shown>.*?)^```)?",
    re.S | re.M,
)


@dataclass
class Block:
    page: str
    line: int
    code: str
    directive: str
    shown: str = ""  # the output the page says the block prints, if it shows one

    @property
    def kind(self) -> str:
        return self.directive.split(maxsplit=1)[0] if self.directive else "run"


def page_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    name = str(path.relative_to(ROOT))
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append(Block(name, line, match.group("code"), match.group("directive") or "",
                            match.group("shown") or ""))
    return blocks


BLOCKS = {str(p.relative_to(ROOT)): page_blocks(p) for p in PAGES}
RUNNABLE = [page for page, blocks in BLOCKS.items() if any(b.kind != "distributed" for b in blocks)]
DISTRIBUTED = [b for blocks in BLOCKS.values() for b in blocks if b.kind == "distributed"]


def test_directives_are_known():
    for blocks in BLOCKS.values():
        for b in blocks:
            assert b.kind in ("run", "skip", "requires", "distributed"), f"{b.page}:{b.line}: {b.directive!r}"
            if b.kind == "skip":
                assert "(" in b.directive, f"{b.page}:{b.line}: say why a block is skipped: skip (why)"


def test_readme_has_a_runnable_quickstart_that_shows_its_output():
    readme = [b for b in BLOCKS["README.md"] if b.kind == "run"]
    assert readme and any("torch_logme" in b.code and b.shown for b in readme)


def test_shown_outputs_are_found():
    # The pattern that pairs a block with its output must see the pages' "It prints:" blocks.
    shown = [b for blocks in BLOCKS.values() for b in blocks if b.shown]
    assert len(shown) >= 3, [f"{b.page}:{b.line}" for b in shown]


def test_a_wrong_output_is_caught():
    block = Block("page.md", 1, "", "", "rank  model  logme\n   1  good   -0.375082\n")
    _check_shown(block, "header\nrank  model  logme\n   1  good   -0.3750821\n")
    with pytest.raises(AssertionError):
        _check_shown(block, "rank  model  logme\n   1  good   -0.3761\n")
    with pytest.raises(AssertionError):
        _check_shown(block, "rank  model  logme\n   1  weak   -0.375082\n")


_NUMBER = re.compile(r"[-+]?\d+\.\d*(?:e[-+]?\d+)?|[-+]?\d+e[-+]?\d+")


def _same_line(got: str, want: str) -> bool:
    """The same words, and the same numbers to 1e-4 relative (the last printed digit may differ)."""
    if _NUMBER.sub("#", got.strip()) != _NUMBER.sub("#", want.strip()):
        return False
    pairs = zip(_NUMBER.findall(got), _NUMBER.findall(want))
    return all(math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-12) for a, b in pairs)


def _check_shown(block: Block, printed: str) -> None:
    want = [line for line in block.shown.splitlines() if line.strip()]
    got = [line for line in printed.splitlines() if line.strip()]
    starts = [i for i in range(len(got) - len(want) + 1)
              if all(_same_line(g, w) for g, w in zip(got[i:i + len(want)], want))]
    assert starts, f"{block.page}:{block.line}: the page shows\n{block.shown}\nbut the block printed\n{printed}"


def _exec(block: Block, namespace: dict) -> None:
    # The file name and line make a failing block's traceback point into the page.
    code = "\n" * (block.line - 1) + block.code
    exec(compile(code, block.page, "exec"), namespace)


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints, CSV files and plots go to tmp_path
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plots render headless
    namespace: dict = {"__name__": "docs_example"}
    for block in BLOCKS[page]:
        if block.kind == "skip" or block.kind == "distributed":
            compile(block.code, block.page, "exec")  # at least it parses
            continue
        if block.kind == "requires":
            missing = [m for m in block.directive.split()[1:] if importlib.util.find_spec(m) is None]
            if missing:
                pytest.skip(f"{page}:{block.line} needs {', '.join(missing)}")
        if not block.shown:
            _exec(block, namespace)
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            _exec(block, namespace)
        _check_shown(block, printed.getvalue())


def _launch(script: Path, world: int):
    """Start ``world`` processes as torchrun would (RANK, WORLD_SIZE, ... in the environment)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=script.parent,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


_RESULT = re.compile(r"over (\d+) ranks: (-?[\d.]+)")


def _score(procs) -> float:
    """The score that rank 0 printed."""
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the distributed example did not finish in 300 s: killed")
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    found = _RESULT.search(outputs[0])
    assert found, outputs[0]
    assert int(found.group(1)) == len(procs)
    return float(found.group(2))


def test_there_is_a_distributed_example():
    assert DISTRIBUTED, "the streaming and distributed guide should show a torchrun script"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("block", DISTRIBUTED, ids=[f"{b.page}:{b.line}" for b in DISTRIBUTED])
def test_distributed_example_equals_one_process(block, tmp_path, monkeypatch, capsys):
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    two = _launch(script, 2)
    # Meanwhile, the same script as a one-rank group in this process: the single-process score.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    try:
        _exec(block, {"__name__": "docs_example"})
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    one = _RESULT.search(capsys.readouterr().out)
    assert one and one.group(1) == "1"
    assert _score(two) == pytest.approx(float(one.group(2)), rel=1e-7)


def test_site_builds_strictly(tmp_path):
    """The site builds with no warning: no broken link, no docstring mkdocstrings cannot read."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "scores/logme/index.html", "api/scores/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_the_images_the_pages_show_exist_and_are_drawn_by_their_examples():
    pytest.importorskip("matplotlib")  # make_images.py selects its backend at import
    shown = {m for page in PAGES for m in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text(encoding="utf-8"))}
    assert shown, "the guides show the plots"
    for path in shown:
        assert (ROOT / "docs" / "images" / Path(path).name).is_file(), path
    spec = importlib.util.spec_from_file_location("make_images", ROOT / "docs" / "images" / "make_images.py")
    make_images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_images)  # defines only: the drawing runs under __main__
    drawn = "".join(code for page, heading in make_images.SECTIONS
                    for code in make_images.section_blocks(page, heading))
    assert {Path(p).name for p in shown} == set(make_images.IMAGES)
    assert all(f'savefig("{name}"' in drawn for name in make_images.IMAGES)
