"""The preprocessing spec a model artifact carries: plain JSON, validated here.

vit3d only stores and validates the spec; the batch job applies it. Volumes are
taken in RAS axis order (x, y, z) and fed to the model as (D, H, W) = (x, y, z).

Keys:
- ``orientation``: "RAS" (reorient to the closest canonical) or None (keep as stored).
- ``spacing``: None (no resampling) or 3 voxel sizes in mm to resample to first.
- ``size``: 3 ints, the (D, H, W) the volume is resized to; None means the
  model's img_size, filled in when the artifact is saved.
- ``intensity``: {"kind": "zscore"} (per-volume mean 0, std 1) or
  {"kind": "clip", "window": [lo, hi]} (clip, then scale to [0, 1]).
- ``interpolation_order``: spline order of the resize (1 = linear).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

DEFAULT_PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS",
    "spacing": None,
    "size": None,
    "intensity": {"kind": "zscore"},
    "interpolation_order": 1,
}


def _positive_triple(value, key, cast):
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"preprocessing[{key!r}] must be 3 positive numbers, got {value!r}")
    triple = [cast(v) for v in value]
    if not all(math.isfinite(v) and v > 0 for v in triple):
        raise ValueError(f"preprocessing[{key!r}] must be 3 positive numbers, got {value!r}")
    return triple


def normalize_spec(spec: dict[str, Any] | None = None, size: Iterable[int] | None = None) -> dict[str, Any]:
    """A complete, validated copy of ``spec`` (None: the default), ``size`` filling a missing size."""
    merged = copy.deepcopy(DEFAULT_PREPROCESSING)
    if spec is not None:
        if not isinstance(spec, dict):
            raise ValueError(f"preprocessing must be a dict, got {type(spec).__name__}")
        unknown = set(spec) - set(DEFAULT_PREPROCESSING)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        merged.update(copy.deepcopy(spec))
    if merged["orientation"] not in ("RAS", None):
        raise ValueError(f"preprocessing['orientation'] must be 'RAS' or None, got {merged['orientation']!r}")
    if merged["spacing"] is not None:
        merged["spacing"] = _positive_triple(merged["spacing"], "spacing", float)
    if merged["size"] is None and size is not None:
        merged["size"] = list(size)
    if merged["size"] is not None:
        merged["size"] = _positive_triple(merged["size"], "size", int)
    intensity = merged["intensity"]
    kind = intensity.get("kind") if isinstance(intensity, dict) else None
    if kind == "zscore":
        merged["intensity"] = {"kind": "zscore"}
    elif kind == "clip":
        window = intensity.get("window")
        if (
            not isinstance(window, (list, tuple))
            or len(window) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in window)
            or not window[0] < window[1]
        ):
            raise ValueError(f"preprocessing clip window must be [lo, hi] with lo < hi, got {window!r}")
        merged["intensity"] = {"kind": "clip", "window": [float(window[0]), float(window[1])]}
    else:
        raise ValueError(
            "preprocessing['intensity'] must be {'kind': 'zscore'} or "
            f"{{'kind': 'clip', 'window': [lo, hi]}}, got {intensity!r}"
        )
    order = merged["interpolation_order"]
    if order not in (0, 1, 2, 3):
        raise ValueError(f"preprocessing['interpolation_order'] must be 0-3, got {order!r}")
    return merged
