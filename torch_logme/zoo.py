"""Model zoos for :func:`torch_logme.rank_models`: timm, Hugging Face transformers and torchvision models by name.

A candidate given as a string is built, when its turn comes, by its zoo's
adapter:

- ``"timm:<name>"``: ``timm.create_model(name, pretrained=True)``, which
  reads timm's cache (the Hugging Face hub cache) and downloads on a miss;
- ``"hf:<name or path>"``: ``transformers.AutoModel.from_pretrained`` with
  its ``AutoTokenizer`` (or, for a vision model, its
  ``AutoImageProcessor``); a local directory written by
  ``save_pretrained`` loads offline;
- ``"torchvision:<name>"``: ``torchvision.models.get_model(name,
  weights="DEFAULT")``, which reads torch hub's cache.

For options (random weights, keyword arguments, another tokenizer), pass
the builder that :func:`timm_model`, :func:`hf_model` or
:func:`torchvision_model` returns instead of the string: a zero-argument
callable, built when its turn comes like any other.

Each adapter imports its package only when one of its models is built, and
raises an ImportError naming the extra that installs it
(``pip install "torch_logme[timm]"``, ``[hf]``, ``[torchvision]``).

Every model an adapter builds declares, through the attributes that
:mod:`torch_logme.model_layers` reads:

- its default layer. timm and torchvision: the input of the classifier, as
  for any model (timm: ``model.get_classifier()``; ``"output"`` when the
  model has no head). Hugging Face: ``"output"``, whose first field is the
  last hidden state [B, T, D], averaged over the tokens the attention mask
  keeps (``pool="cls"``: the first token);
- its blocks for ``layers="all"``. timm: the stages in
  ``model.feature_info``; torchvision: ``layer1`` to ``layer4`` (ResNets),
  else each child of ``features`` (VGG, MobileNet, EfficientNet, ConvNeXt,
  DenseNet) or of ``encoder.layers`` (ViT); Hugging Face: ``embeddings``
  and every block of the encoder, the layers whose outputs
  ``output_hidden_states=True`` returns;
- how it prepares raw inputs. A batch whose inputs are a list of texts is
  tokenized by the model's own tokenizer (padding to the longest,
  truncating at the model's maximum length), a list of PIL images is
  transformed by the model's own preprocessing (timm's data config, the
  torchvision weights' transforms, the Hugging Face image processor).
  Tensors and dicts pass as they are. With :func:`raw_collate` a
  DataLoader yields such lists, so that one data set serves models that
  prepare their inputs differently.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .model_layers import BLOCKS_ATTR, DEFAULT_LAYER_ATTR, OUTPUT, PREPARE_ATTR
from .model_ranking import register_adapter

__all__ = [
    "timm_model", "hf_model", "torchvision_model", "timm_defaults", "hf_defaults", "torchvision_defaults",
    "ZooBuilder", "ImageTransform", "PrepareImages", "PrepareHF", "raw_collate", "EXTRAS",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

#: package -> the extra of torch_logme that installs it.
EXTRAS = {"timm": "timm", "transformers": "hf", "torchvision": "torchvision", "PIL": "hf"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _require(package: str, *names: str) -> Any:
    """The package (or the attributes ``names`` of it), or an ImportError that names the extra to install."""
    extra = EXTRAS[package.partition(".")[0]]
    install = f'pip install "torch_logme[{extra}]"'
    try:
        module = importlib.import_module(package)
        return tuple(getattr(module, n) for n in names) if names else module
    except ImportError as err:
        raise ImportError(f"{package} is needed here but cannot be imported ({err}); install it with: {install}") \
            from err
    except Exception as err:  # installed, but broken: e.g. a torchvision built for another torch
        raise ImportError(
            f"{package} is installed but failed to import ({type(err).__name__}: {err}); it may have been built "
            f"for another torch than the installed {torch.__version__}: reinstall a build that matches it "
            f"({install})"
        ) from err


class ZooBuilder:
    """A zero-argument callable that builds one zoo model: what :func:`timm_model` and the others return."""

    def __init__(self, zoo: str, name: str, build: Callable[[], nn.Module], options: Mapping[str, Any]) -> None:
        self.zoo, self.name, self.options = zoo, name, dict(options)
        self._build = build

    def __call__(self) -> nn.Module:
        return self._build()

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self.zoo}_model({self.name!r}{options})"


def _check_name(name: Any, zoo: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a {zoo} model name must be a non-empty string, got {name!r}")
    return name.strip()


# -- raw inputs: images and texts ----------------------------------------------------------------------------

def _is_image(value: Any) -> bool:
    return hasattr(value, "convert") and hasattr(value, "size") and hasattr(value, "mode")  # a PIL image


def _is_images(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(_is_image(x) for x in inputs)


def _is_texts(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(x, str) for x in inputs)


def _is_text_pairs(inputs: Any) -> bool:
    """Two lists of texts of one length, as a DataLoader collates (first, second) pairs of sentences."""
    return (isinstance(inputs, (list, tuple)) and len(inputs) == 2 and all(_is_texts(x) for x in inputs)
            and len(inputs[0]) == len(inputs[1]))


def raw_collate(batch: Sequence[Any]) -> Tuple[List[Any], Tensor]:
    """A DataLoader's ``collate_fn`` for samples (image or text, label): (list of inputs, labels [B]).

    Zoo models prepare such lists themselves (their tokenizer, their
    transform), so one DataLoader serves models with different
    preprocessing. PIL images cannot be stacked by the default collate.
    """
    inputs, labels = [], []
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"raw_collate takes samples (input, label), got {type(item).__name__}")
        inputs.append(item[0])
        labels.append(int(item[1]))
    return inputs, torch.tensor(labels, dtype=torch.int64)


class ImageTransform:
    """The default image preprocessing: resize, center crop, scale to [0, 1], normalize; PIL and torch only.

    The shorter side is resized to ``resize`` (bilinear, antialiased by
    PIL), the center ``size`` x ``size`` is cropped, and each channel is
    normalized with ``mean`` and ``std`` (ImageNet's by default): the
    evaluation transform of most ImageNet models (256 -> 224).

    Args:
        size: the side of the square crop (default 224).
        resize: the shorter side before the crop (default: size / 0.875, 256 for 224).
        mean, std: per-channel statistics of the RGB values in [0, 1].
    """

    def __init__(self, size: int = 224, resize: Optional[int] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        resize = round(size / 0.875) if resize is None else resize
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < size:
            raise ValueError(f"resize must be an int >= size ({size}), got {resize!r}")
        self.size, self.resize = size, resize
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, image: Any) -> Tensor:
        """A PIL image -> [3, size, size] float32."""
        image = image.convert("RGB")
        width, height = image.size
        scale = self.resize / min(width, height)
        width, height = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.resize((width, height), resample=2)  # 2: PIL's BILINEAR, in every PIL version
        left, top = (width - self.size) // 2, (height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, resize={self.resize}, mean={self.mean}, std={self.std})"


class PrepareImages:
    """A model's input preparation for images: a list of PIL images -> its transform of each, stacked [B, 3, H, W].

    Tensors (already transformed by the data pipeline) and dicts pass as
    they are; a list of texts is refused, naming the model.
    """

    def __init__(self, transform: Callable[[Any], Tensor], what: str) -> None:
        self.transform, self.what = transform, what

    def __call__(self, inputs: Any) -> Any:
        if _is_images(inputs):
            return torch.stack([self.transform(image.convert("RGB")) for image in inputs])
        if _is_texts(inputs) or _is_text_pairs(inputs):
            raise TypeError(f"{self.what} takes images, but the data gave texts")
        return inputs

    @property
    def cache_key(self) -> str:
        return f"images {self.transform!r}"

    def __repr__(self) -> str:
        return f"PrepareImages({self.transform!r})"


def _model_max_length(tokenizer: Any, config: Any) -> Optional[int]:
    """The longest input the model takes: the tokenizer's limit when it sets one, else the position table's."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # unset limits are huge sentinels (1e30)
        return limit
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


class PrepareHF:
    """A Hugging Face model's input preparation: texts -> its tokenizer, PIL images -> its image processor.

    A list of texts (or two lists: sentence pairs) is tokenized with
    padding to the longest, truncation at ``max_length``, as tensors; the
    attention mask it returns masks the token pooling. A list of images
    goes through the image processor. Dicts (already tokenized) and
    tensors pass as they are.
    """

    def __init__(self, tokenizer: Any = None, image_processor: Any = None, max_length: Optional[int] = None,
                 what: str = "the model") -> None:
        self.tokenizer, self.image_processor, self.max_length, self.what = tokenizer, image_processor, max_length, what

    def __call__(self, inputs: Any) -> Any:
        texts = _is_texts(inputs)
        if texts or _is_text_pairs(inputs):
            if self.tokenizer is None:
                raise TypeError(f"{self.what} has no tokenizer, but the data gave texts; tokenize them in the data "
                                "pipeline (dict batches) or pass hf_model(..., tokenizer=...)")
            args = [list(inputs)] if texts else [list(inputs[0]), list(inputs[1])]
            encoded = self.tokenizer(*args, padding=True, truncation=self.max_length is not None,
                                     max_length=self.max_length, return_tensors="pt")
            return dict(encoded)
        if _is_images(inputs):
            if self.image_processor is None:
                raise TypeError(f"{self.what} has no image processor, but the data gave images")
            return dict(self.image_processor(images=[image.convert("RGB") for image in inputs], return_tensors="pt"))
        return inputs

    @property
    def cache_key(self) -> str:
        parts = [f"max_length={self.max_length}"]
        for role, obj in (("tokenizer", self.tokenizer), ("image processor", self.image_processor)):
            if obj is not None:
                size = len(obj) if role == "tokenizer" and hasattr(obj, "__len__") else ""
                parts.append(f"{role} {type(obj).__name__} {getattr(obj, 'name_or_path', '')} {size}")
                if role == "image processor" and hasattr(obj, "to_json_string"):
                    parts.append(obj.to_json_string())
        return "hf " + " | ".join(parts)

    def __repr__(self) -> str:
        return f"PrepareHF(tokenizer={type(self.tokenizer).__name__}, " \
               f"image_processor={type(self.image_processor).__name__}, max_length={self.max_length})"


# -- timm ----------------------------------------------------------------------------------------------------

def _module_name(model: nn.Module, module: nn.Module) -> Optional[str]:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def _existing(model: nn.Module, names: Sequence[str]) -> List[str]:
    out = []
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        out.append(name)
    return out


def timm_defaults(model: nn.Module, transform: Optional[Callable[[Any], Tensor]] = None) -> nn.Module:
    """Declare a timm model's default layer, blocks and image preprocessing (see the module's docstring).

    Args:
        model: a model from ``timm.create_model``.
        transform: PIL image -> tensor; default: timm's evaluation
            transform for the model's data config.

    Returns:
        ``model``, with the attributes set.
    """
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Linear):
        name = _module_name(model, head)
        if name:
            setattr(model, DEFAULT_LAYER_ATTR, f"{name}:input")
    elif getattr(model, "num_classes", None) == 0:  # no head: the model returns its pooled features
        setattr(model, DEFAULT_LAYER_ATTR, OUTPUT)
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)):
        stages = _existing(model, [d["module"] for d in info if isinstance(d, Mapping) and d.get("module")])
        if stages:
            setattr(model, BLOCKS_ATTR, stages)
    if transform is None:
        data = _require("timm.data")
        config_of = getattr(data, "resolve_model_data_config", None)  # timm >= 0.9; before: resolve_data_config
        config = config_of(model) if config_of is not None else data.resolve_data_config({}, model=model)
        transform = data.create_transform(**config, is_training=False)
    setattr(model, PREPARE_ATTR, PrepareImages(transform, f"timm model {type(model).__name__}"))
    return model


def timm_model(name: str, *, pretrained: bool = True, **kwargs: Any) -> ZooBuilder:
    """A builder of ``timm.create_model(name, pretrained=pretrained, **kwargs)``, with its defaults declared.

    Args:
        name: a timm model name, e.g. "resnet50" or "vit_base_patch16_224.augreg_in21k".
        pretrained: load the pre-trained weights (from timm's cache, or downloaded); False: random weights.
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``pretrained_cfg_overlay``).

    Returns:
        A zero-argument callable for ``rank_models``' ``models``.
    """
    name = _check_name(name, "timm")

    def build() -> nn.Module:
        timm = _require("timm")
        return timm_defaults(timm.create_model(name, pretrained=pretrained, **kwargs))

    return ZooBuilder("timm", name, build, {"pretrained": pretrained, **kwargs})


# -- Hugging Face transformers ------------------------------------------------------------------------------

def _hf_blocks(model: nn.Module) -> Optional[List[str]]:
    """The embeddings and the encoder's blocks: the first ModuleList of config.num_hidden_layers modules."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        return None
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList) and len(module) == count:
            blocks = [f"{name}.{i}" for i in range(count)]
            return _existing(model, ["embeddings"]) + blocks  # embeddings: hidden_states[0]
    return None


def hf_defaults(model: nn.Module, tokenizer: Any = None, image_processor: Any = None,
                max_length: Optional[int] = None) -> nn.Module:
    """Declare a Hugging Face model's default layer, blocks and input preparation (see the module's docstring).

    Args:
        model: a transformers model (e.g. from ``AutoModel.from_pretrained``).
        tokenizer: its tokenizer, for texts (None: texts must come tokenized).
        image_processor: its image processor, for PIL images.
        max_length: truncate texts to this many tokens (None: the model's limit).

    Returns:
        ``model``, with the attributes set.
    """
    setattr(model, DEFAULT_LAYER_ATTR, OUTPUT)
    blocks = _hf_blocks(model)
    if blocks:
        setattr(model, BLOCKS_ATTR, blocks)
    if tokenizer is not None and max_length is None:
        max_length = _model_max_length(tokenizer, getattr(model, "config", None))
    if tokenizer is not None or image_processor is not None:
        setattr(model, PREPARE_ATTR, PrepareHF(tokenizer, image_processor, max_length,
                                               f"Hugging Face model {type(model).__name__}"))
    return model


def _hf_processor(transformers: Any, cls: str, source: Any, name: str) -> Any:
    """``source`` when it is already a tokenizer / processor, else ``Auto<cls>.from_pretrained(source)``."""
    if source is None or source is False:
        return None
    if not isinstance(source, str):
        return source
    return getattr(transformers, cls).from_pretrained(source)


def hf_model(name: str, *, pretrained: bool = True, tokenizer: Any = True, image_processor: Any = True,
             max_length: Optional[int] = None, **kwargs: Any) -> ZooBuilder:
    """A builder of ``transformers.AutoModel.from_pretrained(name, **kwargs)`` with its tokenizer.

    Args:
        name: a model on the Hugging Face hub ("bert-base-uncased") or a
            local directory written by ``save_pretrained``.
        pretrained: load the weights; False: the architecture from its
            config, with random weights (``AutoModel.from_config``).
        tokenizer: True (default): ``AutoTokenizer.from_pretrained(name)``,
            or none when the model has no tokenizer; a name or path; a
            tokenizer; or None (texts come tokenized, as dict batches).
        image_processor: for a model without a tokenizer: True (default):
            ``AutoImageProcessor.from_pretrained(name)`` when it has one; a
            name, a processor, or None.
        max_length: truncate texts to this many tokens (None: the model's limit).
        **kwargs: passed to ``from_pretrained`` / ``from_config`` (e.g. ``revision``, ``torch_dtype``).

    Returns:
        A zero-argument callable for ``rank_models``' ``models``.
    """
    name = _check_name(name, "Hugging Face")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or a positive int, got {max_length!r}")

    def build() -> nn.Module:
        transformers = _require("transformers")
        auto_model, auto_config = _require("transformers", "AutoModel", "AutoConfig")
        if pretrained:
            model = auto_model.from_pretrained(name, **kwargs)
        else:
            model = auto_model.from_config(auto_config.from_pretrained(name), **kwargs)
        tok = _auto_processor(transformers, "AutoTokenizer", name, tokenizer)
        processor = None
        if tok is None:
            processor = _auto_processor(transformers, "AutoImageProcessor", name, image_processor)
        return hf_defaults(model, tok, processor, max_length)

    return ZooBuilder("hf", name, build, {"pretrained": pretrained, **kwargs})


def _auto_processor(transformers: Any, cls: str, name: str, given: Any) -> Any:
    """The tokenizer / image processor asked for; True: the model's own, or None when it has none."""
    if given is True:
        try:
            return _hf_processor(transformers, cls, name, name)
        except Exception as err:  # whatever the reason, the model has none that loads
            if isinstance(err, ImportError) and cls == "AutoImageProcessor":
                logger.warning("Hugging Face model %r: its image processor cannot load (%s)", name, err)
            logger.info("Hugging Face model %r: no %s (%s)", name, cls, err)
            return None
    return _hf_processor(transformers, cls, given, name)


# -- torchvision ---------------------------------------------------------------------------------------------

def _torchvision_blocks(model: nn.Module) -> Any:
    stages = _existing(model, ["layer1", "layer2", "layer3", "layer4"])
    if len(stages) == 4:  # ResNet, ResNeXt, Wide ResNet
        return stages
    for container in ("features", "encoder.layers"):  # VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet; ViT
        if _existing(model, [container]) and any(True for _ in model.get_submodule(container).children()):
            return container
    return None


def _torchvision_weights(tv: Any, name: str, weights: Any) -> Any:
    """The weights enum member for ``weights`` ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2")."""
    if weights is None or not isinstance(weights, str):
        return weights
    try:
        if "." in weights:
            return tv.models.get_weight(weights)
        enum = tv.models.get_model_weights(name)
        return enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError, AttributeError) as err:
        raise ValueError(f"torchvision model {name!r} has no weights {weights!r} ({err})") from err


def torchvision_defaults(model: nn.Module, weights: Any = None) -> nn.Module:
    """Declare a torchvision model's blocks and image preprocessing (see the module's docstring).

    Args:
        model: a torchvision classification model.
        weights: its weights (an enum member): their ``transforms()``
            prepare PIL images; None: :class:`ImageTransform` (224, ImageNet statistics).

    Returns:
        ``model``, with the attributes set.
    """
    blocks = _torchvision_blocks(model)
    if blocks is not None:
        setattr(model, BLOCKS_ATTR, blocks)
    transform = weights.transforms() if weights is not None and hasattr(weights, "transforms") else ImageTransform()
    setattr(model, PREPARE_ATTR, PrepareImages(transform, f"torchvision model {type(model).__name__}"))
    return model


def torchvision_model(name: str, *, weights: Any = "DEFAULT", **kwargs: Any) -> ZooBuilder:
    """A builder of ``torchvision.models.get_model(name, weights=weights, **kwargs)``, with its defaults declared.

    Args:
        name: a torchvision model name, e.g. "resnet50", "vit_b_16".
        weights: "DEFAULT" (the best weights torchvision has; read from
            torch hub's cache, or downloaded), another name of the model's
            weights ("IMAGENET1K_V1"), an enum member, or None (random weights).
        **kwargs: passed to ``get_model`` (e.g. ``num_classes`` with weights=None).

    Returns:
        A zero-argument callable for ``rank_models``' ``models``.
    """
    name = _check_name(name, "torchvision")

    def build() -> nn.Module:
        tv = _require("torchvision")
        resolved = _torchvision_weights(tv, name, weights)
        return torchvision_defaults(tv.models.get_model(name, weights=resolved, **kwargs), resolved)

    return ZooBuilder("torchvision", name, build, {"weights": weights, **kwargs})


register_adapter("timm", lambda name: timm_model(name)())
register_adapter("hf", lambda name: hf_model(name)())
register_adapter("torchvision", lambda name: torchvision_model(name)())
