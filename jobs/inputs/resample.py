"""Order-1 resize of a 3-D volume and its intensity step, in float32 and one pass over the source voxels.

``scipy.ndimage.zoom(order=1)`` cost about 40 ms of a 256x256x160 scan's 80 ms on one core: it works in
float64 through a general spline machinery. Linear interpolation is separable with 2 taps per axis, so this
module reads each source row once, interpolates in float32 (numba, compiled once per dtype and cached on disk),
and fuses slope/intercept, z-score or clip, the finite check and the final axis order into one more pass over
the small output (see README, "Feeding the accelerator").

The coordinate mapping is exactly zoom's with ``grid_mode=False`` and ``mode="constant"``: output ``i`` of ``m``
samples source coordinate ``i * ((n - 1) / (m - 1))`` computed in float64, and a coordinate that rounds above
``n - 1`` lies outside the volume and gives 0 (scipy zeroes the last plane for some shape pairs, e.g. 256 -> 32;
kept, so a model's stored spec means what it meant when it was trained). Results equal the scipy path within
float32 rounding (``tests/test_resample.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numba
import numpy as np

# Source dtypes the kernels take as they are; anything else (float16, bool, complex…) is converted to float32.
_KERNEL_DTYPES = frozenset(
    ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
)
_BLOCK = 16  # float32 values per 64-byte cache line


def linear_taps(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, t, inside)`` per output sample of an ``n`` -> ``m`` linear resize, as scipy's zoom maps them.

    The value is ``src[lo] + t * (src[hi] - src[lo])`` where ``inside``, else 0. The lerp form keeps a constant
    volume exactly constant in float32 (weights ``1 - t`` and ``t`` need not sum to 1 after rounding).
    """
    zoom = (n - 1) / (m - 1) if m > 1 else 1.0  # scipy: np.divide(n - 1, m - 1, where=m - 1 != 0), else 1
    x = np.arange(m, dtype=np.float64) * zoom
    lo = np.minimum(np.floor(x).astype(np.intp), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    t = (x - lo).astype(np.float32)
    inside = x <= n - 1
    return lo, hi, t, inside


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _resize3(src, lo0, hi0, t0, in0, lo1, hi1, t1, in1, lo2, hi2, t2, in2, out):  # pragma: no cover (compiled)
    """out[k, j, i] = trilinear sample of ``src`` (axes in memory order, last one fastest); out is float32."""
    m0, m1, m2 = out.shape
    n2 = src.shape[2]
    row = np.empty(n2, np.float32)
    for k in range(m0):
        tk = t0[k]
        for j in range(m1):
            if not (in0[k] and in1[j]):
                for i in range(m2):
                    out[k, j, i] = 0.0
                continue
            tj = t1[j]
            a = src[lo0[k], lo1[j]]
            b = src[hi0[k], lo1[j]]
            c = src[lo0[k], hi1[j]]
            d = src[hi0[k], hi1[j]]
            for x in range(n2):
                p = np.float32(a[x]) + tk * (np.float32(b[x]) - np.float32(a[x]))
                q = np.float32(c[x]) + tk * (np.float32(d[x]) - np.float32(c[x]))
                row[x] = p + tj * (q - p)
            for i in range(m2):
                if in2[i]:
                    p = row[lo2[i]]
                    out[k, j, i] = p + t2[i] * (row[hi2[i]] - p)
                else:
                    out[k, j, i] = 0.0


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _moments(r):  # pragma: no cover (compiled)
    """Mean and population variance of a C-contiguous float32 array, in float64 (two passes, like NumPy)."""
    flat = r.reshape(r.size)
    n = flat.size
    total = 0.0
    for x in range(n):
        total += np.float64(flat[x])
    mean = total / n
    sq = 0.0
    for x in range(n):
        d = np.float64(flat[x]) - mean
        sq += d * d
    return mean, sq / n


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _finish(r, dst, center, scale, offset, clip, lo, hi, span):  # pragma: no cover (compiled)
    """dst = (r - center) * scale + offset, then clipped to [lo, hi] and mapped to [0, 1] if clip.

    Returns how many results are not finite (NaN stays NaN through the clip, as with ``np.clip``).

    ``dst`` is a strided view of the C-ordered output laid over r's memory order: writing through it reorders
    the axes in the same pass.
    """
    m0, m1, m2 = r.shape
    bad = 0
    for k0 in range(0, m0, _BLOCK):  # blocks of r's slowest axis: reads and writes both stay in cache lines
        k1 = min(k0 + _BLOCK, m0)
        for j in range(m1):
            for i in range(m2):
                for k in range(k0, k1):
                    v = (r[k, j, i] - center) * scale + offset
                    if clip:
                        if v < lo:
                            v = lo
                        elif v > hi:
                            v = hi
                        v = (v - lo) / span
                    bad += (v - v) != 0  # not finite
                    dst[k, j, i] = v
    return bad


@numba.njit(cache=True, nogil=True)
def _count_nonfinite(flat):  # pragma: no cover (compiled)
    bad = 0
    for i in range(flat.size):
        v = flat[i]
        bad += (v - v) != 0  # NaN for NaN and +-Inf; branch-free, so it vectorises (np.isfinite here did not)
    return bad


def all_finite(array: np.ndarray) -> bool:
    """True when no voxel is NaN or Inf (integer arrays always are); one read of the array, no temporary."""
    if array.dtype.kind != "f":
        return True
    if array.dtype.name not in _KERNEL_DTYPES:
        return bool(np.isfinite(array).all())
    src, _, _ = _memory_order(array)
    return _count_nonfinite(src.ravel() if src.flags.c_contiguous else src.reshape(-1)) == 0


def _memory_order(array):
    """(view, perm, flipped): ``array`` transposed so its strides run largest to smallest and are positive.

    ``view`` axis k is ``array`` axis ``perm[k]``, reversed where ``flipped[k]``. For nibabel's Fortran-ordered
    voxels after a reorientation (flips and a transpose) it is the C-contiguous buffer itself.
    """
    if array.dtype.name not in _KERNEL_DTYPES:
        array = array.astype(np.float32)
    elif not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="), order="K")  # numba reads native byte order only
    perm = sorted(range(array.ndim), key=lambda ax: -abs(array.strides[ax]))
    view = array.transpose(perm)
    flipped = [view.strides[k] < 0 for k in range(view.ndim)]
    view = view[tuple(slice(None, None, -1) if f else slice(None) for f in flipped)]
    return view, perm, flipped


def _resize_memory_order(array, target):
    """(float32 output in the source's memory order, perm): the kernel's output before axes are put back."""
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {array.shape}")
    target = tuple(int(t) for t in target)
    if any(t < 1 for t in target):
        raise ValueError(f"target shape must be positive, got {target}")
    src, perm, flipped = _memory_order(array)
    taps = []
    for k, ax in enumerate(perm):
        n = array.shape[ax]
        lo, hi, t, inside = linear_taps(n, target[ax])
        if flipped[k]:  # view index s holds array index n - 1 - s
            lo, hi = n - 1 - lo, n - 1 - hi
        taps.extend((lo, hi, t, inside))
    out = np.empty([target[ax] for ax in perm], np.float32)
    _resize3(src, *taps, out)
    return out, perm


def resize(array: np.ndarray, target: Iterable[int]) -> np.ndarray:
    """``scipy.ndimage.zoom(array, factors, order=1, output=np.float32)`` to exactly ``target`` shape.

    Returns float32 of shape ``target``, possibly a transposed view of a C-contiguous buffer (as the job's
    scipy path did). Any dtype, byte order, strides or flips.
    """
    out, perm = _resize_memory_order(array, target)
    return out.transpose(np.argsort(perm))


def resize_intensity(
    array: np.ndarray, target: Iterable[int], slope: float, inter: float, intensity: dict[str, Any]
) -> tuple[np.ndarray, bool]:
    """(model input, all finite): ``array`` resized to ``target``, scaled by slope/intercept, then normalised.

    ``intensity`` is the spec's ``{"kind": "zscore"}`` or ``{"kind": "clip", "window": [lo, hi]}``. The output
    is float32, C-contiguous, shape ``target``. Same arithmetic as the scipy path: z-score statistics in float64
    over the scaled float32 values (derived here from the unscaled ones: both are linear), a constant volume
    gives zeros; clip works on the scaled values in float32.
    """
    r, perm = _resize_memory_order(array, target)
    target = tuple(int(t) for t in target)
    out = np.empty(target, np.float32)
    dst = out.transpose(perm)  # out's axes in r's order: _finish writes r[k, j, i] where it belongs
    slope, inter = float(slope), float(inter)
    kind = intensity["kind"]
    if kind == "zscore":
        mean_r, var_r = _moments(r)
        mean, std = mean_r * slope + inter, abs(slope) * math.sqrt(var_r)
        if math.isfinite(std) and std > 1e-12 * max(1.0, abs(mean)):
            # ((r * slope + inter) - mean) / std == (r - mean_r) * (slope / std)
            f32 = np.float32
            bad = _finish(r, dst, f32(mean_r), f32(slope / std), f32(0), False, f32(0), f32(1), f32(1))
        else:  # a constant volume (or one whose scaled values overflow): zeros, as the scipy path gives
            out[...] = 0.0
            bad = 0
    elif kind == "clip":
        lo, hi = (float(v) for v in intensity["window"])
        f32 = np.float32
        bad = _finish(r, dst, f32(0), f32(slope), f32(inter), True, f32(lo), f32(hi), f32(hi - lo))
    else:
        raise ValueError(f"unknown intensity kind {kind!r}")
    return out, bad == 0
