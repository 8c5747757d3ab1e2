"""One small training loop for dense and masked models: closed to edits, open to callbacks.

Pruning methods never fork the loop; they hook into it through `Callback` (e.g. editing gradients
in `on_before_optimizer_step`). What the loop minimises is an `Objective` (cross-entropy unless
`loss=` says otherwise). Logging, checkpoint/resume, evaluation and the progress bar are callbacks
too, built from the Trainer's keyword arguments.

`fit()` runs, in this order:
1. torch's RNG is seeded with the trainer's `seed`;
2. `on_fit_start`: Checkpointing restores a saved run here (so callbacks before it see step 0);
3. `on_train_begin`: trainer.epoch, step and history are the restored ones;
4. per epoch: `loader.set_epoch(epoch)`, then per batch `on_step_begin`, forward and backward,
   `on_before_optimizer_step`, gradient clipping, the optimizer and LR steps, `on_step_end`;
   then the epoch's metrics are appended to trainer.history and `on_epoch_end` sees them;
5. `on_train_end` after the last epoch or stop();
6. `on_fit_end`, always, also when fit() raises (the progress bar closes here).

Every hook runs the callbacks in one order: Evaluation (so eval metrics are there for everyone),
the callbacks passed, then ProgressBar, JsonLog (which logs what the others added to the metrics)
and Checkpointing (last, so the saved history is complete; only whole epochs are saved).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import nn
from tqdm import tqdm

from prunekit import hparams
from prunekit.errors import PrunekitError
from prunekit.hparams import Check, integer, number, one_of, optional, setting
from prunekit.io import atomic_path
from prunekit.modes import model_mode
from prunekit.objectives import Batch, CrossEntropy, Loss, Objective, as_objective, batch_examples, to_device

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "step", "constant")
VALID_SEED = integer(0)


class TrainLoader(Protocol):
    """Batches the objective takes (`(inputs, class indices)` for cross-entropy); `len()` is batches per epoch.

    It may also define `set_epoch(epoch)`, called at the start of every epoch, to make
    that epoch's shuffling deterministic (required for exact resume).
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


def _are_increasing_fractions(values: Any) -> bool:
    return (isinstance(values, (tuple, list)) and all(hparams.is_number(v) and 0 < v < 1 for v in values)
            and all(a < b for a, b in zip(values, values[1:])))


INCREASING_FRACTIONS = Check("increasing fractions in (0, 1), e.g. 0.5,0.75", _are_increasing_fractions)
BOOLEAN = Check("true or false", lambda value: isinstance(value, bool))


@dataclass
class TrainConfig:
    """Everything that determines a training run, apart from the model, the data (and its batch size) and the seed."""

    epochs: int = setting(10, "Passes over the training loader.", integer(1))
    optimizer: str = setting("sgd", "Optimizer.", one_of(*OPTIMIZERS))
    lr: float = setting(0.1, "Peak learning rate.", number(0, low_open=True))
    momentum: float = setting(0.9, "SGD momentum; for adam it is beta1.", number(0, 1, high_open=True))
    nesterov: bool = setting(False, "Nesterov momentum (SGD only; needs momentum > 0).", BOOLEAN)
    weight_decay: float = setting(5e-4, "L2 penalty added to the gradient by the optimizer.", number(0))
    lr_schedule: str = setting("cosine", "LR decay after warm-up.", one_of(*LR_SCHEDULES))
    lr_milestones: tuple[float, ...] = setting(
        (0.5, 0.75), "For 'step': fractions of all steps where the LR is multiplied by lr_gamma.", INCREASING_FRACTIONS)
    lr_gamma: float = setting(0.1, "For 'step': LR multiplier at each milestone.", number(0, 1, low_open=True))
    warmup_epochs: float = setting(0.0, "Epochs of linear LR warm-up from lr/steps to lr (fewer than epochs).",
                                   number(0))
    label_smoothing: float = setting(0.0, "Label smoothing of the cross-entropy training loss.",
                                     number(0, 1, high_open=True))
    grad_clip: float | None = setting(None, "Clip the global gradient norm to this value; None: no clipping.",
                                      optional(number(0, low_open=True)))

    def check_relations(self) -> None:
        if self.nesterov and not (self.optimizer == "sgd" and self.momentum > 0):
            raise PrunekitError(f"nesterov=True is invalid with optimizer={self.optimizer!r} and momentum="
                                f"{self.momentum!r}: Nesterov momentum needs optimizer 'sgd' with momentum > 0; "
                                "set --nesterov false, or --optimizer sgd with --momentum > 0")
        if self.epochs > 0 and not self.warmup_epochs < self.epochs:  # 0 epochs (a method's "no training") warm nothing
            raise PrunekitError(f"warmup_epochs={self.warmup_epochs!r} is invalid: set it to a number below "
                                f"epochs={self.epochs} (--warmup-epochs)")


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
    """Hooks into `Trainer`; every method is a no-op, override the ones you need (the order is in the module doc).

    Inside the three step hooks `trainer.step` is the 0-based index of the step in progress.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """First in fit(), after seeding and before any resume: restore saved state here."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step of fit() (after any resume, so trainer.step may be > 0)."""

    def on_step_begin(self, trainer: Trainer, batch: Batch) -> None:
        """Before the forward pass; `batch` is already on the trainer's device."""

    def on_before_optimizer_step(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """After backward, before gradient clipping and optimizer.step(): edit gradients here."""

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """After optimizer.step() and the LR scheduler step."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        """After the epoch; `metrics` is the last entry of trainer.history: entries added to it are kept and logged."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch, or after stop()."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Last in fit(), also when it raises: release what the callback holds; it must not raise."""


class Trainer:
    """Trains `model` to minimise `loss` under `config`, with callbacks, a JSONL log and exact resume.

    `seed` seeds torch's RNG when fit() starts (the loader's shuffling has its own seed). `loss` is None
    (cross-entropy with the config's label smoothing), an Objective, or a callable `loss(model, batch)`.
    `trainer.epoch` is the 0-based index of the epoch in progress (after fit(), the number of
    finished epochs); `trainer.step` counts optimizer steps taken so far.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: TrainLoader,
        config: TrainConfig,
        *,
        seed: int = 0,
        loss: Loss = None,
        eval_loader: Iterable[Batch] | None = None,
        callbacks: Iterable[Callback] = (),
        device: str | torch.device = "cpu",
        log_path: str | Path | None = None,
        checkpoint_path: str | Path | None = None,
        progress: bool | None = None,
        params: Iterable[torch.Tensor] | None = None,
    ) -> None:
        hparams.validate(config, "training")
        if not VALID_SEED(seed):
            raise PrunekitError(f"seed={seed!r} is invalid: set it to {VALID_SEED.requirement} (--seed)")
        self.objective = _training_objective(loss, config)
        self.config = config
        self.seed = seed
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.params = _trainable_params(self.model, params)
        self.steps_per_epoch = _steps_per_epoch(train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = _build_optimizer(self.params, config)
        steps_per_epoch = self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(config, step, steps_per_epoch)
        )
        # Evaluation first, so every callback sees its metrics; the log and the checkpoint last, so they hold
        # what the others added. Cross-entropy is evaluated without label smoothing.
        evaluation = [] if eval_loader is None else [Evaluation(eval_loader, None if loss is None else self.objective)]
        show_progress = _stderr_is_terminal() if progress is None else progress
        self.callbacks = (*evaluation, *callbacks, *([ProgressBar()] if show_progress else []),
                          *([] if log_path is None else [JsonLog(log_path)]),
                          *([] if checkpoint_path is None else [Checkpointing(checkpoint_path)]))
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self._stop_requested = False

    def fit(self) -> list[dict]:
        """Train until `config.epochs` are done, resuming from the checkpoint if there is one.

        Returns the metrics of every epoch of the run, including those restored from the checkpoint.
        """
        self._stop_requested = False
        torch.manual_seed(self.seed)
        try:
            self._notify("on_fit_start")
            self._notify("on_train_begin")
            while self.epoch < self.config.epochs and not self._stop_requested:
                self._run_epoch()
            self._notify("on_train_end")
        finally:
            self._notify("on_fit_end")
        return list(self.history)

    def stop(self) -> None:
        """End fit() after the current step (or right away when called from on_epoch_end)."""
        self._stop_requested = True

    @property
    def lr(self) -> float:
        """The learning rate of the next step (of the first parameter group)."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def at_epoch_boundary(self) -> bool:
        """Whether the steps taken are whole epochs (not after stop() mid-epoch): where a run resumes exactly."""
        return self.step % self.steps_per_epoch == 0

    def _run_epoch(self) -> None:
        set_epoch = getattr(self.train_loader, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)
        self.model.train()
        started = time.perf_counter()
        totals = _Totals(self.objective, self.device)
        for batch in self.train_loader:
            batch = to_device(batch, self.device)
            loss, outputs = self._train_step(batch)
            totals.add(loss, outputs, batch)
            if self._stop_requested:
                break
        train = totals.summary()  # syncs the device, so `seconds` below is the real compute time
        metrics = {"epoch": self.epoch + 1, **_prefixed("train_", train), "lr": self.lr,
                   "seconds": time.perf_counter() - started}
        self.history.append(metrics)
        self._notify("on_epoch_end", metrics)
        if self.at_epoch_boundary:
            self.epoch += 1

    def _train_step(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        self._notify("on_step_begin", batch)
        # The model's own grads too: with restricted `params` the rest would otherwise accumulate.
        self.model.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss, outputs = self.objective.loss(self.model, batch)
        loss.backward()
        self._notify("on_before_optimizer_step", loss)
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self._notify("on_step_end", loss)
        self.step += 1
        return loss.detach(), outputs

    def _notify(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def _training_objective(loss: Loss, config: TrainConfig) -> Objective:
    if loss is None:
        return CrossEntropy(config.label_smoothing)
    if isinstance(loss, CrossEntropy) and config.label_smoothing:  # the objective a prune inferred or was named
        return replace(loss, label_smoothing=config.label_smoothing)
    if config.label_smoothing:
        raise PrunekitError(f"label_smoothing={config.label_smoothing!r} applies to the default cross-entropy only, "
                            "but a loss was passed: set it to 0, or smooth in your loss "
                            "(e.g. loss=CrossEntropy(label_smoothing=...))")
    return as_objective(loss)


def evaluate(model: nn.Module, loader: Iterable[Batch], device: str | torch.device = "cpu",
             objective: Loss = None) -> dict:
    """Mean `loss` of `objective` (cross-entropy by default), `accuracy` (a fraction in [0, 1]; where the
    objective has one) and `examples` over `loader`.

    `model` must already be on `device`; it is run in eval mode under no_grad and its mode is restored.
    """
    objective = as_objective(objective)
    totals = _Totals(objective, torch.device(device))
    with model_mode(model, False), torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            totals.add(*objective.loss(model, batch), batch)
    if totals.examples == 0:
        raise PrunekitError("evaluate(): the loader yielded no examples; pass a loader with at least one batch.")
    return {**totals.summary(), "examples": totals.examples}


class _Totals:
    """The loss and the objective's measures summed on the device, so the hot loop never waits for them."""

    def __init__(self, objective: Objective, device: torch.device) -> None:
        self.objective = objective
        self.loss_sum = torch.zeros((), device=device)
        self.sums: dict[str, torch.Tensor] = {}  # e.g. correct predictions, for accuracy
        self.examples = 0

    def add(self, mean_loss: torch.Tensor, outputs: Any, batch: Batch) -> None:
        count = batch_examples(batch)
        with torch.no_grad():
            self.loss_sum += mean_loss.detach() * count
            for name, value in self.objective.measures(outputs, batch).items():
                self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.examples += count

    def summary(self) -> dict[str, float]:
        examples = max(1, self.examples)
        means = {"loss": self.loss_sum.item() / examples}
        means.update({name: value.item() / examples for name, value in self.sums.items()})
        return self.objective.summary(means)


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {prefix + name: value for name, value in values.items()}


# ---------------------------------------------------------------- the built-in callbacks

class Evaluation(Callback):
    """After every epoch: eval_loss (and eval_accuracy where the objective has one) on `loader`."""

    def __init__(self, loader: Iterable[Batch], objective: Loss = None) -> None:
        self.loader = loader
        self.objective = objective

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        result = evaluate(trainer.model, self.loader, trainer.device, self.objective)
        metrics.update(_prefixed("eval_", {name: value for name, value in result.items() if name != "examples"}))


class ProgressBar(Callback):
    """tqdm over optimizer steps; the postfix refreshes at most twice a second, as reading the loss syncs the device."""

    POSTFIX_INTERVAL_SECONDS = 0.5

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._next_postfix = 0.0

    def on_train_begin(self, trainer: Trainer) -> None:
        self._bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", dynamic_ncols=True)
        self._next_postfix = 0.0

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self._bar.update()
        now = time.monotonic()
        if now >= self._next_postfix:
            self._bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{trainer.lr:.3g}")
            self._next_postfix = now + self.POSTFIX_INTERVAL_SECONDS

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class JsonLog(Callback):
    """JSON lines appended to `path`: the settings when training (re)starts, then one line of metrics per epoch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, trainer: Trainer) -> None:
        self._append({"config": hparams.to_dict(trainer.config), "seed": trainer.seed, "start_epoch": trainer.epoch})

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        self._append(metrics)

    def _append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")


class Checkpointing(Callback):
    """Saves the run to `path` after every whole epoch and resumes from it when fit() starts, bit for bit.

    A checkpoint written with other settings, another seed or another number of steps is refused.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.path.exists():
            self._restore(trainer, torch.load(self.path, map_location="cpu", weights_only=True))

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        # A partly trained epoch could not be resumed exactly, so only whole epochs are saved.
        if trainer.at_epoch_boundary:
            with atomic_path(self.path) as tmp:
                torch.save(self._state(trainer), tmp)

    def _state(self, trainer: Trainer) -> dict:
        state = {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "epoch": trainer.step // trainer.steps_per_epoch,
            "step": trainer.step,
            "rng_state": torch.get_rng_state(),
            "history": trainer.history,
            "config": hparams.to_dict(trainer.config),
            "seed": trainer.seed,
            "total_steps": trainer.total_steps,
        }
        if trainer.device.type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state(trainer.device)
        return state

    def _restore(self, trainer: Trainer, state: dict) -> None:
        self._check_same_run(trainer, state)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.epoch = state["epoch"]
        trainer.step = state["step"]
        trainer.history = list(state["history"])
        torch.set_rng_state(state["rng_state"])
        if "cuda_rng_state" in state and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"], trainer.device)

    def _check_same_run(self, trainer: Trainer, state: dict) -> None:
        saved = {**state["config"], "seed": state.get("seed")}
        current = {**hparams.to_dict(trainer.config), "seed": trainer.seed}
        changed = [f"{name}: {saved.get(name)!r} -> {value!r}" for name, value in current.items()
                   if saved.get(name) != value]
        if changed:
            raise PrunekitError(
                f"checkpoint {self.path} was written with other training settings ({'; '.join(changed)}); resume "
                "with the same settings and seed, or move the checkpoint away to start a new run."
            )
        if state["total_steps"] != trainer.total_steps:
            raise PrunekitError(
                f"checkpoint {self.path} was written for {state['total_steps']} steps, but this run has "
                f"{trainer.total_steps} (epochs x len(train_loader)); resume with the same loader length, "
                "or move the checkpoint away to start a new run."
            )


# ---------------------------------------------------------------- helpers

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
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    try:
        with model_mode(model, True), torch.no_grad():
            for inputs, _ in loader:
                model(inputs.to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return len(norms)
