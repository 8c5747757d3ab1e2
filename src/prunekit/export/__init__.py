"""Export: pruned models made really smaller (compaction and its files, sparse weight files) and, where measured
faster, faster (sparse linear layers, the channels_last memory format); ONNX files checked against PyTorch with
onnxruntime."""
from .compact_files import load_compact, save_compact
from .compaction import compact
from .memory_format import MemoryFormatChoice, fastest_memory_format, to_memory_format
from .onnx import OnnxExport, export_onnx
from .sparse_files import SparseFileReport, load_sparse, save_sparse
from .sparse_layers import SparseLayersReport, SparseLinear, sparsify_linear_layers

__all__ = ["compact", "save_compact", "load_compact", "fastest_memory_format", "to_memory_format", "MemoryFormatChoice",
           "save_sparse", "load_sparse", "SparseFileReport", "sparsify_linear_layers", "SparseLinear",
           "SparseLayersReport", "export_onnx", "OnnxExport"]
