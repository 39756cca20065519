"""vit3d: a Keras 3 3-D Vision Transformer whose saved artifacts prove they reloaded.

Knows nothing of Ray or NIfTI; the batch job in ``jobs`` builds on it.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from vit3d.artifact import (  # noqa: E402
    ArtifactError,
    ArtifactInfo,
    ChecksumMismatchError,
    CorruptArtifactError,
    ModelReloadError,
    UnsafeArtifactError,
    inspect,
    load,
    load_with_info,
    save,
)
from vit3d.model import ViT3D  # noqa: E402
from vit3d.preprocessing import DEFAULT_PREPROCESSING  # noqa: E402

__all__ = [
    "ArtifactError",
    "ArtifactInfo",
    "ChecksumMismatchError",
    "CorruptArtifactError",
    "DEFAULT_PREPROCESSING",
    "ModelReloadError",
    "UnsafeArtifactError",
    "ViT3D",
    "inspect",
    "load",
    "load_with_info",
    "save",
]
