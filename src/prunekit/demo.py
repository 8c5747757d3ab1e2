"""`make demo`: train a small network, prune it with every registered method, print one table.

Runs offline on scikit-learn's digits; adds MNIST when the data directory holds it.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch

from . import workflow
from .api import prune
from .errors import PrunekitError
from .methods import all_methods
from .tables import render_table
from .training import TrainConfig


@dataclass(frozen=True)
class DemoJob:
    dataset: str
    model: str
    training: TrainConfig


JOBS = (
    DemoJob("digits", "lenet300", TrainConfig(epochs=30, batch_size=64, lr=0.05, weight_decay=1e-4)),
    DemoJob("mnist", "mlpnet", TrainConfig(epochs=3, batch_size=128, lr=0.05, weight_decay=1e-4)),
)
CALIBRATION_BATCH = 128


def run(sparsities: list[float], data_dir: str | None = None) -> list[list]:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows: list[list] = []
    for job in JOBS:
        try:
            setup = workflow.setup(job.model, job.dataset, data_dir if job.dataset != "digits" else None,
                                   seed=job.training.seed)
        except PrunekitError as exc:
            print(f"skipping {job.dataset}: {exc}")
            continue
        rows += _prune_everything(job, setup, sparsities)
    print(render_table(["dataset", "model", "method", "sparsity", "accuracy", "seconds"], rows))
    return rows


def _prune_everything(job: DemoJob, setup: workflow.Setup, sparsities: list[float]) -> list[list]:
    started = time.perf_counter()
    print(f"training {job.model} on {job.dataset} ({job.training.epochs} epochs) ...")
    workflow.train(setup, job.training, progress=False)
    dense = workflow.evaluate(setup)["accuracy"]
    rows = [[job.dataset, job.model, "dense", "0.0000", f"{dense:.4f}", f"{time.perf_counter() - started:.2f}"]]
    calibration = workflow.calibration_loader(setup, CALIBRATION_BATCH, seed=0)
    for method in all_methods():
        for sparsity in sparsities:
            pruned = copy.deepcopy(setup)
            result = prune(pruned.model, method.name, sparsity, calibration if method.needs_data else None)
            accuracy = workflow.evaluate(pruned)["accuracy"]
            rows.append([job.dataset, job.model, method.name, f"{result.sparsity:.4f}", f"{accuracy:.4f}",
                         f"{result.cost.seconds:.2f}"])
    return rows
