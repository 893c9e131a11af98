"""Fault injection: every streaming accumulator under bad states, bad batches, threads and disagreeing ranks.

What the accumulators promise (docs/design.md, "Guarantees of the
accumulators"): a failed ``update`` or ``load_state_dict`` leaves the
accumulator exactly as it was; concurrent updates are all counted;
``sync()`` then ``compute()`` counts every sample once; ranks that
disagree all raise the same ValueError instead of some of them waiting in
a collective.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from torch_logme import SCORES, accumulator

from conftest import run_ranks

STREAMING = [name for name, spec in SCORES.items() if spec.streams]
D, C = 6, 4


def _batch(seed: int, n: int = 24, classes: int = C):
    """Features [n, D] (or NCE's source logits [n, D]) whose offset is far from 0, and labels [n]."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[: min(n, classes)] = torch.arange(min(n, classes))  # every class in every batch
    features = torch.randn(n, D, generator=gen, dtype=torch.float64) + 3.0
    features[:, 0] += labels.double()
    return features, labels


def _make(name: str, **options):
    return accumulator(name, D, **options)


def _snapshot(acc) -> dict:
    return acc.state_dict()


def _assert_same_state(before: dict, after: dict) -> None:
    assert set(before) == set(after)
    for key, value in before.items():
        other = after[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and value.dtype == other.dtype, key
            assert torch.equal(value, other), key
        else:
            assert value == other, key


# -- load_state_dict is atomic -------------------------------------------------------------
def _partial_cases():
    for name in STREAMING:
        full = _make(name)
        full.update(*_batch(1))
        for key in list(full.states) + ["sizes"]:
            yield name, key


@pytest.mark.parametrize("name, key", list(_partial_cases()))
def test_partial_state_dict_is_rejected_and_changes_nothing(name, key):
    source = _make(name)
    source.update(*_batch(1))
    source.update(*_batch(2, classes=C + 1))  # a class more than the target below has
    state = source.state_dict()
    del state[key]
    target = _make(name)
    target.update(*_batch(3))
    before, score = _snapshot(target), target.compute()
    with pytest.raises(ValueError, match=repr(key)):
        target.load_state_dict(state)
    _assert_same_state(before, _snapshot(target))
    assert torch.equal(target.compute(), score)


@pytest.mark.parametrize("name", [n for n in STREAMING if len(_make(n)._AXES) > 1])
def test_state_dict_with_a_bad_last_state_changes_nothing(name):
    source = _make(name)
    source.update(*_batch(1))
    state = source.state_dict()
    last = list(source.states)[-1]  # every other state would be copied before it is reached
    state[last] = torch.zeros(tuple(state[last].shape) + (2,), dtype=state[last].dtype)
    target = _make(name)
    target.update(*_batch(3))
    before = _snapshot(target)
    with pytest.raises(ValueError, match=repr(last)):
        target.load_state_dict(state)
    _assert_same_state(before, _snapshot(target))


@pytest.mark.parametrize("name", STREAMING)
def test_state_dict_with_sizes_larger_than_its_sums_changes_nothing(name):
    source = _make(name)
    source.update(*_batch(1))
    state = source.state_dict()
    grown = "num_target_classes" if name == "nce" else ("num_columns" if name == "logme" else "num_classes")
    state["sizes"] = dict(state["sizes"], **{grown: state["sizes"][grown] + 3})  # the sums keep their shape
    target = _make(name)
    target.update(*_batch(3))
    before = _snapshot(target)
    with pytest.raises(ValueError, match="has shape"):
        target.load_state_dict(state)
    _assert_same_state(before, _snapshot(target))  # not even grown


def test_regression_width_not_set_yet_fits_any():
    # Found by tests/test_properties.py: a regression accumulator without num_targets takes its width
    # from its first batch; before that (width 0) it could neither load nor merge another's sums.
    features, labels = _batch(1)
    targets = torch.nn.functional.one_hot(labels, C).double()
    used = _make("logme", regression=True)
    used.update(features, targets)
    expected = used.compute()
    fresh = _make("logme", regression=True)
    fresh.load_state_dict(used.state_dict())
    assert torch.equal(fresh.compute(), expected)
    merged = _make("logme", regression=True).merge(used)
    assert torch.equal(merged.compute(), expected)
    assert torch.equal(used.merge(_make("logme", regression=True)).compute(), expected)  # an empty one adds 0
    used.load_state_dict(_make("logme", regression=True).state_dict())  # an empty state: no samples left
    assert used.num_columns == C and float(used.state_dict()["num_samples"]) == 0
    narrower = _make("logme", regression=True)
    narrower.update(features, targets[:, :2])
    with pytest.raises(ValueError, match="num_columns differs: 2 here, 4"):
        narrower.merge(merged)
    with pytest.raises(ValueError, match="num_columns differs: 2 here, 4 in the state_dict"):
        narrower.load_state_dict(merged.state_dict())


@pytest.mark.parametrize("name", STREAMING)
def test_state_dict_with_fewer_classes_loads_padded(name):
    # Found by tests/test_properties.py: classes grow on update and pad on merge, but a state with
    # fewer classes than the accumulator loading it was refused ("has shape").
    # LogME counts an absent class in its mean by default (as merge's padding would too): skip them here.
    options = {"absent_classes": "skip"} if name == "logme" else {}
    source = _make(name, **options)
    source.update(*_batch(1, classes=2))
    target = _make(name, **options)
    target.update(*_batch(3, classes=C + 2))
    target.load_state_dict(source.state_dict())
    assert torch.allclose(target.compute(), source.compute(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", [n for n in STREAMING if SCORES[n].input == "features" and n != "logme"])
def test_state_dict_with_a_bad_scale_changes_nothing(name):
    source = _make(name)
    source.update(*_batch(1))
    state = source.state_dict()
    state["scale"] = torch.ones(D + 1, dtype=torch.float64)
    target = _make(name)
    target.update(*_batch(3))
    before = _snapshot(target)
    with pytest.raises(ValueError, match="'scale'"):
        target.load_state_dict(state)
    _assert_same_state(before, _snapshot(target))


# -- update is all or nothing ----------------------------------------------------------------
@pytest.mark.parametrize("bad", [C, -1], ids=["too large", "negative"])
@pytest.mark.parametrize("name", STREAMING)
def test_unchecked_update_with_a_bad_label_changes_nothing(name, bad):
    options = {"num_classes": C, "check_inputs": False}  # NCE: D source classes, fixed by _make
    acc = _make(name, **options)
    acc.update(*_batch(1))
    before = _snapshot(acc)
    features, labels = _batch(2)
    labels[-1] = bad
    with pytest.raises(ValueError, match="out of range|non-negative"):
        acc.update(features, labels)
    _assert_same_state(before, _snapshot(acc))
    fresh = _make(name, **options)  # and on a first batch: no shift, no scale, no states left behind
    with pytest.raises(ValueError, match="out of range|non-negative"):
        fresh.update(features, labels)
    _assert_same_state(_snapshot(_make(name, **options)), _snapshot(fresh))
    assert getattr(fresh, "shift", None) is None


def _inject_failure(monkeypatch, name: str, acc) -> None:
    """Make the next update fail after its checks, its growth and its shift, just before its first sum."""
    def boom(*args, **kwargs):
        raise RuntimeError("injected fault")

    if name == "logme":
        monkeypatch.setattr("torch_logme.streaming._as_statistics", boom)
    elif name == "nce":
        monkeypatch.setattr("torch_logme.streaming_scores.add_counts_", boom)
    else:
        monkeypatch.setattr(acc, "_add", boom)


@pytest.mark.parametrize("name", STREAMING)
def test_update_failing_after_growth_and_shift_is_undone(monkeypatch, name):
    acc = _make(name)  # classes grow; the first batch sets the shift (and scale)
    empty = _snapshot(_make(name))
    _inject_failure(monkeypatch, name, acc)
    with pytest.raises(RuntimeError, match="injected fault"):
        acc.update(*_batch(1))
    _assert_same_state(empty, _snapshot(acc))
    assert getattr(acc, "shift", None) is None and getattr(acc, "scale", None) is None
    monkeypatch.undo()
    acc.update(*_batch(1))
    reference = _make(name)
    reference.update(*_batch(1))
    _assert_same_state(_snapshot(reference), _snapshot(acc))


# -- threads ----------------------------------------------------------------------------------
def _count(acc) -> float:
    states = acc.states
    return float(states["num_samples"] if "num_samples" in states else states["counts"].sum())


@pytest.mark.parametrize("name", STREAMING)
def test_concurrent_updates_are_all_counted(monkeypatch, name):
    threads, per_thread, n = 4, 6, 64
    data = [_batch(100 + i, n=n) for i in range(threads * per_thread)]
    sequential = _make(name)
    for features, labels in data:
        sequential.update(features, labels)
    expected = sequential.compute()
    for trial in range(3):
        acc = _make(name)  # fresh: the lazy allocation races too
        # Fault injection: a pause between "no states yet?" and making them, where a thread switch lets
        # every thread make its own zeros (and lose the batches added to the others'); without it the
        # race of the in-place adds shows only now and then. The later updates race as they are.
        allocate = acc._allocate

        def slow(device, allocate=allocate):
            time.sleep(0.05)
            allocate(device)

        monkeypatch.setattr(acc, "_allocate", slow)
        start = threading.Barrier(threads)
        errors = []

        def work(part: int, acc=acc, start=start, errors=errors) -> None:
            try:
                start.wait()
                for features, labels in data[part::threads]:
                    acc.update(features, labels)
            except BaseException as err:  # reported below: a thread's exception is otherwise lost
                errors.append(err)

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        assert not errors, errors
        assert _count(acc) == threads * per_thread * n, trial
        assert torch.allclose(acc.compute(), expected, rtol=1e-9, atol=1e-12), trial


# -- two ranks ----------------------------------------------------------------------------------
def _outcome(fn) -> str:
    """What a call did, as text both ranks can compare: its value or its error."""
    try:
        return f"ok {float(fn()):.12g}"
    except Exception as err:  # the test compares the ranks' outcomes, whatever they are
        return f"{type(err).__name__}: {err}"


def _distributed_case(rank: int, out_dir: str, case: str) -> None:
    result = {}
    other = STREAMING[1:] + STREAMING[:1]
    for i, name in enumerate(STREAMING):
        features, labels = _batch(10 + rank, classes=C if rank == 0 else C + 1)
        if case == "sync_then_compute":
            acc = _make(name)
            acc.update(features, labels)
            acc.sync()
            result[name] = acc.compute()
            result[name + " again"] = acc.sync().compute()  # a second sync adds nothing
        elif case == "fixed_vs_grown":
            acc = _make(name, num_classes=C + 2) if rank == 0 else _make(name)  # rank 1 grows to C + 1
            acc.update(features, labels)
            result[name] = _outcome(acc.compute)
        elif case == "types":
            acc = _make(name if rank == 0 else other[i])
            acc.update(*_batch(10 + rank))
            result[name] = _outcome(acc.compute)
        elif case == "synced_on_one_rank":
            acc = _make(name)
            acc.update(features, labels)
            acc.sync()
            if rank == 0:
                acc.update(features, labels)  # new data here: rank 0's sums are no longer the global ones
            result[name] = _outcome(acc.compute)
    if case == "regression_idle_rank":
        features, labels = _batch(10)
        targets = torch.nn.functional.one_hot(labels, C).double()
        idle = _make("logme", regression=True)
        if rank == 0:  # rank 1 sees no batch: its width is not set yet
            idle.update(features, targets)
        result["idle"] = _outcome(idle.compute)
        wide = _make("logme", regression=True)
        wide.update(features, targets[:, : 2 + rank])
        result["widths"] = _outcome(wide.compute)
    if case == "regression_vs_classification":
        features, labels = _batch(10 + rank)
        if rank == 0:
            acc = _make("logme", num_classes=C)
            acc.update(features, labels)
        else:
            acc = _make("logme", regression=True, num_targets=C)
            acc.update(features, torch.nn.functional.one_hot(labels, C).double())
        result["logme"] = _outcome(acc.compute)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(tmp_path, case):
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    # A short group timeout: a rank left waiting in a collective fails in seconds, not in 30 minutes.
    run_ranks(_distributed_case, (str(tmp_path), case), timeout=180.0, timeout_s=20.0)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_sync_then_compute_counts_every_sample_once(tmp_path):
    results = _run(tmp_path, "sync_then_compute")
    for name in STREAMING:
        one = _make(name)
        for rank in range(2):
            one.update(*_batch(10 + rank, classes=C if rank == 0 else C + 1))
        expected = one.compute()
        for res in results:
            assert torch.allclose(res[name], expected, rtol=1e-9, atol=1e-12), name
            assert torch.allclose(res[name + " again"], expected, rtol=1e-9, atol=1e-12), name


def _assert_same_error(results, name, *fragments):
    first, second = results[0][name], results[1][name]
    assert first == second, (name, first, second)
    assert first.startswith("ValueError: "), (name, first)
    for fragment in fragments:
        assert fragment in first, (name, fragment, first)


def test_fixed_and_grown_classes_raise_on_every_rank(tmp_path):
    results = _run(tmp_path, "fixed_vs_grown")
    for name in STREAMING:
        size = "num_target_classes" if name == "nce" else ("fixed_columns" if name == "logme" else "num_classes")
        _assert_same_error(results, name, "ranks disagree on", size, f"rank 0: {C + 2}", "rank 1: None")


def test_different_accumulator_types_raise_on_every_rank(tmp_path):
    results = _run(tmp_path, "types")
    for name in STREAMING:
        _assert_same_error(results, name, "ranks disagree on accumulator type", "rank 0:", "rank 1:")


def test_regression_and_classification_are_not_summed(tmp_path):
    results = _run(tmp_path, "regression_vs_classification")
    _assert_same_error(results, "logme", "ranks disagree on regression", "rank 0: False", "rank 1: True")


def test_sync_on_some_ranks_only_raises_on_every_rank(tmp_path):
    results = _run(tmp_path, "synced_on_one_rank")
    for name in STREAMING:
        _assert_same_error(results, name, "ranks disagree on whether sync() ran", "ranks [1] synced")


def test_regression_rank_without_batches_takes_the_width(tmp_path):
    results = _run(tmp_path, "regression_idle_rank")
    one = _make("logme", regression=True)
    features, labels = _batch(10)
    one.update(features, torch.nn.functional.one_hot(labels, C).double())
    for res in results:
        assert res["idle"] == f"ok {float(one.compute()):.12g}", res["idle"]
    _assert_same_error(results, "widths", "ranks disagree on", "num_columns", "rank 0: 2", "rank 1: 3")
