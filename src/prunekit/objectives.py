"""What training and evaluation minimise: an objective turns a batch into a mean loss.

An `Objective` gives the mean loss of a batch together with the model's outputs (so metrics need no
second forward pass) and its measures (top-1 for classification, the cosine to the dense outputs
for `distill`). `loss=` is None (inferred from the first batch), a name — "cross-entropy",
"causal-lm", "model" (the model's own `.loss`), "distill" (match a frozen copy of the dense model,
no labels needed) — an Objective, or a plain callable `loss(model, batch) -> scalar tensor`.

A batch is an `(inputs, targets)` tuple or a mapping of tensors (Hugging Face style, for objectives
that call `model(**batch)`); `to_device` and `batch_examples` handle both.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrunekitError

Batch = Any  # an (inputs, targets) tuple or a mapping of tensors


OBJECTIVES = ("cross-entropy", "causal-lm", "model", "distill")
# The objectives whose evaluation has a graded metric (higher is better) that a benchmark can rank by, and the key
# of that metric in `training.evaluate`'s result: top-1 for classification, the cosine similarity of the mean-pooled
# outputs to the dense model's for distillation. The language-model objectives grade by loss (lower is better).
GRADES = {"cross-entropy": "accuracy", "distill": "cosine"}
LABELS = "labels"  # the key of the targets in a Hugging Face style mapping batch


class Objective:
    """How a batch becomes a loss; override `loss`, and `measures` for metrics beyond the loss."""

    # Whether the rows `curvature` gives are gradients of this loss (the empirical Fisher's are), so that their
    # mean is its gradient: a second-order method's first-order term.
    curvature_has_gradient = True
    # Where the curvature rows are not the loss's gradient: the local model's first-order term is the loss's
    # gradient times this, the rows' second moment over the loss's (Gauss-Newton) Hessian; None: no such term.
    gradient_scale: float | None = None

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
        """The batch's mean loss (a scalar tensor to backpropagate) and the model's outputs."""
        raise NotImplementedError

    def measures(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Metrics summed over the batch's examples (left on the device), e.g. {"accuracy": correct count}."""
        return {}

    def summary(self, means: dict[str, float]) -> dict[str, float]:
        """The evaluation's metrics from the means of the loss and the measures (e.g. perplexity from the loss)."""
        return means

    def curvature(self, examples: Batch) -> tuple[Objective, Batch]:
        """The loss whose per-example gradients g make E[g gᵀ] the curvature the second-order methods model,
        and the examples it takes. The empirical Fisher: the objective itself on the examples."""
        return self, examples

    def frozen(self, examples: Batch) -> tuple[Objective, Batch]:
        """The same loss on examples that will be scored many times, with what does not depend on the pruned
        model computed once (a reference's outputs); by default the objective itself."""
        return self, examples


@dataclass(frozen=True)
class CrossEntropy(Objective):
    """Classification: cross-entropy of the logits (divided by `temperature`) against class indices; top-1.

    Batches are `(inputs, class indices)` or mappings whose `labels` are the classes (the rest goes to
    `model(**batch)`); the logits are the model's output tensor or its `.logits`.
    """

    label_smoothing: float = 0.0
    temperature: float = 1.0

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        targets = targets_of(batch)
        logits = logits_of(call_model(model, without_labels(batch)))
        return F.cross_entropy(logits / self.temperature, targets, label_smoothing=self.label_smoothing), logits

    def measures(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return {"accuracy": (outputs.argmax(dim=-1) == targets_of(batch)).sum()}


@dataclass(frozen=True)
class CausalLM(Objective):
    """Next-token cross-entropy over a sequence: logits at position t predict the token at t + 1.

    Batches are mappings with `input_ids` (and `attention_mask`, `labels` optional; labels default to the
    inputs) or `(input_ids, labels)` tuples. Padding (attention mask 0) and `ignore_index` labels do not count.
    """

    ignore_index: int = -100

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = without_labels(batch)
        logits = logits_of(call_model(model, inputs))
        labels = self._labels(batch)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=self.ignore_index), logits

    def summary(self, means: dict[str, float]) -> dict[str, float]:
        return {**means, "perplexity": math.exp(min(means["loss"], 700.0))}

    def _labels(self, batch: Batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            labels = batch.get(LABELS, batch.get("input_ids"))
            if labels is None:
                raise PrunekitError("causal-lm needs input_ids (or labels) in each batch; pass mappings from a "
                                    "tokenizer, e.g. {'input_ids': ..., 'attention_mask': ...}")
            mask = batch.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, self.ignore_index)
            return labels
        return targets_of(batch)


@dataclass(frozen=True)
class ModelLoss(Objective):
    """The model's own loss: `model(**batch).loss`, for mapping batches that carry `labels`."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
        if not isinstance(batch, Mapping) or LABELS not in batch:
            raise PrunekitError("loss='model' takes the model's own loss, which needs `labels` in each (mapping) "
                                "batch; add labels, or pass loss='distill' (no labels needed) or another loss")
        outputs = model(**batch)
        loss = getattr(outputs, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise PrunekitError(f"loss='model' but {type(model).__name__} returned no .loss for a batch with labels; "
                                "pass loss='cross-entropy', 'causal-lm' or a callable")
        return loss, outputs

    def measures(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        logits = getattr(outputs, "logits", None)
        labels = batch[LABELS]
        if logits is None or logits.dim() != 2 or labels.dim() != 1:
            return {}  # not a classifier's: the loss is the metric
        return {"accuracy": (logits.argmax(dim=-1) == labels).sum()}


class Distill(Objective):
    """Match a frozen copy of the dense model: MSE between the outputs (or KL between logits' softmaxes).

    Needs inputs only (labels are dropped), so any data can drive any data-driven method. The metric
    is the cosine similarity to the dense outputs, per example: of the mean over the attended tokens
    for sequence outputs (a sentence embedding, as sentence-transformers pool), else of the output row.
    """

    curvature_has_gradient = False  # random projections of the Jacobian: their mean is noise, not the gradient

    def __init__(self, reference: nn.Module, kind: str = "mse") -> None:
        if kind not in ("mse", "kl"):
            raise PrunekitError(f"distill kind {kind!r} is unknown; use mse or kl")
        self.reference = copy.deepcopy(reference).eval().requires_grad_(False)
        self.kind = kind
        # MSE over D outputs has the Gauss-Newton Hessian 2JᵀJ/D and the rows' second moment is JᵀJ/D (below).
        # KL's is Jᵀ(diag p − ppᵀ)J, which the rows do not follow: its local model keeps no gradient term.
        self.gradient_scale = 0.5 if kind == "mse" else None

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = without_labels(batch)
        return _Matching(self.kind).loss(model, {"inputs": inputs, "dense": self._dense(inputs)})

    def frozen(self, examples: Batch) -> tuple[Objective, Batch]:
        inputs = without_labels(examples)
        return _Matching(self.kind), {"inputs": inputs, "dense": self._dense(inputs)}

    def _dense(self, inputs: Batch) -> torch.Tensor:
        with torch.no_grad():
            return output_tensor(call_model(self.reference, inputs))

    def measures(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        pruned, dense = (pooled(tensor, batch) for tensor in outputs)
        return {"cosine": F.cosine_similarity(pruned, dense, dim=-1).sum()}

    def curvature(self, examples: Batch) -> tuple[Objective, Batch]:
        """At the dense model the distillation loss is 0 with a zero gradient for every example, so its
        empirical Fisher is 0. Its curvature there is the Gauss–Newton matrix JᵀJ / D (J the Jacobian of
        the D outputs): the second moment of Jᵀu for random directions u ~ N(0, I/D), one per example,
        drawn from a fixed seed (padding positions get none). The rows are the gradients of ⟨f(x), u⟩."""
        inputs = without_labels(examples)
        dense = self._dense(inputs)
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(dense.shape, generator=generator).to(dense.device) / math.sqrt(dense[0].numel())
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is not None and dense.dim() == 3:
            direction = direction * mask.unsqueeze(-1).to(direction.dtype)
        return _Projection(), {"inputs": inputs, "direction": direction}


@dataclass(frozen=True)
class _Matching(Objective):
    """Distill's loss against dense outputs given in the batch: {"inputs": ..., "dense": ...}."""

    kind: str

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        outputs, dense = output_tensor(call_model(model, batch["inputs"])), batch["dense"]
        if self.kind == "kl":
            loss = F.kl_div(F.log_softmax(outputs, -1).flatten(0, -2), F.log_softmax(dense, -1).flatten(0, -2),
                            log_target=True, reduction="batchmean")
        else:
            loss = F.mse_loss(outputs, dense)
        return loss, (outputs, dense)


class _Projection(Objective):
    """⟨f(x), u⟩ averaged over the examples: its gradient is Jᵀu (see Distill.curvature)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = output_tensor(call_model(model, batch["inputs"]))
        return (outputs * batch["direction"]).sum() / outputs.shape[0], outputs


class LossFunction(Objective):
    """A plain `loss(model, batch) -> scalar tensor`: a loss, no other metric."""

    def __init__(self, function: Callable[[nn.Module, Batch], torch.Tensor]) -> None:
        self.function = function

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, None]:
        value = self.function(model, batch)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PrunekitError(f"loss {self.function!r} returned {shape}, not a scalar tensor: return the mean "
                                "loss over the batch (e.g. end with .mean())")
        return value, None


# What `loss=` accepts: None (inferred), a name from OBJECTIVES, an Objective, or a callable loss(model, batch).
Loss = Objective | str | Callable[[nn.Module, Batch], torch.Tensor] | None


def as_objective(loss: Loss, model: nn.Module | None = None) -> Objective:
    """The objective for `loss=`: None → CrossEntropy(), a name, an Objective as is, a callable wrapped.

    `distill` copies `model` (the dense model, before any pruning) as its frozen reference.
    """
    if loss is None:
        return CrossEntropy()
    if isinstance(loss, Objective):
        return loss
    if isinstance(loss, str):
        return _named(loss, model)
    if callable(loss):
        return LossFunction(loss)
    raise PrunekitError(f"loss={loss!r} is invalid: pass a name ({', '.join(OBJECTIVES)}), a "
                        "prunekit.objectives.Objective, or a callable loss(model, batch) -> scalar tensor")


def _named(name: str, model: nn.Module | None) -> Objective:
    if name == "cross-entropy":
        return CrossEntropy()
    if name == "causal-lm":
        return CausalLM()
    if name == "model":
        return ModelLoss()
    if name == "distill":
        if model is None:
            raise PrunekitError("loss='distill' matches the dense model's outputs and needs that model")
        return Distill(model)
    raise PrunekitError(f"loss={name!r} is invalid: set it to one of {', '.join(OBJECTIVES)}, an Objective "
                        "or a callable loss(model, batch) -> scalar tensor")


def infer_objective(loss: Loss, model: nn.Module, batch: Batch) -> Objective:
    """`loss=` made concrete, inferred from a first batch when None.

    A mapping batch with labels → the model's own loss; `(inputs, integer targets)` → cross-entropy;
    anything else must be named (a mapping without labels: 'causal-lm' or 'distill').
    """
    if loss is not None:
        return as_objective(loss, model)
    if isinstance(batch, Mapping):
        if LABELS in batch:
            return ModelLoss()
        raise PrunekitError(f"cannot tell the loss of batches with keys {sorted(batch)} and no labels: pass "
                            "loss='causal-lm' (a language model), loss='distill' (match the dense model's outputs) "
                            "or a callable loss(model, batch)")
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and not batch[1].is_floating_point():
        return CrossEntropy()
    raise PrunekitError(f"cannot tell the loss of a {type(batch).__name__} batch: pass (inputs, class indices) "
                        "for cross-entropy, or loss= one of " + ", ".join(OBJECTIVES) + " or a callable")


def probe(objective: Objective, model: nn.Module, batch: Batch) -> None:
    """Run the objective once on a batch, so that a batch the model cannot take, a loss that is not a scalar,
    or one that is NaN fails here, in one line, before any work."""
    try:
        with torch.no_grad():
            loss, _ = objective.loss(model, batch)
    except PrunekitError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as error:
        detail = " ".join(str(error).split())[:300]
        raise PrunekitError(f"the model cannot take the data's batches with this loss ({type(error).__name__}: "
                            f"{detail}); check the batch's keys or shapes, or pass another loss=") from None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise PrunekitError("the loss is not a scalar tensor: return the mean loss over the batch")
    if not torch.isfinite(loss):
        raise PrunekitError(f"the loss on the first batch is {float(loss)}: check the model, the data and the loss "
                            "(a dense model should give a finite loss)")


# ---------------------------------------------------------------- batches and outputs

def call_model(model: nn.Module, inputs: Batch) -> Any:
    """`model(**inputs)` for a mapping, `model(inputs)` for a tensor."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def without_labels(batch: Batch) -> Batch:
    """What the model is called with: the mapping less its labels, or the inputs of an (inputs, targets) pair."""
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if key != LABELS}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def targets_of(batch: Batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise PrunekitError(f"the batch has no labels (keys {sorted(batch)}); pass a loss that needs none, "
                                "e.g. loss='distill' or 'causal-lm'")
        return batch[LABELS]
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise PrunekitError(f"cross-entropy takes (inputs, targets) batches, got a {type(batch).__name__}; "
                            "pass loss=<an Objective or a callable loss(model, batch)> for other batches")
    return batch[1]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, or its `.logits`."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise PrunekitError(f"the model returned a {type(output).__name__} without logits; pass loss='distill' "
                        "(matches any output) or a callable loss(model, batch)")


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor an output stands for: itself, its logits, or its last hidden state (an encoder's)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PrunekitError(f"cannot find the output tensor of a {type(output).__name__}; pass a callable loss")


def pooled(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """One vector per example: sequence outputs averaged over their attended tokens, others flattened."""
    if outputs.dim() == 3:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        weights = torch.ones(outputs.shape[:2], device=outputs.device) if mask is None else mask.to(outputs.dtype)
        return (outputs * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    return outputs.flatten(1)


def map_batch(batch: Batch, function: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """The batch with `function` applied to every tensor in it (in a tuple, list or mapping), the rest kept."""
    if isinstance(batch, torch.Tensor):
        return function(batch)
    if isinstance(batch, Mapping):
        return {key: map_batch(value, function) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(item, function) for item in batch)
    return batch


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor in it moved to `device`."""
    return map_batch(batch, lambda tensor: tensor.to(device, non_blocking=True))


def slice_batch(batch: Batch, start: int, stop: int, squeeze: bool = False) -> Batch:
    """Examples start..stop of a batch (`squeeze`: the one example without its batch dimension)."""
    return map_batch(batch, lambda tensor: tensor[start] if squeeze else tensor[start:stop])


def concat_batches(parts: list[Batch], key: str | None = None) -> Batch:
    """Batches of one kind joined along the batch dimension; sequences padded to the longest (token batches
    are padded per batch): with 0 (ids, attention masks), labels with -100 (ignored by the losses)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() > 1 and len({part.shape[1] for part in parts}) > 1:
            length = max(part.shape[1] for part in parts)
            fill = -100 if key == LABELS else 0
            parts = [F.pad(part, (0, 0) * (part.dim() - 2) + (0, length - part.shape[1]), value=fill)
                     for part in parts]
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {name: concat_batches([part[name] for part in parts], name) for name in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([part[i] for part in parts]) for i in range(len(first)))
    return first


def batch_examples(batch: Batch) -> int:
    """Examples in a batch: the first dimension of its first tensor that has one."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return item.shape[0]
    raise PrunekitError(f"a batch of type {type(batch).__name__} holds no tensor with a batch dimension; "
                        "pass (inputs, targets) tuples or mappings of tensors")
