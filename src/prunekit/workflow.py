"""Model + data + checkpoint set-up shared by the CLI, the demo and the bench."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import (
    checkpoint_normalization,
    load_state_dict_into,
    read_state_dict,
    save_model,
)
from .data import Dataset, Loader, TextDataset, TokenLoader, load_dataset
from .data.catalog import get_spec
from .data.text import TOKENIZER_FILE, load_tokenizer
from .errors import PrunekitError
from .export.compact_files import is_compact_file, load_compact
from .masks import folded_copy, get_masks
from .models import MODELS, create_model_for, list_models
from .models.hf import PACKAGED, check_model_folder, is_model_folder, load_model_folder, save_model_folder
from .objectives import Loss
from .training import TrainConfig, Trainer
from .training import evaluate as evaluate_model

EVAL_BATCH = 1000
DEVICES = ("cpu", "cuda")


@dataclass
class Setup:
    """A model ready for a dataset, with the input normalisation its weights expect.

    A Hugging Face model folder may come without a dataset (then `dataset` is None and mean/std empty), or with
    a text dataset (mean/std empty; batches are tokenised with the folder's tokenizer.json).
    """

    model_name: str
    model: nn.Module
    dataset: Dataset | TextDataset | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint_metadata: dict[str, Any]
    model_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the zoo model
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # of the model and every loader
    folder: Path | None = None  # the Hugging Face model folder the model came from; None for a zoo model

    def loader(self, split: str, batch_size: int, **kwargs) -> Loader | TokenLoader:
        if isinstance(self.dataset, TextDataset):
            if kwargs.pop("augment", False):
                raise PrunekitError(f"{self.dataset.name} is text, which has no augmentation; drop augment")
            return TokenLoader.for_model_folder(getattr(self.dataset, split).texts, self.folder, batch_size,
                                                **{"device": self.device, **kwargs})
        return Loader.for_dataset(self.dataset, split, batch_size, mean=self.mean, std=self.std,
                                  **{"device": self.device, **kwargs})

    def macs_example(self) -> tuple[int, ...] | dict[str, torch.Tensor]:
        """What `metrics.count_macs` counts one example's MACs on: an image's input shape (fed as zeros), or the
        first test text tokenised, a batch of one (MACs are then per that text's tokens)."""
        if isinstance(self.dataset, TextDataset):
            return next(iter(self.loader("test", 1)))
        return self.dataset.input_shape

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


def setup(model_name: str, dataset_name: str | None, data_dir=None, checkpoint=None, *, seed: int = 0,
          train_size: int | None = None, test_size: int | None = None,
          model_options: dict[str, Any] | None = None, device: str = "cpu") -> Setup:
    """Load the data (first: a wrong data directory fails fast), then build or load the model on `device`.

    `model_name` is a zoo model or a Hugging Face model folder (config.json + safetensors); only the folder
    may come without a dataset, since a zoo model's input shape and classes are the data's.
    """
    target = require_device(device)
    folder = _checked_folder(model_name, dataset_name, checkpoint, model_options)
    _check_text_model(dataset_name, folder)
    dataset = load_dataset(dataset_name, data_dir, train_size=train_size, test_size=test_size) if dataset_name else None
    if folder is not None:
        return Setup(model_name, load_model_folder(folder).to(target), dataset, *_normalization(dataset), {},
                     device=target, folder=folder)
    options = dict(model_options or {})
    model = _new_model(model_name, dataset, options, seed)
    metadata: dict[str, Any] = {}
    if checkpoint:
        state, metadata = read_state_dict(checkpoint)
        if is_compact_file(metadata):  # `prunekit export --format compact`: narrower layers, sizes recorded
            load_compact(checkpoint, model)
        else:
            load_state_dict_into(model, state)
    mean, std = checkpoint_normalization(metadata) or (dataset.mean, dataset.std)
    return Setup(model_name, model.to(target), dataset, tuple(mean), tuple(std), metadata, options, target)


def _checked_folder(model_name: str, dataset_name: str | None, checkpoint, model_options) -> Path | None:
    """The Hugging Face folder `model_name` names, checked before any work; None for a zoo model."""
    if not is_model_folder(model_name):
        if model_name not in MODELS:
            raise PrunekitError(f"unknown model {model_name!r}: neither a zoo model ({', '.join(list_models())}), a "
                                f"packaged pretrained one ({', '.join(PACKAGED)}) nor a Hugging Face model folder "
                                "(config.json + model.safetensors)")
        if dataset_name is None:
            raise PrunekitError(f"zoo model {model_name!r} needs --dataset: its input shape and classes are the data's")
        return None
    if checkpoint or model_options:
        raise PrunekitError(f"{model_name} is a Hugging Face folder, which holds its own weights and config; drop "
                            "--checkpoint and model options (they are for zoo models)")
    return check_model_folder(model_name)


def _check_text_model(dataset_name: str | None, folder: Path | None) -> None:
    """Text becomes tokens only with a Hugging Face model's tokenizer: refused before any work otherwise."""
    if dataset_name is None or not get_spec(dataset_name).text:
        return
    if folder is None:
        raise PrunekitError(f"{dataset_name} is text: pass --model a Hugging Face model folder whose "
                            f"{TOKENIZER_FILE} turns it into tokens (zoo models take images)")
    load_tokenizer(folder)  # present, readable, and tokenizers installed


def _normalization(dataset: Dataset | TextDataset | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Only images are normalised."""
    return (tuple(dataset.mean), tuple(dataset.std)) if isinstance(dataset, Dataset) else ((), ())


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


def evaluate(setup: Setup, objective: Loss = None) -> dict:
    """The test split's metrics under `objective` (cross-entropy by default). For loss='distill', pass the same
    Objective that pruned the model (made from the dense model before pruning): it holds the dense reference."""
    return evaluate_model(setup.model, setup.loader("test", EVAL_BATCH), setup.device, objective)


def calibration_loader(setup: Setup, batch_size: int, seed: int, augment: bool = False) -> Loader | TokenLoader:
    """Training data for methods that need data: shuffled by the seed; augmented only when asked (for training)."""
    return setup.loader("train", batch_size, shuffle=True, augment=augment, seed=seed)


def save_weights(setup: Setup, path, metadata: dict[str, Any]) -> None:
    """Plain weights (masks folded in) that load anywhere, with how they were made.

    A Hugging Face model is written as a model folder (save_pretrained, safetensors) unless `path` names a
    .safetensors file.
    """
    model = folded_copy(setup.model) if get_masks(setup.model) else setup.model
    about = {"model": setup.model_name, **metadata}
    if setup.dataset is not None:
        about.update(dataset=setup.dataset.name, normalization=[list(setup.mean), list(setup.std)])
    if setup.folder is not None and Path(path).suffix != ".safetensors":
        save_model_folder(model, path, about, source=setup.folder)
    else:
        save_model(model, path, about)
