"""Optional adapters: the torchmetrics metric and the Lightning callback.

Each test skips when its library is missing; the "test" extra installs both,
so CI runs them.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from torch_logme import LogMEAccumulator, logme

from conftest import make_features


def close(a, b, rtol=1e-10):
    return torch.allclose(torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu(), rtol=rtol, atol=0)


# -- torchmetrics ---------------------------------------------------------------


@pytest.mark.parametrize("d", [12, 300])  # 300: the CPU Gram matrix keeps only its upper triangle
def test_metric_equals_accumulator_and_logme(device, d):
    pytest.importorskip("torchmetrics")
    from torch_logme.integrations.torchmetrics import LogMEMetric

    f, y = make_features(150, d, 4, seed=7)
    ft, yt = torch.from_numpy(f).float().to(device), torch.from_numpy(y).to(device)
    metric = LogMEMetric(d, 4).to(device)
    per_class = LogMEMetric(d, 4, reduction="none").to(device)
    acc = LogMEAccumulator(d, 4)
    for rows in (slice(0, 1), slice(1, 40), slice(40, 150)):  # batch sizes 1, 39, 110
        metric.update(ft[rows], yt[rows])
        per_class.update(ft[rows], yt[rows])
        acc.update(ft[rows], yt[rows])
    score = metric.compute()
    assert score.device.type == device
    assert close(score, logme(ft, yt, num_classes=4))
    assert close(score, acc.compute(), rtol=1e-12)
    assert close(per_class.compute(), logme(ft, yt, num_classes=4, reduction="none"))
    metric.reset()
    metric.update(ft[:60], yt[:60])
    assert close(metric.compute(), logme(ft[:60], yt[:60], num_classes=4))


def test_metric_sums_across_processes_through_torchmetrics_sync():
    pytest.importorskip("torchmetrics")
    from torch_logme.integrations.torchmetrics import LogMEMetric

    f, y = make_features(100, 6, 3, seed=8)
    ft, yt = torch.from_numpy(f), torch.from_numpy(y)
    other = {}

    def gather(tensor, group=None):  # what all_gather returns on rank 0 of two ranks
        return [tensor, other[id(tensor)]]

    # compute() runs torchmetrics' own sync: gather every state, apply dist_reduce_fx="sum", unsync.
    rank0 = LogMEMetric(6, 3, dist_sync_fn=gather, distributed_available_fn=lambda: True)
    rank1 = LogMEMetric(6, 3)
    rank0.update(ft[:30], yt[:30])
    rank1.update(ft[30:], yt[30:])
    other.update({id(getattr(rank0, name)): getattr(rank1, name) for name in rank0.metric_state})
    assert close(rank0.compute(), logme(ft, yt))
    assert int(rank0.num_samples) == 30  # the local state is back after compute
    local = LogMEMetric(6, 3)
    local.update(ft[:30], yt[:30])
    local.merge_state(rank1)
    assert close(local.compute(), logme(ft, yt))


def test_metric_regression_and_errors():
    pytest.importorskip("torchmetrics")
    from torch_logme.integrations.torchmetrics import LogMEMetric

    gen = torch.Generator().manual_seed(9)
    f = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    t = f[:, :2] + 0.1 * torch.randn(80, 2, generator=gen, dtype=torch.float64)
    metric = LogMEMetric(5, regression=True, num_targets=2)
    metric.update(f[:50], t[:50])
    metric.update(f[50:], t[50:])
    assert close(metric.compute(), logme(f, t, regression=True))
    with pytest.raises(ValueError, match="needs num_classes"):
        LogMEMetric(5)
    with pytest.raises(ValueError, match="needs num_targets"):
        LogMEMetric(5, regression=True)
    with pytest.raises(ValueError, match="reduction"):
        LogMEMetric(5, 2, reduction="max")
    with pytest.raises(ValueError, match="columns"):
        metric.update(f[:4], t[:4, :1])
    with pytest.raises(ValueError, match="out of range"):
        LogMEMetric(5, 2).update(f[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        LogMEMetric(5, 2).update(f[:3, :4], torch.tensor([0, 1, 1]))


# -- Lightning ------------------------------------------------------------------


def _lightning_module(pl, schedule):
    class Tiny(pl.LightningModule):
        """A scored layer whose weights a schedule sets per epoch, and a trained head."""

        def __init__(self):
            super().__init__()
            self.features = nn.Linear(8, 4).requires_grad_(False)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.features(x))

        def on_train_epoch_start(self):
            with torch.no_grad():
                self.features.weight.copy_(schedule[self.current_epoch])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    return Tiny()


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own use of a torch API
def test_lightning_callback_drives_model_checkpoint(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from torch_logme.integrations.lightning import LogMECallback

    from test_checkpoint import SCHEDULE, task

    x, y = task(n=96)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    model = _lightning_module(pl, SCHEDULE)
    logme_cb = LogMECallback("features", num_classes=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/logme", mode="max", save_top_k=1,
                           filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1, limit_train_batches=2,
        default_root_dir=tmp_path, callbacks=[logme_cb, ckpt],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)

    # One score per epoch (the sanity check is not scored), each equal to logme on that epoch's features.
    assert [e for e, _ in logme_cb.history] == [0, 1, 2]
    for epoch, score in logme_cb.history:
        with torch.no_grad():
            feats = x @ SCHEDULE[epoch].T + model.features.bias
        assert score == pytest.approx(float(logme(feats, y)), rel=1e-6)
    scores = [s for _, s in logme_cb.history]
    assert float(trainer.callback_metrics["val/logme"]) == pytest.approx(scores[-1])
    best = max(range(3), key=scores.__getitem__)
    assert best == 1
    assert re.search(rf"epoch={best}\.ckpt$", ckpt.best_model_path)
    assert float(ckpt.best_model_score) == pytest.approx(scores[best])
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed after each epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written elsewhere


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own use of a torch API
def test_score_callback_logs_other_scores(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from torch_logme import SCORES
    from torch_logme.integrations.lightning import ScoreCallback

    from test_checkpoint import SCHEDULE, task

    x, y = task(n=96)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    model = _lightning_module(pl, SCHEDULE)
    # Two callbacks of one class in one Trainer: their state keys differ by the logged key.
    h_cb = ScoreCallback("features", score="h_score", num_classes=3)
    nce_cb = ScoreCallback("head", score="nce", key="val/nce_of_head")  # the head's logits [B, 3]
    assert (h_cb.key, h_cb.mode, h_cb.score_name) == ("val/h_score", SCORES["h_score"].mode, "h_score")
    assert h_cb.state_key != nce_cb.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=h_cb.key, mode=h_cb.mode, save_top_k=1,
                           filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1, limit_train_batches=2,
        default_root_dir=tmp_path, callbacks=[h_cb, nce_cb, ckpt],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)

    assert [e for e, _ in h_cb.history] == [0, 1, 2]
    for epoch, score in h_cb.history:
        with torch.no_grad():
            feats = x @ SCHEDULE[epoch].T + model.features.bias
        assert score == pytest.approx(float(SCORES["h_score"].fn(feats, y)), rel=1e-6)
    scores = [s for _, s in h_cb.history]
    assert float(trainer.callback_metrics["val/h_score"]) == pytest.approx(scores[-1])
    best = max(range(3), key=scores.__getitem__)
    assert re.search(rf"epoch={best}\.ckpt$", ckpt.best_model_path)
    # NCE of the trained head's predictions after the last epoch.
    with torch.no_grad():
        want = float(SCORES["nce"].fn(model(x), y))
    assert nce_cb.history[-1] == (2, pytest.approx(want, rel=1e-10))
    assert float(trainer.callback_metrics["val/nce_of_head"]) == pytest.approx(want)
    assert "val/logme" not in trainer.callback_metrics
    assert all(not m._forward_hooks for m in model.modules())


def test_score_callback_arguments(monkeypatch):
    pytest.importorskip("lightning.pytorch")
    from types import MappingProxyType

    from torch_logme import registry
    from torch_logme.integrations.lightning import LogMECallback, ScoreCallback

    fake = registry.ScoreSpec(logme, "features", False, "test", LogMEAccumulator, "lower_logme")
    monkeypatch.setattr(registry, "SCORES", MappingProxyType({**registry.SCORES, "lower_logme": fake}))
    lower = ScoreCallback("features", score="lower_logme")
    assert (lower.key, lower.mode) == ("val/lower_logme", "min")
    default = ScoreCallback("features")
    name = registry.DEFAULT_SCORE
    assert (default.score_name, default.key, default.mode) == (name, f"val/{name}", registry.SCORES[name].mode)
    legacy = LogMECallback("features", num_classes=3)
    assert (legacy.score_name, legacy.key, legacy.mode) == ("logme", "val/logme", "max")
    assert legacy.state_key == "LogMECallback"  # where older checkpoints keep its history
    ScoreCallback("features", score="transrate", num_classes=3, score_options={"transrate": {"eps": 1e-3}})
    assert ScoreCallback("features", score="leep").mode == "max"  # cannot stream: its batches are kept
    with pytest.raises(ValueError, match="unknown score 'logmee'"):
        ScoreCallback("features", score="logmee")
    with pytest.raises(TypeError, match="one score"):
        ScoreCallback("features", score=["logme", "gbc"])
    with pytest.raises(TypeError, match="gbc takes no option 'method'"):
        ScoreCallback("features", score="gbc", method="icml")
    with pytest.raises(ValueError, match="not requested"):
        ScoreCallback("features", score="gbc", score_options={"logme": {}})
    with pytest.raises(TypeError, match="use ScoreCallback"):
        LogMECallback("features", score="gbc")


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own use of a torch API
def test_score_callback_combines_a_pooled_score_across_epochs(tmp_path, pooled_score):
    pl = pytest.importorskip("lightning.pytorch")
    from torch_logme import gbc, h_score
    from torch_logme.integrations.lightning import ScoreCallback

    from test_checkpoint import SCHEDULE, task

    x, y = task(n=96)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = _lightning_module(pl, SCHEDULE)
    callback = ScoreCallback("features", score=pooled_score)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=2,
        default_root_dir=tmp_path, callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    terms = []
    for epoch, score in callback.history:
        with torch.no_grad():
            feats = x @ SCHEDULE[epoch].T + model.features.bias
        terms.append([float(h_score(feats, y)), float(gbc(feats, y))])
        pool = torch.tensor(terms, dtype=torch.float64)
        want = ((pool - pool.amin(0)) / (pool.amax(0) - pool.amin(0))).sum(1)[-1]
        if epoch == 0:  # a pool of one: every term equal across it adds 0
            assert score == 0
        else:
            assert score == pytest.approx(float(want), rel=1e-6)
    assert len(callback.state_dict()["terms"]) == 3
