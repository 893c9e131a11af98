"""Shared test settings: the one list of devices and dtypes every test uses."""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from typing import Callable, Optional

import numpy as np
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]


def make_features(n: int, d: int, c: int, seed: int = 0, scale: float = 1.0):
    """Gaussian features [n, d] whose mean depends on the label, and labels [n] in 0..c-1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    centres = rng.standard_normal((max(c, 1), d))
    feats = rng.standard_normal((n, d)) + 0.7 * centres[labels]
    return feats * scale, labels


def batches(n: int, sizes: list) -> list:
    """Split range(n) into consecutive slices of the given sizes (cycled)."""
    out, start, i = [], 0, 0
    while start < n:
        stop = min(start + sizes[i % len(sizes)], n)
        out.append(slice(start, stop))
        start, i = stop, i + 1
    return out


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_and_exit(body: Callable[[], None]) -> None:
    """Run a spawned rank's body (which saves its results), then end the process at once.

    The process leaves with os._exit, without tearing its gloo group down: on
    torch 2.4 to 2.7 destroying a gloo group joins its worker thread while
    holding the GIL, and that thread may still need the GIL to free the last
    all_reduce's tensors, a deadlock seen in about one run in three under
    load (fixed in torch 2.8, pytorch#154976). On an error the traceback is
    printed and the exit status is 1, which the parent reports.
    """
    try:
        body()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _gloo_rank(
    rank: int, world_size: int, port: int, body: Callable, args: tuple, timeout_s: Optional[float] = None
) -> None:
    """One spawned rank: join a gloo group on loopback, run ``body(rank, *args)``, exit at once.

    ``timeout_s``: the group's timeout for a collective (None: torch's default).
    """
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # body's module imports conftest
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **extra)
    run_and_exit(lambda: body(rank, *args))  # no teardown: see run_and_exit


def run_ranks(
    body: Callable, args: tuple = (), world_size: int = 2, timeout: float = 300.0, timeout_s: Optional[float] = None
) -> None:
    """Run ``body(rank, *args)`` on every rank of a gloo group of ``world_size`` processes; fail, never hang.

    ``body`` is a module-level function (spawned processes import it by
    name) that saves what the test checks. A rank that raises fails the
    test with its traceback; ranks still running after ``timeout`` seconds
    are killed and the test fails, so that a collective that never
    completes cannot stall the whole suite. ``timeout_s`` is the process
    group's own timeout (None: torch's default, 30 minutes): tests of ranks
    that might wait on each other set it short, so that a rank stuck in a
    collective raises instead of waiting for ``timeout``.
    """
    import torch.multiprocessing as mp

    context = mp.spawn(
        _gloo_rank, args=(world_size, free_port(), body, args, timeout_s), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world_size} ranks still running after {timeout:.0f} s: killed")


def _two_terms(features, labels, **options):
    """A stand-in pooled score: the H-score and GBC of the features, as two terms [2]."""
    from torch_logme import gbc, h_score

    return torch.stack([h_score(features, labels, **options), gbc(features, labels, **options)])


def _min_max_sum(terms):
    """Each term min-max scaled across the pool [M, T], then summed: [M]; a term equal across the pool adds 0."""
    low, high = terms.amin(0), terms.amax(0)
    spread = high - low
    return torch.where(spread > 0, (terms - low) / torch.where(spread > 0, spread, 1), 0).sum(1)


@pytest.fixture
def pooled_score(monkeypatch) -> str:
    """Registers "two_terms", a score normalised across the pool of models, for the test; returns its name."""
    from types import MappingProxyType

    from torch_logme import ranking, registry

    spec = registry.ScoreSpec(
        _two_terms, "features", True, "test", None, "two_terms", no_stream_reason="test",
        terms=("h", "gbc"), combine=_min_max_sum,
    )
    scores = MappingProxyType({**registry.SCORES, spec.name: spec})
    monkeypatch.setattr(registry, "SCORES", scores)
    monkeypatch.setattr(ranking, "SCORES", scores)
    return spec.name
