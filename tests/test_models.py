"""Every registered model: output shape for its tutorial input and for other sizes and channels."""

from __future__ import annotations

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models import BUILDERS, build_model, freeze_backbone, load_pretrained, train_mode
from toolkit.names import SEED_MODELS

DEFAULT_INPUT = {"mlp": (1, 28), "mnist_cnn": (1, 28), "bn_cnn": (1, 28), "small_convnet": (1, 28),
                 "cifar_cnn": (3, 32), "lenet": (3, 32)}
# The tutorials' own flatten sizes: the first Linear of each head.
TUTORIAL_FLATTEN = {"mlp": 784, "mnist_cnn": 3136, "bn_cnn": 1152, "small_convnet": 6272, "cifar_cnn": 2048, "lenet": 400}


def test_registry_is_the_seed_list():
    assert set(BUILDERS) == set(SEED_MODELS) == set(DEFAULT_INPUT)  # names.py names each one once


@pytest.mark.parametrize("name", sorted(DEFAULT_INPUT))
def test_tutorial_shapes(name):
    channels, size = DEFAULT_INPUT[name]
    model = build_model(name, 10, channels, size).eval()
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert first_linear.in_features == TUTORIAL_FLATTEN[name]
    assert model(torch.randn(4, channels, size, size)).shape == (4, 10)


@pytest.mark.parametrize("name", sorted(DEFAULT_INPUT))
@pytest.mark.parametrize("channels,size,classes", [(3, 40, 7), (1, 16, 3)])
def test_other_sizes(name, channels, size, classes):
    model = build_model(name, classes, channels, size).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


@pytest.mark.parametrize("name", sorted(DEFAULT_INPUT))
def test_channels_last_batches(name):
    """The training layout gives the logits of the contiguous model (flatten, not view: a view of a
    channels_last tensor would either fail or silently reorder the features)."""
    channels, size = DEFAULT_INPUT[name]
    torch.manual_seed(0)
    model = build_model(name, 10, channels, size).eval()
    images = torch.randn(2, channels, size, size)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        got = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_too_small_input_is_a_user_error():
    with pytest.raises(ToolkitError, match="lenet.*cannot take 1x8x8"):
        build_model("lenet", 10, 1, 8)


def test_unknown_model_suggests():
    with pytest.raises(ToolkitError, match="did you mean 'resnet18'"):
        build_model("resnet81", 10, 3, 32)


def test_bad_model_arg():
    with pytest.raises(ToolkitError, match="'dropuot' is not an argument of mnist_cnn.*did you mean 'dropout'"):
        build_model("mnist_cnn", 10, 1, 28, {"dropuot": 0.3})
    model = build_model("mnist_cnn", 10, 1, 28, {"dropout": 0.4})
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.4 for m in model.modules())


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_model_new_head_and_stem(channels):
    model = build_model("resnet18", 5, channels, 64).eval()
    assert model.fc.out_features == 5 and model.conv1.in_channels == channels
    assert model(torch.randn(2, channels, 64, 64)).shape == (2, 5)


def test_transfer_learning_freeze_and_frozen_batchnorm(tmp_path):
    # A "pretrained" ResNet-18 saved locally with a 1000-class head, as users bring one.
    source = build_model("resnet18", 1000, 3, 64)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", 10, 3, 64)
    summary = load_pretrained(model, tmp_path / "resnet18.pth")
    assert "2 left as initialised" in summary  # fc.weight, fc.bias
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    freeze_backbone(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    train_mode(model)
    assert model.training and model.fc.training
    assert not model.bn1.training  # frozen BatchNorm keeps its running statistics
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, before)
