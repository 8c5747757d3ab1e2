"""`prunekit export`: a pruned checkpoint written as a compact model, a sparse weight file or ONNX, with its size
and its latency measured against the dense model it came from.

Every check that needs no model runs first (the output's kind and folder, the checkpoint, the ONNX extra); the
file is written last, atomically, after the export has been checked, so a refused or failed export leaves
nothing behind.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from ..errors import PrunekitError
from ..objectives import Batch, call_model, without_labels
from .compact_files import COMPACT_FILE_FORMAT
from .timing import clock_name, default_clock, interleaved_seconds

COMPACT, SPARSE, ONNX = "compact", "sparse", "onnx"
FORMATS = (COMPACT, SPARSE, ONNX)
# What --out may be named for each format: compact weights are safetensors, or ONNX of the compact model.
SUFFIXES = {COMPACT: (".safetensors", ".onnx"), SPARSE: (".safetensors",), ONNX: (".onnx",)}
SEQUENCE_LENGTH = 128  # tokens per example for a Hugging Face model exported without a dataset


@dataclass(frozen=True)
class ExportRequest:
    model: str
    checkpoint: str | None
    format: str
    out: str
    dataset: str | None = None
    data_dir: str | None = None
    batch_size: int = 8
    threads: int | None = None


def check_request(request: ExportRequest) -> None:
    """Everything that can be refused without loading the model, refused before any work."""
    from ..models.hf import is_model_folder

    if request.format not in FORMATS:
        raise PrunekitError(f"--format {request.format} is unknown; use one of {', '.join(FORMATS)}")
    if request.batch_size < 1 or (request.threads is not None and request.threads < 1):
        raise PrunekitError("--batch-size and --threads must be at least 1")
    _check_checkpoint(request, folder=is_model_folder(request.model))
    _check_out(request)
    if request.format == ONNX or Path(request.out).suffix == ".onnx":
        from .onnx import require_onnx

        require_onnx()


def _check_checkpoint(request: ExportRequest, folder: bool) -> None:
    if request.checkpoint is None:
        if not folder:
            raise PrunekitError("pass --checkpoint, the pruned weights to export (a zoo model has no weights of its "
                                "own)")
        return
    if not Path(request.checkpoint).is_file():
        raise PrunekitError(f"checkpoint {request.checkpoint} does not exist; check the path")


def _check_out(request: ExportRequest) -> None:
    out = Path(request.out)
    if out.is_dir():
        raise PrunekitError(f"--out {out} is a folder; pass a file path")
    allowed = SUFFIXES[request.format]
    if out.suffix not in allowed:
        raise PrunekitError(f"--format {request.format} writes {' or '.join(allowed)}; name --out *{allowed[0]}, "
                            f"not {out.name}")
    if not out.resolve().parent.is_dir():
        raise PrunekitError(f"cannot write {out}: folder {out.resolve().parent} does not exist")
    if request.checkpoint is not None and out.resolve() == Path(request.checkpoint).resolve():
        raise PrunekitError(f"--out {out} is the checkpoint being exported; write the export to another file")
    if out.exists() and out.suffix == ".safetensors" and _safetensors_format(out) != _format_written(request):
        raise PrunekitError(f"--out {out} exists and holds another kind of file (format "
                            f"{_safetensors_format(out)!r}, not {_format_written(request)!r}); remove it or choose "
                            "another --out")


def _format_written(request: ExportRequest) -> str:
    from .sparse_files import SPARSE_FILE_FORMAT

    return SPARSE_FILE_FORMAT if request.format == SPARSE else COMPACT_FILE_FORMAT


def _safetensors_format(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception:  # not a safetensors file at all: another kind too
        return None


# ---------------------------------------------------------------- the export

@dataclass(frozen=True)
class ExportOutcome:
    out: Path
    dense_bytes: int
    out_bytes: int
    batch: str  # the examples latency was measured on, in words
    dense_seconds: float
    export_seconds: float
    notes: list[str]
    memory_formats: tuple[str, str] | None = None  # the dense model's and the export's, each its fastest

    def __str__(self) -> str:
        size = (f"written {self.out}: {_megabytes(self.out_bytes)} vs the dense model's "
                f"{_megabytes(self.dense_bytes)} safetensors ({self.out_bytes / self.dense_bytes:.3f}×)")
        dense, export = (f" ({name})" for name in self.memory_formats) if self.memory_formats else ("", "")
        each = ", each in its fastest memory format" if self.memory_formats else ""
        latency = (f"latency on {self.batch}, {torch.get_num_threads()} thread(s), {clock_name(default_clock())}"
                   f"{each}: dense{dense} {self.dense_seconds * 1e3:.2f} ms, export{export} "
                   f"{self.export_seconds * 1e3:.2f} ms "
                   f"(dense / export {self.dense_seconds / self.export_seconds:.2f}×)")
        return "\n".join([*self.notes, size, latency])


class _Exported(NamedTuple):
    run: Callable[[], Any] | None  # the exported model on the examples; None: it runs as the dense model does
    notes: list[str]
    memory_formats: tuple[str, str] | None = None


def run_export(request: ExportRequest) -> ExportOutcome:
    """Check, load, export (the file appears atomically, once the export has been checked), then time it."""
    check_request(request)
    if request.threads:
        torch.set_num_threads(request.threads)
    model, examples, described = _load(request)
    exporter = {COMPACT: _export_compact, SPARSE: _export_sparse, ONNX: _export_onnx}[request.format]
    out = Path(request.out)
    exported = exporter(model, examples, out)
    dense = lambda: call_model(model, examples)  # noqa: E731
    candidates = {"dense": dense} if exported.run is None else {"dense": dense, "export": exported.run}
    seconds = interleaved_seconds(candidates, clock=default_clock())
    return ExportOutcome(out, _dense_bytes(model), out.stat().st_size, described, seconds["dense"],
                         seconds.get("export", seconds["dense"]), exported.notes, exported.memory_formats)


def _load(request: ExportRequest) -> tuple[nn.Module, Batch, str]:
    """The pruned model (plain weights, eval mode) and the examples it is measured and checked on."""
    from .. import workflow
    from ..checkpoints import load_state_dict_into, read_state_dict
    from ..models.hf import is_model_folder

    folder = is_model_folder(request.model)
    setup = workflow.setup(request.model, request.dataset, request.data_dir,
                           None if folder else request.checkpoint)
    if folder and request.checkpoint:
        load_state_dict_into(setup.model, read_state_dict(request.checkpoint)[0])
    model = setup.model.eval()
    if setup.dataset is not None:
        examples = without_labels(next(iter(setup.loader("test", request.batch_size))))
        return model, examples, f"{request.batch_size} test examples of {setup.dataset.name}"
    return model, _token_examples(model, request.batch_size), f"{request.batch_size} × {SEQUENCE_LENGTH} random tokens"


def _token_examples(model: nn.Module, batch_size: int) -> dict[str, torch.Tensor]:
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocabulary:
        raise PrunekitError(f"{type(model).__name__} has no config.vocab_size to draw example tokens from; pass "
                            "--dataset")
    ids = torch.randint(0, vocabulary, (batch_size, SEQUENCE_LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _dense_bytes(model: nn.Module) -> int:
    """The size of the model's dense safetensors file, as `prunekit prune --out` writes it."""
    from ..checkpoints import save_model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dense.safetensors"
        save_model(model, path, {})
        return path.stat().st_size


def _export_sparse(model: nn.Module, examples: Batch, out: Path) -> _Exported:
    """The sparse file, and the model with the linear layers that are faster as CSR (None: no layer is)."""
    from .sparse_files import save_sparse
    from .sparse_layers import sparsify_linear_layers

    save_sparse(model, out, {"exported_by": "prunekit export --format sparse"})
    decided = copy.deepcopy(model)  # plain weights: a deep copy is safe
    report = sparsify_linear_layers(decided, examples)
    if not report.kept:
        return _Exported(None, [f"sparse linear layers: none kept ({len(report.layers)} timed; none, or not the "
                                "model, faster as CSR): the export runs as the dense model does"])
    note = f"sparse linear layers: {len(report.sparse_layers)} of {len(report.layers)} measured faster as CSR, kept"
    return _Exported(lambda: call_model(decided, examples), [note])


def _export_compact(model: nn.Module, examples: Batch, out: Path) -> _Exported:
    """The compact model, written; then it and the dense model are each left in their fastest memory format, so
    that the latency compared is compaction's, not a layout's (the file records the compact model's format)."""
    from .compact_files import save_compact
    from .compaction import compact
    from .hf_config import config_changes, undescribed
    from .memory_format import fastest_memory_format

    masked = copy.deepcopy(model)  # the dense model stays plain: it is the latency reference
    attach_zero_masks(masked)
    compacted = compact(masked, examples).eval()
    before, after = _parameters(model), _parameters(compacted)
    if after == before:
        raise PrunekitError("no channel of the checkpoint is zero in every layer that reads it, so compaction "
                            "removes nothing; prune with a structured budget (--structure groups), or export "
                            "unstructured sparsity with --format sparse")
    notes = [f"compact: {after:,} parameters of {before:,} ({after / before:.3f}×)",
             *_config_notes(config_changes(model, compacted), undescribed(compacted))]
    if out.suffix == ".onnx":
        from .onnx import export_onnx

        notes.append(_checked_note(export_onnx(compacted, examples, out)) + "; latency below is the compact "
                     "PyTorch model's")
    dense_format, compact_format = fastest_memory_format(model, examples), fastest_memory_format(compacted, examples)
    timed = bool(dense_format.seconds or compact_format.seconds)  # not for models without 4-D weights
    if timed:
        notes.append(f"memory format: dense {dense_format}; compact {compact_format}")
    if out.suffix != ".onnx":
        save_compact(compacted, model, out, {"parameters": after, "dense_parameters": before})
    formats = (dense_format.chosen, compact_format.chosen) if timed else None
    return _Exported(lambda: call_model(compacted, examples), notes, formats)


def _config_notes(changes: dict[str, Any], undescribed: list[str]) -> list[str]:
    """What the compact model's config says, and what it cannot (a model without a transformers config: nothing)."""
    notes = [f"config: {', '.join(f'{key} = {value}' for key, value in changes.items())}"] if changes else []
    if undescribed:
        notes.append(f"config: {len(undescribed)} tensors have shapes no config of this class describes (e.g. "
                     f"{undescribed[0]}: removed heads, per-layer widths, sizes the config has no key for); load "
                     "the file with prunekit.export.load_compact(PATH, MODEL), not from_pretrained")
    return notes


def attach_zero_masks(model: nn.Module) -> None:
    """Masks that keep each prunable weight's nonzero entries: a checkpoint's zeros as the pruning that made them."""
    from ..masks import attach_masks
    from ..targets import find_targets

    attach_masks(model, {target.name: target.weight.detach() != 0 for target in find_targets(model)[0]})


def _parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _export_onnx(model: nn.Module, examples: Batch, out: Path) -> _Exported:
    from .onnx import export_onnx, feeds, session

    result = export_onnx(model, examples, out)
    onnx_session = session(out)
    inputs = feeds(onnx_session, examples)
    note = _checked_note(result) + "; latency below is onnxruntime's"
    return _Exported(lambda: onnx_session.run(None, inputs), [note])


def _checked_note(result) -> str:
    return (f"onnx: checked in onnxruntime, {result.outputs} output(s) within {result.relative_error:.1e} relative "
            "of PyTorch")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"
