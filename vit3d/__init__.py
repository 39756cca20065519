"""vit3d: a Keras 3 3-D Vision Transformer whose saved artifacts prove they reloaded.

Knows nothing of Ray or NIfTI; the batch job in ``jobs`` builds on it. Exports
load lazily, so ``vit3d.storage`` and ``vit3d.preprocessing`` can be used (by
CPU decode workers) without importing TensorFlow.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

_EXPORTS = {
    "ArtifactError": "vit3d.artifact",
    "ArtifactInfo": "vit3d.artifact",
    "ChecksumMismatchError": "vit3d.artifact",
    "CorruptArtifactError": "vit3d.artifact",
    "ModelReloadError": "vit3d.artifact",
    "UnsafeArtifactError": "vit3d.artifact",
    "inspect": "vit3d.artifact",
    "load": "vit3d.artifact",
    "load_with_info": "vit3d.artifact",
    "save": "vit3d.artifact",
    "ViT3D": "vit3d.model",
    "DEFAULT_PREPROCESSING": "vit3d.preprocessing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vit3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
