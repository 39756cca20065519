"""Floating-point operations of one forward pass, counted from a :class:`vit3d.ViT3D` config.

Counted as 2 per multiply-add of the matrix products, which are all but a fraction of a percent of the work:

- patch embedding: ``2·P·(p³·C)·H`` (P patches of p³ voxels and C channels, H hidden);
- each of L layers: ``2·T·(4·H² + 2·H·M) + 4·T²·H`` (T tokens: P, plus the class token when classifying; M the
  MLP width): Q, K, V and the output projection, the two MLP matrices, and the attention scores and their product
  with V;
- the classification head: ``2·H·K`` (K classes).

Layer norms, softmax, GELU, biases and the mean pool are left out: they are not matrix products, and they are
what keeps a model below the speed of a large matrix product on the same cores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def forward_flops(config: Mapping[str, Any]) -> int:
    """FLOPs of one scan's forward pass, for ``config`` as ``ViT3D.get_config()`` returns it."""
    size = _triple(config["img_size"])
    patch = _triple(config["patch_size"])
    channels = int(config.get("in_channels", 1))
    hidden, mlp = int(config["hidden_size"]), int(config["mlp_dim"])
    layers = int(config["num_layers"])
    patches = math.prod(s // p for s, p in zip(size, patch, strict=True))
    classifying = bool(config.get("classification", False))
    tokens = patches + int(classifying)
    embed = 2 * patches * math.prod(patch) * channels * hidden
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * tokens * tokens * hidden
    head = 2 * hidden * int(config.get("num_classes", 2)) if classifying else 0
    return embed + layers * per_layer + head


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    a, b, c = (int(v) for v in value)
    return (a, b, c)
