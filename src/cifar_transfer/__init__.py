"""cifar-transfer: adapt ImageNet-pretrained CNNs to CIFAR-10 by transfer learning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]

if TYPE_CHECKING:
    from cifar_transfer.artifacts.bundle import load_model


def __getattr__(name: str) -> Any:
    # Lazy, so `import cifar_transfer` stays light (no torch) until a model is actually loaded.
    if name == "load_model":
        from cifar_transfer.artifacts.bundle import load_model

        return load_model
    raise AttributeError(f"module 'cifar_transfer' has no attribute {name!r}")
