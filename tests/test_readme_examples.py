"""The README's "Streaming, hooks and checkpoint selection" examples run, so they cannot rot.

Each fenced ```python block of that section runs as written: in-process in
a fresh namespace, or, for the distributed one, as a script in two
processes with the environment torchrun would give them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Streaming, hooks and checkpoint selection"


def section_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start:end if end != -1 else len(text)]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


BLOCKS = section_blocks()
LOCAL = [b for b in BLOCKS if "torch.distributed" not in b]
DISTRIBUTED = [b for b in BLOCKS if "torch.distributed" in b]


def test_section_has_the_examples():
    assert len(LOCAL) >= 2 and len(DISTRIBUTED) == 1
    assert any("score_layers" in b for b in LOCAL) and any("CheckpointSelector" in b for b in LOCAL)


@pytest.mark.parametrize("code", LOCAL, ids=[f"block{i}" for i in range(len(LOCAL))])
def test_example_runs(code, tmp_path, monkeypatch):
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("import ", "from ")))
    for library in ("torchmetrics", "lightning"):  # the optional extras
        if library in imports:
            pytest.importorskip(library)
    monkeypatch.chdir(tmp_path)  # checkpoints and trainer files go to tmp_path
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    if "score_layers" in code:
        assert set(namespace["scores"]) == {"1", "3"}
        assert all(torch.isfinite(s) for s in namespace["scores"].values())
    if "CheckpointSelector" in code:
        selector = namespace["selector"]
        assert [e for e, _ in selector.history] == [0, 1, 2]
        assert selector.best_score == max(s for _, s in selector.history)
        assert (tmp_path / "checkpoints" / "best.pt").is_file()


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


def _score(procs) -> float:
    """The score that rank 0 printed."""
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the distributed README example did not finish in 300 s: killed")
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    found = re.search(r"LogME over (\d+) ranks: (-?[\d.]+)", outputs[0])
    assert found, outputs[0]
    assert int(found.group(1)) == len(procs)
    return float(found.group(2))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_distributed_example_equals_one_process(tmp_path, monkeypatch, capsys):
    script = tmp_path / "score_ddp.py"
    script.write_text(DISTRIBUTED[0], encoding="utf-8")
    two = _launch(script, 2)
    # Meanwhile, the same script as a one-rank group in this process: the single-process score.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    try:
        exec(compile(DISTRIBUTED[0], "README.md", "exec"), {"__name__": "readme_example"})
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    one = re.search(r"LogME over 1 ranks: (-?[\d.]+)", capsys.readouterr().out)
    assert one
    assert _score(two) == pytest.approx(float(one.group(1)), rel=1e-7)
