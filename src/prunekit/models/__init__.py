"""Model zoo: MNIST and CIFAR networks in plain torch, with module names that match published checkpoints."""
from prunekit.models.zoo import MODELS, create_model, create_model_for, list_models

__all__ = ["MODELS", "create_model", "create_model_for", "list_models"]
