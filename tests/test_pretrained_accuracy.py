"""The shared CHITA-paper checkpoints load through the public path and keep their accuracy."""
from prunekit import workflow
from prunekit.errors import PrunekitError

import pytest


def test_mlpnet_checkpoint_gives_9397_on_mnist(data_dir, checkpoints_dir):
    setup = workflow.setup("mlpnet", "mnist", data_dir, checkpoints_dir / "mnist_25_epoch_93.97.ckpt")
    assert setup.mean == (0.1307,) and setup.std == (0.3081,)
    metrics = workflow.evaluate(setup)
    assert metrics["examples"] == 10000
    assert round(metrics["accuracy"] * 100, 2) == 93.97


def test_resnet20_checkpoint_needs_its_own_normalisation(data_dir, checkpoints_dir):
    # 1000 random test images keep this fast; the full-set 91.43% is in benchmarks/RESULTS.md.
    setup = workflow.setup("resnet20", "cifar10", data_dir, checkpoints_dir / "resnet20_cifar10.pth.tar",
                           test_size=1000)
    assert setup.mean == (0.5, 0.5, 0.5)
    accuracy = workflow.evaluate(setup)["accuracy"]
    assert accuracy > 0.89
    setup.mean, setup.std = setup.dataset.mean, setup.dataset.std
    assert workflow.evaluate(setup)["accuracy"] < accuracy - 0.1


def test_checkpoint_for_another_model_names_the_mismatch(data_dir, checkpoints_dir):
    with pytest.raises(PrunekitError, match="(?s)fc1.*--model mlpnet"):
        workflow.setup("lenet300", "mnist", data_dir, checkpoints_dir / "mnist_25_epoch_93.97.ckpt")
