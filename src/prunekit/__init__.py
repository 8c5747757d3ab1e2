"""prunekit: optimization-based pruning for PyTorch."""
__version__ = "0.1.0"
