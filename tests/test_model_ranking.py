"""rank_models over candidate models: one forward pass each, every layer and score streamed, as by hand."""
from __future__ import annotations

import gc
import os
import re
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_logme
from torch_logme import ModelRanking, gbc, h_score, leep, logme, rank_models, transrate
from torch_logme import model_ranking as mr
from torch_logme.ranking import ModelScoreError

from conftest import run_ranks

ROOT = Path(__file__).resolve().parents[1]
N, B, C = 240, 40, 4


# -- tiny models ------------------------------------------------------------------------------------------------

def counting(model: nn.Module) -> nn.Module:
    """The model, counting its forward passes in ``model.calls``."""
    model.calls = 0  # type: ignore[assignment]

    def pre(module, args):
        module.calls += 1

    model.register_forward_pre_hook(pre)
    return model


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return counting(nn.Sequential(nn.Flatten(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 7)))


class SmallCNN(nn.Module):
    """[B, 3, 4, 4] images -> feature maps [B, C, H, W] -> classifier."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        h = self.block2(self.block1(x))
        return self.fc(self.drop(h.mean((2, 3))))


class TokenModel(nn.Module):
    """input_ids [B, T] and attention_mask [B, T] -> token states [B, T, D] -> classifier on the masked mean."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, 16)
        self.mix = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids, attention_mask):
        h = self.mix(self.embed(input_ids))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def images(n: int = N, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=gen)
    x = torch.randn(n, 3, 4, 4, generator=gen)
    x[:, 0] += 0.8 * y[:, None, None].float()
    return x, y


def loader(x, y, batch_size=B) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def tokens(n: int = N, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=gen)
    ids = torch.randint(0, 20, (n, 6), generator=gen)
    ids[:, 0] = 5 * y + torch.randint(0, 5, (n,), generator=gen)  # the label leaks into the first token
    lengths = torch.randint(2, 7, (n,), generator=gen)
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    return ids, mask, y


def token_batches(ids, mask, y, size=B):
    return [({"input_ids": ids[i:i + size], "attention_mask": mask[i:i + size]}, y[i:i + size])
            for i in range(0, len(y), size)]


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


def outputs_of(model, x, names, on_input=()):
    """Each named module's output (or input) on x, by hand."""
    seen = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        if name in on_input:
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o)))
    model.eval()
    with torch.no_grad():
        model(x) if not isinstance(x, dict) else model(**x)
    for h in handles:
        h.remove()
    return seen


# -- the default layer, several layers and scores --------------------------------------------------------------

def test_default_layer_is_the_classifiers_input():
    x, y = images()
    model = mlp()
    r = rank_models({"mlp": model}, loader(x, y), progress=False)
    assert isinstance(r, ModelRanking)
    assert r.best_layer == "3:input" and list(r[0].layers) == ["3:input"]
    hand = outputs_of(model, x, ["3"], on_input=("3",))["3"]
    assert rel(r[0].scores["logme"], logme(hand, y)) < 1e-10
    assert model.calls == 1 + N // B  # the hand pass, then one per batch


def test_no_linear_needs_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x, y = images()
    with pytest.raises(ValueError, match="no nn.Linear.*layers="):
        rank_models({"conv": model}, loader(x, y), progress=False)
    r = rank_models({"conv": model}, loader(x, y), layers="1", progress=False)
    assert r.best_layer == "1"


def test_several_layers_and_scores_in_one_pass_equal_the_functional_scores(device):
    x, y = images()
    model = counting(SmallCNN()).to(device)
    scores = ("logme", "h_score", "gbc", "transrate")
    r = rank_models({"cnn": model}, loader(x, y), scores, layers=["block1", "block2.1", "fc:input"],
                    progress=False)
    assert model.calls == N // B  # one forward pass over the data
    hand = outputs_of(model, x.to(device), ["block1", "block2.1", "fc"], on_input=("fc",))
    feats = {"block1": hand["block1"].mean((2, 3)), "block2.1": hand["block2.1"].mean((2, 3)),
             "fc:input": hand["fc"]}
    fns = {"logme": logme, "h_score": h_score, "gbc": gbc, "transrate": transrate}
    layers = r[0].layers
    assert list(layers) == ["block1", "block2.1", "fc:input"]
    for label, f in feats.items():
        for s in scores:
            assert rel(layers[label][s], fns[s](f, y)) < 1e-10, (label, s)
    best = max(layers, key=lambda label: layers[label]["logme"])
    assert r[0].layer == best and r[0].scores == layers[best]


def test_token_model_with_an_attention_mask_and_cls():
    ids, mask, y = tokens()
    model = TokenModel()
    data = token_batches(ids, mask, y)
    r = rank_models({"tok": model}, data, ("logme", "h_score"), layers=["embed", "mix"], progress=False)
    hand = outputs_of(model, {"input_ids": ids, "attention_mask": mask}, ["embed", "mix"])
    m = mask.unsqueeze(-1).float()
    for label in ("embed", "mix"):
        pooled = (hand[label] * m).sum(1) / m.sum(1)
        assert rel(r[0].layers[label]["logme"], logme(pooled, y)) < 1e-10
        assert rel(r[0].layers[label]["h_score"], h_score(pooled, y)) < 1e-10
    cls = rank_models({"tok": model}, data, layers="embed", pool="cls", progress=False)
    assert rel(cls[0].scores["logme"], logme(hand["embed"][:, 0], y)) < 1e-10
    # Without a mask in the inputs: the plain mean over tokens.
    plain = [(ids[i:i + B], y[i:i + B]) for i in range(0, N, B)]
    emb = nn.Sequential(nn.Embedding(20, 16))
    r2 = rank_models({"emb": emb}, plain, layers="0", progress=False)
    with torch.no_grad():
        assert rel(r2[0].scores["logme"], logme(emb(ids).mean(1), y)) < 1e-10
    # The default layer of the token model: the head's input, the masked mean.
    r3 = rank_models({"tok": model}, data, progress=False)
    assert r3.best_layer == "head:input"


def test_pool_flatten_and_callable():
    x, y = images()
    model = SmallCNN()
    hand = outputs_of(model, x, ["block1"])["block1"]
    flat = rank_models({"m": model}, loader(x, y), layers="block1", pool="flatten", progress=False)
    assert rel(flat[0].scores["logme"], logme(hand.reshape(N, -1), y)) < 1e-10
    amax = rank_models({"m": model}, loader(x, y), layers="block1", pool=lambda v: v.amax((2, 3)), progress=False)
    assert rel(amax[0].scores["logme"], logme(hand.amax((2, 3)), y)) < 1e-10


def test_a_score_that_cannot_stream_equals_its_functional_form():
    x, y = images()
    model = SmallCNN()
    r = rank_models({"m": model}, loader(x, y), ("sfda", "logme"), layers=["block1", "fc:input"], progress=False)
    hand = outputs_of(model, x, ["block1", "fc"], on_input=("fc",))
    feats = {"block1": hand["block1"].mean((2, 3)), "fc:input": hand["fc"]}
    for label, f in feats.items():
        assert rel(r[0].layers[label]["sfda"], torch_logme.sfda(f, y)) < 1e-10
    assert r[0].collected_bytes == N * (8 + 12) * 4


def test_leep_and_nce_read_the_models_output():
    x, y = images()
    model = SmallCNN()
    r = rank_models({"m": model}, loader(x, y), ("logme", "leep", "nce"), progress=False)
    with torch.no_grad():
        probs = model.eval()(x).softmax(1)
    assert rel(r[0].layers["output"]["leep"], leep(probs, y)) < 1e-10
    assert rel(r[0].scores["nce"], torch_logme.nce(probs.argmax(1), y)) < 1e-10
    assert r[0].layer == "fc:input"  # chosen by logme, the first feature score


# -- lazily built models, eval mode ------------------------------------------------------------------------------

def test_lazily_built_models_are_built_once_and_freed():
    x, y = images()
    built, refs = [], []

    def build(seed):
        def make():
            built.append(seed)
            model = SmallCNN(seed)
            refs.append(weakref.ref(model))
            # only this candidate may be alive now
            assert sum(ref() is not None for ref in refs) == 1
            return model
        return make

    r = rank_models({f"cnn{s}": build(s) for s in range(3)}, loader(x, y), progress=False)
    gc.collect()
    assert built == [0, 1, 2] and all(ref() is None for ref in refs)
    assert sorted(r.models) == ["cnn0", "cnn1", "cnn2"]


def test_eval_mode_for_the_pass_then_restored():
    x, y = images()
    model = SmallCNN()
    model.train()
    model.block1.eval()  # a submodule's own flag survives too
    modes = []
    model.drop.register_forward_hook(lambda m, a, o: modes.append(m.training))
    rank_models({"m": model}, loader(x, y), progress=False)
    assert modes and not any(modes)
    assert model.training and model.drop.training and not model.block1.training
    # The batch-norm statistics did not move (eval mode, no update).
    before = model.block2[1].running_mean.clone()
    rank_models({"m": model}, loader(x, y), progress=False)
    assert torch.equal(before, model.block2[1].running_mean)


# -- aggregation ---------------------------------------------------------------------------------------------

def test_aggregation_best_last_mean():
    x, y = images()
    data = loader(x, y)
    layers = ["block1", "block2", "fc:input"]
    models = {"a": SmallCNN(0), "b": SmallCNN(1)}
    best = rank_models(models, data, ("logme", "h_score"), layers=layers, progress=False)
    last = rank_models(models, data, ("logme", "h_score"), layers=layers, aggregate="last", progress=False)
    mean = rank_models(models, data, ("logme", "h_score"), layers=layers, aggregate="mean", progress=False)
    for e in best:
        table = e.layers
        assert e.layer == max(table, key=lambda label: table[label]["logme"])
        assert e.scores == table[e.layer]
    for e in last:
        assert e.layer == "fc:input" and e.scores == e.layers["fc:input"]
    for e in mean:
        assert e.layer == "mean"
        for s in ("logme", "h_score"):
            assert e.scores[s] == pytest.approx(np.mean([v[s] for v in e.layers.values()]), rel=1e-12)
    # Ranked by the aggregated first score.
    for r in (best, last, mean):
        assert [e.scores["logme"] for e in r] == sorted((e.scores["logme"] for e in r), reverse=True)
    with pytest.raises(ValueError, match="aggregate"):
        rank_models(models, data, aggregate="max", progress=False)


def test_layers_all_with_blocks_per_model():
    x, y = images()
    model = SmallCNN()
    by_name = rank_models({"m": model}, loader(x, y), layers="all", blocks="block2", progress=False)
    assert list(by_name[0].layers) == ["block2.0", "block2.1", "block2.2"]
    by_type = rank_models({"m": model}, loader(x, y), layers="all", blocks=nn.ReLU, progress=False)
    assert list(by_type[0].layers) == ["block1.1", "block2.2"]
    listed = rank_models({"m": model, "n": SmallCNN(1)}, loader(x, y), layers={"m": "all"},
                         blocks={"m": ["block1", ("fc", "input")]}, progress=False)
    by = {e.name: e for e in listed}
    assert list(by["m"].layers) == ["block1", "fc:input"] and list(by["n"].layers) == ["fc:input"]
    with pytest.raises(ValueError, match="blocks="):
        rank_models({"m": model}, loader(x, y), layers="all", progress=False)


# -- the result ---------------------------------------------------------------------------------------------

def test_result_table_json_and_pandas():
    x, y = images()
    r = rank_models({"a": SmallCNN(0), "b": mlp(1)}, loader(x, y), ("logme", "gbc"),
                    layers={"a": ["block1", "fc:input"]}, progress=False)
    text = str(r)
    assert "ranked by logme" in text and "scores per layer" in text and "peak memory:" in text
    assert re.search(r"fc:input \*", text) or re.search(r"block1 \*", text)
    d = r.to_dict()
    assert d["aggregate"] == "best" and d["selected_by"] == "logme"
    row = d["ranking"][0]
    assert {"layer", "layers", "seconds", "peak_memory_bytes", "features_from", "logme", "gbc"} <= set(row)
    assert row["seconds"] > 0 and (row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= 0)
    import json

    assert json.loads(r.to_json()) == json.loads(json.dumps(d))
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            r.to_pandas()
    else:
        frame = r.to_pandas()
        assert list(frame["model"]) == r.models
        assert len(r.to_pandas(per_layer=True)) == sum(len(e.layers) for e in r)


def test_progress_bar_or_log_line(caplog):
    x, y = images()
    import logging

    with caplog.at_level(logging.INFO, logger="torch_logme.model_ranking"):
        rank_models({"m": SmallCNN()}, loader(x, y), progress=True)
    assert any("model 'm'" in rec.getMessage() for rec in caplog.records)


def test_autocast_bfloat16_statistics_stay_float64():
    x, y = images()
    model = SmallCNN()
    r = rank_models({"m": model}, loader(x, y), layers=["block2", "fc:input"], autocast=torch.bfloat16,
                    progress=False)
    plain = rank_models({"m": model}, loader(x, y), layers=["block2", "fc:input"], progress=False)
    for label in ("block2", "fc:input"):
        assert np.isfinite(r[0].layers[label]["logme"])
        assert abs(r[0].layers[label]["logme"] - plain[0].layers[label]["logme"]) < 0.05
    with pytest.raises(TypeError, match="autocast"):
        rank_models({"m": model}, loader(x, y), autocast="bf16", progress=False)


# -- pooled scores and non-streaming scores --------------------------------------------------------------------

def test_pooled_score_combined_across_models_and_layers(pooled_score):
    from conftest import _min_max_sum

    x, y = images()
    r = rank_models({"a": SmallCNN(0), "b": SmallCNN(1)}, loader(x, y), (pooled_score, "logme"),
                    layers=["block1", "fc:input"], progress=False)
    cells = [(e.name, label) for e in r for label in e.layers]
    by = {e.name: e for e in r}
    terms = torch.tensor([[by[m].layers[label][f"{pooled_score}.{t}"] for t in ("h", "gbc")] for m, label in cells],
                         dtype=torch.float64)
    combined = _min_max_sum(terms)
    for (m, label), v in zip(cells, combined.tolist()):
        assert by[m].layers[label][pooled_score] == pytest.approx(v, rel=1e-12)
    assert any("(model, layer) pairs" in note for note in r.notes)


def test_memory_of_scores_that_cannot_stream_reported_and_limited(pooled_score):
    x, y = images()
    model = counting(SmallCNN())
    # N from the DataLoader's dataset, D from the classifier: known before the pass.
    r = rank_models({"m": model}, loader(x, y), (pooled_score,), progress=False)
    assert r[0].collected_bytes == N * 12 * 4
    assert rank_models({"m": model}, loader(x, y), progress=False)[0].collected_bytes == 0  # LogME streams
    calls = model.calls
    with pytest.raises(mr.CollectLimitError, match="max_collect_bytes"):
        rank_models({"m": model}, loader(x, y), (pooled_score,), max_collect_bytes=N * 12 * 4 - 1, progress=False)
    assert model.calls == calls  # refused before any forward pass
    with pytest.warns(ResourceWarning, match="cannot stream will keep"):
        old, mr.WARN_COLLECT_BYTES = mr.WARN_COLLECT_BYTES, 10
        try:
            rank_models({"m": model}, loader(x, y), (pooled_score,), progress=False)
        finally:
            mr.WARN_COLLECT_BYTES = old
    # D unknown before the pass (a Sequential block): estimated once the first batch shows it.
    model.calls = 0
    with pytest.raises(mr.CollectLimitError, match="would keep"):
        rank_models({"m": model}, loader(x, y), (pooled_score,), layers="block1", max_collect_bytes=N * 8 * 4 - 1,
                    progress=False)
    assert model.calls == 1
    assert rank_models({"m": model}, loader(x, y), (pooled_score,), layers="block1",
                       max_collect_bytes=N * 8 * 4, progress=False)[0].collected_bytes == N * 8 * 4
    # N unknown (a list of batches): the limit holds as the rows come.
    batches = [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]
    with pytest.raises(mr.CollectLimitError, match="already keep"):
        rank_models({"m": model}, batches, (pooled_score,), max_collect_bytes=3 * B * 12 * 4 - 1, progress=False)


# -- the feature cache ----------------------------------------------------------------------------------------

def test_cache_reused_then_invalidated(tmp_path):
    x, y = images()
    data = loader(x, y)
    model = counting(SmallCNN())
    kwargs = dict(scores=("logme", "h_score"), layers=["block1", "fc:input"], cache=tmp_path, progress=False)
    first = rank_models({"m": model}, data, **kwargs)
    assert model.calls == N // B and first[0].features_from == "forward"
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)
    again = rank_models({"m": model}, data, **kwargs)
    assert model.calls == N // B and again[0].features_from == "cache"  # no forward pass
    assert again[0].layers == first[0].layers  # the same values, bit for bit
    # Cached features are what the pass pooled.
    hand = outputs_of(model, x, ["block1"])["block1"].mean((2, 3))
    model.calls = 0
    cached = np.load(next((tmp_path / "m").glob("block1-*.npy")))
    assert np.allclose(cached, hand.numpy(), rtol=1e-6, atol=1e-6)
    # Changed weights: the pass runs again and the old files are replaced.
    with torch.no_grad():
        model.fc.weight[0, 0] += 1.0
    rank_models({"m": model}, data, **kwargs)
    assert model.calls == N // B
    assert len(list((tmp_path / "m").iterdir())) == 2
    # Changed labels: a miss too.
    model.calls = 0
    rank_models({"m": model}, loader(x, (y + 1) % C), **kwargs)
    assert model.calls == N // B
    # Another layer set or pooling: a miss for what is not there.
    model.calls = 0
    rank_models({"m": model}, data, **{**kwargs, "layers": ["block2"]})
    assert model.calls == N // B
    # Two callables as pool: told apart by their code.
    for pool in (lambda v: v.amax((2, 3)), lambda v: v.amin((2, 3))):
        model.calls = 0
        r = rank_models({"m": model}, data, **{**kwargs, "layers": ["block2"], "pool": pool})
        assert model.calls == N // B and r[0].features_from == "forward"


def test_cache_with_scores_that_cannot_stream(tmp_path, pooled_score):
    x, y = images()
    model = counting(SmallCNN())
    kwargs = dict(layers=["block1", "fc:input"], cache=tmp_path, progress=False)
    a = rank_models({"m": model}, loader(x, y), (pooled_score, "logme", "leep"), **kwargs)
    b = rank_models({"m": model}, loader(x, y), (pooled_score, "logme", "leep"), **kwargs)
    assert model.calls == N // B and b[0].features_from == "cache"
    assert a[0].layers == b[0].layers and b[0].collected_bytes == a[0].collected_bytes > 0


# -- bad inputs: clear errors before any forward pass -----------------------------------------------------------

def test_bad_inputs_fail_before_any_forward_pass(tmp_path):
    x, y = images()
    data = loader(x, y)
    good = counting(SmallCNN())
    cases = [
        (dict(layers={"good": "fc:input", "bad": "nope"}), ValueError, "has no layer 'nope'"),
        (dict(layers="fc:sideways"), ValueError, "'input' or 'output'"),
        (dict(layers={"ghost": "fc"}), ValueError, "not ranked"),
        (dict(pool="max"), ValueError, "pool must be one of"),
        (dict(pool=3), TypeError, "pool must be"),
        (dict(scores="nope"), ValueError, "unknown score"),
        (dict(score_options={"logme": {"bogus": 1}}), TypeError, "bogus"),
        (dict(cache=3), TypeError, "cache"),
        (dict(max_collect_bytes=-1), ValueError, "max_collect_bytes"),
        (dict(model_output="raw"), ValueError, "model_output"),
        (dict(progress=1), TypeError, "progress"),
        (dict(blocks="block1"), ValueError, "blocks= applies only"),
    ]
    for kwargs, error, message in cases:
        scores = kwargs.pop("scores", ("logme",))
        with pytest.raises(error, match=message):
            rank_models({"good": good, "bad": SmallCNN()}, data, scores, **kwargs)
        assert good.calls == 0, kwargs
    with pytest.raises(ValueError, match="empty"):
        rank_models({"good": good}, [], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        rank_models({"good": good}, (b for b in []), progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        rank_models({"good": good, "other": SmallCNN()}, iter(list(data)), progress=False)
    with pytest.raises(TypeError, match="iterable of"):
        rank_models({"good": good}, x, progress=False)
    with pytest.raises(ValueError, match="models is empty|at least one model"):
        rank_models({}, data)
    assert good.calls == 0


def test_models_strings_and_mixes():
    x, y = images()
    with pytest.raises(ValueError, match=r"registered adapter \(registered: timm:, hf:, torchvision:"):
        rank_models({"r50": "nozoo:resnet50"}, loader(x, y))
    with pytest.raises(TypeError, match="not a mix"):
        rank_models({"a": SmallCNN(), "b": torch.randn(N, 4)}, y)
    with pytest.raises(TypeError, match="layers"):
        rank_models({"a": torch.randn(N, 4)}, y, layers="fc")
    with pytest.raises(TypeError, match="returned a"):
        rank_models({"a": lambda: 3}, loader(x, y), progress=False)
    mr.register_adapter("toy", lambda name: SmallCNN(int(name)))
    try:
        r = rank_models({"one": "toy:1", "two": "toy:2"}, loader(x, y), progress=False)
        assert sorted(r.models) == ["one", "two"]
    finally:
        mr.MODEL_ADAPTERS.pop("toy")


def test_feature_ranking_is_unchanged():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (100,), generator=gen)
    f = torch.randn(100, 5, generator=gen) + y[:, None]
    r = rank_models({"f": f, "g": torch.randn(100, 5, generator=gen)}, y)
    assert type(r) is torch_logme.Ranking and r.models == ["f", "g"]


def test_score_error_names_model_score_and_layer(monkeypatch):
    x, y = images()

    def fail(self):
        raise ValueError("boom")

    monkeypatch.setattr(torch_logme.GBCAccumulator, "compute", fail)
    with pytest.raises(ModelScoreError, match=r"model 'm', score 'gbc': layer 'fc:input': boom") as info:
        rank_models({"m": SmallCNN()}, loader(x, y), ("logme", "gbc"), progress=False)
    assert info.value.model == "m" and info.value.score == "gbc"


# -- across processes -----------------------------------------------------------------------------------------

def _ranks_body(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    x, y = images()
    batches = [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]
    mine = batches[rank::2]  # a DistributedSampler-style split: each rank its shard
    cache = os.path.join(out_dir, "cache")
    r = rank_models({"a": lambda: SmallCNN(0), "b": lambda: SmallCNN(1)}, mine, ("logme", "h_score", "gbc"),
                    layers=["block1", "fc:input"], cache=cache, progress=False)
    again = rank_models({"a": lambda: SmallCNN(0), "b": lambda: SmallCNN(1)}, mine, ("logme", "h_score", "gbc"),
                        layers=["block1", "fc:input"], cache=cache, progress=False)
    torch.save({"first": r.to_dict(), "again": again.to_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_ranks_equal_one_process(tmp_path):
    run_ranks(_ranks_body, (str(tmp_path),), 2)
    x, y = images()
    one = rank_models({"a": SmallCNN(0), "b": SmallCNN(1)}, loader(x, y), ("logme", "h_score", "gbc"),
                      layers=["block1", "fc:input"], progress=False)
    single = {e.name: e.layers for e in one}
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for run in ("first", "again"):
            rows = saved[run]["ranking"]
            assert [row["model"] for row in rows] == one.models
            assert all(row["features_from"] == ("forward" if run == "first" else "cache") for row in rows)
            for row in rows:
                for label, values in row["layers"].items():
                    for s, v in values.items():
                        assert rel(v, single[row["model"]][label][s]) < 1e-10, (rank, run, row["model"], label, s)
    assert (tmp_path / "cache" / "a" / "rank0of2").is_dir() and (tmp_path / "cache" / "a" / "rank1of2").is_dir()


def test_no_warnings_in_a_plain_run():
    x, y = images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rank_models({"m": SmallCNN()}, loader(x, y), progress=False)


def _empty_shard_body(rank: int, out_dir: str) -> None:
    x, y = images()
    batches = [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]
    mine = batches if rank == 0 else []  # rank 1's shard is empty
    try:
        rank_models({"a": SmallCNN(0)}, mine, ("logme",), layers=["fc:input"], progress=False)
    except ValueError as err:
        torch.save(str(err), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_an_empty_shard_raises_on_every_rank_instead_of_hanging(tmp_path):
    run_ranks(_empty_shard_body, (str(tmp_path),), 2, timeout=120, timeout_s=60)
    messages = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert "no batches on some rank" in messages[0] and messages[1].startswith("data gave no batches")
