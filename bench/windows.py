"""Window geometry and the CPU cost of cutting windows, one core: how many windows a scan makes, and what gathering
them into the scoring actor's fixed-size batches costs next to the model.

python -m bench.windows [--shape 512 512 300] [--zooms 0.7 0.7 1.5] [--spacing 1 1 1] [--roi 96 96 96]
                        [--overlap 0.25] [--batch 8] [--repeat 3]

Prints, for a scan of --shape voxels of --zooms mm resampled to --spacing: its size at that spacing, the window grid
(per axis and in all, how many windows are pulled back to the edge), the voxels scored per voxel of the scan (the
overlap's cost), the time and bytes to copy every window into --batch-sized contiguous batches (best of --repeat,
thread CPU time), and the peak traced memory while doing so: about one batch, never all windows.
"""

import argparse
import math
import time
import tracemalloc

import numpy as np

from jobs.inputs.windows import iter_windows, window_grid
from jobs.testing.cpu import header


def gather(volume, grid, batch):
    """Copy every window into a reused (batch, *roi) buffer, as a scoring actor fills its fixed-size batches."""
    buf = np.empty((batch, *grid.roi_size), np.float32)
    filled = batches = 0
    for window in iter_windows(volume, grid):
        buf[filled] = window
        filled += 1
        if filled == batch:
            filled, batches = 0, batches + 1
    return batches + (filled > 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--zooms", type=float, nargs=3, default=[0.7, 0.7, 1.5])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    ap.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96])
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    print(header("bench.windows: window grid and gather cost"))
    # The resampled size, as jobs.inputs.preprocess computes it.
    size = [max(1, round(n * z / s)) for n, z, s in zip(args.shape, args.zooms, args.spacing, strict=True)]
    grid = window_grid(size, args.roi, args.overlap)
    pulled = [int(s[-1] != (len(s) - 1) * step) for s, step in zip(grid.starts, grid.interval, strict=True)]
    scored = grid.count * math.prod(grid.roi_size)
    print(f"scan {args.shape} at {args.zooms} mm -> {size} at {args.spacing} mm (padded {list(grid.padded_size)})")
    print(f"roi {args.roi}, overlap {args.overlap}: step {list(grid.interval)}, grid {list(grid.shape)}")
    print(f"windows: {grid.count}; last window pulled back on axes {[a for a in range(3) if pulled[a]]}")
    print(f"voxels scored per voxel of the scan: {scored / math.prod(size):.2f}")

    volume = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    best = math.inf
    for _ in range(args.repeat):
        t0 = time.thread_time()
        batches = gather(volume, grid, args.batch)
        best = min(best, time.thread_time() - t0)
    tracemalloc.start()
    gather(volume, grid, args.batch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    window_mb = math.prod(grid.roi_size) * 4 / 2**20
    per_window = best / grid.count * 1e3
    print(f"gather into {batches} batches of {args.batch}: {best * 1e3:.1f} ms CPU ({per_window:.2f} ms a window)")
    print(
        f"peak traced memory while gathering: {peak / 2**20:.1f} MiB (one batch: {args.batch * window_mb:.1f} MiB, "
        f"all windows at once would be {grid.count * window_mb:.0f} MiB; the volume: {volume.nbytes / 2**20:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
