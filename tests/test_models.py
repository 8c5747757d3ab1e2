"""Model zoo: every model builds and runs, and the published architectures have their exact sizes and names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import MODELS, create_model, list_models


def parameter_count(model: nn.Module) -> int:
    """Number of trainable values in the model."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_on_its_input_shape(name: str) -> None:
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, *model.input_shape))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_list_models_names_the_registry() -> None:
    assert list_models() == sorted(MODELS)
    assert {"mlpnet", "lenet300", "lenet5", "resnet20", "resnet32", "resnet56",
            "vgg16_bn", "resnet18", "mobilenet_v1"} <= set(list_models())


def test_mlpnet_matches_the_woodfisher_architecture() -> None:
    model = create_model("mlpnet")
    assert model.input_shape == (1, 28, 28)
    assert parameter_count(model) == 32_360
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [
        ("fc1.weight", (40, 784)), ("fc2.weight", (20, 40)), ("fc3.weight", (10, 20))]


def test_lenet300_has_biases() -> None:
    model = create_model("lenet300")
    assert parameter_count(model) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_resnet20_projection_has_the_shared_checkpoint_size_and_names() -> None:
    model = create_model("resnet20")
    weights = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert parameter_count(model) == 272_474
    assert weights == 270_896
    downsample = model.get_submodule("layer2.0.downsample.0")
    assert isinstance(downsample, nn.Conv2d) and downsample.stride == (2, 2) and downsample.bias is None
    assert isinstance(model.get_submodule("layer3.0.downsample.1"), nn.BatchNorm2d)
    assert (model.fc.in_features, model.fc.out_features) == (64, 10) and model.fc.bias is not None
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet20_identity_shortcut_has_no_projection_parameters() -> None:
    model = create_model("resnet20", shortcut="identity")
    assert not any("downsample" in name for name, _ in model.named_parameters())
    assert parameter_count(model) == 272_474 - (16 * 32 + 2 * 32) - (32 * 64 + 2 * 64)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
def test_cifar_resnet_depth_sets_blocks_per_stage(name: str, blocks: int) -> None:
    model = create_model(name)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [blocks] * 3


def test_resnet18_has_four_stages_of_two_blocks() -> None:
    model = create_model("resnet18")
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] == [64, 128, 256, 512]
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert model.conv1.kernel_size == (3, 3)


def test_vgg16_bn_has_thirteen_conv_bn_layers() -> None:
    model = create_model("vgg16_bn")
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert model.classifier.in_features == 512


def test_mobilenet_depthwise_convs_have_one_group_per_channel() -> None:
    model = create_model("mobilenet_v1")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert model.fc.in_features == 1024


@pytest.mark.parametrize(("in_channels", "shape"), [(1, (1, 28, 28)), (3, (3, 32, 32))])
def test_lenet5_sizes_its_classifier_for_mnist_and_cifar(in_channels: int, shape: tuple[int, ...]) -> None:
    model = create_model("lenet5", in_channels=in_channels)
    assert model.input_shape == shape
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_in_channels_changes_input_shape() -> None:
    model = create_model("resnet20", in_channels=1)
    assert model.input_shape == (1, 32, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(PrunekitError, match="unknown model 'resnet99'.*resnet20"):
        create_model("resnet99")


def test_unknown_option_and_bad_counts_are_refused() -> None:
    with pytest.raises(PrunekitError, match="takes no option shortcut"):
        create_model("mlpnet", shortcut="identity")
    with pytest.raises(PrunekitError, match="unknown shortcut"):
        create_model("resnet20", shortcut="B")
    with pytest.raises(PrunekitError, match="num_classes must be a positive integer"):
        create_model("resnet20", num_classes=0)
