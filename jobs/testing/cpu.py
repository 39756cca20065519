"""The CPU a bench ran on, printed at the top of every bench (and checked by a test): speeds differ by vendor,
model and SIMD set.

A TensorFlow Conv3D filter gradient took 177 s on an AVX2-only AMD EPYC and 2 ms on an AVX-512 Xeon, so a
figure without its CPU is not a figure.
"""

import os
import platform
from typing import Any

# The SIMD and matrix extensions that change which kernels NumPy, oneDNN and Eigen run.
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve",
)  # fmt: skip


def cpu_info() -> dict[str, Any]:
    """``{"model", "vendor", "simd", "cores"}`` read from /proc/cpuinfo (platform's words elsewhere)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "vendor_id", "flags", "Features") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id", "?"),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def header(title: str) -> str:
    """The lines every bench prints first: what it measures and on which CPU."""
    info = cpu_info()
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (TensorFlow decides by CPU)")
    return "\n".join(
        [
            f"# {title}",
            f"# CPU: {info['model']} ({info['vendor']}), {info['cores']} usable cores",
            f"# SIMD: {' '.join(info['simd']) or 'none of ' + ', '.join(SIMD_FLAGS[:4])}",
            f"# AVX-512: {'yes' if 'avx512f' in info['simd'] else 'no'}; TF_ENABLE_ONEDNN_OPTS={onednn}",
        ]
    )
