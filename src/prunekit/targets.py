"""Which parameters of a model may be pruned, and why the others are not.

Prunable weights are those of nn.Linear and nn.Conv1d/2d/3d (stored out × in × kernel) and of
transformers' `Conv1D` (GPT-2, GPT, ImageGPT: a linear layer stored in × out). `Conv1D` is
recognised by duck typing, its class name and an integer `nf` (output features) equal to the
weight's second dimension, so prunekit never imports transformers to look. Each Target carries its
`Layout`, so output filters, input channels and N:M groups follow how the weight is stored; masks
keep the stored shape.

Parameters are found by identity: a Parameter reachable under several names (tied weights, such as
GPT-2's `lm_head.weight`, which is `transformer.wte.weight`) is one tensor and becomes at most one
Target. Embeddings and every parameter shared between modules are left dense unless an --include
pattern names one of their names: a pruned row of a token table, or of a head tied to it, changes
every use of that token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PrunekitError
from .masks import mask_of, unmasked

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class Layout:
    """Where a stored weight keeps its outputs and its inputs.

    Filters are slices along `output_dim`; input channels and N:M groups run along `input_dim`.
    """

    output_dim: int
    input_dim: int


OUT_IN = Layout(output_dim=0, input_dim=1)  # nn.Linear, nn.ConvNd (out × in × kernel), nn.Embedding
IN_OUT = Layout(output_dim=1, input_dim=0)  # transformers' Conv1D: y = x @ W + b with W stored in × out


@dataclass(frozen=True)
class Target:
    """One prunable weight tensor: `name` is its state-dict name, e.g. `layer1.0.conv1.weight`."""

    name: str
    module_name: str
    module: nn.Module = field(compare=False, repr=False)
    layout: Layout = OUT_IN

    @property
    def weight(self) -> torch.Tensor:
        """The weight the module computes with (masked when a mask is attached)."""
        return self.module.weight

    @property
    def dense(self) -> nn.Parameter:
        """The trainable tensor behind the weight (the unmasked original when masked)."""
        return unmasked(self.module)

    @property
    def shape(self) -> torch.Size:
        return self.dense.shape

    @property
    def numel(self) -> int:
        return self.dense.numel()

    @property
    def groups(self) -> int:
        """Convolution groups (1 for Linear); channels are only coupled within a group."""
        return getattr(self.module, "groups", 1)


@dataclass(frozen=True)
class Skipped:
    """A parameter that is not pruned, with the reason shown in reports."""

    name: str
    numel: int
    reason: str


def describe_skipped(skipped: Sequence[Skipped], listed: int = 3) -> str:
    """`not pruned: ...` grouped by reason, a few names each, so a transformer's hundred biases take one line."""
    by_reason: dict[str, list[str]] = {}
    for item in skipped:
        by_reason.setdefault(item.reason, []).append(item.name)
    parts = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - listed} more" if len(names) > listed else ""
        parts.append(f"{reason}: {', '.join(names[:listed])}{more}")
    return "not pruned: " + "; ".join(parts)


@dataclass(frozen=True)
class _Alias:
    """One name under which a parameter is reachable: the module holding it and the attribute."""

    name: str
    module_name: str
    module: nn.Module
    param_name: str

    @property
    def layout(self) -> Layout | None:
        """How the module stores this tensor when it is a prunable weight, else None."""
        return weight_layout(self.module) if self.param_name == "weight" else None

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.module, EMBEDDINGS)

    @property
    def masked(self) -> bool:
        return self.param_name == "weight" and mask_of(self.module) is not None


@dataclass
class _Tensor:
    """A distinct Parameter with every name it has, in the order `named_modules` meets them."""

    numel: int
    aliases: list[_Alias]


def find_targets(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> tuple[list[Target], list[Skipped]]:
    """Prunable weights of `model`, one per distinct Parameter, filtered by regexes searched in its names.

    A weight that already carries a mask stays a target (it was chosen when it was pruned).
    """
    include_patterns = _compile(include, "include")
    exclude_patterns = _compile(exclude, "exclude")
    targets: list[Target] = []
    skipped: list[Skipped] = []
    tensors = _distinct_parameters(model)
    for tensor in tensors:
        target, left_out = _sort_out(tensor, include_patterns, exclude_patterns)
        targets.extend([target] if target else [])
        skipped.extend(left_out)
    _check_patterns_used(include_patterns, exclude_patterns, [a.name for t in tensors for a in t.aliases])
    if not targets:
        raise PrunekitError(
            f"{type(model).__name__} has no prunable tensors: prunekit prunes the weights of "
            f"{', '.join(m.__name__ for m in PRUNABLE_MODULES)} modules and transformers' Conv1D"
            + (" and --include/--exclude left none of them" if include or exclude else "")
            + ". Check the model, or widen --include/--exclude."
        )
    return targets, skipped


def maskable_weights(model: nn.Module) -> dict[str, Target]:
    """Every weight prunekit can mask, under each name it has, whatever the default choice (embeddings and tied
    weights included): what a prune's masks or a mask file may name."""
    return {alias.name: Target(alias.name, alias.module_name, alias.module, alias.layout)
            for tensor in _distinct_parameters(model) for alias in tensor.aliases if alias.layout is not None}


def _distinct_parameters(model: nn.Module) -> list[_Tensor]:
    """Every Parameter once, by identity, with all its names (a tied weight has several)."""
    by_identity: dict[int, _Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # seen through its owner, as that module's `weight`
        for param_name, param in _own_parameters(module):
            name = f"{module_name}.{param_name}" if module_name else param_name
            alias = _Alias(name, module_name, module, param_name)
            by_identity.setdefault(id(param), _Tensor(param.numel(), [])).aliases.append(alias)
    return list(by_identity.values())


def _own_parameters(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Direct parameters of a module, seen through a mask parametrization if there is one."""
    if parametrize.is_parametrized(module, "weight"):
        yield "weight", unmasked(module)
    yield from module.named_parameters(recurse=False)


def _sort_out(tensor: _Tensor, include: list[re.Pattern], exclude: list[re.Pattern]
              ) -> tuple[Target | None, list[Skipped]]:
    """The tensor's Target (or None) and the names it leaves out, each with its reason."""
    prunable = [alias for alias in tensor.aliases if alias.layout is not None]
    if not prunable:
        return None, [Skipped(a.name, tensor.numel, _structural_reason(a)) for a in tensor.aliases]
    names = [alias.name for alias in tensor.aliases]
    chosen = _choose(prunable, include)
    reason = _opt_in_reason(tensor, chosen)
    if reason is not None and (chosen.masked or _matches(include, names)):
        reason = None  # an embedding or shared weight that --include names (or that was pruned so) is pruned
    if reason is None and include and not _matches(include, names):
        reason = "not matched by --include"
    if reason is None and _matches(exclude, names):
        reason = "excluded by --exclude"
    others = [Skipped(a.name, tensor.numel, f"tied to {chosen.name}") for a in tensor.aliases if a is not chosen]
    if reason is not None:
        return None, [Skipped(chosen.name, tensor.numel, reason), *others]
    return Target(chosen.name, chosen.module_name, chosen.module, chosen.layout), others


def _choose(prunable: list[_Alias], include: list[re.Pattern]) -> _Alias:
    """The name a tensor is pruned under: the one already masked, else the first --include names, else the first."""
    return (next((a for a in prunable if a.masked), None)
            or next((a for a in prunable if _matches(include, [a.name])), None)
            or prunable[0])


def _opt_in_reason(tensor: _Tensor, chosen: _Alias) -> str | None:
    """Why a prunable weight is left dense unless --include names it: an embedding, or shared between modules."""
    if chosen.is_embedding:
        return "embedding"
    embedding = next((a for a in tensor.aliases if a.is_embedding), None)
    if embedding is not None:
        return f"tied to {embedding.name}"
    if len(tensor.aliases) > 1:
        return "shared with " + ", ".join(a.name for a in tensor.aliases if a is not chosen)
    return None


def weight_layout(module: nn.Module) -> Layout | None:
    """How `module` stores its `weight` when prunekit can prune it, else None."""
    if isinstance(module, PRUNABLE_MODULES + EMBEDDINGS):
        return OUT_IN
    if _is_transformers_conv1d(module):
        return IN_OUT
    return None


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, known by its name and its in × out weight of `nf` outputs."""
    if _class_name(module) != "Conv1D" or not isinstance(getattr(module, "nf", None), int):
        return False
    weight = unmasked(module) if hasattr(module, "weight") else None
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf


def _structural_reason(alias: _Alias) -> str:
    """Why a tensor that is no prunable weight is left alone."""
    module = alias.module
    if weight_layout(module) is not None:
        return "bias vectors are not pruned"
    if _is_normalisation(module):
        return "normalisation parameters are not pruned"
    return f"{_class_name(module)} parameters are not supported for pruning"


def _is_normalisation(module: nn.Module) -> bool:
    """torch's norms, and by name the ones models define themselves (LlamaRMSNorm, T5LayerNorm, ...)."""
    torch_norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return isinstance(module, torch_norms) or _class_name(module).endswith("Norm")


def _class_name(module: nn.Module) -> str:
    """The module's own class name; a mask makes its class a generated `Parametrized<Name>` subclass."""
    return parametrize.type_before_parametrizations(module).__name__


def _compile(patterns: Sequence[str] | str | None, flag: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise PrunekitError(f"--{flag} pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return compiled


def _matches(patterns: list[re.Pattern], names: Sequence[str]) -> bool:
    return any(p.search(name) for p in patterns for name in names)


def _check_patterns_used(include: list[re.Pattern], exclude: list[re.Pattern], names: list[str]) -> None:
    for flag, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not _matches([pattern], names):
                raise PrunekitError(
                    f"--{flag} pattern {pattern!r} matches no parameter; "
                    f"parameter names look like {names[0]!r}"
                )
