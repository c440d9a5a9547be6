"""The seed models of the five tutorials plus any torchvision classifier, built for the data's
channels, image size and class count. Knows nothing about distribution or checkpoints."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from toolkit.errors import ToolkitError, did_you_mean
from toolkit.names import SEED_MODELS

ModelBuilder = Callable[..., nn.Module]
BUILDERS: dict[str, ModelBuilder] = {}  # one per name of names.SEED_MODELS


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    if name not in SEED_MODELS:  # config.py validates against names.SEED_MODELS, without torch
        raise ValueError(f"seed model {name!r}: add it to toolkit/names.py SEED_MODELS too")

    def add(builder: ModelBuilder) -> ModelBuilder:
        BUILDERS[name] = builder
        return builder

    return add


class ImageSizeError(ToolkitError):
    """A network that cannot take the configured image size; `detail` names the failing layer."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def probe(net: nn.Module, channels: int, image_size: int) -> tuple[torch.Tensor | None, str, Exception | None]:
    """One zero image through `net` in eval mode: (output or None, the last layer entered, the error)."""
    entered = [""]
    hooks = [m.register_forward_pre_hook(lambda _m, _i, name=f"{n} ({type(m).__name__})": entered.__setitem__(0, name))
             for n, m in net.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():  # eval: a probe must not move BatchNorm running statistics
            return net.eval()(torch.zeros(1, channels, image_size, image_size)), entered[0], None
    except (RuntimeError, TypeError, ValueError) as exc:
        return None, entered[0], exc
    finally:
        for hook in hooks:
            hook.remove()
        net.train()


def _flat_size(features: nn.Module, channels: int, image_size: int, model: str) -> int:
    """Features' output size for one C x S x S image (follows any input size)."""
    out, layer, exc = probe(features, channels, image_size)
    if out is None:
        detail = f"layer features.{layer}: {exc}"
        raise ImageSizeError(f"model {model!r} cannot take {channels}x{image_size}x{image_size} images: {detail}", detail)
    return out.flatten(1).shape[1]


class Classifier(nn.Module):
    """features -> flatten -> head; flatten (not view) so channels_last batches work."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(images), 1))


@register("mlp")
def mlp(channels: int, image_size: int, num_classes: int, hidden: int = 512, dropout: float = 0.0) -> nn.Module:
    """Tutorial E: Flatten; Linear(784,512) ReLU; Linear(512,512) ReLU; Linear(512,10)."""
    return Classifier(nn.Identity(), nn.Sequential(
        nn.Linear(channels * image_size * image_size, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes)))


@register("mnist_cnn")
def mnist_cnn(channels: int, image_size: int, num_classes: int, dropout: float = 0.25, head_dropout: float = 0.5) -> nn.Module:
    """Tutorial C's SimpleCNN: two double-conv blocks, then Linear(3136,128) for 28x28."""
    features = nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(dropout),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(dropout))
    flat = _flat_size(features, channels, image_size, "mnist_cnn")
    return Classifier(features, nn.Sequential(
        nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(head_dropout), nn.Linear(128, num_classes)))


@register("bn_cnn")
def bn_cnn(channels: int, image_size: int, num_classes: int, dropout: float = 0.4) -> nn.Module:
    """Tutorial E's ConvNeuralNetwork: 3 x [conv, BN, ReLU, pool]; Linear(1152,512) for 28x28."""
    layers: list[nn.Module] = []
    for cin, cout in ((channels, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
    features = nn.Sequential(*layers)
    flat = _flat_size(features, channels, image_size, "bn_cnn")
    return Classifier(features, nn.Sequential(
        nn.Linear(flat, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(512, num_classes)))


@register("cifar_cnn")
def cifar_cnn(channels: int, image_size: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Tutorial A's SimpleCNN: 3 x [conv, ReLU, pool]; Linear(2048,256) for 32x32."""
    layers: list[nn.Module] = []
    for cin, cout in ((channels, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    features = nn.Sequential(*layers)
    flat = _flat_size(features, channels, image_size, "cifar_cnn")
    return Classifier(features, nn.Sequential(
        nn.Linear(flat, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, num_classes)))


@register("lenet")
def lenet(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Tutorial D's LeNet: conv5-pool-conv5-pool; Linear(400,120) for 32x32."""
    features = nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
    flat = _flat_size(features, channels, image_size, "lenet")
    return Classifier(features, nn.Sequential(
        nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)))


@register("small_convnet")
def small_convnet(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Tutorial B's MNIST_ConvNet: two convs without pooling; Linear(6272,32) for 28x28."""
    features = nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
    flat = _flat_size(features, channels, image_size, "small_convnet")
    return Classifier(features, nn.Sequential(nn.Linear(flat, 32), nn.ReLU(), nn.Linear(32, num_classes)))


# ---------------------------------------------------------------- torchvision


def _last(model: nn.Module, kind: type[nn.Module]) -> tuple[str, nn.Module] | None:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    return found[-1] if found else None


def _first(model: nn.Module, kind: type[nn.Module]) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, kind)), None)


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def head_name(model: nn.Module) -> str:
    """Dotted name of the classification head (the last Linear)."""
    found = _last(model, nn.Linear)
    if found is None:
        raise ToolkitError("model has no Linear layer to use as classification head")
    return found[0]


def _torchvision(name: str, channels: int, num_classes: int, weights: str | None, **args) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        choices = list(SEED_MODELS) + available
        raise ToolkitError(f"model.name: {name!r} is neither a seed model ({', '.join(SEED_MODELS)}) "
                           f"nor a torchvision classification model{did_you_mean(name, choices)}")
    try:
        model = torchvision.models.get_model(name, weights=weights, **args)
    except Exception as exc:  # torchvision raises plain errors for bad weight names and failed downloads
        raise ToolkitError(f"model.torchvision_weights: cannot load {weights!r} for {name}: {exc}."
                           f"{_offline_hint(name, weights)}") from None
    head_key, head = _last(model, nn.Linear)
    _replace(model, head_key, nn.Linear(head.in_features, num_classes))
    stem = _first(model, nn.Conv2d)
    if stem is not None and stem[1].in_channels != channels:
        key, conv = stem
        new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None)
        with torch.no_grad():  # keep pretrained filters: grayscale sums the RGB filters
            new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight) * (3 / channels))
        _replace(model, key, new)
    return model


def _offline_hint(name: str, weights: str | None) -> str:
    """Where the weights come from, and the offline way: a local file given as model.pretrained_weights."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name)[weights or "DEFAULT"].url
    except (KeyError, ValueError, AttributeError):
        return ""
    return (f" Without internet here, fetch {url} where there is, copy it over and use "
            f"--set model.torchvision_weights=null --set model.pretrained_weights=PATH/{url.rsplit('/', 1)[-1]}")


# ---------------------------------------------------------------- entry points


def check_model(name: str, args: dict, channels: int, image_size: int) -> None:
    """The configured model builds and runs for this input, checked without weights before the run directory
    is taken or the data read; a ToolkitError says what is wrong (a size too small: the layer, a size that works)."""
    if (failure := _size_failure(name, args, channels, image_size)) is None:
        return
    net = None if name in BUILDERS else build_model(name, 2, channels, image_size, args)  # one size fits all
    works = next((size for size in range(image_size + 1, 513) if (_size_failure(name, args, channels, size) if net is None
                                                                  else probe(net, channels, size)[2]) is None), None)
    hint = f"data.image_size: {works} (the smallest that works) or larger" if works else "a larger data.image_size"
    raise ToolkitError(f"model.name: {name!r} cannot take {channels}x{image_size}x{image_size} images: {failure}. "
                       f"Use {hint}, or another model.") from None


def _size_failure(name: str, args: dict, channels: int, image_size: int) -> str | None:
    try:
        net = build_model(name, 2, channels, image_size, args)
    except ImageSizeError as exc:
        return exc.detail
    _, layer, exc = probe(net, channels, image_size)
    return None if exc is None else f"layer {layer}: {exc}"


def parameter_counts(model: nn.Module) -> str:
    """'1,234,567 parameters, 5,130 trainable': a frozen backbone shows here."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total:,} parameters, {trainable:,} trainable"


def build_model(name: str, num_classes: int, channels: int, image_size: int,
                args: dict | None = None, torchvision_weights: str | None = None) -> nn.Module:
    """Config -> model with a head of num_classes for channels x image_size x image_size input."""
    args = dict(args or {})
    builder = BUILDERS.get(name)
    if builder is None:
        return _torchvision(name, channels, num_classes, torchvision_weights, **args)
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("channels", "image_size", "num_classes")]
    unknown = [k for k in args if k not in allowed]
    if unknown:
        raise ToolkitError(f"model.args: {unknown[0]!r} is not an argument of {name}{did_you_mean(unknown[0], allowed)}; "
                           f"allowed: {', '.join(allowed) or 'none'}")
    return builder(channels=channels, image_size=image_size, num_classes=num_classes, **args)


def load_pretrained(model: nn.Module, path: str | Path) -> str:
    """Load a local state_dict, skipping a head whose shape differs. Returns a one-line summary."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ToolkitError(f"model.pretrained_weights: cannot read {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ToolkitError(f"model.pretrained_weights: {path} shares no tensor with {type(model).__name__} "
                           f"(first keys: {', '.join(list(state)[:3])})")
    head = head_name(model) + "."
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {list(state[k].shape)} (model {list(own[k].shape)})" for k in state
                if k in own and own[k].shape != state[k].shape and not k.startswith(head)]
    if missing or unexpected or reshaped:
        listed = lambda keys: ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")  # noqa: E731
        parts = [f"{what} {listed(keys)}" for what, keys in (("missing keys:", missing), ("unexpected keys:", unexpected),
                                                               ("other shapes:", reshaped)) if keys]
        raise ToolkitError(f"model.pretrained_weights: {path} does not match the model {type(model).__name__} (only "
                           f"the head, {head[:-1]}, may differ): {'; '.join(parts)}. Use weights of this model.name.")
    model.load_state_dict(usable, strict=False)
    skipped = len(own) - len(usable)
    return f"loaded {len(usable)} tensors from {path}" + (f", {skipped} left as initialised (head)" if skipped else "")


def freeze_backbone(model: nn.Module) -> None:
    """Only the head trains."""
    head = head_name(model)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(head + ".")


def train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorm layers whose parameters are frozen stay in eval mode,
    so their running statistics do not drift while only the head trains."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
