"""Export: pruned models made really smaller (compaction, sparse weight files) and, where measured faster, faster
(sparse linear layers); ONNX files checked against PyTorch with onnxruntime."""
from .compaction import compact
from .onnx import OnnxExport, export_onnx
from .sparse_files import SparseFileReport, load_sparse, save_sparse
from .sparse_layers import SparseLayersReport, SparseLinear, sparsify_linear_layers

__all__ = ["compact", "save_sparse", "load_sparse", "SparseFileReport", "sparsify_linear_layers", "SparseLinear",
           "SparseLayersReport", "export_onnx", "OnnxExport"]
