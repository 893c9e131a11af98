"""The torchmetrics metric of every registered streaming score (``TransferabilityMetric``).

Every check runs over the registry's streaming scores (``torch_logme.SCORES``),
with the inputs of the shared test table: the metric against the score's
functional form on all the data (uneven batches; offset, huge and float32
features), ``forward``, ``merge_state``, ``reset``, ``.to()`` and dtype casts,
state_dict persistence, and two gloo processes synced by torchmetrics
itself. ``LogMEMetric`` is checked against its historical behaviour.
"""
from __future__ import annotations

import copy
import inspect
import os
import pickle

import pytest
import torch

from torch_logme import SCORES, logme

from conftest import batches, run_ranks
from score_table import TABLE

torchmetrics = pytest.importorskip("torchmetrics")
from torch_logme.integrations.torchmetrics import LogMEMetric, TransferabilityMetric  # noqa: E402

STREAMING = [name for name, spec in SCORES.items() if spec.streams]
N, D, C = 240, 12, 4
RTOL = 1e-10
#: LogME of features 1e6 from 0 is itself conditioned to about 1e-10 (its eigh and svd solvers differ by
#: 8e-11 on this data), so paths that add parts about different shifts agree to that, not to 1e-10
#: exactly; 1e-9 is the bound tests/test_precision_logme.py uses for offset features.
RTOL_OFFSET = 1e-9
#: Features are offset or scaled only for scores that read features; probabilities stay as they are.
VARIANTS = ["plain", "offset", "huge", "float32"]


def _close(actual, expected, rtol=RTOL) -> bool:
    actual, expected = torch.as_tensor(actual).double().cpu(), torch.as_tensor(expected).double().cpu()
    return bool(torch.allclose(actual, expected, rtol=rtol, atol=1e-300))


def _data(name: str, variant: str = "plain", device: str = "cpu", seed: int = 0):
    """(inputs [N, W], labels [N]) of the score's table entry, in the variant asked for."""
    x, y = TABLE[name].make(N, D, C, seed)
    x = torch.from_numpy(x)
    if SCORES[name].input == "features":
        if variant == "offset":
            x = x + 1e6
        elif variant == "huge":  # beyond 2**250: the feature scores' power-of-two scales differ batch to batch
            x = x * 2.0 ** 300
    if variant == "float32":
        x = x.float()
    return x.to(device), torch.from_numpy(y).to(device)


def _metric(name: str, **kwargs) -> TransferabilityMetric:
    return TransferabilityMetric(name, D, C, **kwargs)


def _rtol(variant: str) -> float:
    return RTOL_OFFSET if variant == "offset" else RTOL


def _parts(metric: TransferabilityMetric) -> int:
    """The leading (parts) axis of the metric's states."""
    return next(iter(metric.metric_state.values())).shape[0]


# -- update / compute -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", STREAMING)
def test_metric_equals_functional(name, variant, device):
    x, y = _data(name, variant, device)
    metric = _metric(name).to(device)
    acc = SCORES[name].accumulator_cls(D, C)  # (width, classes), as the metric makes it
    for rows in batches(N, [1, 7, 32, 50]):
        metric.update(x[rows], y[rows])
        acc.update(x[rows], y[rows])
    score = metric.compute()
    assert score.dim() == 0 and score.device.type == device
    assert _close(score, SCORES[name].fn(x, y), _rtol(variant))
    # The metric adds the batches with the accumulator's own code: the same number.
    assert _close(score, acc.compute(), 1e-12)
    assert _parts(metric) == 1


@pytest.mark.parametrize("name", STREAMING)
def test_higher_is_better_and_repr_follow_the_spec(name):
    metric = _metric(name)
    assert metric.higher_is_better is SCORES[name].larger_is_better
    assert metric.score == name and metric.spec is SCORES[name]
    assert repr(name) in repr(metric)
    assert not metric.is_differentiable and metric.full_state_update is False


@pytest.mark.parametrize("name", STREAMING)
def test_forward_returns_the_batch_score_and_accumulates_globally(name):
    x, y = _data(name, "offset")
    metric = _metric(name)
    for rows in batches(N, [50, 70]):
        batch = metric(x[rows], y[rows])
        assert _close(batch, SCORES[name].fn(x[rows], y[rows]), RTOL_OFFSET)
        assert _parts(metric) == 1  # forward's stacked batch part is merged back at once
    assert _close(metric.compute(), SCORES[name].fn(x, y), RTOL_OFFSET)
    # update after forward keeps adding to the same global sums
    metric.update(x[:60], y[:60])
    both = torch.cat([x, x[:60]]), torch.cat([y, y[:60]])
    assert _close(metric.compute(), SCORES[name].fn(*both), RTOL_OFFSET)


@pytest.mark.filterwarnings("ignore:.*called before the ``update``")  # torchmetrics: merge_state is no update
@pytest.mark.parametrize("variant", ["plain", "offset", "huge"])
@pytest.mark.parametrize("name", STREAMING)
def test_merge_state_equals_one_metric_on_all_data(name, variant):
    x, y = _data(name, variant)
    whole = _metric(name)
    for rows in batches(N, [40]):
        whole.update(x[rows], y[rows])
    first, second = _metric(name), _metric(name)
    first.update(x[:30], y[:30])  # different first batches: different shifts (and scales)
    first.update(x[30:100], y[30:100])
    second.update(x[100:], y[100:])
    assert _close(first.compute(), SCORES[name].fn(x[:100], y[:100]), _rtol(variant))  # caches a value
    first_copy, second_copy = copy.deepcopy(first), copy.deepcopy(second)
    first.merge_state(second)
    assert _parts(first) == 1
    assert _close(first.compute(), whole.compute(), _rtol(variant))
    assert _close(first.compute(), SCORES[name].fn(x, y), _rtol(variant))
    assert _close(second.compute(), SCORES[name].fn(x[100:], y[100:]), _rtol(variant))  # second untouched
    # Symmetric: the sums are added about the mean of the two frames, whichever merges into which.
    second_copy.merge_state(first_copy)
    assert _close(second_copy.compute(), first.compute(), 1e-13)
    # A dict of states merges too, and an empty metric adds nothing.
    fresh = _metric(name)
    fresh.merge_state({key: value.clone() for key, value in first.metric_state.items()})
    fresh.merge_state(_metric(name))
    assert _close(fresh.compute(), first.compute(), 1e-13)


@pytest.mark.parametrize("name", STREAMING)
def test_merge_state_needs_the_same_score(name):
    other = next(n for n in STREAMING if n != name)
    with pytest.raises(ValueError, match="cannot merge"):
        _metric(name).merge_state(_metric(other))


@pytest.mark.parametrize("name", STREAMING)
def test_reset_forgets_batches_and_frame(name):
    x, y = _data(name, "plain")
    metric = _metric(name)
    metric.update(x, y)
    metric.compute()
    metric.reset()
    assert all(not bool(value.ne(0).any()) for value in metric.metric_state.values())
    # a new frame comes from the next batch: data far from the first batches loses nothing
    xo, _ = _data(name, "offset")
    metric.update(xo[:120], y[:120])
    assert _close(metric.compute(), SCORES[name].fn(xo[:120], y[:120]), RTOL_OFFSET)


# -- devices, dtypes, persistence -----------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMING)
def test_to_device_and_dtype_casts_keep_the_sums(name, device):
    x, y = _data(name, "offset")
    metric = _metric(name)
    metric.update(x[:100], y[:100])
    dtypes = {key: value.dtype for key, value in metric.metric_state.items()}
    metric = metric.to(device)  # moves the states, then updates there
    metric.to(torch.float16)  # module-wide casts (Lightning's "16-true") leave the sums' dtype alone
    metric.set_dtype(torch.float16)
    metric.half()
    assert {key: value.dtype for key, value in metric.metric_state.items()} == dtypes
    assert all(value.device.type == device for value in metric.metric_state.values())
    metric.update(x[100:].to(device), y[100:].to(device))
    assert _close(metric.compute(), SCORES[name].fn(x, y), RTOL_OFFSET)
    metric.to("cpu")
    assert _close(metric.compute(), SCORES[name].fn(x, y), RTOL_OFFSET)


@pytest.mark.parametrize("name", STREAMING)
def test_float32_sums(name):
    x, y = _data(name, "plain")
    metric = _metric(name, dtype=torch.float32)
    assert torch.float32 in {metric.metric_state[key].dtype for key in metric._sum_names}
    for rows in batches(N, [64]):
        metric.update(x[rows], y[rows])
    assert _close(metric.compute(), SCORES[name].fn(x, y), 1e-4)


@pytest.mark.parametrize("name", STREAMING)
def test_state_dict_clone_and_pickle_resume(name):
    x, y = _data(name, "offset")
    metric = _metric(name)
    metric.persistent(True)
    metric.update(x[:100], y[:100])
    saved = metric.state_dict()
    assert set(saved) == set(metric.metric_state)
    restored = _metric(name)
    restored.load_state_dict(saved)
    clone = metric.clone()
    unpickled = pickle.loads(pickle.dumps(metric))
    for resumed in (restored, clone, unpickled, metric):
        resumed.update(x[100:], y[100:])
        assert _close(resumed.compute(), SCORES[name].fn(x, y), RTOL_OFFSET)


@pytest.mark.parametrize("name", STREAMING)
def test_updates_in_inference_mode_then_outside(name):
    # Lightning validates under inference_mode: the states must stay writable outside it afterwards.
    x, y = _data(name, "plain")
    metric = _metric(name)
    with torch.inference_mode():
        metric(x[:50], y[:50])
        metric.update(x[50:100], y[50:100])
        metric.reset()
        metric.update(x[:100], y[:100])
    metric.update(x[100:], y[100:])
    assert _close(metric.compute(), SCORES[name].fn(x, y))


def test_metric_collection_shares_states_between_settings():
    # compute groups share the states of metrics whose states are equal: each still scores with its options
    x, y = _data("gbc", "plain")
    scores = {name: _metric(name) for name in STREAMING if SCORES[name].input == "features"}
    scores["gbc_floor"] = _metric("gbc", min_variance=0.5)
    collection = torchmetrics.MetricCollection(scores)
    for rows in batches(N, [60]):
        collection.update(x[rows], y[rows])
    out = collection.compute()
    for key, metric in scores.items():
        options = {"min_variance": 0.5} if key == "gbc_floor" else {}
        assert _close(out[key], SCORES[metric.score].fn(x, y, **options)), key


@pytest.mark.filterwarnings("ignore")  # Lightning's own warnings about tiny loaders and workers
def test_lightning_logs_the_metric_objects():
    # Lightning users log metric objects: forward in training (batch values, global epoch value),
    # update in validation (under inference_mode), compute and reset at each epoch's end.
    pl = pytest.importorskip("lightning.pytorch")
    from torch import nn

    feature_scores = [name for name in STREAMING if SCORES[name].input == "features"]
    x, y = _data(feature_scores[0], "float32")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=80)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(D, C)
            self.train_scores = nn.ModuleDict({name: _metric(name) for name in feature_scores})
            self.val_scores = nn.ModuleDict({name: _metric(name) for name in feature_scores})

        def training_step(self, batch, batch_idx):
            features, labels = batch
            for name, metric in self.train_scores.items():
                metric(features, labels)
                self.log(f"train/{name}", metric, on_step=False, on_epoch=True)
            return nn.functional.cross_entropy(self.head(features), labels)

        def validation_step(self, batch, batch_idx):
            features, labels = batch
            for name, metric in self.val_scores.items():
                metric.update(features, labels)
                self.log(f"val/{name}", metric)

        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(Module(), loader, loader)
    for name in feature_scores:
        want = SCORES[name].fn(x, y)
        assert _close(trainer.callback_metrics[f"train/{name}"], want), name
        assert _close(trainer.callback_metrics[f"val/{name}"], want), name


# -- errors ----------------------------------------------------------------------------------------


def test_bad_scores_and_missing_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown score 'logmee'; choose from logme"):
        TransferabilityMetric("logmee", D, C)
    for name in STREAMING:
        with pytest.raises(ValueError, match="needs num_classes: torchmetrics states have fixed shapes"):
            TransferabilityMetric(name, D)
        with pytest.raises(ValueError, match="needs num_features"):
            TransferabilityMetric(name, num_classes=C)
        with pytest.raises(ValueError, match="Unexpected keyword.*the score's options are"):
            TransferabilityMetric(name, D, C, not_an_option=1)
    with pytest.raises(ValueError, match="min_variance"):
        TransferabilityMetric("gbc", D, C, min_variance=-1.0)


@pytest.mark.parametrize("name", STREAMING)
def test_bad_batches_raise_and_leave_nothing_behind(name):
    x, y = _data(name, "plain")
    metric = _metric(name)
    with pytest.raises(ValueError):
        metric.update(x, y[:-1])
    with pytest.raises(ValueError, match="out of range"):
        metric.update(x[:3], torch.tensor([0, 1, C]))
    metric.update(x, y)
    assert _close(metric.compute(), SCORES[name].fn(x, y))


# -- LogMEMetric: the LogME case, historical signature and numbers -----------------------------------


def test_logme_metric_is_the_logme_case_with_its_signature():
    assert issubclass(LogMEMetric, TransferabilityMetric) and LogMEMetric.higher_is_better is True
    params = list(inspect.signature(LogMEMetric.__init__).parameters)
    assert params == ["self", "num_features", "num_classes", "regression", "num_targets", "reduction", "dtype",
                      "check_inputs", "max_iter", "tol", "method", "legacy_evidence", "absent_classes", "kwargs"]
    assert list(inspect.signature(LogMEMetric.update).parameters) == ["self", "features", "targets"]
    x, y = _data("logme", "plain")
    general, historical = TransferabilityMetric("logme", D, C), LogMEMetric(D, C)
    per_class = LogMEMetric(D, C, reduction="none")
    for rows in batches(N, [1, 39, 110]):
        for metric in (general, historical, per_class):
            metric.update(x[rows], y[rows])
    assert float(general.compute()) == float(historical.compute())
    assert _close(per_class.compute(), logme(x, y, num_classes=C, reduction="none"), 1e-12)
    regression = LogMEMetric(D, regression=True, num_targets=2)
    targets = x[:, :2] + 0.1 * torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    regression.update(features=x[:100], targets=targets[:100])
    regression(x[100:], targets[100:])
    assert _close(regression.compute(), logme(x, targets, regression=True), 1e-12)


# -- two processes: torchmetrics' own sync (gloo) ---------------------------------------------------------


def _rank_scores(rank: int, out_dir: str) -> None:
    result = {}
    for name in STREAMING:
        for variant in ("offset", "huge"):
            x, y = _data(name, variant)
            metric = _metric(name)
            # Each rank half of the batches; uneven sizes, so each rank's first batch (its frame) differs.
            for i, rows in enumerate(batches(N, [20, 33])):
                if i % 2 == rank:
                    metric.update(x[rows], y[rows])
            local = {key: value.clone() for key, value in metric.metric_state.items()}
            result[name, variant] = metric.compute()  # torchmetrics gathers the states of both ranks
            restored = all(torch.equal(local[k], v) for k, v in metric.metric_state.items())
            result[name, variant, "local_restored"] = restored
            result[name, variant, "frame"] = {k: v for k, v in local.items() if k in ("shift", "scale")}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_ranks_sync_through_torchmetrics(tmp_path):
    run_ranks(_rank_scores, (str(tmp_path),))
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    rescaled = set()
    for name in STREAMING:
        for variant in ("offset", "huge"):
            x, y = _data(name, variant)
            want = SCORES[name].fn(x, y)
            for rank in range(2):
                assert _close(got[rank][name, variant], want, _rtol(variant)), (name, variant, rank)
                assert got[rank][name, variant, "local_restored"]
            frames = [got[rank][name, variant, "frame"] for rank in range(2)]
            if "shift" in frames[0]:  # the ranks' shifts differ: compute reconciled them
                assert not torch.equal(frames[0]["shift"], frames[1]["shift"]), (name, variant)
            if "scale" in frames[0] and not torch.equal(frames[0]["scale"], frames[1]["scale"]):
                rescaled.add(name)
    # Huge features give some score's ranks different power-of-two scales, which compute reconciled too.
    assert rescaled


NOT_STREAMING = [name for name, spec in SCORES.items() if not spec.streams]


@pytest.mark.parametrize("name", NOT_STREAMING)
def test_a_score_that_cannot_stream_keeps_its_batches(name, device):
    from torch_logme.integrations.torchmetrics import CollectedScoreMetric

    gen = torch.Generator().manual_seed(7)
    y = torch.randint(0, C, (90,), generator=gen).to(device)
    x = (torch.randn(90, D, generator=gen, dtype=torch.float64).to(device) + y[:, None])
    if SCORES[name].input == "probs":
        x = x.softmax(1)
    metric = TransferabilityMetric(name, D, C).to(device)
    assert isinstance(metric, CollectedScoreMetric) and metric.higher_is_better == SCORES[name].larger_is_better
    for rows in (slice(0, 40), slice(40, 90)):
        metric.update(x[rows], y[rows])
    assert torch.equal(metric.compute(), SCORES[name].fn(x, y))
    with pytest.raises(ValueError, match="must be"):
        metric.update(x[:, :-1], y)
    metric.reset()
    with pytest.raises(ValueError, match="no batch yet"):
        metric.compute()
    with pytest.raises(ValueError, match="the score's options are"):
        TransferabilityMetric(name, D, C, bogus=1)
