"""Which parameters of a model may be pruned, and why the others are not."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PrunekitError
from .masks import unmasked

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Target:
    """One prunable weight tensor: `name` is its state-dict name, e.g. `layer1.0.conv1.weight`."""

    name: str
    module_name: str
    module: nn.Module = field(compare=False, repr=False)

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


def find_targets(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> tuple[list[Target], list[Skipped]]:
    """Conv/Linear weights of `model`, filtered by regexes searched in the parameter name."""
    include_patterns = _compile(include, "include")
    exclude_patterns = _compile(exclude, "exclude")
    targets: list[Target] = []
    skipped: list[Skipped] = []
    for module_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # seen through its owner, as that module's `weight`
        for param_name, param in _own_parameters(module):
            name = f"{module_name}.{param_name}" if module_name else param_name
            reason = _skip_reason(module, param_name)
            if reason is None and include_patterns and not _matches(include_patterns, name):
                reason = "not matched by --include"
            if reason is None and _matches(exclude_patterns, name):
                reason = "excluded by --exclude"
            if reason is None:
                targets.append(Target(name, module_name, module))
            else:
                skipped.append(Skipped(name, param.numel(), reason))
    _check_patterns_used(include_patterns, exclude_patterns, targets, skipped)
    if not targets:
        raise PrunekitError(
            f"{type(model).__name__} has no prunable tensors: prunekit prunes the weights of "
            f"{', '.join(m.__name__ for m in PRUNABLE_MODULES)} modules"
            + (" and --include/--exclude left none of them" if include or exclude else "")
            + ". Check the model, or widen --include/--exclude."
        )
    return targets, skipped


def _own_parameters(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Direct parameters of a module, seen through a mask parametrization if there is one."""
    if parametrize.is_parametrized(module, "weight"):
        yield "weight", unmasked(module)
    yield from module.named_parameters(recurse=False)


def _skip_reason(module: nn.Module, param_name: str) -> str | None:
    if isinstance(module, PRUNABLE_MODULES):
        return None if param_name == "weight" else "bias vectors are not pruned"
    if isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "normalisation parameters are not pruned"
    return f"{type(module).__name__} parameters are not supported for pruning"


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


def _matches(patterns: list[re.Pattern], name: str) -> bool:
    return any(p.search(name) for p in patterns)


def _check_patterns_used(include, exclude, targets: list[Target], skipped: list[Skipped]) -> None:
    names = [t.name for t in targets] + [s.name for s in skipped]
    for flag, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(pattern.search(n) for n in names):
                raise PrunekitError(
                    f"--{flag} pattern {pattern.pattern!r} matches no parameter; "
                    f"parameter names look like {names[0]!r}"
                )
