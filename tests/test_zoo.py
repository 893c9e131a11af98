"""Model-zoo adapters (timm:, hf:, torchvision:) offline, on tiny randomly initialised models; no downloads.

Each optional package's tests skip when it cannot be imported (also when it
is installed but broken, e.g. a torchvision built for another torch).
"""
from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import torch_logme
from torch_logme import logme, rank_models, zoo
from torch_logme import model_ranking as mr
from torch_logme.model_layers import BLOCKS_ATTR, DEFAULT_LAYER_ATTR, PREPARE_ATTR

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a this film movie story cast was is very quite good great fine superb bad awful dull poor"
).split()
POSITIVE, NEGATIVE = ["good", "great", "fine", "superb"], ["bad", "awful", "dull", "poor"]


def importable(name: str):
    """The module, or a skip: missing, or installed but failing to import."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # a broken install raises RuntimeError and the like, not only ImportError
        pytest.skip(f"{name} cannot be imported here: {type(err).__name__}: {err}")


def transformers_or_skip():
    transformers = importable("transformers")
    try:
        transformers.AutoModel, transformers.BertModel  # noqa: B018  (absent when torch is too old for it)
    except Exception as err:
        pytest.skip(f"transformers has no torch models here: {err}")
    return transformers


# -- tiny offline models -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (hidden 32) and a BertTokenizer over a 25-word vocabulary, saved with save_pretrained."""
    transformers = transformers_or_skip()
    root = tmp_path_factory.mktemp("bert")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizer(str(root / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A 2-layer ViT on 32x32 images (8x8 patches) with its image processor, saved with save_pretrained."""
    transformers = transformers_or_skip()
    importable("PIL.Image")
    root = tmp_path_factory.mktemp("vit")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(root)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(root)
    return root


def sentences(n: int = 48, seed: int = 0):
    """Short reviews whose adjectives tell the class (0: positive, 1: negative), of varied lengths."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = ["the", str(rng.choice(["film", "movie", "story", "cast"])), "was"]
        words += [str(w) for w in rng.choice(POSITIVE if label == 0 else NEGATIVE, size=1 + i % 4)]
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def images(n: int = 24, seed: int = 0, size=(40, 36)):
    """PIL images whose red level tells the class (3 classes), of a size that needs resizing and cropping."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out, labels = [], []
    for i in range(n):
        label = i % 3
        pixels = rng.integers(0, 120, (size[1], size[0], 3))
        pixels[..., 0] += 60 * label
        out.append(Image.fromarray(pixels.astype(np.uint8)))
        labels.append(label)
    return out, labels


def raw_loader(inputs, labels, batch_size=8):
    return DataLoader(list(zip(inputs, labels)), batch_size=batch_size, collate_fn=zoo.raw_collate)


# -- without any optional package ----------------------------------------------------------------------------

def test_adapters_are_registered_and_unknown_zoos_refused():
    assert {"timm", "hf", "torchvision"} <= set(mr.MODEL_ADAPTERS)
    x, y = torch.randn(8, 3), torch.arange(8) % 2
    with pytest.raises(ValueError, match=r"registered adapter \(registered: timm:, hf:, torchvision:"):
        rank_models({"m": "nozoo:thing"}, [(x, y)], progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        zoo.timm_model("  ")
    assert repr(zoo.timm_model("resnet50", pretrained=False)) == "timm_model('resnet50', pretrained=False)"


@pytest.mark.parametrize("package, zoo_name, extra", [
    ("timm", "timm", "timm"), ("transformers", "hf", "hf"), ("torchvision", "torchvision", "torchvision"),
])
def test_a_missing_package_names_its_extra(monkeypatch, package, zoo_name, extra):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError, as when not installed
    with pytest.raises(ImportError, match=rf'pip install "torch_logme\[{extra}\]"'):
        rank_models({"m": f"{zoo_name}:anything"}, [(torch.randn(4, 3), torch.arange(4) % 2)], progress=False)


def test_a_broken_package_is_reported_as_such(monkeypatch):
    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(zoo.importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"installed but failed to import \(RuntimeError: operator.*"
                                          r"built for another torch.*torch_logme\[torchvision\]"):
        zoo.torchvision_model("resnet18")()


def test_a_model_declares_its_default_layer_blocks_and_preparation():
    """The attributes the adapters set work for any module: what model_layers reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    calls = []

    def prepare(inputs):
        calls.append(type(inputs).__name__)
        return torch.stack([torch.tensor(v, dtype=torch.float32) for v in inputs])

    setattr(model, DEFAULT_LAYER_ATTR, "1")
    setattr(model, BLOCKS_ATTR, ["1", "3"])
    setattr(model, PREPARE_ATTR, prepare)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    data = [([row.tolist() for row in x[i:i + 10]], y[i:i + 10]) for i in range(0, 40, 10)]  # lists, not tensors
    r = rank_models({"m": model}, data, progress=False)
    assert r.entries[0].layer == "1" and calls == ["list"] * 4
    with torch.no_grad():
        want = logme(torch.relu(model[0](x)), y)
    assert r.entries[0].scores["logme"] == pytest.approx(float(want), rel=1e-12)
    r = rank_models({"m": model}, data, layers="all", aggregate="last", progress=False)
    assert list(r.entries[0].layers) == ["1", "3"] and r.entries[0].layer == "3"


def test_raw_collate_and_the_standard_transform():
    PIL = importable("PIL.Image")
    inputs, labels = zoo.raw_collate([("a", 1), ("b", 0)])
    assert inputs == ["a", "b"] and labels.tolist() == [1, 0] and labels.dtype == torch.int64
    with pytest.raises(TypeError, match="samples"):
        zoo.raw_collate([("a",)])
    # A uniform image: after resize and crop every pixel is its colour, normalised per channel.
    image = PIL.new("RGB", (50, 30), (255, 128, 0))
    x = zoo.ImageTransform(16)(image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    want = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)]
    assert torch.allclose(x.mean((1, 2)), torch.tensor(want), atol=1e-5)
    # The crop is the centre: a bright band in the middle third survives, the dark sides are cut.
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[:, 32:64] = 255
    centre = zoo.ImageTransform(32, resize=32)(PIL.fromarray(pixels))
    white = torch.tensor([(1 - m) / s for m, s in zip(zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)])
    assert centre.shape == (3, 32, 32) and torch.allclose(centre, white.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    with pytest.raises(ValueError, match="resize"):
        zoo.ImageTransform(224, resize=100)
    prepare = zoo.PrepareImages(zoo.ImageTransform(8), "model m")
    assert prepare([image, image]).shape == (2, 3, 8, 8)
    t = torch.randn(2, 3, 8, 8)
    assert prepare(t) is t
    with pytest.raises(TypeError, match="model m takes images, but the data gave texts"):
        prepare(["some text"])


# -- Hugging Face --------------------------------------------------------------------------------------------

def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1)


def test_hf_text_model_by_path_pools_the_last_hidden_state(tiny_bert):
    transformers = transformers_or_skip()
    texts, labels = sentences()
    data = raw_loader(texts, labels)
    r = rank_models({"bert": f"hf:{tiny_bert}"}, data, scores=("logme", "h_score"), progress=False)
    entry = r.entries[0]
    assert entry.layer == "output"
    model = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    feats = []
    with torch.no_grad():
        for batch, _ in data:
            enc = tokenizer(batch, padding=True, return_tensors="pt")
            assert enc["attention_mask"].min() == 0  # padding is there, so the mask matters
            feats.append(masked_mean(model(**enc).last_hidden_state, enc["attention_mask"]))
    feats_all = torch.cat(feats)
    y = torch.tensor(labels)
    assert entry.scores["logme"] == pytest.approx(float(logme(feats_all, y)), rel=1e-9)
    assert entry.scores["h_score"] == pytest.approx(float(torch_logme.h_score(feats_all, y)), rel=1e-9)
    # CLS pooling: the first token's state.
    r = rank_models({"bert": f"hf:{tiny_bert}"}, data, pool="cls", progress=False)
    with torch.no_grad():
        cls = torch.cat([model(**tokenizer(b, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
                         for b, _ in data])
    assert r.entries[0].scores["logme"] == pytest.approx(float(logme(cls, y)), rel=1e-9)
    # Batches tokenized in the data pipeline (dicts) give the same ranking as raw texts.
    tokenized = [({**tokenizer(b, padding=True, return_tensors="pt")}, t) for b, t in data]
    r2 = rank_models({"bert": f"hf:{tiny_bert}"}, tokenized, progress=False)
    assert r2.entries[0].scores["logme"] == pytest.approx(entry.scores["logme"], rel=1e-12)


def test_hf_all_layers_are_the_hidden_states(tiny_bert):
    transformers = transformers_or_skip()
    texts, labels = sentences(32, seed=1)
    data = raw_loader(texts, labels, batch_size=16)
    r = rank_models({"bert": zoo.hf_model(str(tiny_bert))}, data, layers="all", progress=False)
    entry = r.entries[0]
    assert list(entry.layers) == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    model = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    hidden = [[], [], []]
    with torch.no_grad():
        for batch, _ in data:
            enc = tokenizer(batch, padding=True, return_tensors="pt")
            states = model(**enc, output_hidden_states=True).hidden_states
            for i, h in enumerate(states):
                hidden[i].append(masked_mean(h, enc["attention_mask"]))
    y = torch.tensor(labels)
    for label, h in zip(entry.layers, hidden):
        assert entry.layers[label]["logme"] == pytest.approx(float(logme(torch.cat(h), y)), rel=1e-9)


def test_hf_options_random_weights_max_length_pairs(tiny_bert):
    transformers = transformers_or_skip()
    texts, labels = sentences(24)
    built = zoo.hf_model(str(tiny_bert), pretrained=False, max_length=4)()
    loaded = transformers.AutoModel.from_pretrained(tiny_bert)
    assert type(built) is type(loaded)
    assert not torch.equal(built.embeddings.word_embeddings.weight, loaded.embeddings.word_embeddings.weight)
    prepare = getattr(built, PREPARE_ATTR)
    enc = prepare(texts[:4])
    assert enc["input_ids"].shape[1] == 4 and set(enc) >= {"input_ids", "attention_mask"}
    pairs = prepare([texts[:3], texts[3:6]])  # two lists: sentence pairs
    assert pairs["input_ids"].shape[0] == 3 and int(pairs["token_type_ids"].max()) == 1
    assert getattr(zoo.hf_model(str(tiny_bert))(), PREPARE_ATTR).max_length == 64  # the position table
    no_tokenizer = zoo.hf_model(str(tiny_bert), tokenizer=None)()
    assert not hasattr(no_tokenizer, PREPARE_ATTR)
    with pytest.raises(ValueError, match="max_length"):
        zoo.hf_model("x", max_length=0)


def test_hf_vision_model_prepares_images(tiny_vit, tmp_path):
    transformers = transformers_or_skip()
    pictures, labels = images()
    data = raw_loader(pictures, labels)
    r = rank_models({"vit": f"hf:{tiny_vit}"}, data, cache=tmp_path, progress=False)
    # PIL images in the data's fingerprint count by their pixels, so the second run is served by the cache.
    again = rank_models({"vit": f"hf:{tiny_vit}"}, data, cache=tmp_path, progress=False)
    assert again.entries[0].features_from == "cache" and again.entries[0].scores == r.entries[0].scores
    model = transformers.AutoModel.from_pretrained(tiny_vit).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_vit)
    with torch.no_grad():
        feats = torch.cat([model(**processor(images=b, return_tensors="pt")).last_hidden_state.mean(1)
                           for b, _ in data])
    assert r.entries[0].scores["logme"] == pytest.approx(float(logme(feats, torch.tensor(labels))), rel=1e-9)
    with pytest.raises(TypeError, match="has no tokenizer, but the data gave texts"):
        rank_models({"vit": f"hf:{tiny_vit}"}, raw_loader(*sentences(8)), progress=False)


def test_hf_cache_serves_the_second_run(tiny_bert, tmp_path):
    texts, labels = sentences(24)
    data = raw_loader(texts, labels)
    first = rank_models({"bert": f"hf:{tiny_bert}"}, data, cache=tmp_path, progress=False)
    second = rank_models({"bert": f"hf:{tiny_bert}"}, data, cache=tmp_path, progress=False)
    assert first.entries[0].features_from == "forward" and second.entries[0].features_from == "cache"
    assert second.entries[0].scores == first.entries[0].scores
    # Another truncation makes other features: not served from the cache.
    third = rank_models({"bert": zoo.hf_model(str(tiny_bert), max_length=5)}, data, cache=tmp_path, progress=False)
    assert third.entries[0].features_from == "forward"


# -- timm ----------------------------------------------------------------------------------------------------

def test_timm_model_default_layer_blocks_and_images(monkeypatch):
    timm = importable("timm")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 3
    x = torch.randn(24, 3, 32, 32, generator=gen) + y[:, None, None, None] * 0.5
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    torch.manual_seed(0)
    model = zoo.timm_model("resnet18", pretrained=False, num_classes=3)().eval()
    r = rank_models({"r18": model}, data, progress=False)
    assert r.entries[0].layer == "fc:input"
    with torch.no_grad():
        pooled = torch.cat([model.forward_head(model.forward_features(b), pre_logits=True) for b, _ in data])
    assert r.entries[0].scores["logme"] == pytest.approx(float(logme(pooled, y)), rel=1e-9)
    r = rank_models({"r18": model}, data, layers="all", progress=False)
    stages = [d["module"] for d in model.feature_info]
    assert list(r.entries[0].layers) == stages and stages[-1] == "layer4"
    with torch.no_grad():
        want = logme(torch.cat([model.forward_features(b).mean((2, 3)) for b, _ in data]), y)
    assert r.entries[0].layers["layer4"]["logme"] == pytest.approx(float(want), rel=1e-9)
    # PIL images go through timm's own evaluation transform (here 32x32 by the config overlay).
    small = zoo.timm_model("resnet18", pretrained=False, num_classes=3,
                           pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=1.0))()
    batch = getattr(small, PREPARE_ATTR)(images(4)[0])
    assert batch.shape == (4, 3, 32, 32)
    # The string form asks timm for the pre-trained weights.
    asked = {}
    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        asked.update(name=name, pretrained=pretrained)
        return real(name, pretrained=False, num_classes=3)

    monkeypatch.setattr(timm, "create_model", create)
    r = rank_models({"r18": "timm:resnet18"}, data, progress=False)
    assert asked == {"name": "resnet18", "pretrained": True} and r.entries[0].layer == "fc:input"


def test_timm_headless_model_scores_its_output():
    importable("timm")
    y = torch.arange(16) % 2
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + y[:, None, None, None]
    r = rank_models({"m": zoo.timm_model("resnet18", pretrained=False, num_classes=0)}, [(x, y)], progress=False)
    assert r.entries[0].layer == "output"


# -- torchvision ---------------------------------------------------------------------------------------------

def test_torchvision_model_default_layer_blocks_and_weights(monkeypatch):
    tv = importable("torchvision")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 3
    x = torch.randn(24, 3, 32, 32, generator=gen) + y[:, None, None, None] * 0.5
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    torch.manual_seed(0)
    model = zoo.torchvision_model("resnet18", weights=None, num_classes=3)().eval()
    r = rank_models({"r18": model}, data, layers="all", progress=False)
    assert list(r.entries[0].layers) == ["layer1", "layer2", "layer3", "layer4"]
    r = rank_models({"r18": model}, data, progress=False)
    assert r.entries[0].layer == "fc:input"
    trunk = nn.Sequential(*list(model.children())[:-1])
    with torch.no_grad():
        want = logme(torch.cat([trunk(b).flatten(1) for b, _ in data]), y)
    assert r.entries[0].scores["logme"] == pytest.approx(float(want), rel=1e-9)
    assert isinstance(getattr(model, PREPARE_ATTR).transform, zoo.ImageTransform)  # no weights: the standard one
    # The string form asks for the default weights, whose own transforms prepare images (no download here).
    asked = {}
    real = tv.models.get_model

    def get_model(name, weights=None, **kwargs):
        asked.update(name=name, weights=weights)
        return real(name, weights=None, num_classes=3)

    monkeypatch.setattr(tv.models, "get_model", get_model)
    built = mr.MODEL_ADAPTERS["torchvision"]("resnet18")
    assert asked == {"name": "resnet18", "weights": tv.models.ResNet18_Weights.DEFAULT}
    prepare = getattr(built, PREPARE_ATTR)
    assert prepare(images(2)[0]).shape == (2, 3, 224, 224)
    assert "ImageClassification" in prepare.cache_key
    with pytest.raises(ValueError, match="no weights 'NOPE'"):
        zoo.torchvision_model("resnet18", weights="NOPE")()
    assert getattr(zoo.torchvision_model("mobilenet_v3_small", weights=None)(), BLOCKS_ATTR) == "features"


# -- the command: python -m torch_logme rank-models ------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 class folders of 6 random PNGs each (40x36), plus a stray text file that is not an image."""
    importable("PIL.Image")
    root = tmp_path_factory.mktemp("images")
    pictures, labels = images(18, seed=2)
    for i, (picture, label) in enumerate(zip(pictures, labels)):
        folder = root / ["cat", "dog", "fox"][label]
        folder.mkdir(exist_ok=True)
        picture.save(folder / f"{i:02d}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("texts")
    texts, labels = sentences(30, seed=3)
    path = root / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": ["pos", "neg"][y], "id": i}) + "\n"
                            for i, (t, y) in enumerate(zip(texts, labels))), encoding="utf-8")
    return path


def cli(capsys, *argv):
    from torch_logme.__main__ import main

    status = main(["rank-models", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_image_folder_with_the_models_own_preprocessing(capsys, tiny_vit, image_folder):
    import json

    from torch_logme.model_data import loader, read_data

    status, out, err = cli(capsys, f"hf:{tiny_vit}", "--data", image_folder, "--batch-size", 5, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["data"] == {"path": str(image_folder), "kind": "images", "samples": 18,
                              "classes": ["cat", "dog", "fox"]}
    row = result["ranking"][0]
    assert row["model"] == f"hf:{tiny_vit}" and row["layer"] == "output"
    # The same as the Python call on the same files.
    data = read_data(image_folder)
    want = rank_models({"m": f"hf:{tiny_vit}"}, loader(data, 5), progress=False).entries[0].scores["logme"]
    assert row["logme"] == pytest.approx(want, rel=1e-12)


def test_cli_images_standard_preprocessing_limit_and_table(capsys, tiny_vit, image_folder):
    status, out, err = cli(capsys, f"hf:{tiny_vit}", "--data", image_folder, "--preprocess", "standard",
                           "--image-size", 32, "--limit", 9, "--score", "logme", "h_score", "--layers", "all")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"data: {image_folder} (9 images, 3 classes)"
    assert lines[1].startswith("ranked by logme (larger is better)")
    assert "logme  h_score" in lines[2] and "scores per layer" in out
    blocks = zoo._hf_blocks(transformers_or_skip().AutoModel.from_pretrained(tiny_vit))
    assert blocks is not None and blocks[0] == "embeddings" and len(blocks) == 3  # names vary across versions
    per_layer = out[out.index("scores per layer"):]
    assert all(f"  {layer}" in per_layer for layer in blocks)


def test_cli_text_file_layers_scores_cache(capsys, tiny_bert, text_file, tmp_path):
    import json

    args = [f"hf:{tiny_bert}", "--data", text_file, "--layers", "all", "--score", "logme", "--score", "gbc",
            "--limit", 20, "--cache", tmp_path / "cache", "--json"]
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    first = json.loads(out)
    assert first["data"]["kind"] == "texts" and first["data"]["samples"] == 20
    assert first["data"]["classes"] == ["neg", "pos"] and first["scores"] == ["logme", "gbc"]
    row = first["ranking"][0]
    assert list(row["layers"]) == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    assert row["features_from"] == "forward"
    status, out, err = cli(capsys, *args)
    second = json.loads(out)
    assert second["ranking"][0]["features_from"] == "cache"
    assert second["ranking"][0]["layers"] == row["layers"]


def test_cli_csv_with_named_columns_and_pooling(capsys, tiny_bert, tmp_path):
    import csv

    texts, labels = sentences(16, seed=4)
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows([t, 10 if y else 2] for t, y in zip(texts, labels))  # ids in numeric order: 2 < 10
    status, out, err = cli(capsys, f"hf:{tiny_bert}", "--data", path, "--text-column", "review",
                           "--label-column", "stars", "--pool", "cls", "--json", "--max-length", 6)
    assert status == 0, err
    import json

    assert json.loads(out)["data"]["classes"] == ["2", "10"]


@pytest.mark.parametrize("make, argv, fragment", [
    (None, ["hf:{bert}", "--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file or directory"),
    (None, ["resnet50", "--data", "{texts}"], "'resnet50' is not a model name: give '<zoo>:<name>'"),
    (None, ["foo:bar", "--data", "{texts}"], "with zoo timm, hf or torchvision"),
    (None, ["hf:{bert}", "--data", "{texts}", "--text-column", "body"],
     "record 1 has no 'body' column (its columns: 'text', 'label', 'id'); name the columns with --text-column"),
    (None, ["hf:{vit}", "--data", "{texts}"], "has no tokenizer, but the data gave texts"),
    (None, ["hf:{bert}", "--data", "{tmp}/empty"], "no class folders"),
    (None, ["hf:{bert}", "--data", "{tmp}/bad.jsonl"], "bad.jsonl, line 2: not valid JSON"),
    (None, ["hf:{bert}", "--data", "{tmp}/data.txt"], "not an image folder (a directory) nor a text file"),
    (None, ["hf:{bert}", "--data", "{texts}", "--layers", "nosuch"], "has no layer 'nosuch'"),
    (None, ["hf:{tmp}/nomodel", "--data", "{texts}"], "nomodel"),
])
def test_cli_errors_are_one_line(capsys, tiny_bert, tiny_vit, text_file, tmp_path, make, argv, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    (tmp_path / "data.txt").write_text("a,b\n")
    (tmp_path / "nomodel").mkdir()
    names = {"bert": tiny_bert, "vit": tiny_vit, "texts": text_file, "tmp": tmp_path}
    status, out, err = cli(capsys, *(a.format(**names) for a in argv))
    assert status == 1 and out == ""
    assert err.startswith("torch-logme rank-models: error: ") and err.count("\n") == 1, err
    assert fragment in err


def test_cli_usage_errors(capsys, text_file):
    from torch_logme.__main__ import main

    for argv in (["--limit", "0"], ["--batch-size", "x"], ["--score", "bogus"], ["--pool", "max"]):
        with pytest.raises(SystemExit) as info:
            main(["rank-models", "hf:x", "--data", str(text_file), *argv])
        assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["rank-models", "hf:x"])  # --data is required
    capsys.readouterr()


@pytest.mark.parametrize("model", ["timm:resnet18", "torchvision:resnet18"])
def test_cli_timm_and_torchvision_random_weights(capsys, image_folder, model):
    import json

    importable(model.partition(":")[0])
    status, out, err = cli(capsys, model, "--data", image_folder, "--no-pretrained", "--preprocess", "standard",
                           "--image-size", 32, "--json")
    assert status == 0, err
    row = json.loads(out)["ranking"][0]
    assert row["model"] == model and row["layer"] == "fc:input" and row["logme"] is not None
