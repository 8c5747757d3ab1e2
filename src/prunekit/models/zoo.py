"""The model registry: names used on the command line and in checkpoints, mapped to model factories."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.lenet import LeNet5
from prunekit.models.mlp import MLP
from prunekit.models.mobilenet import MobileNetV1
from prunekit.models.resnet import cifar_resnet, resnet18_cifar
from prunekit.models.vgg import VGG16BN

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlpnet": partial(MLP, hidden=(40, 20), bias=False),
    "lenet300": partial(MLP, hidden=(300, 100), bias=True),
    "lenet5": LeNet5,
    "resnet20": partial(cifar_resnet, 20),
    "resnet32": partial(cifar_resnet, 32),
    "resnet56": partial(cifar_resnet, 56),
    "resnet18": resnet18_cifar,
    "vgg16_bn": VGG16BN,
    "mobilenet_v1": MobileNetV1,
}


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int = 10, in_channels: int | None = None, **options: Any) -> nn.Module:
    """Build a zoo model; in_channels=None keeps the model's default; options go to its factory (e.g. shortcut)."""
    factory = _factory(name)
    _require_positive("num_classes", num_classes)
    if in_channels is not None:
        _require_positive("in_channels", in_channels)
        options["in_channels"] = in_channels
    _require_known_options(name, factory, options)
    return factory(num_classes=num_classes, **options)


def _factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered under `name`."""
    if name not in MODELS:
        raise PrunekitError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return MODELS[name]


def _require_positive(what: str, value: int) -> None:
    """Refuse a count that is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunekitError(f"{what} must be a positive integer, got {value!r}")


def _require_known_options(name: str, factory: Callable[..., nn.Module], options: dict[str, Any]) -> None:
    """Refuse options the model's factory does not take, listing the ones it does."""
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PrunekitError(
            f"model {name!r} takes no option {', '.join(unknown)}; its options are: {', '.join(accepted) or 'none'}"
        )


def create_model_for(name: str, num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
    """Build a zoo model for inputs of `input_shape` (C, H, W), sizing MLP/LeNet inputs to match."""
    channels, size = input_shape[0], input_shape[-1]
    if "input_size" in inspect.signature(_factory(name)).parameters:
        options.setdefault("input_size", size)
    model = create_model(name, num_classes, channels, **options)
    if tuple(model.input_shape) != tuple(input_shape):
        raise PrunekitError(f"model {name!r} takes inputs of shape {tuple(model.input_shape)}, not "
                            f"{tuple(input_shape)}; pick a model made for this dataset")
    return model
