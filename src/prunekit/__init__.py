"""prunekit: optimization-based pruning for PyTorch.

    import prunekit
    result = prunekit.prune(model, method="magnitude", sparsity=0.9)
    print(result)
"""
from .version import __version__  # noqa: E402
from .api import PruneResult, prune  # noqa: E402
from .budgets import Budget  # noqa: E402
from .errors import PrunekitError  # noqa: E402
from .export import compact, export_onnx, load_sparse, save_sparse, sparsify_linear_layers  # noqa: E402
from .masks import load_masks, make_permanent, save_masks, sparsity_report  # noqa: E402
from .methods import all_methods  # noqa: E402


def methods() -> list[str]:
    """Names of the registered pruning methods."""
    return [method.name for method in all_methods()]


__all__ = ["prune", "PruneResult", "Budget", "PrunekitError", "sparsity_report", "make_permanent",
           "save_masks", "load_masks", "methods", "compact", "save_sparse", "load_sparse", "sparsify_linear_layers",
           "export_onnx"]
