"""Forward hooks: scoring layers during a forward pass equals logme on their features."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_logme import SCORES, logme
from torch_logme.hooks import LayerScorer, score_layers
from torch_logme.registry import DEFAULT_SCORE

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


# -- any registered streaming score, one or several at once -------------------------

STREAMING = [name for name, spec in SCORES.items() if spec.streams]


@pytest.mark.parametrize("name", STREAMING)
def test_every_streaming_score_equals_its_functional_form(name, device):
    model = make_model(device)
    batches = make_batches(device, seed=4)
    inputs = [x.clone() for x, _ in batches]
    # num_classes is shared under every accumulator's own name for it (NCE's num_target_classes).
    with score_layers(model, ["0", "2"], scores=name, num_classes=3) as scorer:
        for x, y in batches:
            scorer.labels(y)
            model(x)
    assert all(torch.equal(a, x) for a, (x, _) in zip(inputs, batches))  # inputs untouched
    scores = scorer.compute()
    assert list(scores) == ["0", "2"] and scorer.scores == (name,)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        # "2" returns [B, 4] logits: the source-class predictions a "probs" score reads.
        expected = {"0": model[0](x), "2": model(x)}
    for layer, feats in expected.items():
        want = SCORES[name].fn(feats, y)
        assert scores[layer].dim() == 0 and torch.isfinite(scores[layer])
        assert close(scores[layer], want), (name, layer, float(scores[layer]), float(want))
        assert scores[layer].device.type == device
        assert isinstance(scorer.accumulators[layer], SCORES[name].accumulator_cls)


def test_several_scores_give_nested_results_equal_to_single_score_calls():
    model = make_model("cpu")
    batches = make_batches("cpu", seed=5)

    def run(scores, **options):
        with score_layers(model, ["0", "2"], scores=scores, **options) as scorer:
            for x, y in batches:
                scorer.labels(y)
                model(x)
        return scorer

    several = run(STREAMING, num_classes=3)
    nested = several.compute()
    assert list(nested) == ["0", "2"] and all(list(v) == STREAMING for v in nested.values())
    for name in STREAMING:
        single = run(name, num_classes=3).compute()
        for layer in ("0", "2"):
            assert torch.equal(nested[layer][name], single[layer]), (name, layer)
    # accumulators mirrors compute(): layer -> score -> accumulator.
    accs = several.accumulators
    assert all(isinstance(accs["0"][name], SCORES[name].accumulator_cls) for name in STREAMING)
    several.reset()
    assert int(accs["2"][DEFAULT_SCORE].state_dict()["num_samples"]) == 0
    # A sequence of one name is still keyed by score.
    one = run([DEFAULT_SCORE], num_classes=3)
    assert torch.equal(one.compute()["2"][DEFAULT_SCORE], nested["2"][DEFAULT_SCORE])
    assert list(one.accumulators["2"]) == [DEFAULT_SCORE]


def test_shared_and_per_score_options():
    model = make_model("cpu")
    x, y = make_batches("cpu")[0]
    scorer = score_layers(
        model, "0", scores=("logme", "nce", "transrate", "gbc"), num_classes=3, dtype=torch.float32,
        score_options={"logme": {"method": "icml"}, "transrate": {"eps": 1e-3}, "gbc": {"dtype": torch.float64}},
    )
    assert scorer.accumulators == {"0": None}  # made at the first batch
    scorer.labels(y)
    model(x)
    scorer.remove()
    accs = scorer.accumulators["0"]
    assert accs["logme"].options.method == "icml" and accs["logme"].options.dtype == torch.float32
    assert accs["transrate"].eps == 1e-3 and accs["transrate"].dtype == torch.float32
    assert accs["gbc"].dtype == torch.float64  # a score's own option wins over the shared one
    assert accs["nce"].state_dict()["config"]["fixed"]["num_target_classes"] == 3
    with torch.no_grad():
        feats = model[0](x)
    assert close(accs["gbc"].compute(), SCORES["gbc"].fn(feats, y))


def test_reduction_with_several_scores():
    model = make_model("cpu")
    x, y = make_batches("cpu")[0]
    with score_layers(model, "2", scores=["logme", "h_score"], num_classes=3) as scorer:
        scorer.labels(y)
        model(x)
    with pytest.raises(ValueError, match=r"reduction='none' needs per-class scores, but h_score gives one number"):
        scorer.compute(reduction="none")
    with score_layers(model, "2", scores=["logme"], num_classes=3) as per_class:
        per_class.labels(y)
        model(x)
    with torch.no_grad():
        want = logme(model(x), y, num_classes=3, reduction="none")
    assert close(per_class.compute(reduction="none")["2"]["logme"], want)


NOT_STREAMING = [name for name, spec in SCORES.items() if not spec.streams]


@pytest.mark.parametrize("name", NOT_STREAMING)
def test_every_score_that_cannot_stream_keeps_its_batches_and_equals_its_functional_form(name, device):
    model = make_model(device)
    batches = make_batches(device, seed=5)
    # Prediction scores read probabilities: the hooked layer's output through a softmax.
    transform = (lambda v: v.softmax(1)) if SCORES[name].input == "probs" else None
    with score_layers(model, ["2"], scores=[name, "logme"], transform=transform) as scorer:
        for x, y in batches:
            scorer.labels(y)
            model(x)
    got = scorer.compute()["2"]
    with torch.no_grad():
        out = torch.cat([model(x) for x, _ in batches])
    rows = out.softmax(1) if transform is not None else out
    y = torch.cat([b[1] for b in batches]).to(device)
    assert close(got[name], SCORES[name].fn(rows, y))
    assert close(got["logme"], logme(rows, y))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"scores": "logmee"}, ValueError, "unknown score 'logmee'; choose from logme, "),
        ({"scores": 3}, TypeError, "scores must be a score name or a sequence"),
        ({"scores": {"gbc"}}, TypeError, "got set"),
        ({"scores": ()}, ValueError, "at least one"),
        ({"scores": ["gbc", "gbc"]}, ValueError, "repeated"),
        ({"scores": ["logme", "gbc"], "regression": True}, TypeError,
         r"option 'regression' goes to every score, but gbc does not take it.*score_options=\{'logme'"),
        ({"scores": "gbc", "eps": 1.0}, TypeError, "gbc takes no option 'eps'; its options: .*min_variance"),
        ({"scores": ["gbc"], "score_options": {"logme": {}}}, ValueError, "not requested: \\['logme'\\]"),
        ({"scores": ["gbc"], "score_options": {"gbc": {"eps": 1.0}}}, TypeError, r"score_options\['gbc'\]"),
        ({"scores": ["gbc"], "score_options": {"gbc": {"min_variance": -1.0}}}, ValueError, "min_variance"),
        ({"scores": ["gbc"], "score_options": {"gbc": {"device": "cpu"}}}, TypeError, "device"),
        ({"scores": ["gbc"], "score_options": ["gbc"]}, TypeError, "score_options must map"),
        ({"scores": "nce", "num_classes": 3, "num_target_classes": 3}, TypeError,
         "nce: 'num_classes' and 'num_target_classes' are the same option"),
        ({"scores": ["logme", "transrate"], "dtype": torch.float16}, ValueError, "dtype"),
        ({"scores": ["logme", "h_score"], "num_features": 0}, ValueError, "num_features"),
    ],
)
def test_bad_scores_and_options_raise_before_any_forward_pass(kwargs, exc, match):
    model = make_model("cpu")
    with pytest.raises(exc, match=match):
        LayerScorer(model, "0", **kwargs)
    assert all(not m._forward_hooks for m in model.modules())


def good_only(model, layers, batches, **kwargs):
    """Scores of a scorer fed ``batches`` through batch(), nothing else."""
    scorer = score_layers(model, layers, **kwargs)
    for x, y in batches:
        with scorer.batch(y):
            model(x)
    scorer.remove()
    return scorer.compute()


def same_scores(a, b):
    def flat(d):
        return {(k, s): v for k, by in d.items() for s, v in (by.items() if isinstance(by, dict) else [("", by)])}
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(close(fa[k], fb[k], rtol=1e-12) for k in fa)


def test_an_exception_inside_batch_leaves_the_scorer_usable():
    model = make_model("cpu")
    batches = make_batches("cpu", seed=3)
    scorer = score_layers(model, ["0", "2"], num_classes=3)
    (x0, y0), rest = batches[0], batches[1:]
    with scorer.batch(y0):
        model(x0)
    before = scorer.compute()
    with pytest.raises(KeyError, match="boom"):
        with scorer.batch(y0):
            model(x0)
            raise KeyError("boom")  # e.g. the loss or the metric code after the forward pass
    assert same_scores(scorer.compute(), before)  # totals unchanged
    with pytest.raises(KeyError, match="mid-pass"):
        with scorer.batch(y0):
            model[0](x0)  # only the first layer ran when the model failed
            raise KeyError("mid-pass")
    for x, y in rest:
        with scorer.batch(y):  # the next batch works as usual
            model(x)
    scorer.remove()
    assert same_scores(scorer.compute(), good_only(model, ["0", "2"], batches, num_classes=3))


def test_nan_features_in_one_layer_reject_the_batch_for_every_layer():
    model = make_model("cpu")
    batches = make_batches("cpu", seed=4)
    scorer = score_layers(model, ["0", "2"], num_classes=3)
    x, y = batches[0]
    weight = model[2].weight.detach().clone()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # layer "2" gives NaN, layer "0" does not
    with pytest.raises(ValueError, match="NaN|finite"):
        with scorer.batch(y):
            model(x)
    with torch.no_grad():
        model[2].weight.copy_(weight)
    assert scorer.accumulators == {"0": None, "2": None}  # "0" did not take it either
    for xb, yb in batches:
        with scorer.batch(yb):
            model(xb)
    scorer.remove()
    assert same_scores(scorer.compute(), good_only(model, ["0", "2"], batches, num_classes=3))


@pytest.mark.parametrize("strict", ["h_score", "nce"])
def test_a_batch_one_score_rejects_is_taken_by_no_score(strict):
    model = make_model("cpu")
    batches = make_batches("cpu", seed=5, c=3)
    kwargs = dict(scores=("logme", strict), score_options={strict: {"num_classes": 3}})
    scorer = score_layers(model, ["0", "2"], **kwargs)
    x0, y0 = batches[0]
    with scorer.batch(y0):
        model(x0)
    x, y = batches[1]
    wide = y.clone()
    wide[0] = 3  # fine for logme (classes grow), out of range for the other score's num_classes=3
    before = {name: {s: {k: v.clone() for k, v in acc.states.items()} for s, acc in accs.items()}
              for name, accs in scorer.accumulators.items()}
    with pytest.raises(ValueError, match="out of range"):
        with scorer.batch(wide):
            model(x)
    for name, accs in scorer.accumulators.items():
        for s, acc in accs.items():
            assert acc.states.keys() == before[name][s].keys()
            assert all(torch.equal(acc.states[k], v) for k, v in before[name][s].items()), (name, s)
    for xb, yb in batches[1:]:
        with scorer.batch(yb):
            model(xb)
    scorer.remove()
    assert same_scores(scorer.compute(), good_only(model, ["0", "2"], batches, **kwargs))
