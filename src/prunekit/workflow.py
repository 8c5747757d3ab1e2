"""Model + data + checkpoint set-up shared by the CLI, the demo and the bench."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoints import (
    checkpoint_normalization,
    load_state_dict_into,
    read_state_dict,
    save_model,
)
from .data import Dataset, Loader, load_dataset
from .errors import PrunekitError
from .masks import get_masks, make_permanent
from .models import create_model_for
from .training import TrainConfig, Trainer
from .training import evaluate as evaluate_model

EVAL_BATCH = 1000
DEVICES = ("cpu", "cuda")


@dataclass
class Setup:
    """A model ready for a dataset, with the input normalisation its weights expect."""

    model_name: str
    model: nn.Module
    dataset: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint_metadata: dict[str, Any]
    model_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the zoo model
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # of the model and every loader

    def loader(self, split: str, batch_size: int, **kwargs) -> Loader:
        return Loader.for_dataset(self.dataset, split, batch_size, mean=self.mean, std=self.std,
                                  **{"device": self.device, **kwargs})

    def fresh_model(self, seed: int) -> nn.Module:
        """The zoo model as `seed` initialises it, on the set-up's device."""
        return _new_model(self.model_name, self.dataset, self.model_options, seed).to(self.device)


def require_device(device: str) -> torch.device:
    """The device, or a PrunekitError before any work when this machine cannot run on it."""
    if device not in DEVICES:
        raise PrunekitError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise PrunekitError(f"--device cuda asked for, but torch.cuda.is_available() is false ({why}, torch "
                            f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of "
                            "torch, or use --device cpu")
    return torch.device(device)


def setup(model_name: str, dataset_name: str, data_dir=None, checkpoint=None, *, seed: int = 0,
          train_size: int | None = None, test_size: int | None = None,
          model_options: dict[str, Any] | None = None, device: str = "cpu") -> Setup:
    """Load the data (first: a wrong data directory fails fast), then build or load the model on `device`."""
    target = require_device(device)
    dataset = load_dataset(dataset_name, data_dir, train_size=train_size, test_size=test_size)
    options = dict(model_options or {})
    model = _new_model(model_name, dataset, options, seed)
    metadata: dict[str, Any] = {}
    if checkpoint:
        state, metadata = read_state_dict(checkpoint)
        load_state_dict_into(model, state)
    mean, std = checkpoint_normalization(metadata) or (dataset.mean, dataset.std)
    return Setup(model_name, model.to(target), dataset, tuple(mean), tuple(std), metadata, options, target)


def _new_model(model_name: str, dataset: Dataset, options: dict[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model_for(model_name, dataset.num_classes, dataset.input_shape, **options)


def train(setup: Setup, config: TrainConfig, *, batch_size: int, seed: int, log_path=None, checkpoint_path=None,
          callbacks=(), progress: bool | None = None) -> list[dict]:
    """Train on the training split in batches of `batch_size`, shuffled and seeded by `seed`; evaluated on the
    test split after every epoch."""
    train_loader = setup.loader("train", batch_size, shuffle=True, seed=seed)
    trainer = Trainer(setup.model, train_loader, config, seed=seed, eval_loader=setup.loader("test", EVAL_BATCH),
                      callbacks=callbacks, log_path=log_path, checkpoint_path=checkpoint_path, progress=progress,
                      device=setup.device)
    return trainer.fit()


def evaluate(setup: Setup) -> dict:
    return evaluate_model(setup.model, setup.loader("test", EVAL_BATCH), setup.device)


def calibration_loader(setup: Setup, batch_size: int, seed: int, augment: bool = False) -> Loader:
    """Training data for methods that need data: shuffled by the seed; augmented only when asked (for training)."""
    return setup.loader("train", batch_size, shuffle=True, augment=augment, seed=seed)


def save_weights(setup: Setup, path, metadata: dict[str, Any]) -> None:
    """Plain weights (masks folded in) that load anywhere, with how they were made."""
    model = setup.model
    if get_masks(model):
        import copy

        model = make_permanent(copy.deepcopy(model))
    save_model(model, path, {"model": setup.model_name, "dataset": setup.dataset.name,
                             "normalization": [list(setup.mean), list(setup.std)], **metadata})
