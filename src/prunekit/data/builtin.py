"""Data sets that need no files: scikit-learn's digits and a generated one for tests."""
from __future__ import annotations

import numpy as np
import torch

from .splits import TensorSplit

DIGITS_TEST_SIZE = 360  # leaves 1437 of the 1797 images for training
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16


def read_digits() -> tuple[TensorSplit, TensorSplit]:
    # Imported here: scikit-learn takes a noticeable time to import and only this data set needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    everything = TensorSplit(
        torch.from_numpy(pixels[:, None]), torch.from_numpy(bunch.target.astype(np.int64))
    )
    return everything.split(holdout=DIGITS_TEST_SIZE, seed=DIGITS_SPLIT_SEED)


def synthetic_splits(
    *,
    num_classes: int = 10,
    train_size: int = 2000,
    test_size: int = 500,
    image_shape: tuple[int, int, int] = (1, 8, 8),
    noise: float = 0.5,  # a small MLP reaches ~98%: learnable, yet pruning damage stays visible
    seed: int = 0,
) -> tuple[TensorSplit, TensorSplit]:
    """Each class is a fixed random template; examples are the template plus Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0.0, 1.0, (num_classes, *image_shape))

    def draw(count: int) -> TensorSplit:
        labels = rng.integers(0, num_classes, count)
        pixels = templates[labels] + rng.normal(0.0, noise, (count, *image_shape))
        images = np.rint(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
        return TensorSplit(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))

    return draw(train_size), draw(test_size)
