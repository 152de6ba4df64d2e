"""cifar-transfer: adapt ImageNet-pretrained CNNs to CIFAR-10 (and your own photo folders).

The public API, importable from here (lazily: `import cifar_transfer` loads no torch):

- `load_model(run_dir_or_safetensors)` -> (model, meta): a trained bundle, ready to predict;
- `predict_logits(model, uint8_images, resolution, mean, std, batch_size, precision)`;
- `register_backbone(spec, family)`, `BackboneSpec`, `BackboneFamily`: add a backbone family;
- `keep_freed_memory()`: the allocator setting the CLI applies (faster CPU steps).

Everything else lives in the subpackages along the data flow: system, config/recipes, data,
models, artifacts, training, results (see docs/reference/layout.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that owns it
_PUBLIC = {
    "load_model": "cifar_transfer.artifacts.bundle",
    "predict_logits": "cifar_transfer.models.inference",
    "register_backbone": "cifar_transfer.models.backbones",
    "BackboneSpec": "cifar_transfer.models.families",
    "BackboneFamily": "cifar_transfer.models.families",
    "keep_freed_memory": "cifar_transfer.system.allocator",
}
__all__ = [
    "BackboneFamily", "BackboneSpec", "__version__", "keep_freed_memory", "load_model",
    "predict_logits", "register_backbone",
]

if TYPE_CHECKING:
    from cifar_transfer.artifacts.bundle import load_model
    from cifar_transfer.models.backbones import register_backbone
    from cifar_transfer.models.families import BackboneFamily, BackboneSpec
    from cifar_transfer.models.inference import predict_logits
    from cifar_transfer.system.allocator import keep_freed_memory


def __getattr__(name: str) -> Any:
    # Lazy, so `import cifar_transfer` stays light (no torch) until a model is actually loaded.
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cifar_transfer' has no attribute {name!r}")
