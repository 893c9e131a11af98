"""Forward hooks: scoring layers during a forward pass equals logme on their features."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_logme import logme
from torch_logme.hooks import LayerScorer, score_layers

RTOL = 1e-10


def close(a, b, rtol=RTOL):
    return torch.allclose(torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu(), rtol=rtol, atol=0)


def make_model(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double().to(device)


def make_batches(device, n=120, size=25, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64) + y.unsqueeze(1).double()
    return [(x[i:i + size].to(device), y[i:i + size]) for i in range(0, n, size)]


def test_several_layers_in_one_pass_equal_logme(device):
    model = make_model(device)
    batches = make_batches(device)
    # The three added lines of a plain evaluation loop.
    with score_layers(model, ["0", model[1], "2"], num_classes=3) as scorer:
        for x, y in batches:
            scorer.labels(y)
            model(x)
    scores = scorer.compute()
    assert list(scores) == ["0", "1", "2"]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        h0 = model[0](x)
        expected = {"0": h0, "1": model[1](h0), "2": model(x)}
    for name, feats in expected.items():
        assert close(scores[name], logme(feats, y, num_classes=3)), name
        assert scores[name].device.type == device
        acc = scorer.accumulators[name]
        assert all(v.device.type == device for v in acc.states.values())  # features stayed on their device
        assert acc.num_features == feats.shape[1]  # D read from the first batch
    per_class = scorer.compute(reduction="none")["2"]
    assert close(per_class, logme(expected["2"], y, num_classes=3, reduction="none"))


def test_batch_context_manager_and_input_side(device):
    model = make_model(device)
    batches = make_batches(device, seed=1)
    scorer = score_layers(model, "2", on="input", num_classes=3)
    for x, y in batches:
        with scorer.batch(y):
            model(x)
    scorer.remove()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        feats = model[1](model[0](x))  # the input of the last layer
    assert close(scorer.compute()["2"], logme(feats, y))


def test_transform_and_flattening_of_maps():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(30, 1, 5, 5)
    y = torch.randint(0, 2, (30,))
    flat = score_layers(model, "0", num_classes=2)
    pooled = score_layers(model, "1", transform=lambda t: t.mean(dim=(2, 3)), num_classes=2)
    for rows in (slice(0, 12), slice(12, 30)):
        flat.labels(y[rows])
        pooled.labels(y[rows])
        model(x[rows])
    flat.remove()
    pooled.remove()
    with torch.no_grad():
        maps = model[0](x)
    assert flat.accumulators["0"].num_features == 4 * 5 * 5  # [B, C, H, W] -> [B, C*H*W]
    assert close(flat.compute()["0"], logme(maps.reshape(30, -1), y))
    assert close(pooled.compute()["1"], logme(maps.relu().mean(dim=(2, 3)), y))


def test_tuple_outputs_take_the_first_tensor():
    torch.manual_seed(3)
    rnn = nn.GRU(3, 5, batch_first=True)
    x, y = torch.randn(20, 4, 3), torch.randint(0, 2, (20,))
    with score_layers(rnn, "", num_classes=2) as scorer:  # "" is the model itself
        scorer.labels(y)
        out, _ = rnn(x)
    assert close(scorer.compute()[""], logme(out.detach().reshape(20, -1), y), rtol=1e-6)


def test_inference_mode_then_reset_and_rescore():
    model = make_model("cpu")
    batches = make_batches("cpu")
    scorer = score_layers(model, "0", num_classes=3)
    for mode in (torch.inference_mode, torch.no_grad):
        scorer.reset()  # zeroing the sums must work after an inference_mode pass
        with mode():
            for x, y in batches:
                scorer.labels(y)
                model(x)
        first = scorer.compute()["0"]
    scorer.remove()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        assert close(first, logme(model[0](x), y))


def test_hooks_leave_training_untouched():
    model = make_model("cpu")
    x, y = make_batches("cpu")[0]
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with score_layers(model, ["0", "2"], num_classes=3) as scorer:
        scorer.labels(y)
        loss_fn(model(x), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters()))
    assert not any(v.requires_grad for v in scorer.accumulators["0"].states.values())


def test_remove_detaches_every_hook():
    model = make_model("cpu")
    x, y = make_batches("cpu")[0]
    with score_layers(model, ["0", "2"], num_classes=3) as scorer:
        scorer.labels(y)
        model(x)
    assert all(not m._forward_hooks for m in model.modules())
    model(x)  # no hook any more: no labels needed
    assert set(scorer.compute()) == {"0", "2"}
    scorer.remove()  # idempotent


def test_misuse_is_reported():
    model = make_model("cpu")
    x, y = make_batches("cpu")[0]
    scorer = score_layers(model, ["0", "2"], num_classes=3)
    with pytest.raises(RuntimeError, match="without new labels"):
        model(x)  # labels() never called
    scorer.labels(y)
    model(x)
    with pytest.raises(RuntimeError, match="without new labels"):
        model(x)  # the same labels would be used twice
    scorer.labels(y)
    model[0](x)  # only one of the two layers runs
    with pytest.raises(RuntimeError, match=r"\['2'\] did not run"):
        scorer.labels(y)
    with pytest.raises(RuntimeError, match="did not run"):
        scorer.compute()
    scorer.reset()
    with pytest.raises(RuntimeError, match="did not run"):
        with scorer.batch(y):
            model[0](x)
    scorer.reset()
    scorer.enabled = False
    model(x)  # passes through unscored
    scorer.enabled = True
    with pytest.raises(ValueError, match="disagree on N"):
        scorer.labels(y[:3])
        model(x)
    scorer.remove()
    fresh = score_layers(make_model("cpu"), "0")
    with pytest.raises(RuntimeError, match="not run yet"):
        fresh.compute()


def test_given_num_features_and_options():
    model = make_model("cpu")
    x, y = make_batches("cpu")[0]
    scorer = score_layers(model, ["0", "2"], num_features={"0": 16}, num_classes=3, dtype=torch.float32)
    scorer.labels(y)
    model(x)
    assert scorer.accumulators["0"].states["gram"].dtype == torch.float32
    scorer.remove()
    wrong = score_layers(model, "0", num_features=5)
    wrong.labels(y)
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        model(x)
    wrong.remove()
    reg = score_layers(model, "2", regression=True)
    reg.labels(x[:, :2])
    model(x)
    reg.remove()
    with torch.no_grad():
        assert close(reg.compute()["2"], logme(model(x), x[:, :2], regression=True))


@pytest.mark.parametrize(
    "layers, kwargs, exc, match",
    [
        ("nope", {}, ValueError, "no submodule 'nope'"),
        (nn.Linear(2, 2), {}, ValueError, "not part of the model"),
        (["0", "0"], {}, ValueError, "given twice"),
        ([], {}, ValueError, "empty"),
        ([3], {}, TypeError, "module name"),
        ("0", {"on": "middle"}, ValueError, "on must be"),
        ("0", {"device": "cpu"}, TypeError, "device"),
        ("0", {"method": "nope"}, ValueError, "method"),
        ("0", {"transform": 3}, TypeError, "callable"),
        ("0", {"num_features": {"9": 3}}, ValueError, "not scored"),
    ],
)
def test_bad_arguments(layers, kwargs, exc, match):
    model = make_model("cpu")
    with pytest.raises(exc, match=match):
        LayerScorer(model, layers, **kwargs)
    assert all(not m._forward_hooks for m in model.modules())
