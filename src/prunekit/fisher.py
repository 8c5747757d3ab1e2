"""The empirical Fisher as an n×p matrix of gradients, and the memory it will take.

The second-order pruners (CHITA, WoodFisher, OBD) model the loss near the current weights with
the empirical Fisher F = (1/n) GᵀG, where the rows of G are n gradients of the loss with respect
to the prunable weights: per-example gradients (`fisher_batch=1`) or means over mini-batches of
`fisher_batch` examples. G is n×p; nothing here ever forms the p×p matrix.

Gradients are taken with torch.func (functional_call + vmap + grad) with respect to the *effective*
weights, i.e. the weights the model computes with (mask included), every other parameter and
buffer fixed, batch norm in eval mode. For a model that already carries masks this is the gradient
of the loss at the pruned point in *every* coordinate, pruned ones included: the one a local
quadratic model around that point needs (CHITA++ stages and gradual events may revive weights).
The gradient with respect to the masked original would be zero at pruned positions.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize

from .cost import CostMeter
from .errors import PrunekitError
from .hparams import integer, number, setting
from .masks import Mask, mask_buffer_key, parametrizations_of, parametrized_key
from .modes import model_mode
from .objectives import Batch, CrossEntropy, Objective, batch_examples, concat_batches, map_batch, slice_batch
from .targets import Target

GIB = 2**30
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
BLOCK_CHUNK_BYTES = 2**28  # block matrices (float64) formed and factorised at once; a solve holds about 3× as much


@dataclass
class FisherHparams:
    """How many gradients make the empirical Fisher, and how much memory the method may use."""

    fisher_samples: int = setting(1000, "n: gradients in the empirical Fisher (rows of G); memory and time grow "
                                  "linearly with it", integer(1))
    fisher_batch: int = setting(1, "examples averaged into each gradient (1: per-example gradients); n × this "
                                "examples are used", integer(1))
    fisher_chunk: int = setting(128, "examples per vectorised gradient call (speed vs memory; does not change the "
                                "result)", integer(1))
    max_memory: float = setting(8.0, "GiB the method may allocate; it refuses before any work when its estimate "
                                "is above", number(0, low_open=True))


# ---------------------------------------------------------------- layout of the flat weight vector

@dataclass(frozen=True)
class WeightLayout:
    """The prunable tensors laid end to end as one vector of p weights (the columns of G)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, targets: Sequence[Target]) -> WeightLayout:
        return cls(tuple(t.name for t in targets), tuple(t.shape for t in targets))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def p(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].detach().reshape(-1) for name in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vector, self.sizes)
        return {name: part.reshape(shape) for name, part, shape in zip(self.names, parts, self.shapes)}

    def write(self, targets: Sequence[Target], vector: torch.Tensor) -> None:
        """Copy a flat vector into the targets' dense weights (a solver's weights after pruning)."""
        tensors = self.unflatten(vector)
        with torch.no_grad():
            for target in targets:
                target.dense.copy_(tensors[target.name])

    def slices(self) -> list[slice]:
        """Each tensor's columns."""
        offsets = [0, *accumulate(self.sizes)]
        return [slice(a, b) for a, b in pairwise(offsets)]


def block_width(size: int, block_size: int) -> int:
    """The width of a tensor's blocks: ⌊size/block_size⌋ blocks (at least 1) of equal width, the last one shorter."""
    return math.ceil(size / max(1, size // block_size))


def block_chunks(columns: slice, block_size: int, rows: int, chunk_bytes: int) -> Iterator[tuple[slice, int]]:
    """A tensor's columns (`columns`) in chunks of whole blocks (`block_width`), with each chunk's block Hessians
    and its `rows` rows of G's columns (float64) at most `chunk_bytes`: (the chunk's columns, block width)."""
    size = columns.stop - columns.start
    width = block_width(size, block_size)
    step = width * max(1, chunk_bytes // matrix_bytes(width, max(width, rows), torch.float64))
    for start in range(columns.start, columns.stop, step):
        yield slice(start, min(start + step, columns.stop)), width


def blocked(vector: torch.Tensor, width: int) -> torch.Tensor:
    """A vector as rows of `width` (float64; the last row padded with zeros)."""
    count = math.ceil(vector.shape[-1] / width)
    padded = torch.nn.functional.pad(vector.to(torch.float64), (0, count * width - vector.shape[-1]))
    return padded.reshape(*vector.shape[:-1], count, width)


def blocked_rows(rows: torch.Tensor, width: int) -> torch.Tensor:
    """G's columns (n×q) as blocks of `width` columns: (blocks, n, width), float64, the last padded with zeros."""
    return blocked(rows, width).transpose(0, 1)


# ---------------------------------------------------------------- the gradient matrix

@dataclass
class GradientMatrix:
    """G (n×p): row i is the gradient of the loss on the i-th example (or mini-batch)."""

    rows: torch.Tensor
    layout: WeightLayout
    batch: int = 1  # examples averaged into each row
    route: str = "vmap"  # how the rows were computed: "vmap" (batched) or "loop" (one row at a time)

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def p(self) -> int:
        return self.rows.shape[1]

    loss_gradient_sum: torch.Tensor | None = None  # n × the loss's mean gradient, where the rows are not gradients
    reached: bool = True  # some row is not zero (RowGradients.reached)

    def gradient_sum(self, columns: slice = slice(None)) -> torch.Tensor:
        """Gᵀ·1 on `columns`: n times the mean gradient (the first-order term of the local model); for curvature
        rows that are not the loss's gradients (distill's), n times its mean gradient computed apart, at the
        rows' scale."""
        if self.loss_gradient_sum is not None:
            return self.loss_gradient_sum[columns]
        return self.rows[:, columns].sum(dim=0)


def fisher_examples(data: Iterable, count: int, at_least: int | None = None,
                    needs: str = "fisher_samples × fisher_batch") -> Batch:
    """The first `count` examples `data` yields, as one batch of the data's kind (tuple or mapping); all of
    them when it yields fewer but at least `at_least` (default: `count`; `needs` says why, in the error)."""
    parts, have = [], 0
    for batch in data:
        take = min(count - have, batch_examples(batch))
        parts.append(slice_batch(batch, 0, take))
        have += take
        if have == count:
            break
    needed = count if at_least is None else at_least
    if have < needed:
        raise PrunekitError(f"the Fisher needs {needed} examples ({needs}) but the data gave only {have}; lower "
                            "--fisher-samples or --fisher-batch, or pass more data")
    return concat_batches(parts)


class RowGradients:
    """Rows of G, a few at a time: (row indices, (rows, p) float32 tensor), one row per `batch` consecutive examples.

    Each row is the gradient of the objective's mean loss over its examples with respect to the targets'
    effective weights; every other parameter and buffer keeps its value, and batch norm uses its running
    statistics and dropout is off (eval mode). Rows are computed by torch.func (vmap over grad); where
    vmap cannot batch an operation of the model, one row at a time (`route` becomes "loop": same
    values, slower). Examples are counted in `meter` (the hooks cannot see them).

    Padded token batches (a mapping with a right-padded `attention_mask`, one example a row) are batched by
    length: each example trimmed to its tokens, without the mask (all ones), so that models whose mask
    handling inspects the mask's values (Hugging Face's skip of an all-ones mask) still batch under vmap,
    and no row pays for padding. The rows then come in order of length, with their indices.
    """

    def __init__(self, model: nn.Module, targets: Sequence[Target], examples: Batch,
                 objective: Objective | None = None, *, batch: int = 1, chunk: int = 128,
                 meter: CostMeter | None = None) -> None:
        count = batch_examples(examples)
        if count % batch:
            raise PrunekitError(f"{count} examples do not split into gradients of {batch}")
        self.model, self.meter, self.batch = model, meter, batch
        self.objective, examples = (objective or CrossEntropy()).curvature(examples)
        self.rows = count // batch
        self.rows_per_call = max(1, chunk // batch)
        self.calls = _calls_by_length(examples, self.rows_per_call) if batch == 1 else None
        if self.calls is None:
            grouped = map_batch(examples, lambda t: t.reshape(-1, batch, *t.shape[1:]))
            self.calls = [(torch.arange(start, min(start + self.rows_per_call, self.rows)),
                           slice_batch(grouped, start, start + self.rows_per_call))
                          for start in range(0, self.rows, self.rows_per_call)]
        self.weights, self.fixed, self.keys = _effective_weights(targets)
        self.route = "vmap"
        self.reached = False  # some gradient was not zero: the loss depends on these weights

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with model_mode(self.model, training=False):
            for indices, rows in self.calls:
                size = indices.numel()
                # no_grad outside the transform: the biases and BN parameters must not record a graph
                with torch.no_grad(), (self.meter.paused() if self.meter is not None else contextlib.nullcontext()):
                    gradients = self._gradients(rows, size)
                if self.meter is not None:
                    self.meter.count(forward_examples=size * self.batch, backward_examples=size * self.batch)
                flat = torch.cat([gradients[key].reshape(size, -1) for key in self.keys], dim=1)
                self.reached = self.reached or bool(flat.any())
                # Neither these per-tensor gradients nor the rows may outlive the next call: each is chunk × p.
                del gradients
                yield indices, flat
                del flat

    def _row_loss(self, variables: dict[str, torch.Tensor], row: Batch) -> torch.Tensor:
        return self.objective.loss(_WithWeights(self.model, {**variables, **self.fixed}), row)[0]

    def _gradients(self, rows: Batch, size: int) -> dict[str, torch.Tensor]:
        if self.route == "vmap":
            try:
                return vmap(grad(self._row_loss), in_dims=(None, 0))(self.weights, rows)
            except PrunekitError:
                raise
            except Exception:  # an operation vmap cannot batch (data-dependent control flow, .item(), ...)
                self.route = "loop"
        per_row = [grad(self._row_loss)(self.weights, slice_batch(rows, i, i + 1, squeeze=True)) for i in range(size)]
        return {key: torch.stack([gradients[key] for gradients in per_row]) for key in self.keys}


ATTENTION_MASK = "attention_mask"


def _calls_by_length(examples: Batch, per_call: int) -> list[tuple[torch.Tensor, Batch]] | None:
    """One example a row, in calls of at most `per_call` examples of one length, each trimmed to its tokens and
    without its (all-ones) attention mask; None unless the examples carry a right-padded attention mask."""
    mask = _find(examples, ATTENTION_MASK)
    if mask is None or mask.dim() != 2:
        return None
    lengths = mask.ne(0).sum(dim=1)
    if not torch.equal(mask.ne(0), torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)):
        return None  # padded on the left, or holes: the mask must stay
    width = mask.shape[1]
    calls = []
    for length in lengths.unique().tolist():
        indices = (lengths == length).nonzero().squeeze(1)
        for part in torch.split(indices, per_call):
            rows = map_batch(_without(examples, ATTENTION_MASK),
                             lambda t: t[part.to(t.device)][:, :length] if t.dim() >= 2 and t.shape[1] == width
                             else t[part.to(t.device)])
            calls.append((part.cpu(), map_batch(rows, lambda t: t.unsqueeze(1))))
    return calls


def _find(batch: Batch, key: str) -> torch.Tensor | None:
    """`batch[key]`, looked for in nested mappings too (an objective's curvature batch wraps the inputs)."""
    if not isinstance(batch, Mapping):
        return None
    if key in batch:
        return batch[key]
    return next((found for value in batch.values() if (found := _find(value, key)) is not None), None)


def _without(batch: Batch, key: str) -> Batch:
    if not isinstance(batch, Mapping):
        return batch
    return {name: _without(value, key) for name, value in batch.items() if name != key}


class _WithWeights:
    """The model computing with given tensors (torch.func.functional_call); other attributes are the model's."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self._model, self._tensors = model, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._model, self._tensors, args, kwargs, strict=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _effective_weights(targets: Sequence[Target]) -> tuple[dict, dict, list[str]]:
    """What to pass functional_call so that the variables are the effective weights.

    A masked weight is `original * mask`: the effective weight goes in as `original` and the mask is
    replaced by ones, so the gradient reaches every coordinate. Returns (variables, fixed, variable
    name of each target).
    """
    weights, fixed, keys = {}, {}, []
    for target in targets:
        key = target.name
        if parametrize.is_parametrized(target.module, "weight"):
            key = parametrized_key(target.name)
            for index, parametrization in enumerate(parametrizations_of(target.module)):
                if not isinstance(parametrization, Mask):
                    raise PrunekitError(f"{target.name} carries a {type(parametrization).__name__} parametrization; "
                                        "the Fisher only sees through prunekit masks: remove it first")
                fixed[mask_buffer_key(target.name, index)] = torch.ones_like(parametrization.mask)
        weights[key] = target.weight.detach()
        keys.append(key)
    return weights, fixed, keys


def loss_with_weights(model: nn.Module, targets: Sequence[Target], weights: Mapping[str, torch.Tensor],
                      objective: Objective, batch: Batch) -> torch.Tensor:
    """The objective's mean loss on `batch` with the targets computing with `weights` (by target name; masks
    ignored) and everything else as it is, in eval mode: a candidate's loss without writing it into the model."""
    variables, fixed, keys = _effective_weights(targets)
    variables.update({key: weights[target.name].to(variables[key].dtype) for key, target in zip(keys, targets)})
    with torch.no_grad(), model_mode(model, training=False):
        return objective.loss(_WithWeights(model, {**variables, **fixed}), batch)[0]


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "malloc_trim") else None


_LIBC = _glibc()


def release_freed_memory() -> None:
    """Give the memory freed so far back to the system (glibc's malloc_trim; elsewhere nothing).

    A gradient call's per-tensor gradients (a chunk × a tensor's size, below glibc's 32 MB mmap threshold) come
    from the heap, and glibc keeps the heap once they are freed: on ResNet-20 (n = 1000, chunks of 128) that was
    0.6 GiB still resident beside G through the whole solve, more than half of G itself."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def gradient_matrix(model: nn.Module, targets: Sequence[Target], examples: Batch, objective: Objective | None = None,
                    *, batch: int = 1, chunk: int = 128, dtype: torch.dtype = torch.float32,
                    meter: CostMeter | None = None) -> GradientMatrix:
    """G for the given examples (one batch of n × `batch` examples), stored in `dtype` (float64 for solvers)."""
    layout = WeightLayout.of(targets)
    gradients = RowGradients(model, targets, examples, objective, batch=batch, chunk=chunk, meter=meter)
    rows = torch.empty(gradients.rows, layout.p, dtype=dtype, device=layout_device(targets))
    for indices, part in gradients:
        rows[indices.to(rows.device)] = part.to(dtype)
        del part  # before the next call computes its own
    loss_gradient_sum = separate_gradient_sum(model, targets, examples, objective, gradients.rows, chunk * batch, meter)
    release_freed_memory()
    return GradientMatrix(rows, layout, batch, gradients.route,
                          None if loss_gradient_sum is None else loss_gradient_sum.to(dtype),
                          reached=gradients.reached)


def require_some_gradient(reached: bool) -> None:
    """Refuse a Fisher of all-zero gradients (over every target): it gives nothing to prune by, and every method
    on it would fall back to the weights' order without saying so."""
    if not reached:
        raise PrunekitError("every gradient of the objective is zero at these weights (a frozen model, or a loss "
                            "that does not depend on them): the empirical Fisher gives nothing to prune by; check "
                            "the loss, or prune by magnitude")


def separate_gradient_sum(model: nn.Module, targets: Sequence[Target], examples: Batch, objective: Objective | None,
                          rows: int, chunk: int, meter: CostMeter | None) -> torch.Tensor | None:
    """For an objective whose curvature rows are not its gradients but which scales one (distill's MSE): `rows`
    times its mean gradient at the rows' scale (GradientMatrix.gradient_sum); None otherwise."""
    if objective is None or objective.curvature_has_gradient or objective.gradient_scale is None:
        return None
    return objective.gradient_scale * rows * mean_gradient(model, targets, examples, objective, chunk=chunk,
                                                            meter=meter)


def mean_gradient(model: nn.Module, targets: Sequence[Target], examples: Batch, objective: Objective, *,
                  chunk: int, meter: CostMeter | None = None) -> torch.Tensor:
    """The objective's mean loss gradient over the examples with respect to the targets' effective weights (p),
    in eval mode as the rows are, `chunk` examples a backward pass."""
    variables, fixed, keys = _effective_weights(targets)
    count = batch_examples(examples)
    total = torch.zeros(WeightLayout.of(targets).p, dtype=torch.float64, device=layout_device(targets))
    # no_grad outside the transform, as for the rows: the other parameters must not record a graph
    with model_mode(model, training=False), torch.no_grad(), (meter.paused() if meter is not None
                                                              else contextlib.nullcontext()):
        for start in range(0, count, chunk):
            part = slice_batch(examples, start, start + chunk)
            size = batch_examples(part)
            parts = grad(lambda v: objective.loss(_WithWeights(model, {**v, **fixed}), part)[0])(variables)
            total += torch.cat([parts[key].flatten() for key in keys]).to(torch.float64) * size
            if meter is not None:
                meter.count(forward_examples=size, backward_examples=size)
    return total / count


def diagonal_fisher(model: nn.Module, targets: Sequence[Target], examples: Batch, objective: Objective | None = None,
                    *, batch: int = 1, chunk: int = 128, meter: CostMeter | None = None) -> torch.Tensor:
    """diag((1/n) GᵀG) without storing G (p, float64)."""
    total = torch.zeros(WeightLayout.of(targets).p, dtype=torch.float64, device=layout_device(targets))
    gradients = RowGradients(model, targets, examples, objective, batch=batch, chunk=chunk, meter=meter)
    for _, part in gradients:
        # In place, in float32 over one call's rows: a float64 copy and its square had been 4× the rows.
        total += part.square_().sum(dim=0)
        del part  # before the next call computes its own
    require_some_gradient(gradients.reached)
    return total / gradients.rows


def layout_device(targets: Sequence[Target]) -> torch.device:
    return targets[0].dense.device


def tensor_groups(targets: Sequence[Target], column_bytes: float, budget: float) -> list[list[int]]:
    """Consecutive targets (by index) grouped so that each group's columns, at `column_bytes` a weight, take at
    most `budget` (a tensor larger than that is a group of its own)."""
    groups, size = [], 0.0
    for index, target in enumerate(targets):
        if groups and size + target.numel * column_bytes <= budget:
            groups[-1].append(index)
            size += target.numel * column_bytes
        else:
            groups.append([index])
            size = target.numel * column_bytes
    return groups


class GroupedGradients:
    """G one group of targets at a time: (the group's first column in the layout of all targets, its G), computed
    anew on each pass over the groups, except a single group's, which is kept (a second pass costs nothing)."""

    def __init__(self, model: nn.Module, targets: Sequence[Target], examples: Batch, objective: Objective | None,
                 groups: list[list[int]], *, batch: int, chunk: int, dtype: torch.dtype = torch.float32,
                 meter: CostMeter | None = None) -> None:
        self.model, self.targets, self.examples, self.objective, self.groups = model, targets, examples, objective, groups
        self.settings = {"batch": batch, "chunk": chunk, "dtype": dtype, "meter": meter}
        self.kept: GradientMatrix | None = None
        self.route = "vmap"

    def __iter__(self) -> Iterator[tuple[int, GradientMatrix]]:
        starts = [columns.start for columns in WeightLayout.of(self.targets).slices()]
        reached = False
        for members in self.groups:
            g = self.kept
            if g is None:
                g = gradient_matrix(self.model, [self.targets[i] for i in members], self.examples, self.objective,
                                    **self.settings)
                self.route = g.route
                if len(self.groups) == 1:
                    self.kept = g
            reached = reached or g.reached
            yield starts[members[0]], g
        require_some_gradient(reached)  # a group alone may be out of the loss's reach (an unused head)


# ---------------------------------------------------------------- the blocks' Hessians, for the block solvers

@dataclass
class BlockChunk:
    """Consecutive whole blocks of one tensor (`block_chunks`) with what the block solvers need of G there."""

    columns: slice  # in the layout of every target
    width: int  # the tensor's block width
    hessian: torch.Tensor  # (blocks, width, width) float64: each block's GᵀG (the last block padded with zeros)
    gradient_sum: torch.Tensor  # Gᵀ1 on the columns (GradientMatrix.gradient_sum)
    seen: torch.Tensor  # bool per column: G is not all zero there
    scale: float  # the tensor's ‖G_t‖²/(n·p_t)
    n: int  # rows of G
    batch: int  # examples per row


def chunks_of_gradients(gradients: GroupedGradients, block_size: int) -> Iterator[BlockChunk]:
    """Every chunk of blocks of every target, from G computed a group of targets at a time."""
    for offset, g in gradients:
        for tensor in g.layout.slices():
            scale = float(torch.linalg.vector_norm(g.rows[:, tensor])) ** 2 / (g.n * (tensor.stop - tensor.start))
            for local, width in block_chunks(tensor, block_size, g.n, BLOCK_CHUNK_BYTES):
                rows = blocked_rows(g.rows[:, local], width)
                yield BlockChunk(slice(offset + local.start, offset + local.stop), width, rows.transpose(1, 2) @ rows,
                                 g.gradient_sum(local), g.rows[:, local].ne(0).any(dim=0), scale, g.n, g.batch)


class AccumulatedBlocks:
    """Every block's GᵀG summed over the rows of G as they are computed, G itself never held: one pass over the
    examples, about p × block width numbers kept (in `dtype`), fewer than G's n × p when the blocks are narrower
    than n; iterated as `BlockChunk`s any number of times at no further gradient cost."""

    def __init__(self, model: nn.Module, targets: Sequence[Target], examples: Batch, objective: Objective | None,
                 block_size: int, *, batch: int, chunk: int, dtype: torch.dtype = torch.float32,
                 meter: CostMeter | None = None) -> None:
        layout = WeightLayout.of(targets)
        gradients = RowGradients(model, targets, examples, objective, batch=batch, chunk=chunk, meter=meter)
        self.n, self.batch = gradients.rows, batch
        self.pieces = [(tensor, local, width) for tensor in layout.slices()
                       for local, width in block_chunks(tensor, block_size, 0, BLOCK_CHUNK_BYTES)]
        device = layout_device(targets)
        self.hessians = [torch.zeros(math.ceil((local.stop - local.start) / width), width, width, dtype=dtype,
                                     device=device) for _, local, width in self.pieces]
        sums = torch.zeros(layout.p, dtype=torch.float64, device=device)
        for _, part in gradients:
            sums += part.sum(dim=0)
            for hessian, (_, local, width) in zip(self.hessians, self.pieces):
                rows = _blocked_columns(part[:, local].to(dtype), width)
                hessian.baddbmm_(rows.transpose(1, 2), rows)
            del part, rows  # before the next call computes its own
        require_some_gradient(gradients.reached)
        self.route = gradients.route
        separate = separate_gradient_sum(model, targets, examples, objective, self.n, chunk * batch, meter)
        self.gradient_sum = sums if separate is None else separate

    def __iter__(self) -> Iterator[BlockChunk]:
        squares: dict[int, float] = {}
        for (tensor, _, _), hessian in zip(self.pieces, self.hessians):
            squares[tensor.start] = squares.get(tensor.start, 0.0) + float(hessian.diagonal(dim1=1, dim2=2).sum())
        for (tensor, local, width), hessian in zip(self.pieces, self.hessians):
            diagonal = hessian.diagonal(dim1=1, dim2=2).reshape(-1)[:local.stop - local.start]
            scale = squares[tensor.start] / (self.n * (tensor.stop - tensor.start))
            yield BlockChunk(local, width, hessian.to(torch.float64), self.gradient_sum[local], diagonal > 0, scale,
                             self.n, self.batch)


def _blocked_columns(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Rows (c×q) as blocks of `width` columns, (blocks, c, width), in their dtype; the last padded with zeros."""
    count = math.ceil(rows.shape[1] / width)
    padded = torch.nn.functional.pad(rows, (0, count * width - rows.shape[1]))
    return padded.reshape(rows.shape[0], count, width).transpose(0, 1)


def accumulated_hessian_bytes(targets: Sequence[Target], block_size: int, dtype: torch.dtype) -> int:
    """What `AccumulatedBlocks` keeps: every tensor's blocks' width × width matrices."""
    total = 0
    for target in targets:
        width = block_width(target.numel, block_size)
        total += math.ceil(target.numel / width) * matrix_bytes(width, width, dtype)
    return total


# ---------------------------------------------------------------- memory

def matrix_bytes(rows: int, columns: int, dtype: torch.dtype = torch.float32) -> int:
    return rows * columns * torch.empty((), dtype=dtype).element_size()


# A vectorised gradient call's peak: GRADIENT_CALL_FACTOR times its (chunk, p) float32 rows (the per-tensor
# gradients, their concatenation, torch.func's buffers) and ACTIVATION_FACTOR times what autograd saves for its
# examples' forward passes (the saved tensors and, in the backward pass, their gradients). Fitted to the peak of
# one call on ResNet-20 (chunks of 32 and 128: -26 / -6%), ResNet-18 (8 and 24: -1 / +4%) and MiniLM (8 sequences
# of 40 and 128 tokens: +8 / +9%); the rows alone had counted a third of ResNet-20's.
GRADIENT_CALL_FACTOR = 2.2
ACTIVATION_FACTOR = 2.5


def gradient_call_bytes(hp: FisherHparams, p: int, chunk: int | None = None, activations: int = 0) -> int:
    """What one vectorised gradient call of `chunk` examples (default --fisher-chunk) holds at its peak, for a model
    whose autograd saves `activations` bytes an example (`saved_activation_bytes`)."""
    examples = hp.fisher_chunk if chunk is None else chunk
    return math.ceil(GRADIENT_CALL_FACTOR * matrix_bytes(examples, p) + call_activation_bytes(examples, activations))


def call_activation_bytes(examples: int, activations: int) -> int:
    """The part of a gradient call of `examples` examples that its forward and backward passes hold."""
    return math.ceil(ACTIVATION_FACTOR * examples * activations)


def fitted_chunk(hp: FisherHparams, p: int, held: int, activations: int = 0) -> int:
    """--fisher-chunk, or as many examples per gradient call as fit beside `held` bytes within --max-memory (at
    least 1): the chunk changes the speed, never the result."""
    free = hp.max_memory * GIB - held
    return max(1, min(hp.fisher_chunk, int(free // gradient_call_bytes(hp, p, chunk=1, activations=activations))))


def saved_activation_bytes(model: nn.Module, targets: Sequence[Target], objective: Objective, batch: Batch) -> int:
    """What autograd saves for the backward pass of the batch's first example, as G's rows take it (the curvature
    loss, eval mode, gradients with respect to the targets' effective weights), the model's own tensors aside: the
    per-example memory of a gradient call beside its rows, which no parameter count shows (a conv net's feature
    maps, a transformer's attention)."""
    # A copy: a view would count the whole batch's storage as saved.
    curvature, example = objective.curvature(map_batch(slice_batch(batch, 0, 1), torch.clone))
    variables, fixed, _ = _effective_weights(targets)
    variables = {key: tensor.detach().requires_grad_() for key, tensor in variables.items()}
    own = {tensor.untyped_storage().data_ptr()
           for tensor in (*variables.values(), *fixed.values(), *model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with model_mode(model, training=False), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        curvature.loss(_WithWeights(model, {**variables, **fixed}), example)
    return sum(saved.values())


def column_bytes(hp: FisherHparams, dtype: torch.dtype = torch.float32) -> int:
    """What one weight costs a streamed pass: its column of G and of the gradient calls in flight."""
    return matrix_bytes(hp.fisher_samples, 1, dtype) + gradient_call_bytes(hp, 1)


def streamed_groups(targets: Sequence[Target], hp: FisherHparams, fixed: Mapping[str, int],
                    dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """The groups of targets whose G is computed together: as large as --max-memory allows beside `fixed`."""
    return tensor_groups(targets, column_bytes(hp, dtype), hp.max_memory * GIB - sum(fixed.values()))


def streamed_parts(targets: Sequence[Target], hp: FisherHparams, fixed: Mapping[str, int],
                   dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """What a method that streams G by groups of targets (`streamed_groups`) holds: the widest group's G and
    gradient calls' rows, and `fixed` (the calls' activations among them)."""
    widest = max(sum(targets[i].numel for i in members) for members in streamed_groups(targets, hp, fixed, dtype))
    return {"G of one group of tensors": matrix_bytes(hp.fisher_samples, widest, dtype),
            "gradient calls": gradient_call_bytes(hp, widest), **fixed}


def require_streamed_memory(method: str, targets: Sequence[Target], hp: FisherHparams, fixed: Mapping[str, int],
                            knobs: str, dtype: torch.dtype = torch.float32) -> int:
    """`require_memory` on `streamed_parts`."""
    return require_memory(method, streamed_parts(targets, hp, fixed, dtype), hp, knobs)


def require_memory(method: str, parts: Mapping[str, int], hp: FisherHparams, knobs: str,
                   apart: tuple[str, ...] = ()) -> int:
    """The estimate of the peak, refused before allocating when it exceeds --max-memory, naming what would reduce
    it. The parts named in `apart` are phases never held at once: only the largest of them counts."""
    needed = memory_needed(parts, apart)
    if needed > hp.max_memory * GIB:
        detail = ", ".join(f"{what} {size / GIB:.2f}" for what, size in parts.items() if size)
        phases = f"; of {' and '.join(apart)} only the larger at once" if apart else ""
        raise PrunekitError(f"{method} would need about {needed / GIB:.2f} GiB, above --max-memory "
                            f"{hp.max_memory:g} ({detail}{phases}); lower {knobs}, or raise --max-memory")
    return needed


def memory_needed(parts: Mapping[str, int], apart: tuple[str, ...] = ()) -> int:
    together = sum(size for what, size in parts.items() if what not in apart)
    return together + max((parts[what] for what in apart), default=0)
