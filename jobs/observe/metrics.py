"""Ray metrics of a run, recorded where things happen, exported by every node's metrics agent (Prometheus).

Through ``ray.util.metrics``, so they land where Ray's own metrics land: each node's metrics export port
(``ray start --metrics-export-port``; the dashboard's Metrics tab and Grafana read the same). Ray prefixes
every name with ``ray_``; counters get ``_total``, histograms ``_bucket``/``_sum``/``_count``, and each process
is its own series (tag ``WorkerId``): sum over it.

| metric | kind | tags | recorded in |
|---|---|---|---|
| ``vit3d_scans_scored`` | counter | mode, model | the driver, when a result row is committed (exactly once) |
| ``vit3d_scans_failed`` | counter | stage, mode, model | the driver, when an error row is committed |
| ``vit3d_stage_seconds`` | histogram | stage (read, decode, preprocess, infer) | decode tasks; scoring actors |
| ``vit3d_model_loads`` | counter | device, model | scoring actors, per model load (a restart loads again) |

``model`` is the first 12 hex digits of the artifact's sha256. Recording never fails a scan: outside Ray, or
if Ray's metrics cannot be recorded, nothing is recorded (one warning per process).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from jobs import stages

logger = logging.getLogger(__name__)

SCANS_SCORED = "vit3d_scans_scored"
SCANS_FAILED = "vit3d_scans_failed"
STAGE_SECONDS = "vit3d_stage_seconds"
MODEL_LOADS = "vit3d_model_loads"
STAGES = stages.TIMED  # read, decode, preprocess, infer
# Seconds per scan: 1 ms (a tiny volume's read) to 2 min (a huge scan on a slow store).
BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]

_metrics: dict = {}
_state = {"warned": False}


def _get(name):
    """The metric object ``name`` of this process (created once), or None outside a Ray process."""
    ray = sys.modules.get("ray")  # never import Ray just to record: a bench may run the stages without it
    if ray is None or not ray.is_initialized():
        return None
    if name not in _metrics:
        from ray.util.metrics import Counter, Histogram

        if name == SCANS_SCORED:
            _metrics[name] = Counter(name, "Scans scored and committed to results/.", tag_keys=("mode", "model"))
        elif name == SCANS_FAILED:
            _metrics[name] = Counter(
                name, "Scans that failed, committed to errors/, by stage.", tag_keys=("stage", "mode", "model")
            )
        elif name == STAGE_SECONDS:
            _metrics[name] = Histogram(
                name, "Seconds one scan spent in a stage.", boundaries=BOUNDARIES, tag_keys=("stage",)
            )
        else:
            _metrics[name] = Counter(name, "Model loads by scoring actors.", tag_keys=("device", "model"))
    return _metrics[name]


def _safely(record):
    """Run ``record()``; a metrics problem is logged once per process and never reaches the scan."""
    try:
        record()
    except Exception as e:
        if not _state["warned"]:
            _state["warned"] = True
            logger.warning("Ray metrics not recorded: %s: %s", type(e).__name__, e)


def observe_stages(batch: dict[str, Any], stages: Iterable[str]) -> None:
    """Stage seconds of ``batch``'s successful rows (columns ``<stage>_s``), one observation per scan."""

    def record():
        histogram = _get(STAGE_SECONDS)
        if histogram is None:
            return
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        for stage in stages:
            for seconds in np.asarray(batch[f"{stage}_s"], np.float64)[ok]:
                histogram.observe(float(seconds), tags={"stage": stage})

    _safely(record)


def committed(batch: dict[str, Any], fresh: np.ndarray, mode: str, model_sha256: str) -> None:
    """Count the rows the sink has just committed (``fresh``: new rows, not a retried task's repeats; rows deferred
    by ``--settle-s`` are neither scored nor failed)."""
    if "deferred" in batch:
        fresh = np.asarray(fresh, dtype=bool) & ~np.asarray(batch["deferred"], dtype=bool)

    def record():
        scored, failed = _get(SCANS_SCORED), _get(SCANS_FAILED)
        if scored is None:
            return
        tags = {"mode": mode, "model": (model_sha256 or "")[:12]}
        stages = [str(s) for s, e, f in zip(batch["stage"], batch["error"], fresh, strict=True) if f and e]
        ok = int(np.count_nonzero(fresh)) - len(stages)
        if ok:
            scored.inc(ok, tags=tags)
        for stage in sorted(set(stages)):
            failed.inc(stages.count(stage), tags={"stage": stage, **tags})

    _safely(record)


def model_loaded(device: str, model_sha256: str) -> None:
    """One model load by a scoring actor on ``device`` ("cpu" or "gpu:N")."""

    def record():
        loads = _get(MODEL_LOADS)
        if loads is not None:
            loads.inc(1, tags={"device": device, "model": (model_sha256 or "")[:12]})

    _safely(record)
