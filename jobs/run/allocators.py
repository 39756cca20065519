"""The driver process's allocators: what it frees goes back to the system, so that its memory does not grow with
the night. The job's command line (``python -m jobs.score``) sets them for its own process; ``jobs.score.run()``
inside someone else's process (a notebook, the tests) leaves that process's allocators alone.

This module imports nothing but the standard library: :func:`arrow_on_the_drivers_pool` has to run before anything
imports pyarrow.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h), and the size from which a block gets a mapping of its own.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LARGE_BLOCK_BYTES = 128 * 1024
ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"  # read once, when pyarrow is imported
# jemalloc hands what it freed back to the system about a second later (its decay), and reuses it until then;
# pyarrow's Linux x86_64 wheels carry it. Elsewhere the C library's allocator, which hands back at once.
DRIVER_ARROW_POOL = "jemalloc" if sys.platform.startswith("linux") and platform.machine() == "x86_64" else "system"


def return_large_blocks() -> bool:
    """Have glibc give every block of :data:`LARGE_BLOCK_BYTES` or more a mapping of its own, handed back to the
    system when it is freed, and trim its heap's top above twice that. False where the C library is not glibc.

    Left to itself, glibc raises that threshold to the size of each such block freed (up to 32 MiB), after which a
    night's transient buffers (Arrow batches, the sink's row groups, the page's reads) came from its heaps and stayed
    resident: a first night's driver grew with the night (bench.nightly)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mapped = libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)
        trimmed = libc.mallopt(M_TRIM_THRESHOLD, 2 * LARGE_BLOCK_BYTES)
    except (OSError, AttributeError):
        return False
    return bool(mapped and trimmed)


def arrow_on_the_drivers_pool() -> str:
    """Have Arrow allocate this process's buffers from :data:`DRIVER_ARROW_POOL` instead of pyarrow's default,
    mimalloc, which kept what it freed: what the driver frees grows with the night. Returns the pool Arrow's
    Python calls now use.

    Arrow has two defaults. pyarrow's own (:func:`pyarrow.set_memory_pool`) serves the calls made from Python; the
    C++ one serves what Arrow allocates inside a call (Parquet decoding, dataset scans), and it is chosen once, from
    ``ARROW_DEFAULT_MEMORY_POOL``, when pyarrow is imported. So this sets that variable for the import, if pyarrow
    is not imported yet, and takes it away again: Ray's worker processes, started later from this environment, keep
    Arrow's own default. Where pyarrow is imported already, only pyarrow's own default can change. An operator's
    own ``ARROW_DEFAULT_MEMORY_POOL`` is left as it is, and so are both defaults."""
    if ARROW_POOL_VARIABLE in os.environ:
        import pyarrow as pa

        return pa.default_memory_pool().backend_name
    if "pyarrow" not in sys.modules:
        os.environ[ARROW_POOL_VARIABLE] = DRIVER_ARROW_POOL
        try:
            import pyarrow  # noqa: F401 (the import reads the variable)
        finally:
            del os.environ[ARROW_POOL_VARIABLE]
    import pyarrow as pa

    try:
        pool = pa.jemalloc_memory_pool() if DRIVER_ARROW_POOL == "jemalloc" else pa.system_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    return pool.backend_name
