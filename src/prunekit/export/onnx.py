"""ONNX export with torch's exporter, every file checked with onnxruntime against the PyTorch model.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch.export underneath) is used: it exported every
zoo model and MiniLM with keyword inputs, where the TorchScript exporter failed on MiniLM's keyword arguments
(`BertModel.forward() got multiple values for argument 'use_cache'`, torch 2.13). Every input dimension is marked
`Dim.AUTO`, so the file takes other batch sizes (and sequence lengths) wherever the model allows.

`onnx`, `onnxscript` and `onnxruntime` are the optional extra `prunekit[onnx]`, imported only here, when used.
onnxruntime turns sparse initializers back into dense ones at load, so an ONNX file of an unstructured model
is neither smaller nor faster: compact a structured one, or keep sparse weights in a sparse file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree

from ..errors import PrunekitError
from ..io import atomic_path
from ..masks import get_masks
from ..objectives import Batch, call_model

EXTRA = "pip install 'prunekit[onnx]'"
RELATIVE_TOLERANCE = 1e-5
SINGLE_FILE_LIMIT = 2 * 1024**3  # protobuf's limit on one ONNX file; weights beyond it need external data


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    relative_error: float  # the largest over the outputs of max |onnxruntime − torch| / max |torch|
    outputs: int


def require_onnx() -> ModuleType:
    """onnxruntime (with onnx and onnxscript present, which the exporter needs), or an error naming the extra."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise PrunekitError(f"ONNX export needs {', '.join(missing)}, which prunekit does not install by default: "
                            f"{EXTRA}")
    import onnxruntime

    return onnxruntime


def check_exportable(model: nn.Module) -> None:
    """Refuse, before any work, what the exporter would fail on late or what would make a wrong file."""
    require_onnx()
    if get_masks(model):
        raise PrunekitError("the model still has masks attached: fold them in first with prunekit.make_permanent")
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if weight_bytes >= SINGLE_FILE_LIMIT:
        raise PrunekitError(f"the model's weights take {weight_bytes / 1024**3:.1f} GiB, more than one ONNX file "
                            "holds (2 GiB); prunekit writes single-file ONNX only: export a smaller model")


def export_onnx(model: nn.Module, example_inputs: Batch, path: str | os.PathLike) -> OnnxExport:
    """Write `model` (eval mode) as one ONNX file, atomically, after checking it with onnxruntime.

    `example_inputs` is the model's input: a tensor, or a mapping of keyword inputs (a tokenizer's batch).
    The file is written only if onnxruntime's outputs on the examples equal the model's within 1e-5 relative.
    """
    check_exportable(model)
    path = Path(path)
    if path.suffix != ".onnx":
        raise PrunekitError(f"name the ONNX file *.onnx, not {path.name}")
    model = model.eval()
    with atomic_path(path) as temporary:
        _export(model, example_inputs, temporary)
        error, outputs = compare_with_onnxruntime(temporary, model, example_inputs)
        if error > RELATIVE_TOLERANCE:
            raise PrunekitError(f"onnxruntime's outputs differ from PyTorch's by {error:.2e} relative (more than "
                                f"{RELATIVE_TOLERANCE:g}); the file was not written. Report the model: an operator "
                                "is translated wrongly")
    return OnnxExport(path, error, outputs)


def _export(model: nn.Module, example_inputs: Batch, path: Path) -> None:
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else ((example_inputs,), {})
    auto = torch.export.Dim.AUTO
    dynamic = ({name: _every_dim(value, auto) for name, value in kwargs.items()} if kwargs
               else tuple(_every_dim(value, auto) for value in args))
    # The exporter prints its progress and warns about optional operator sets (torchvision's): not for users.
    with _quiet():
        try:
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic, verbose=False)
        except Exception as exc:  # torch.export raises many types; the first line names the failing module or op
            raise PrunekitError(f"torch.onnx.export could not export {type(model).__name__}: "
                                f"{_first_line(exc)}") from None


def _every_dim(tensor: torch.Tensor, auto: Any) -> dict[int, Any]:
    return {dim: auto for dim in range(tensor.dim())}


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session on `threads` intra-op threads (default: torch's thread count)."""
    onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(onnx_session, example_inputs: Batch) -> dict[str, np.ndarray]:
    """The examples as onnxruntime inputs: keyword inputs by name (the exporter keeps them), others by position."""
    names = [entry.name for entry in onnx_session.get_inputs()]
    if isinstance(example_inputs, Mapping) and set(names) <= set(example_inputs):
        return {name: example_inputs[name].detach().cpu().numpy() for name in names}
    values = list(example_inputs.values()) if isinstance(example_inputs, Mapping) else [example_inputs]
    if len(names) != len(values):
        raise PrunekitError(f"the ONNX file takes {len(names)} inputs ({', '.join(names)}), given {len(values)}")
    return {name: value.detach().cpu().numpy() for name, value in zip(names, values)}


def compare_with_onnxruntime(path: str | os.PathLike, model: nn.Module, example_inputs: Batch) -> tuple[float, int]:
    """The largest relative difference (max |ort − torch| / max |torch|) over the outputs, and their count."""
    onnx_session = session(path)
    produced = onnx_session.run(None, feeds(onnx_session, example_inputs))
    with torch.no_grad():
        expected = [leaf for leaf in _pytree.tree_leaves(call_model(model, example_inputs))
                    if isinstance(leaf, torch.Tensor)]
    if len(produced) != len(expected):
        raise PrunekitError(f"the ONNX file returns {len(produced)} outputs where the model returns {len(expected)}")
    return max(_relative_error(ours, theirs.numpy()) for ours, theirs in zip(produced, expected)), len(expected)


def _relative_error(produced: np.ndarray, expected: np.ndarray) -> float:
    if produced.shape != expected.shape:
        return float("inf")
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    difference = float(np.abs(produced.astype(np.float64) - expected).max()) if expected.size else 0.0
    return difference / scale if scale else difference


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]
