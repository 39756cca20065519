"""The precision a scoring actor computes in: ``--precision auto`` takes bfloat16 where the hardware computes it.

bfloat16 matrix products run natively on CPUs with ``avx512_bf16`` or AMX and on GPUs of compute capability 8.0 and
later (Ampere, Hopper, Ada, Blackwell); there, ``mixed_bfloat16`` scored a ViT-B-sized model 1.5x faster than float32
(docs/explanation/performance.md). Elsewhere bfloat16 is emulated, and only costs time: float32. Each actor decides
on its own node, so a mixed cluster is fine; every result row records what its actor used (``precision``).
"""

from __future__ import annotations

from types import ModuleType

PRECISIONS = ("auto", "float32", "mixed_bfloat16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 matrix products
BF16_GPU_CAPABILITY = (8, 0)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where there is no such file."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bfloat16(tf: ModuleType, device: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ``device`` ("cpu", or "gpu…" for this process's first visible GPU) has bfloat16 matrix units."""
    if device.startswith("gpu"):
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return False
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return bool(capability) and tuple(capability) >= BF16_GPU_CAPABILITY
    return bool(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))


def resolve_precision(requested: str, tf: ModuleType, device: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """``requested`` as a Keras dtype policy name: "auto" becomes mixed_bfloat16 or float32 for ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return "mixed_bfloat16" if native_bfloat16(tf, device, cpuinfo) else "float32"
