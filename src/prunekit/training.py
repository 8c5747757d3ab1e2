"""One small training loop for dense and masked models: closed to edits, open to callbacks.

Pruning methods never fork the loop; they hook into it through `Callback`
(e.g. editing gradients in `on_before_optimizer_step`).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunekit.errors import PrunekitError
from prunekit.io import atomic_path

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "step", "constant")

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainLoader(Protocol):
    """Batches of (inputs, class indices); `len()` is batches per epoch.

    It may also define `set_epoch(epoch)`, called at the start of every epoch, to make
    that epoch's shuffling deterministic (required for exact resume).
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


@dataclass
class TrainConfig:
    """Everything that determines a training run, apart from the model and data."""

    epochs: int = field(default=10, metadata={"help": "Passes over the training loader (>= 1)."})
    batch_size: int = field(
        default=128, metadata={"help": "Examples per batch; informational, the loaders own batching."}
    )
    optimizer: str = field(default="sgd", metadata={"help": "Optimizer: 'sgd' or 'adam'."})
    lr: float = field(default=0.1, metadata={"help": "Peak learning rate (> 0)."})
    momentum: float = field(
        default=0.9, metadata={"help": "SGD momentum in [0, 1); for 'adam' it is beta1."}
    )
    nesterov: bool = field(
        default=False, metadata={"help": "Nesterov momentum (SGD only; needs momentum > 0)."}
    )
    weight_decay: float = field(
        default=5e-4, metadata={"help": "L2 penalty added to the gradient by the optimizer (>= 0)."}
    )
    lr_schedule: str = field(
        default="cosine", metadata={"help": "LR decay after warmup: 'cosine', 'step' or 'constant'."}
    )
    lr_milestones: tuple[float, ...] = field(
        default=(0.5, 0.75),
        metadata={
            "help": "For 'step': increasing fractions of all steps, in (0, 1), where the LR is multiplied by lr_gamma."
        },
    )
    lr_gamma: float = field(
        default=0.1, metadata={"help": "For 'step': LR multiplier at each milestone, in (0, 1]."}
    )
    warmup_epochs: float = field(
        default=0.0, metadata={"help": "Epochs of linear LR warmup from lr/steps to lr, in [0, epochs)."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing of the training loss, in [0, 1)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for torch's RNG at the start of fit() (>= 0)."})
    grad_clip: float | None = field(
        default=None, metadata={"help": "Clip the global gradient norm to this value (> 0); None: no clipping."}
    )

    def validate(self) -> None:
        """Raise PrunekitError naming the first out-of-range field."""
        for name, requirement, ok in self._field_checks():
            if not ok:
                raise PrunekitError(
                    f"TrainConfig.{name}={getattr(self, name)!r} is invalid: set it to {requirement}."
                )

    def _field_checks(self) -> Iterator[tuple[str, str, bool]]:
        # A generator, so a field's type is checked before later fields compare against it.
        yield "epochs", "an integer >= 1", _is_int(self.epochs) and self.epochs >= 1
        yield "batch_size", "an integer >= 1", _is_int(self.batch_size) and self.batch_size >= 1
        yield "optimizer", f"one of {OPTIMIZERS}", self.optimizer in OPTIMIZERS
        yield "lr", "a finite number > 0", _is_real(self.lr) and 0 < self.lr < math.inf
        yield "momentum", "a number in [0, 1)", _is_real(self.momentum) and 0 <= self.momentum < 1
        yield "nesterov", "False, or True only with optimizer='sgd' and momentum > 0", (
            isinstance(self.nesterov, bool)
            and (not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0))
        )
        yield "weight_decay", "a finite number >= 0", (
            _is_real(self.weight_decay) and 0 <= self.weight_decay < math.inf
        )
        yield "lr_schedule", f"one of {LR_SCHEDULES}", self.lr_schedule in LR_SCHEDULES
        yield "lr_milestones", "increasing fractions in (0, 1), e.g. (0.5, 0.75)", (
            _are_increasing_fractions(self.lr_milestones)
        )
        yield "lr_gamma", "a number in (0, 1]", _is_real(self.lr_gamma) and 0 < self.lr_gamma <= 1
        yield "warmup_epochs", "a number in [0, epochs)", (
            _is_real(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs
        )
        yield "label_smoothing", "a number in [0, 1)", (
            _is_real(self.label_smoothing) and 0 <= self.label_smoothing < 1
        )
        yield "seed", "an integer >= 0", _is_int(self.seed) and self.seed >= 0
        yield "grad_clip", "None or a finite number > 0", self.grad_clip is None or (
            _is_real(self.grad_clip) and 0 < self.grad_clip < math.inf
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _are_increasing_fractions(values: Any) -> bool:
    if not isinstance(values, (tuple, list)):
        return False
    if not all(_is_real(v) and 0 < v < 1 for v in values):
        return False
    return all(a < b for a, b in zip(values, values[1:]))


def lr_multiplier(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Factor on `config.lr` for optimizer step `step` (0-based): linear warmup times the decay."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = config.warmup_epochs * steps_per_epoch
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warmup * _decay(config, step, total_steps, warmup_steps)


def _decay(config: TrainConfig, step: int, total_steps: int, warmup_steps: float) -> float:
    if config.lr_schedule == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_steps) / (total_steps - warmup_steps)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "step":
        passed = sum(step >= fraction * total_steps for fraction in config.lr_milestones)
        return config.lr_gamma**passed
    return 1.0


class Callback:
    """Hooks into `Trainer`; every method is a no-op, override the ones you need.

    Inside the three step hooks `trainer.step` is the 0-based index of the step in progress.
    """

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step of fit() (after any resume, so trainer.step may be > 0)."""

    def on_step_begin(self, trainer: Trainer, batch: Batch) -> None:
        """Before the forward pass; `batch` is already on the trainer's device."""

    def on_before_optimizer_step(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """After backward, before gradient clipping and optimizer.step(): edit gradients here."""

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """After optimizer.step() and the LR scheduler step."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        """After the epoch's metrics (and evaluation); entries added to `metrics` are logged too."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch, or after stop()."""


class Trainer:
    """Trains `model` with cross-entropy under `config`, with callbacks, a JSONL log and exact resume.

    `trainer.epoch` is the 0-based index of the epoch in progress (after fit(), the number of
    finished epochs); `trainer.step` counts optimizer steps taken so far.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: TrainLoader,
        config: TrainConfig,
        *,
        eval_loader: Iterable[Batch] | None = None,
        callbacks: Iterable[Callback] = (),
        device: str | torch.device = "cpu",
        log_path: str | Path | None = None,
        checkpoint_path: str | Path | None = None,
        progress: bool | None = None,
        params: Iterable[torch.Tensor] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.callbacks = tuple(callbacks)
        self.log_path = None if log_path is None else Path(log_path)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.show_progress = _stderr_is_terminal() if progress is None else progress
        self.params = _trainable_params(self.model, params)
        self.steps_per_epoch = _steps_per_epoch(train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = _build_optimizer(self.params, config)
        steps_per_epoch = self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(config, step, steps_per_epoch)
        )
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self._stop_requested = False

    def fit(self) -> list[dict]:
        """Train until `config.epochs` are done, resuming from the checkpoint if it exists.

        Returns the metrics of every epoch of the run, including those restored from the checkpoint.
        """
        torch.manual_seed(self.config.seed)
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self._resume()
        self._stop_requested = False
        self._append_log({"config": asdict(self.config), "start_epoch": self.epoch})
        self._notify("on_train_begin")
        bar = _ProgressBar(self.show_progress, self.total_steps, self.step)
        try:
            while self.epoch < self.config.epochs and not self._stop_requested:
                self._run_epoch(bar)
        finally:
            bar.close()
        self._notify("on_train_end")
        return list(self.history)

    def stop(self) -> None:
        """End fit() after the current step (or right away when called from on_epoch_end)."""
        self._stop_requested = True

    def reset_momentum(self) -> None:
        """Drop the optimizer's state (momentum / Adam moments), e.g. after the mask changes."""
        self.optimizer.state.clear()

    def _run_epoch(self, bar: _ProgressBar) -> None:
        set_epoch = getattr(self.train_loader, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)
        self.model.train()
        started = time.perf_counter()
        totals = _EpochTotals(self.device)
        steps_at_start = self.step
        for inputs, targets in self.train_loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, logits = self._train_step(inputs, targets)
            totals.add(loss, logits, targets)
            bar.advance(loss, self._current_lr())
            if self._stop_requested:
                break
        train = totals.summary()  # syncs the device, so `seconds` below is the real compute time
        metrics = {
            "epoch": self.epoch + 1,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "lr": self._current_lr(),
            "seconds": time.perf_counter() - started,
        }
        self._finish_epoch(metrics, completed=self.step - steps_at_start >= self.steps_per_epoch)

    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._notify("on_step_begin", (inputs, targets))
        # The model's own grads too: with restricted `params` the rest would otherwise accumulate.
        self.model.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)
        loss.backward()
        self._notify("on_before_optimizer_step", loss)
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self._notify("on_step_end", loss)
        self.step += 1
        return loss.detach(), logits.detach()

    def _finish_epoch(self, metrics: dict, completed: bool) -> None:
        if self.eval_loader is not None:
            evaluation = evaluate(self.model, self.eval_loader, self.device)
            metrics["eval_accuracy"] = evaluation["accuracy"]
            metrics["eval_loss"] = evaluation["loss"]
        self._notify("on_epoch_end", metrics)
        self.history.append(metrics)
        self._append_log(metrics)
        # A checkpoint of a partly trained epoch could not be resumed exactly, so only whole epochs are saved.
        if completed:
            self.epoch += 1
            self._save_checkpoint()

    def _current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _notify(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _append_log(self, record: dict) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")

    def _save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(self._checkpoint_state(), tmp)

    def _checkpoint_state(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng_state": torch.get_rng_state(),
            "history": self.history,
            "config": asdict(self.config),
            "total_steps": self.total_steps,
        }
        if self.device.type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        return state

    def _resume(self) -> None:
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        self._check_same_run(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.step = state["step"]
        self.history = list(state["history"])
        torch.set_rng_state(state["rng_state"])
        if "cuda_rng_state" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"], self.device)

    def _check_same_run(self, state: dict) -> None:
        saved, current = state["config"], asdict(self.config)
        changed = [
            f"{name}: {saved.get(name)!r} -> {value!r}"
            for name, value in current.items()
            if saved.get(name) != value
        ]
        if changed:
            raise PrunekitError(
                f"checkpoint {self.checkpoint_path} was written with a different TrainConfig "
                f"({'; '.join(changed)}); resume with the same config, or move the checkpoint away to start a new run."
            )
        if state["total_steps"] != self.total_steps:
            raise PrunekitError(
                f"checkpoint {self.checkpoint_path} was written for {state['total_steps']} steps, but this run has "
                f"{self.total_steps} (epochs x len(train_loader)); resume with the same loader length, "
                "or move the checkpoint away to start a new run."
            )


def evaluate(model: nn.Module, loader: Iterable[Batch], device: str | torch.device = "cpu") -> dict:
    """Accuracy (fraction in [0, 1]), mean cross-entropy `loss` and `examples` over `loader`.

    `model` must already be on `device`; it is run in eval mode under no_grad and its mode is restored.
    """
    was_training = model.training
    model.eval()
    totals = _EpochTotals(torch.device(device))
    try:
        with torch.no_grad():
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                logits = model(inputs)
                totals.add(F.cross_entropy(logits, targets), logits, targets)
    finally:
        model.train(was_training)
    if totals.examples == 0:
        raise PrunekitError("evaluate(): the loader yielded no examples; pass a loader with at least one batch.")
    return {**totals.summary(), "examples": totals.examples}


class _EpochTotals:
    """Loss and correct counts kept on the device, so the hot loop never waits for it."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.examples = 0

    def add(self, mean_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        count = targets.shape[0]
        self.loss_sum += mean_loss * count
        self.correct += (logits.argmax(dim=1) == targets).sum()
        self.examples += count

    def summary(self) -> dict[str, float]:
        examples = max(1, self.examples)
        return {"loss": self.loss_sum.item() / examples, "accuracy": self.correct.item() / examples}


class _ProgressBar:
    """tqdm over optimizer steps; the postfix refreshes at most twice a second, as reading the loss syncs the device."""

    POSTFIX_INTERVAL_SECONDS = 0.5

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if enabled else None
        self._next_postfix = 0.0

    def advance(self, loss: torch.Tensor, lr: float) -> None:
        if self._bar is None:
            return
        self._bar.update()
        now = time.monotonic()
        if now >= self._next_postfix:
            self._bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}")
            self._next_postfix = now + self.POSTFIX_INTERVAL_SECONDS

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _stderr_is_terminal() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


def _trainable_params(model: nn.Module, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not chosen:
        raise PrunekitError(
            "nothing to train: no parameter requires grad; pass params=[...] or call requires_grad_(True) on some."
        )
    for index, param in enumerate(chosen):
        if not isinstance(param, torch.Tensor) or not param.requires_grad:
            raise PrunekitError(
                f"params[{index}] is not a tensor with requires_grad=True, so training cannot change it; "
                "leave it out of params or call requires_grad_(True) on it."
            )
    return chosen


def _steps_per_epoch(train_loader: TrainLoader) -> int:
    try:
        steps = len(train_loader)
    except TypeError:
        raise PrunekitError(
            "train_loader has no len(); the LR schedule needs the number of batches per epoch, so give it a __len__."
        ) from None
    if steps < 1:
        raise PrunekitError("train_loader is empty (len 0); pass a loader with at least one batch per epoch.")
    return steps


def _build_optimizer(params: list[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def reestimate_batch_norm(model: nn.Module, loader: Iterable[Batch], device: str | torch.device = "cpu") -> int:
    """Batch-norm running statistics from one train-mode pass over `loader` (a cumulative average,
    as the CHITA code does before pruning); the weights are untouched. Returns the layers re-estimated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for inputs, _ in loader:
                model(inputs.to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return len(norms)
