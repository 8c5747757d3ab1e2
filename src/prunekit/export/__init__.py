"""Export: pruned models made really smaller (sparse weight files) and, where measured faster, faster (sparse
linear layers); ONNX files checked against PyTorch with onnxruntime."""
from .compaction import compact
from .sparse_files import SparseFileReport, load_sparse, save_sparse

__all__ = ["compact", "save_sparse", "load_sparse", "SparseFileReport"]
