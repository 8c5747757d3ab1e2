import json
import math
import re
from dataclasses import fields

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit import hparams
from prunekit.errors import PrunekitError
from prunekit.training import Callback, TrainConfig, Trainer, evaluate, lr_multiplier, reestimate_batch_norm

FEATURES, CLASSES = 8, 3


class ToyLoader:
    """Stand-in for the data contract: each epoch's batches depend only on (seed, epoch)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.inputs, self.targets, self.batch_size, self.seed = inputs, targets, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.targets), generator=generator)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield self.inputs[batch], self.targets[batch]


def blobs(examples: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs: learnable by a linear model."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(examples) % CLASSES
    centers = 4.0 * torch.eye(CLASSES, FEATURES)
    inputs = centers[targets] + 0.5 * torch.randn(examples, FEATURES, generator=generator)
    return inputs, targets


def toy_loader(examples: int = 96, batch_size: int = 16) -> ToyLoader:
    return ToyLoader(*blobs(examples), batch_size=batch_size)


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, CLASSES))


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "lr": 0.05, **overrides})


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lrs: list[float] = []

    def on_fit_start(self, trainer):
        self.events.append(("fit_start", trainer.step))

    def on_train_begin(self, trainer):
        self.events.append(("train_begin", trainer.step))

    def on_step_begin(self, trainer, batch):
        self.events.append(("step_begin", trainer.step))

    def on_before_optimizer_step(self, trainer, loss):
        self.events.append(("before_optimizer_step", trainer.step))
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, trainer, loss):
        self.events.append(("step_end", trainer.step))

    def on_epoch_end(self, trainer, metrics):
        self.events.append(("epoch_end", trainer.step))

    def on_train_end(self, trainer):
        self.events.append(("train_end", trainer.step))

    def on_fit_end(self, trainer):
        self.events.append(("fit_end", trainer.step))


class ZeroGradRows(Callback):
    """Zeroes the gradient of the first layer's first rows, as a pruning mask would."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def on_before_optimizer_step(self, trainer, loss):
        trainer.model[0].weight.grad[: self.rows] = 0


class Mask(nn.Module):
    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("mask", (torch.arange(math.prod(shape)) % 2).reshape(shape).float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class BatchMetrics(Callback):
    """Each training step's loss and the accuracy of the logits it was computed from (no dropout: same logits)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.correct: list[int] = []

    def on_step_begin(self, trainer, batch):
        inputs, targets = batch
        with torch.no_grad():
            self.correct.append(int((trainer.model(inputs).argmax(1) == targets).sum()))

    def on_step_end(self, trainer, loss):
        self.losses.append(loss.item())


def test_loss_goes_down_and_metrics_are_reported():
    loader, model, batches = toy_loader(), mlp(), BatchMetrics()
    trainer = Trainer(model, loader, config(epochs=4), eval_loader=toy_loader(), callbacks=[batches], progress=False)
    history = trainer.fit()
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["eval_accuracy"] > 0.9
    for key in ("train_loss", "train_accuracy", "lr", "seconds", "eval_accuracy", "eval_loss"):
        assert isinstance(history[-1][key], float)
    steps = len(loader)  # every batch holds 16 examples, so the epoch's means are plain means over its steps
    for epoch, metrics in enumerate(history):
        assert metrics["train_loss"] == pytest.approx(sum(batches.losses[epoch * steps:(epoch + 1) * steps]) / steps)
        assert metrics["train_accuracy"] == pytest.approx(sum(batches.correct[epoch * steps:(epoch + 1) * steps])
                                                          / len(loader.targets))
        assert metrics["seconds"] > 0
    final = evaluate(model, toy_loader())
    assert (history[-1]["eval_accuracy"], history[-1]["eval_loss"]) == (final["accuracy"], pytest.approx(final["loss"]))
    assert history[-1]["lr"] == trainer.optimizer.param_groups[0]["lr"] < 1e-3 * 0.05  # cosine: near zero at the end


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_on_separable_set_and_mode_restored(training):
    model = nn.Linear(CLASSES, CLASSES, bias=False)
    with torch.no_grad():
        model.weight.copy_(10 * torch.eye(CLASSES))
    model.train(training)
    inputs, targets = torch.eye(CLASSES).repeat(4, 1), torch.arange(CLASSES).repeat(4)
    loader = [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])]
    result = evaluate(model, loader)
    assert result["accuracy"] == 1.0
    assert result["examples"] == 12
    expected = nn.functional.cross_entropy(model(inputs), targets).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert model.training is training


def test_callback_order_and_step_indices():
    recorder = Recorder()
    loader = toy_loader(examples=48, batch_size=16)
    Trainer(mlp(), loader, config(epochs=2), callbacks=[recorder], progress=False).fit()
    steps_per_epoch = len(loader)
    expected = [("fit_start", 0), ("train_begin", 0)]
    for epoch in range(2):
        for index in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            expected += [("step_begin", index), ("before_optimizer_step", index), ("step_end", index)]
        expected.append(("epoch_end", (epoch + 1) * steps_per_epoch))
    expected += [("train_end", 2 * steps_per_epoch), ("fit_end", 2 * steps_per_epoch)]
    assert recorder.events == expected


def test_fit_end_runs_when_training_raises():
    recorder = Recorder()
    with pytest.raises(KeyboardInterrupt):
        Trainer(mlp(), toy_loader(), config(), callbacks=[recorder, KillDuringEpoch(step=1)], progress=False).fit()
    assert recorder.events[-2:] == [("step_end", 1), ("fit_end", 1)]


class AddMetric(Callback):
    """Sees the evaluation's metrics and adds its own, which the log and the checkpoint must keep."""

    def __init__(self) -> None:
        self.seen: list[set[str]] = []

    def on_epoch_end(self, trainer, metrics):
        self.seen.append(set(metrics))
        metrics["custom"] = trainer.epoch


def test_evaluation_comes_before_user_callbacks_and_log_and_checkpoint_after(tmp_path):
    log, checkpoint = tmp_path / "train.jsonl", tmp_path / "checkpoint.pt"
    add = AddMetric()
    history = Trainer(mlp(), toy_loader(), config(epochs=2), eval_loader=toy_loader(), callbacks=[add],
                      log_path=log, checkpoint_path=checkpoint, progress=False).fit()
    assert all({"eval_accuracy", "eval_loss"} <= seen for seen in add.seen)
    assert [m["custom"] for m in history] == [0, 1]
    assert [json.loads(line) for line in log.read_text().splitlines()][1:] == history
    assert torch.load(checkpoint, weights_only=True)["history"] == history


@pytest.mark.parametrize(
    "overrides",
    [
        {"momentum": 0.0, "weight_decay": 0.0},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0},
    ],
)
def test_zeroed_gradients_keep_weights_unchanged(overrides):
    model = mlp()
    before = model[0].weight.detach().clone()
    Trainer(model, toy_loader(), config(**overrides), callbacks=[ZeroGradRows(rows=5)], progress=False).fit()
    after = model[0].weight.detach()
    assert torch.equal(after[:5], before[:5])
    assert not torch.equal(after[5:], before[5:])


def recorded_lrs(**overrides) -> tuple[list[float], list[dict]]:
    recorder = Recorder()
    loader = toy_loader(examples=80, batch_size=16)  # 5 steps per epoch
    history = Trainer(mlp(), loader, config(lr=0.1, **overrides), callbacks=[recorder], progress=False).fit()
    return recorder.lrs, history


def test_cosine_schedule_decays_to_zero():
    lrs, history = recorded_lrs(epochs=4, lr_schedule="cosine")
    assert len(lrs) == 20
    assert lrs[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 0.01 * 0.1
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_drops_at_milestones():
    lrs, _ = recorded_lrs(epochs=4, lr_schedule="step", lr_milestones=(0.5, 0.75), lr_gamma=0.1)
    assert lrs == pytest.approx([0.1] * 10 + [0.01] * 5 + [0.001] * 5)


def test_linear_warmup_then_schedule():
    lrs, _ = recorded_lrs(epochs=3, lr_schedule="constant", warmup_epochs=1.0)
    assert lrs == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1] + [0.1] * 10)
    cosine = [lr_multiplier(config(epochs=3, warmup_epochs=1.0), step, 5) for step in range(15)]
    assert all(a < b for a, b in zip(cosine[:5], cosine[1:5]))
    assert cosine[4] == cosine[5] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(cosine[5:], cosine[6:]))


class KillDuringEpoch(Callback):
    """Raises mid-epoch, as if the process were killed after the previous epoch's checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, loss):
        if trainer.step == self.step:
            raise KeyboardInterrupt


def masked_mlp(seed: int) -> nn.Module:
    model = mlp(seed, dropout=0.3)
    parametrize.register_parametrization(model[0], "weight", Mask(model[0].weight.shape))
    return model


def test_resume_after_kill_is_bit_identical(tmp_path):
    run = config(epochs=3, warmup_epochs=0.5, label_smoothing=0.1, grad_clip=1.0, nesterov=True)
    reference = masked_mlp(seed=0)
    Trainer(reference, toy_loader(), run, progress=False).fit()

    checkpoint = tmp_path / "run" / "checkpoint.pt"
    kill = KillDuringEpoch(step=2 * len(toy_loader()) + 2)
    killed = Trainer(
        masked_mlp(seed=0), toy_loader(), run, checkpoint_path=checkpoint, callbacks=[kill], progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        killed.fit()

    resumed_model = masked_mlp(seed=1)  # different init: the weights must come from the checkpoint
    resumed = Trainer(resumed_model, toy_loader(), run, checkpoint_path=checkpoint, progress=False)
    history = resumed.fit()

    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert resumed.step == resumed.total_steps
    expected = reference.state_dict()
    for name, tensor in resumed_model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_checkpoint_contents_and_atomic_writes(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    Trainer(mlp(), toy_loader(), config(epochs=2), checkpoint_path=checkpoint, progress=False).fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    state = torch.load(checkpoint, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "rng_state", "history"} <= state.keys()
    assert state["epoch"] == 2 and state["step"] == 2 * len(toy_loader())


def test_resume_with_different_config_or_seed_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    Trainer(mlp(), toy_loader(), config(epochs=1), seed=3, checkpoint_path=checkpoint, progress=False).fit()
    with pytest.raises(PrunekitError, match=r"lr: 0\.05 -> 0\.2"):
        Trainer(mlp(), toy_loader(), config(epochs=1, lr=0.2), seed=3, checkpoint_path=checkpoint, progress=False).fit()
    with pytest.raises(PrunekitError, match=r"seed: 3 -> 4"):
        Trainer(mlp(), toy_loader(), config(epochs=1), seed=4, checkpoint_path=checkpoint, progress=False).fit()


def test_jsonl_log_has_config_then_one_line_per_epoch(tmp_path):
    log = tmp_path / "logs" / "train.jsonl"
    history = Trainer(mlp(), toy_loader(), config(epochs=3), seed=7, log_path=log, progress=False).fit()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["config"]["epochs"] == 3 and lines[0]["seed"] == 7 and lines[0]["start_epoch"] == 0
    assert lines[1:] == history


@pytest.mark.parametrize(
    "field, value, requirement",
    [
        ("epochs", 0, "an integer >= 1"),
        ("epochs", 2.5, "an integer >= 1"),
        ("optimizer", "rmsprop", "one of sgd, adam"),
        ("lr", 0.0, "a finite number > 0"),
        ("lr", float("nan"), "a finite number > 0"),
        ("momentum", 1.0, "a number in [0, 1)"),
        ("nesterov", 1, "true or false"),
        ("weight_decay", -1e-4, "a finite number >= 0"),
        ("lr_schedule", "linear", "one of cosine, step, constant"),
        ("lr_milestones", (0.75, 0.5), "increasing fractions in (0, 1)"),
        ("lr_milestones", (0.5, 1.5), "increasing fractions in (0, 1)"),
        ("lr_gamma", 0.0, "a number in (0, 1]"),
        ("warmup_epochs", -1.0, "a finite number >= 0"),
        ("warmup_epochs", 3, "a number below epochs=3"),
        ("label_smoothing", 1.0, "a number in [0, 1)"),
        ("label_smoothing", -0.1, "a number in [0, 1)"),
        ("grad_clip", 0.0, "None or a finite number > 0"),
    ],
)
def test_bad_config_names_the_field_the_value_and_the_requirement(field, value, requirement, tmp_path):
    bad = config(**{field: value})
    message = re.escape(f"{field}={value!r} is invalid: set it to {requirement}")
    with pytest.raises(PrunekitError, match=message):
        hparams.validate(bad, "training")
    log = tmp_path / "train.jsonl"
    with pytest.raises(PrunekitError, match=message):
        Trainer(mlp(), toy_loader(), bad, log_path=log, progress=False)
    assert not log.exists()


def test_field_errors_say_training_and_the_flag():
    with pytest.raises(PrunekitError) as error:
        hparams.validate(config(epochs=0), "training")
    assert str(error.value) == "training epochs=0 is invalid: set it to an integer >= 1 (--epochs)"


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_refused_before_work(seed, tmp_path):
    log = tmp_path / "train.jsonl"
    with pytest.raises(PrunekitError, match=re.escape(f"seed={seed!r} is invalid: set it to an integer >= 0")):
        Trainer(mlp(), toy_loader(), config(), seed=seed, log_path=log, progress=False)
    assert not log.exists()


def test_seed_and_batch_size_are_not_training_settings():
    names = {f.name for f in fields(TrainConfig)}
    assert not names & {"seed", "batch_size"}


def test_nesterov_needs_sgd_momentum():
    with pytest.raises(PrunekitError, match=r"nesterov=True is invalid with optimizer='sgd' and momentum=0\.0"):
        hparams.validate(config(nesterov=True, momentum=0.0), "training")
    with pytest.raises(PrunekitError, match=r"nesterov=True is invalid with optimizer='adam'"):
        hparams.validate(config(nesterov=True, optimizer="adam"), "training")


def test_zero_epochs_a_method_may_allow_need_no_warm_up_check():
    config(epochs=0, warmup_epochs=0.5).check_relations()


def test_config_fields_have_help_and_a_check():
    assert all(f.metadata.get("help") and f.metadata.get("check") for f in fields(TrainConfig))


def test_stop_ends_after_current_step():
    class StopAt(Callback):
        def on_step_end(self, trainer, loss):
            if trainer.step == 3:
                trainer.stop()

    trainer = Trainer(mlp(), toy_loader(), config(epochs=3), callbacks=[StopAt()], progress=False)
    history = trainer.fit()
    assert trainer.step == 4
    assert len(history) == 1


def test_params_restricts_training():
    model = mlp()
    first_before = model[0].weight.detach().clone()
    last_before = [p.detach().clone() for p in model[3].parameters()]
    Trainer(model, toy_loader(), config(epochs=1), params=model[0].parameters(), progress=False).fit()
    assert not torch.equal(model[0].weight, first_before)
    assert all(torch.equal(p, q) for p, q in zip(model[3].parameters(), last_before))


def test_bad_params_and_loaders_are_refused():
    model = mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(PrunekitError, match="params"):
        Trainer(model, toy_loader(), config(), params=[model[0].weight], progress=False)
    with pytest.raises(PrunekitError, match="len"):
        Trainer(mlp(), iter(toy_loader()), config(), progress=False)
    with pytest.raises(PrunekitError, match="empty"):
        Trainer(mlp(), [], config(), progress=False)


def test_progress_bar_shows_loss_and_lr(capsys):
    Trainer(mlp(), toy_loader(), config(epochs=1), progress=True).fit()
    shown = capsys.readouterr().err
    assert "loss=" in shown and "lr=" in shown


def test_reestimate_batch_norm_gives_the_statistics_of_the_pass_and_leaves_weights_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[1].running_mean.fill_(5.0)
    model.eval()
    inputs = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    batches = [(inputs[:40], torch.zeros(40)), (inputs[40:], torch.zeros(24))]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert reestimate_batch_norm(model, batches) == 1
    hidden = model[0](inputs).detach()
    # A cumulative average of the two batches' means (not the momentum-weighted one), mode restored.
    expected = (hidden[:40].mean(0) + hidden[40:].mean(0)) / 2
    torch.testing.assert_close(model[1].running_mean, expected)
    assert not model.training and model[1].momentum == 0.1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
