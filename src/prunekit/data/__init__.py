"""Data sets read from their standard files into memory, and fast seeded batch loaders (images, tokenised text)."""
from .catalog import (
    DATA_DIR_ENV,
    DATASETS,
    Dataset,
    DatasetSpec,
    channel_stats,
    list_datasets,
    load_dataset,
    resolve_data_dir,
)
from .download import download
from .loader import Loader
from .splits import TensorSplit
from .text import TextDataset, TextSplit, TokenLoader, load_tokenizer

__all__ = [
    "DATA_DIR_ENV",
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "Loader",
    "TensorSplit",
    "TextDataset",
    "TextSplit",
    "TokenLoader",
    "channel_stats",
    "download",
    "list_datasets",
    "load_dataset",
    "load_tokenizer",
    "resolve_data_dir",
]
