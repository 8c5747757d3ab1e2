"""Model + data + checkpoint set-up shared by the CLI, the demo and the bench."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoints import checkpoint_normalization, load_state_dict_into, read_state_dict, save_model
from .data import Dataset, Loader, load_dataset
from .masks import get_masks, make_permanent
from .models import create_model_for
from .training import TrainConfig, Trainer, evaluate as evaluate_model

EVAL_BATCH = 1000


@dataclass
class Setup:
    """A model ready for a dataset, with the input normalisation its weights expect."""

    model_name: str
    model: nn.Module
    dataset: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint_metadata: dict[str, Any]

    def loader(self, split: str, batch_size: int, **kwargs) -> Loader:
        return Loader.for_dataset(self.dataset, split, batch_size, mean=self.mean, std=self.std, **kwargs)


def setup(model_name: str, dataset_name: str, data_dir=None, checkpoint=None, *, seed: int = 0,
          train_size: int | None = None, test_size: int | None = None) -> Setup:
    """Load the data (first: a wrong data directory fails fast), then build or load the model."""
    dataset = load_dataset(dataset_name, data_dir, train_size=train_size, test_size=test_size)
    torch.manual_seed(seed)
    model = create_model_for(model_name, dataset.num_classes, dataset.input_shape)
    metadata: dict[str, Any] = {}
    if checkpoint:
        state, metadata = read_state_dict(checkpoint)
        load_state_dict_into(model, state)
    mean, std = checkpoint_normalization(metadata) or (dataset.mean, dataset.std)
    return Setup(model_name, model, dataset, tuple(mean), tuple(std), metadata)


def train(setup: Setup, config: TrainConfig, *, log_path=None, checkpoint_path=None, callbacks=(),
          progress: bool | None = None) -> list[dict]:
    train_loader = setup.loader("train", config.batch_size, shuffle=True, seed=config.seed)
    trainer = Trainer(setup.model, train_loader, config, eval_loader=setup.loader("test", EVAL_BATCH),
                      callbacks=callbacks, log_path=log_path, checkpoint_path=checkpoint_path, progress=progress)
    return trainer.fit()


def evaluate(setup: Setup) -> dict:
    return evaluate_model(setup.model, setup.loader("test", EVAL_BATCH))


def calibration_loader(setup: Setup, batch_size: int, seed: int) -> Loader:
    """Training data for methods that need data: shuffled by the seed, without augmentation."""
    return setup.loader("train", batch_size, shuffle=True, augment=False, seed=seed)


def save_weights(setup: Setup, path, metadata: dict[str, Any]) -> None:
    """Plain weights (masks folded in) that load anywhere, with how they were made."""
    model = setup.model
    if get_masks(model):
        import copy

        model = make_permanent(copy.deepcopy(model))
    save_model(model, path, {"model": setup.model_name, "dataset": setup.dataset.name,
                             "normalization": [list(setup.mean), list(setup.std)], **metadata})
