"""Coupled channel groups: the channels that must be removed together, found by running the model once.

A channel of a convolution's (or linear layer's) output is read by every layer downstream until
the next layer that makes new channels: batch norms, activations and pools keep it, a residual
add merges it with the channel of the same index on the other branch, a flatten spreads it over
the features a linear layer reads. To remove it physically, every slice that carries it goes:
the producers' output rows (and biases, batch-norm entries) and the consumers' input columns.
A *group* is such a set, one channel wide; a *family* is the groups made by the same layers (the
16 channels of a ResNet stage's residual stream are one family of 16 groups).

The model runs once on example inputs while prunekit follows the channel dimension of every
tensor: layers with weights are seen through forward hooks (each output channel gets a fresh id,
each input channel is read as the id it carries), the functions between them through a
`TorchFunctionMode` (elementwise ops and pools pass ids on; adds union them; a flatten repeats
them; a channel zero-pad, as in ResNet's option-A shortcut, adds ids of zero channels). Channels
reaching the model's output, or an operation this module does not follow (a LayerNorm mixes its
channels; a view that splits them into attention heads), are pinned: never pruned, with the
reason kept. Depthwise convolutions tie their outputs to their inputs; grouped ones tie the same
position in every group, so groups shrink evenly.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import PrunekitError
from .modes import model_mode
from .objectives import call_model
from .targets import IN_OUT, OUT_IN, Layout, weight_layout

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Functions that keep every channel where it is (outputs the shape of their input).
ELEMENTWISE = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish", "leaky_relu",
    "elu", "selu", "mish", "softplus", "dropout", "dropout1d", "dropout2d", "dropout3d", "contiguous", "clone",
    "detach", "to", "float", "half", "double", "__neg__", "neg", "abs", "clamp", "clamp_min", "exp", "log", "sqrt",
    "rsqrt", "square", "erf", "sin", "cos", "reciprocal", "type_as",
})
# Functions that reduce space within each channel (channels on dim 1).
POOLS = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "_adaptive_max_pool2d",
})
# Elementwise functions of two tensors: the channels of the same index are merged.
BINARY = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
                    "__isub__", "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
                    "__rtruediv__", "__itruediv__", "pow", "__pow__", "__rpow__"})
RESHAPES = frozenset({"flatten", "view", "reshape"})
TRANSPOSES = frozenset({"transpose", "transpose_", "swapaxes", "swapdims", "permute"})
MATMULS = frozenset({"matmul", "__matmul__", "bmm"})
SOFTMAXES = frozenset({"softmax", "log_softmax", "_softmax"})
CONCATENATIONS = frozenset({"cat", "concat", "concatenate"})
SPLITS = frozenset({"split", "chunk", "tensor_split", "split_with_sizes"})


@dataclass
class Layer:
    """A weight's coupling: the channel id of each of its output rows and input positions.

    `in_ids` is None where the input carries no ids (the model's input); a depthwise convolution
    has no input positions of its own (its rows are its input channels).
    """

    name: str  # the weight's state-dict name, e.g. `layer1.0.conv1.weight`
    module: nn.Module
    layout: Layout
    out_ids: list[int]
    in_ids: list[int] | None
    depthwise: bool = False


@dataclass
class Norm:
    """A per-channel module (batch norm) whose parameters and statistics follow its channels."""

    module_name: str
    module: nn.Module
    ids: list[int]


@dataclass
class Pad:
    """A channel zero-pad inside `module` (ResNet's option-A shortcut): ids of the zero channels before and after."""

    module_name: str
    module: nn.Module | None
    before: list[int]
    after: list[int]


@dataclass
class Split:
    """A split of channels into parts inside `module` (GPT-2's query, key and value): each part's ids.

    `by_size`: the parts were given by their size (`split`), not by their number (`chunk`).
    """

    module_name: str
    module: nn.Module | None
    parts: list[list[int]]
    by_size: bool


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the earlier id names the class


@dataclass
class _Label:
    dim: int
    ids: list[int]


def _name_of(func: Any) -> str:
    return getattr(func, "__name__", type(func).__name__)


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


class _Tracer(TorchFunctionMode):
    """Follows channel ids through one forward pass; `layers`, `norms`, `pads` and `pins` are what it saw."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.uf = _UnionFind()
        self.labels: dict[int, tuple[torch.Tensor, _Label]] = {}  # the tensor is kept so its id is not reused
        self.layers: dict[str, Layer] = {}
        self.norms: dict[str, Norm] = {}
        self.pads: list[Pad] = []
        self.splits: list[Split] = []
        self.pins: dict[int, str] = {}
        self.stack: list[tuple[str, nn.Module]] = []
        self.inside_layer = 0
        self.handles = [handle for name, module in model.named_modules() for handle in self._hook(name, module)]

    # ------------------------------------------------------------- hooks on modules

    def _hook(self, name: str, module: nn.Module) -> list:
        followed = _follows(module)

        def before(mod, args):
            self.stack.append((name, mod))
            self.inside_layer += followed

        def after(mod, args, output):
            self.inside_layer -= followed
            if followed and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                self._layer(name, mod, args[0], output)
            self.stack.pop()

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def where(self) -> str:
        """The innermost module running, for messages: `module 'layer1.0.conv1' (Conv2d)`."""
        if not self.stack:
            return "the model's forward"
        name, module = self.stack[-1]
        return f"module {name!r} ({type(module).__name__})" if name else f"the forward of {type(module).__name__}"

    # ------------------------------------------------------------- labels

    def label(self, tensor: Any) -> _Label | None:
        entry = self.labels.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is tensor else None

    def set_label(self, tensor: torch.Tensor, dim: int, ids: list[int]) -> None:
        if tensor.dim() > dim and tensor.shape[dim] == len(ids):
            self.labels[id(tensor)] = (tensor, _Label(dim, ids))
        else:
            self.pin(ids, f"a shape this trace does not follow in {self.where()}")

    def fresh(self, count: int) -> list[int]:
        return [self.uf.new() for _ in range(count)]

    def pin(self, ids: Iterable[int], reason: str) -> None:
        for item in ids:
            self.pins.setdefault(item, reason)

    def pin_inputs(self, values: Iterable[Any], reason: str) -> None:
        for tensor in values:
            label = self.label(tensor)
            if label is not None:
                self.pin(label.ids, reason)

    def union_all(self, a: Sequence[int], b: Sequence[int]) -> None:
        for x, y in zip(a, b):
            self.uf.union(x, y)

    # ------------------------------------------------------------- layers with weights

    def _layer(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        if isinstance(module, BATCH_NORMS):
            self._norm(name, module, x, out)
            return
        layout = weight_layout(module)
        weight = _weight_shape(module)
        out_dim = 1 if isinstance(module, CONVOLUTIONS) else out.dim() - 1
        in_features = module.in_channels if isinstance(module, CONVOLUTIONS) else weight[layout.input_dim]
        in_ids = self._read(x, out_dim, in_features)
        groups = getattr(module, "groups", 1)
        depthwise = groups > 1 and groups == in_features
        out_features = weight[layout.output_dim]
        if depthwise:
            ties = in_ids if in_ids is not None else self._pinned_fresh(in_features, "tied to the model's input")
            out_ids = [ties[o * groups // out_features] for o in range(out_features)]
            in_ids = None
        else:
            if in_ids is not None and groups > 1:
                in_ids = self._tie_positions(in_ids, groups)
            per_group = self.fresh(out_features // groups)
            out_ids = [per_group[o % len(per_group)] for o in range(out_features)]
        self._record(Layer(f"{name}.weight" if name else "weight", module, layout, out_ids, in_ids, depthwise))
        self.set_label(out, out_dim, out_ids)

    def _read(self, x: torch.Tensor, dim: int, features: int) -> list[int] | None:
        """The ids of the features a layer reads along `dim`, or None when they carry none."""
        label = self.label(x)
        if label is None:
            return None
        if label.dim != dim or len(label.ids) != features:
            self.pin(label.ids, f"read along another dimension by {self.where()}")
            return None
        return label.ids

    def _tie_positions(self, ids: list[int], groups: int) -> list[int]:
        """A grouped convolution's weight holds one column per position within a group: tie each position."""
        width = len(ids) // groups
        for position in range(width):
            for group in range(1, groups):
                self.uf.union(ids[position], ids[group * width + position])
        return ids[:width]

    def _pinned_fresh(self, count: int, reason: str) -> list[int]:
        ids = self.fresh(count)
        self.pin(ids, reason)
        return ids

    def _record(self, layer: Layer) -> None:
        """A module called again reuses its rows and columns: its ids are the same channels."""
        seen = self.layers.get(layer.name)
        if seen is None:
            self.layers[layer.name] = layer
            return
        self.union_all(seen.out_ids, layer.out_ids)
        if seen.in_ids is not None and layer.in_ids is not None:
            self.union_all(seen.in_ids, layer.in_ids)
        elif layer.in_ids is not None:
            self.pin(layer.in_ids, f"{layer.name} is called on inputs with and without channel ids")

    def _norm(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        ids = self._read(x, 1, module.num_features)
        if ids is None:
            return
        seen = self.norms.get(name)
        if seen is None:
            self.norms[name] = Norm(name, module, ids)
        else:
            self.union_all(seen.ids, ids)
        self.set_label(out, 1, ids)

    # ------------------------------------------------------------- functions between layers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_layer:
            return out
        inputs = [t for t in tensors_in((args, kwargs)) if self.label(t) is not None]
        name = _name_of(func)
        if inputs and name == "__setitem__":  # writes into some channels in place (and returns nothing)
            self.pin_inputs(inputs, f"an assignment into channels in {self.where()}")
        elif inputs and any(True for _ in tensors_in(out)):
            self._follow(name, args, kwargs, inputs, out)
        return out

    def _follow(self, name: str, args: tuple, kwargs: dict, inputs: list[torch.Tensor], out: Any) -> None:
        first = inputs[0]
        label = self.label(first)
        if name in SPLITS and args[0] is first and isinstance(out, (tuple, list)):
            self._split(first, label, args[1:], kwargs, out, by_size=name in ("split", "split_with_sizes"))
        elif not isinstance(out, torch.Tensor):
            self.pin_inputs(inputs, f"{name}() in {self.where()}")
        elif name in ELEMENTWISE and len(inputs) == 1 and out.shape == first.shape:
            self.set_label(out, label.dim, label.ids)
        elif name in POOLS and label.dim == 1 and out.dim() == first.dim():
            self.set_label(out, 1, label.ids)
        elif name in BINARY and len(args) >= 2:
            self._binary(args[0], args[1], out)
        elif name == "pad":
            self._pad(first, args, kwargs, out)
        elif name in RESHAPES and args[0] is first:
            self._reshape(first, label, out)
        elif name in TRANSPOSES and args[0] is first:
            self._transpose(name, label, args[1:], out)
        elif name in MATMULS and len(args) >= 2 or name == "scaled_dot_product_attention":
            self._batched_product(list(args[:2] if name in MATMULS else args[:3]), out)
        elif name in SOFTMAXES and args[0] is first:
            self._softmax(first, label, args[1] if len(args) > 1 else kwargs.get("dim"), out)
        elif name == "__getitem__" and args[0] is first:
            self._getitem(first, label, args[1], out)
        elif name in CONCATENATIONS:
            self._cat(args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0), out)
        else:
            self.pin_inputs(inputs, f"{name}() in {self.where()}")

    def _binary(self, a: Any, b: Any, out: torch.Tensor) -> None:
        la, lb = self.label(a), self.label(b)
        if la is None:
            a, b, la, lb = b, a, lb, la
        offset = a.dim() - la.dim  # channels counted from the end, as broadcasting aligns them
        if lb is not None:
            if b.dim() - lb.dim == offset and len(lb.ids) == len(la.ids):
                self.union_all(la.ids, lb.ids)
                self.set_label(out, out.dim() - offset, la.ids)
            else:
                self.pin(la.ids + lb.ids, f"tensors with channels on different dimensions in {self.where()}")
        elif not isinstance(b, torch.Tensor) or b.numel() == 1 or b.dim() < offset or b.shape[b.dim() - offset] == 1:
            self.set_label(out, out.dim() - offset, la.ids)  # the other operand is the same for every channel
        else:
            self.pin(la.ids, f"combined with a per-channel tensor that has no channel ids in {self.where()}")

    def _pad(self, x: torch.Tensor, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        label = self.label(x)
        pad = list(args[1] if len(args) > 1 else kwargs["pad"])
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", None)
        pair = x.dim() - 1 - label.dim  # pad pairs run from the last dimension backwards
        before, after = (pad[2 * pair], pad[2 * pair + 1]) if 2 * pair + 1 < len(pad) else (0, 0)
        if (before or after) and (mode != "constant" or value not in (None, 0) or before < 0 or after < 0):
            self.pin(label.ids, f"a channel pad other than with zeros in {self.where()}")
            return
        owner_name, owner = self.stack[-1] if self.stack else ("", None)
        pad_ids = Pad(owner_name, owner, self.fresh(before), self.fresh(after))
        if before or after:
            self.pads.append(pad_ids)
        self.set_label(out, label.dim, pad_ids.before + label.ids + pad_ids.after)

    def _reshape(self, x: torch.Tensor, label: _Label, out: torch.Tensor) -> None:
        dim = label.dim
        if out.shape[: dim + 1] == x.shape[: dim + 1]:
            self.set_label(out, dim, label.ids)  # only dimensions after the channels change
        elif out.dim() == dim + 1 and out.shape[:dim] == x.shape[:dim]:
            spread = math.prod(x.shape[dim + 1:])  # flattened: each channel becomes `spread` features
            self.set_label(out, dim, [i for i in label.ids for _ in range(spread)])
        elif out.shape[:dim] == x.shape[:dim] and out.shape[dim + 2:] == x.shape[dim + 1:]:
            self._split_heads(label, out.shape[dim], out)
        else:
            self.pin(label.ids, f"a reshape that splits or moves channels in {self.where()}")

    def _split(self, x: torch.Tensor, label: _Label, args: tuple, kwargs: dict, parts: Sequence[torch.Tensor],
               by_size: bool) -> None:
        """Channels split into parts (GPT-2's one projection into query, key and value): each part its ids."""
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
        if dim != label.dim:
            for part in parts:
                self.set_label(part, label.dim, label.ids)
            return
        start, ids = 0, []
        for part in parts:
            ids.append(label.ids[start:start + part.shape[dim]])
            start += part.shape[dim]
            self.set_label(part, dim, ids[-1])
        owner_name, owner = self.stack[-1] if self.stack else ("", None)
        self.splits.append(Split(owner_name, owner, ids, by_size))

    def _split_heads(self, label: _Label, heads: int, out: torch.Tensor) -> None:
        """Channels viewed as (heads, head width), as attention splits them: a head's channels go together."""
        width = len(label.ids) // heads
        for head in range(heads):
            for channel in label.ids[head * width + 1:(head + 1) * width]:
                self.uf.union(label.ids[head * width], channel)
        self.set_label(out, label.dim, label.ids[::width])

    def _transpose(self, name: str, label: _Label, dims: tuple, out: torch.Tensor) -> None:
        if name == "permute":
            order = [d % out.dim() for d in (dims[0] if len(dims) == 1 else dims)]
            self.set_label(out, order.index(label.dim), label.ids)
            return
        first, second = (d % out.dim() for d in dims[:2])
        swapped = {first: second, second: first}
        self.set_label(out, swapped.get(label.dim, label.dim), label.ids)

    def _batched_product(self, operands: list[Any], out: torch.Tensor) -> None:
        """matmul and attention over batches of matrices: a channel on a batch dimension stays a batch (a head)."""
        labels = [self.label(x) for x in operands]
        offsets = {x.dim() - label.dim for x, label in zip(operands, labels) if label is not None}
        lengths = {len(label.ids) for label in labels if label is not None}
        batch = len(offsets) == 1 and min(offsets) > 2 and len(lengths) == 1
        if batch and all(label is not None or x.shape[x.dim() - min(offsets)] == 1
                         for x, label in zip(operands, labels)):
            known = [label for label in labels if label is not None]
            for label in known[1:]:
                self.union_all(known[0].ids, label.ids)
            self.set_label(out, out.dim() - min(offsets), known[0].ids)
        else:
            self.pin_inputs(operands, f"a product over channels in {self.where()}")

    def _softmax(self, x: torch.Tensor, label: _Label, dim: Any, out: torch.Tensor) -> None:
        if isinstance(dim, int) and dim % x.dim() != label.dim and out.shape == x.shape:
            self.set_label(out, label.dim, label.ids)
        else:
            self.pin(label.ids, f"a softmax over channels in {self.where()}")

    def _getitem(self, x: torch.Tensor, label: _Label, index: Any, out: torch.Tensor) -> None:
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (x.dim() - len(index) + 1) + index[at + 1:]
        plain = all(isinstance(i, slice) for i in index)
        keeps_channels = label.dim >= len(index) or index[label.dim] == slice(None)
        if plain and keeps_channels and out.dim() == x.dim():
            self.set_label(out, label.dim, label.ids)
        else:
            self.pin(label.ids, f"indexing that selects channels in {self.where()}")

    def _cat(self, tensors: Sequence[torch.Tensor], dim: int, out: torch.Tensor) -> None:
        tensors = [t for t in tensors if t.numel()]  # an empty start (a key/value cache's) adds nothing
        labels = [self.label(t) for t in tensors]
        known = next(label for label in labels if label is not None)
        dim = dim % out.dim()
        if dim == known.dim:
            ids = []
            for tensor, label in zip(tensors, labels):
                ids += label.ids if label is not None else self._pinned_fresh(tensor.shape[dim], "concatenated with "
                                                                              "channels that have no ids")
            self.set_label(out, dim, ids)
        elif all(label is not None and label.dim == known.dim for label in labels):
            for label in labels[1:]:
                self.union_all(known.ids, label.ids)
            self.set_label(out, known.dim, known.ids)
        else:
            self.pin_inputs(tensors, f"cat() in {self.where()}")


def _follows(module: nn.Module) -> bool:
    """Layers whose weights the trace reads through hooks (their inner functions are not followed)."""
    return isinstance(module, BATCH_NORMS) or weight_layout(module) in (OUT_IN, IN_OUT) and not isinstance(
        module, (nn.Embedding, nn.EmbeddingBag))


def _weight_shape(module: nn.Module) -> torch.Size:
    from .masks import unmasked

    return unmasked(module).shape


@dataclass
class ChannelGroups:
    """The coupled channel groups of a model and how each weight's rows and columns belong to them.

    `families[name]` lists the groups one set of producing layers makes (the name is the first
    producer's weight); a group is removable when none of its channels is pinned and every layer
    holding one of its slices is a prunable target.
    """

    layers: dict[str, Layer]
    norms: dict[str, Norm]
    pads: list[Pad]
    splits: list[Split]
    classes: list[int]  # group index → its class id (its smallest channel id)
    families: dict[str, torch.Tensor]  # family name (its first producer's weight) → indices of its groups
    pinned: dict[int, str]  # class id → why it is never pruned
    find: Callable[[int], int] = field(repr=False)  # channel id → its class id
    _positions: dict[int, int] = field(init=False, repr=False)
    _slices: dict[str, tuple] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._positions = {cls: index for index, cls in enumerate(self.classes)}

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def family_sizes(self) -> dict[str, int]:
        return {name: len(groups) for name, groups in self.families.items()}

    def index(self, ids: Sequence[int] | None) -> torch.Tensor | None:
        """Group index of each channel id (`size` for channels in no removable group)."""
        if ids is None:
            return None
        return torch.tensor([self._positions.get(self.find(i), self.size) for i in ids], dtype=torch.long)

    def rows_and_columns(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The group index of each output row and (unless depthwise) input column of the layer's weight."""
        if layer.name not in self._slices:
            self._slices[layer.name] = (self.index(layer.out_ids),
                                        None if layer.depthwise else self.index(layer.in_ids))
        return self._slices[layer.name]

    def root(self, family: str) -> Layer:
        """The first layer that makes the family's channels: its output rows hold every group of the family."""
        members = set(self.families[family].tolist())
        return next(layer for layer in self.layers.values()
                    if not layer.depthwise and members <= set(self.rows_and_columns(layer)[0].tolist()))

    def family_scores(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each group's score: the mean of the scores of every weight it removes (its rows and its columns).

        Entries with negative scores are left out of the mean: the stage engine ranks weights an
        earlier stage pruned at -1 (`_stages.PRUNED`), and a group crossing a pruned one should be
        ranked by the weights it still has. A group with none left scores -1, below every survivor.
        """
        device = next(iter(scores.values())).device
        total = torch.zeros(self.size + 1, dtype=torch.float64, device=device)
        count = torch.zeros(self.size + 1, dtype=torch.float64, device=device)
        for layer in self.layers.values():
            if layer.name not in scores:
                continue
            score = out_in(scores[layer.name].detach(), layer.layout).to(torch.float64)
            alive = score >= 0
            values = torch.where(alive, score, torch.zeros_like(score))
            rows, columns = self.rows_and_columns(layer)
            total.index_add_(0, rows.to(device), values.flatten(1).sum(1))
            count.index_add_(0, rows.to(device), alive.flatten(1).sum(1).to(torch.float64))
            if columns is not None:
                total.index_add_(0, columns.to(device), values.transpose(0, 1).flatten(1).sum(1))
                count.index_add_(0, columns.to(device), alive.transpose(0, 1).flatten(1).sum(1).to(torch.float64))
        mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, -1.0))
        return {name: mean[groups] for name, groups in self.families.items()}

    def masks(self, keep: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Boolean masks shaped and placed like the tensors in `like`: a removed group's rows and columns are False."""
        kept = torch.ones(self.size + 1, dtype=torch.bool)
        for name, groups in self.families.items():
            kept[groups] = keep[name].cpu()
        return {name: self._mask(name, tensor.shape, kept).to(tensor.device) for name, tensor in like.items()}

    def _mask(self, name: str, shape: torch.Size, kept: torch.Tensor) -> torch.Tensor:
        layer = self.layers.get(name)
        if layer is None:  # never called in the forward pass: it holds no channel of any group
            return torch.ones(shape, dtype=torch.bool)
        rows, columns = self.rows_and_columns(layer)
        stored = _out_in_shape(shape, layer.layout)
        mask = kept[rows].view(-1, *[1] * (len(stored) - 1)).expand(stored)
        if columns is not None:
            mask = mask & kept[columns].view(1, -1, *[1] * (len(stored) - 2)).expand(stored)
        return out_in(mask, layer.layout).clone()

    def describe_pinned(self, listed: int = 3) -> str:
        reasons = sorted(set(self.pinned.values()))
        return "; ".join(reasons[:listed]) + (f" and {len(reasons) - listed} more" if len(reasons) > listed else "")


def out_in(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A weight (or its mask or score) as out × in, however the layer stores it; its own inverse."""
    return tensor if layout == OUT_IN else tensor.transpose(0, 1)


def _out_in_shape(shape: torch.Size, layout: Layout) -> torch.Size:
    return shape if layout == OUT_IN else torch.Size((shape[1], shape[0], *shape[2:]))


def channel_groups(model: nn.Module, example_inputs: Any, targets: Iterable[str] | None = None) -> ChannelGroups:
    """Run `model` once (eval mode) on `example_inputs` and return its coupled channel groups.

    `example_inputs` is a tensor, or a mapping of keyword inputs (`model(**batch)`). `targets` are the
    weight names that may be pruned (default: every weight the trace sees); a group touching any
    other weight is pinned.
    """
    tracer = _Tracer(model)
    try:
        with torch.no_grad(), model_mode(model, training=False), tracer:
            output = call_model(model, example_inputs)
    except PrunekitError:
        raise
    except Exception as error:
        raise PrunekitError(f"running {type(model).__name__} on the example inputs to find its channel groups "
                            f"failed in {tracer.where()}: {type(error).__name__}: {error}; pass inputs that "
                            "model(...) accepts (a tensor, or a mapping of keyword arguments)"
                            ) from None
    finally:
        tracer.remove_hooks()
    tracer.pin_inputs(tensors_in(output), "the model's output")
    return _groups(tracer, None if targets is None else set(targets))


def _groups(tracer: _Tracer, targets: set[str] | None) -> ChannelGroups:
    find = tracer.uf.find
    pinned: dict[int, str] = {}
    for item, reason in tracer.pins.items():
        pinned.setdefault(find(item), reason)
    for layer in tracer.layers.values():
        if targets is not None and layer.name not in targets:
            reason = f"{layer.name} is not pruned"
            for item in layer.out_ids + (layer.in_ids or []):
                pinned.setdefault(find(item), reason)
    producers: dict[int, list[str]] = {}  # class → the layers that make it, in the order they run
    for layer in tracer.layers.values():
        if not layer.depthwise:  # a depthwise convolution's channels are its input's
            for cls in dict.fromkeys(find(i) for i in layer.out_ids if find(i) not in pinned):
                producers.setdefault(cls, []).append(layer.name)
    families: dict[tuple[str, ...], list[int]] = {}  # the groups the same layers make are one family
    for cls, made_by in producers.items():
        families.setdefault(tuple(made_by), []).append(cls)
    named: dict[str, list[int]] = {}
    for made_by, members in families.items():
        named[made_by[0] if made_by[0] not in named else f"{made_by[0]}[{len(named)}]"] = members
    classes = [cls for members in named.values() for cls in members]
    position = {cls: index for index, cls in enumerate(classes)}
    indexed = {name: torch.tensor([position[c] for c in members], dtype=torch.long) for name, members in named.items()}
    return ChannelGroups(tracer.layers, tracer.norms, tracer.pads, tracer.splits, classes, indexed, pinned, find)
