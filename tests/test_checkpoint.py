"""CheckpointSelector: scores each epoch, keeps the best state_dict, never a torn file."""
from __future__ import annotations

import os
from types import MappingProxyType

import pytest
import torch
from torch import nn

from torch_logme import SCORES, LogMEAccumulator, logme
from torch_logme.checkpoint import CheckpointSelector, atomic_save


def task(n=90, seed=0):
    """Inputs [n, 8] whose first 4 columns carry the class (3 classes), the rest noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen)
    x[:, :4] += 2.0 * nn.functional.one_hot(y, 4).float()
    return x, y


def loader_of(x, y, size=32):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


# Weights of the scored layer per "epoch": noise columns only, signal columns, a mix.
SCHEDULE = [
    torch.cat([torch.zeros(4, 4), torch.eye(4)], 1),
    torch.cat([torch.eye(4), torch.zeros(4, 4)], 1),
    torch.cat([0.3 * torch.eye(4), torch.eye(4)], 1),
]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5), nn.Linear(4, 3))


def train_epoch(model, epoch):
    with torch.no_grad():  # a scripted "training": the feature layer of this epoch
        model[0].weight.copy_(SCHEDULE[epoch])


def test_keeps_the_best_epoch(tmp_path, device):
    x, y = task()
    model = make_model().to(device)
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path / "ckpt", num_classes=3)
    saved = {}
    for epoch in range(3):
        train_epoch(model, epoch)
        model.train()
        score = selector.step()
        assert model.training  # the mode is restored after scoring
        saved[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            expected = logme(model[0](x.to(device)), y)
        assert score == pytest.approx(float(expected), rel=1e-10)
    assert [e for e, _ in selector.history] == [0, 1, 2]
    scores = [s for _, s in selector.history]
    assert selector.best_epoch == 1 and selector.best_score == max(scores)
    best = torch.load(selector.path, map_location=device)
    assert all(torch.equal(best[k], saved[1][k]) for k in best)
    assert os.listdir(tmp_path / "ckpt") == ["best.pt"]  # no temporary files left


def test_scores_in_eval_mode_and_resumes(tmp_path):
    x, y = task(seed=1)
    model = make_model()
    train_epoch(model, 1)
    selector = CheckpointSelector(model, model[0], loader_of(x, y), tmp_path, on="output", num_classes=3)
    first = selector.score()
    assert selector.score() == first  # dropout is off while scoring
    selector.step(epoch=5)
    state = selector.state_dict()
    again = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, num_classes=3)
    again.load_state_dict(state)
    assert again.best_epoch == 5 and again.history == [(5, first)]
    mtime = os.stat(again.path).st_mtime_ns
    assert again.step() == first and again.history[-1][0] == 6
    assert again.best_epoch == 5 and os.stat(again.path).st_mtime_ns == mtime  # a tie keeps the old file


def test_a_crash_while_saving_keeps_the_previous_best(tmp_path, monkeypatch):
    x, y = task()
    model = make_model()
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, num_classes=3)
    train_epoch(model, 0)
    selector.step()
    before = (tmp_path / "best.pt").read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    train_epoch(model, 1)  # better: it would replace the best
    with pytest.raises(OSError, match="disk full"):
        selector.step()
    assert (tmp_path / "best.pt").read_bytes() == before
    assert os.listdir(tmp_path) == ["best.pt"]
    assert selector.best_epoch == 0  # the failed epoch did not become the best


def test_atomic_save_writes_beside_then_renames(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((os.path.dirname(src), os.path.basename(src), dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert calls and calls[0][0] == str(tmp_path) and calls[0][1] != "m.pt"
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], torch.ones(2))


def test_bad_arguments(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="no submodule"):
        CheckpointSelector(model, "9", [], tmp_path)
    with pytest.raises(TypeError, match="one module"):
        CheckpointSelector(model, ["0", "2"], [], tmp_path)
    with pytest.raises(ValueError, match="method"):
        CheckpointSelector(model, "0", [], tmp_path, method="nope")
    assert all(not m._forward_hooks for m in model.modules())


# -- selecting on any streaming score -------------------------------------------------


def test_selects_on_another_score(tmp_path):
    name = "h_score"
    x, y = task(seed=2)
    model = make_model()
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, score=name, num_classes=3)
    assert selector.score_name == name and selector.spec is SCORES[name]
    for epoch in range(3):
        train_epoch(model, epoch)
        value = selector.step()
        with torch.no_grad():
            assert value == pytest.approx(float(SCORES[name].fn(model[0](x), y)), rel=1e-10)
    scores = [s for _, s in selector.history]
    assert selector.best_score == max(scores)
    assert selector.state_dict()["score"] == name
    other = CheckpointSelector(model, "0", loader_of(x, y), tmp_path / "other", num_classes=3)
    with pytest.raises(ValueError, match="selecting on 'h_score', this selector selects on 'logme'"):
        other.load_state_dict(selector.state_dict())
    legacy = {k: v for k, v in selector.state_dict().items() if k != "score"}  # saved before scores had names
    again = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, score=name, num_classes=3)
    again.load_state_dict(legacy)
    assert again.best_epoch == selector.best_epoch


def test_a_smaller_is_better_score_keeps_the_minimum(tmp_path, monkeypatch):
    from torch_logme import registry

    # LogME under a spec that says smaller is better: the selector must keep its smallest epoch.
    fake = registry.ScoreSpec(logme, "features", False, "test", LogMEAccumulator, "lower_logme")
    monkeypatch.setattr(registry, "SCORES", MappingProxyType({**registry.SCORES, "lower_logme": fake}))
    x, y = task()
    model = make_model()
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, score="lower_logme", num_classes=3)
    saved = {}
    for epoch in range(3):
        train_epoch(model, epoch)
        selector.step()
        saved[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    scores = [s for _, s in selector.history]
    best = min(range(3), key=scores.__getitem__)
    assert scores[best] < max(scores)
    assert selector.best_epoch == best and selector.best_score == min(scores)
    train_epoch(model, best)  # the same weights again: a tie keeps the earlier epoch
    assert selector.step() == scores[best] and selector.best_epoch == best
    kept = torch.load(selector.path)
    assert all(torch.equal(kept[k], saved[best][k]) for k in kept)


def test_bad_scores_raise_before_any_epoch(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="unknown score 'logmee'; choose from logme, "):
        CheckpointSelector(model, "0", [], tmp_path, score="logmee")
    CheckpointSelector(model, "0", [], tmp_path, score="leep")  # cannot stream: its batches are kept
    with pytest.raises(TypeError, match="one score"):
        CheckpointSelector(model, "0", [], tmp_path, score=["logme", "gbc"])
    with pytest.raises(TypeError, match="one score"):
        CheckpointSelector(model, "0", [], tmp_path, scores="gbc")
    with pytest.raises(TypeError, match="gbc takes no option 'method'"):
        CheckpointSelector(model, "0", [], tmp_path, score="gbc", method="icml")
    assert all(not m._forward_hooks for m in model.modules())
    assert not any(tmp_path.iterdir())  # nothing written


# -- reliability under faults: file names, a NaN best, permissions --------------------


@pytest.mark.parametrize("filename", ["../x.pt", "sub/best.pt", "", ".", "..", "/tmp/abs.pt", "best.pt/"])
def test_filename_must_be_a_plain_name_checked_at_construction(tmp_path, filename):
    model = make_model()
    with pytest.raises(ValueError, match="filename must be a plain file name"):
        CheckpointSelector(model, "0", [], tmp_path / "ckpt", filename=filename, num_classes=3)
    assert not (tmp_path / "ckpt").exists()  # refused before anything is made
    assert all(not m._forward_hooks for m in model.modules())


def test_a_plain_filename_is_used(tmp_path):
    x, y = task()
    model = make_model()
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, filename="epoch-best.ckpt", num_classes=3)
    train_epoch(model, 1)
    selector.step()
    assert selector.path == tmp_path / "epoch-best.ckpt" and os.listdir(tmp_path) == ["epoch-best.ckpt"]


def test_a_nan_best_in_a_loaded_state_is_no_best(tmp_path):
    x, y = task()
    model = make_model()
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, num_classes=3)
    selector.load_state_dict({"history": [(0, float("nan"))], "best_epoch": 0, "best_score": float("nan"),
                              "score": "logme"})
    assert selector.best_epoch is None and selector.best_score is None
    assert selector.history[0][0] == 0
    train_epoch(model, 1)
    value = selector.step()
    assert selector.best_epoch == 1 and selector.best_score == value  # saved, not silently skipped
    assert (tmp_path / "best.pt").is_file()
    # The same when best_score is set to NaN by hand.
    selector.best_score = float("nan")
    train_epoch(model, 0)
    assert selector.step() < value and selector.best_epoch == 2


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_checkpoint_has_the_mode_torch_save_gives(tmp_path, umask):
    state = {"w": torch.ones(2)}
    old = os.umask(umask)
    try:
        torch.save(state, tmp_path / "plain.pt")
        atomic_save(state, tmp_path / "atomic.pt")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert os.stat(tmp_path / "plain.pt").st_mode & 0o777 == expected
    assert os.stat(tmp_path / "atomic.pt").st_mode & 0o777 == expected
    # Over an existing file, torch.save keeps its mode: so does the atomic replace.
    os.chmod(tmp_path / "atomic.pt", 0o640)
    atomic_save({"w": torch.zeros(2)}, tmp_path / "atomic.pt")
    assert os.stat(tmp_path / "atomic.pt").st_mode & 0o777 == 0o640
    assert torch.equal(torch.load(tmp_path / "atomic.pt")["w"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["atomic.pt", "plain.pt"]


def test_a_pooled_score_is_judged_against_the_earlier_epochs(tmp_path, pooled_score):
    x, y = task()
    model = make_model()
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, score=pooled_score)
    values = []
    for epoch in range(3):
        train_epoch(model, epoch)
        values.append(selector.step())
    assert len(selector.terms) == 3 and all(len(t) == 2 for t in selector.terms)
    pool = torch.tensor(selector.terms, dtype=torch.float64)
    combined = ((pool - pool.amin(0)) / (pool.amax(0) - pool.amin(0))).sum(1)
    assert values[-1] == pytest.approx(float(combined[-1]), rel=1e-12)
    assert selector.best_epoch is not None and selector.path.exists()
    restored = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, score=pooled_score)
    restored.load_state_dict(selector.state_dict())
    assert restored.terms == selector.terms


def test_a_pooled_score_saves_an_epoch_that_beats_the_saved_one(tmp_path, pooled_score, monkeypatch):
    """An earlier unsaved epoch that the pool now ranks higher does not stop a better-than-saved epoch."""
    x, y = task()
    model = make_model()
    selector = CheckpointSelector(model, "0", loader_of(x, y), tmp_path, score=pooled_score)
    # Terms per epoch (larger is better): the pool decides which epoch ranks where.
    scripted = iter([[0.0, 0.0], [1.0, 1.0], [0.9, 0.0], [0.95, 0.5]])
    monkeypatch.setattr(selector, "_measure", lambda: torch.tensor(next(scripted), dtype=torch.float64))
    for _ in range(4):
        selector.step()
    assert selector.best_epoch == 1  # epoch 1 has the largest terms whatever the pool
    pool = torch.tensor(selector.terms, dtype=torch.float64)
    combined = ((pool - pool.amin(0)) / (pool.amax(0) - pool.amin(0))).sum(1)
    assert selector.best_score == pytest.approx(float(combined[1]))
    with pytest.raises(ValueError, match="terms are not 2 per epoch"):
        selector.load_state_dict({**selector.state_dict(), "terms": [[1.0]]})
    assert len(selector.terms) == 4  # the rejected state changed nothing
