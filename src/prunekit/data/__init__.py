"""Data sets read from their standard files into memory, and a fast seeded batch loader."""
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

__all__ = [
    "DATA_DIR_ENV",
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "Loader",
    "TensorSplit",
    "channel_stats",
    "download",
    "list_datasets",
    "load_dataset",
    "resolve_data_dir",
]
