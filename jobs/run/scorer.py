"""The scoring stage: one callable class per GPU (or CPU worker).

Each instance loads the model once with ``vit3d.load`` — verification included,
pinned to the sha256 the driver checked — and compiles one inference function
for a fixed batch size (the last batch is padded, so it never retraces). A bad
scan never raises: it becomes an error row.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.inputs import windows as sliding
from jobs.observe import metrics
from jobs.observe.logs import hide_native_stderr_lines, is_verbose, tensorflow_startup_noise
from jobs.run.ledger import process_guarded
from jobs.run.precision import resolve_precision

if TYPE_CHECKING:
    from types import ModuleType

    from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)
LOADS_PER_PROCESS = {"count": 0}  # model deserializations in this worker process


def scores_from_logits(logits: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(score, probabilities): sigmoid for one class; else 1 - softmax p(class 0, "normal")."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 1:
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        score = probabilities[:, 0]
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        score = 1.0 - probabilities[:, 0]
    return score.astype(np.float32), probabilities.astype(np.float32)


# Keras imports matplotlib.pyplot, where it is installed, for plotting helpers (keras.visualization) that the job
# never calls: about 0.5 s of TensorFlow's first import in a scoring actor (bench.startup: 3.72 s → 3.20 s on 2 cores
# of an Intel Xeon). jobs.report.review still imports matplotlib's colormaps itself, later, when it draws.
UNUSED_BY_KERAS = ("matplotlib",)


@contextlib.contextmanager
def unimportable(names: tuple[str, ...]) -> Iterator[None]:
    """Inside the block, importing one of ``names`` (top-level packages not imported yet) raises ImportError, so
    that a library's optional import of it is skipped; afterwards they import as usual."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # Python's documented import block
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


def configure_tensorflow(threads: int | None = None) -> ModuleType:
    """Memory growth on every visible GPU and a thread budget, before TF builds anything.

    TensorFlow's first import and device listing in a process print start-up lines that TF_CPP_MIN_LOG_LEVEL
    does not reach (see :func:`jobs.observe.logs.tensorflow_startup_noise`); those are hidden, unless verbose.
    That first import skips Keras's optional plotting import (:data:`UNUSED_BY_KERAS`).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    first = "tensorflow" not in sys.modules
    with (
        hide_native_stderr_lines(tensorflow_startup_noise, enabled=first and not is_verbose()),
        unimportable(UNUSED_BY_KERAS if first else ()),
    ):
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")  # cuInit: its error, where no GPU can be, is start-up noise
    # RuntimeError: TensorFlow is already initialised in this process (a notebook, a bench): keep its settings.
    with contextlib.suppress(RuntimeError):
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    if threads:
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(min(2, int(threads)))
    return tf


class Scorer:
    """Ray Data callable class: ``batch`` of preprocessed scans in, result/error rows out.

    Adds the outputs (``score`` and ``probabilities``, or ``embedding``) and the scoring-stage provenance
    (``jobs.output.sink.SCORING_PROVENANCE``: ``infer_s``, ``device``, ``precision``, ``worker_pid``) to each
    batch.

    Args:
        model_uri: str. The artifact to load (local path or URI).
        model_sha256: str. The sha256 the driver verified; any other file is refused.
        mode: str. ``"score"`` or ``"embed"``.
        batch_size: int. The compiled batch size; shorter batches are padded.
        threads: int or None. TensorFlow's thread budget. Defaults to ``None`` (TensorFlow decides).
        ledger_name: str or None. The crash ledger actor's name. Defaults to ``None`` (no crash accounting).
        precision: str. ``"auto"``, ``"float32"`` or ``"mixed_bfloat16"``; "auto" is resolved for this actor's
            device (:func:`jobs.run.precision.resolve_precision`). Defaults to ``"auto"``.
        xla: bool. Compile the scoring function with XLA (``jit_compile``). Defaults to ``False``.
        before_attempt: callable or None. Given each attempt's scan_ids (tests plant faults with it).
            Defaults to ``None``.
        windows: dict or None. ``{"overlap": float, "aggregate": str}``: each scan arrives whole at the model's
            spacing and is scored as sliding windows (:mod:`jobs.inputs.windows`); windows of all the batch's scans
            share the compiled batches. Defaults to ``None`` (each scan arrives at the model's input size).
        review: int. Render a review picture (:mod:`jobs.report.review`) for each scan that enters this actor's
            ``review`` highest scores so far (score mode): the run's top ``review`` are among them. Defaults to
            ``0`` (none).
    """

    def __init__(
        self,
        model_uri: str,
        model_sha256: str,
        mode: str,
        batch_size: int,
        threads: int | None = None,
        ledger_name: str | None = None,
        precision: str = "auto",
        xla: bool = False,
        before_attempt: Callable[[list[str]], None] | None = None,
        windows: dict[str, Any] | None = None,
        review: int = 0,
    ) -> None:
        tf = configure_tensorflow(threads)
        import vit3d

        self.device = "gpu:" + os.environ["CUDA_VISIBLE_DEVICES"] if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"
        self.precision = resolve_precision(precision, tf, self.device)
        started = time.perf_counter()
        self.model, self.info = vit3d.load_with_info(
            model_uri, expected_sha256=model_sha256, dtype_policy=self.precision
        )
        LOADS_PER_PROCESS["count"] += 1
        self.load_s = time.perf_counter() - started
        self.node_id = node_id()
        if ledger_name is not None:
            import ray

            ray.get(ray.get_actor(ledger_name).scoring_started.remote(self.node_id, os.getpid()))
        logger.info("loaded and verified %s in %.1f s (%s on %s)", model_uri, self.load_s, self.precision, self.device)
        self.mode = mode
        self.ledger_name = ledger_name
        self.before_attempt = before_attempt
        self.batch_size = int(batch_size)
        self.input_shape = tuple(self.info.input_shape[1:])
        metrics.model_loaded(self.device, self.info.sha256)  # Ray metrics (jobs.observe.metrics)
        model_fn = self.model.embed if mode == "embed" else (lambda x: self.model(x, training=False))

        def forward(x):
            return tf.cast(model_fn(x), tf.float32)  # bfloat16 models too: float32 out

        spec = tf.TensorSpec((self.batch_size, *self.input_shape), tf.float32)
        self._infer = tf.function(forward, input_signature=[spec], reduce_retracing=True, jit_compile=bool(xla))
        started = time.perf_counter()
        warmup = self._infer(np.zeros((self.batch_size, *self.input_shape), np.float32))  # compile once, up front
        self.compile_s = time.perf_counter() - started
        logger.info("compiled the scoring function in %.1f s (XLA %s)", self.compile_s, "on" if xla else "off")
        self.width = int(warmup.shape[-1])  # classes (score) or hidden size (embed)
        self.windows = dict(windows) if windows else None
        self.review = int(review) if mode == "score" else 0
        self._review_heap: list[float] = []  # this actor's highest scores so far (a min-heap of at most `review`)
        self._review_failed = False

    def _launched(self, batches: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Model outputs of each compiled-size batch in ``batches``, in order, each batch launched before the
        previous one's output is read back. On a GPU, where TensorFlow returns from a call before the work is done,
        preparing and copying the next batch overlaps the current one's compute; on a CPU a call returns when it is
        done (same results, nothing to overlap). Each batch must be an array of its own: it may still be in use."""
        pending = None
        for batch in batches:
            launched = self._infer(batch)
            if pending is not None:
                yield np.asarray(pending)
            pending = launched
        if pending is not None:
            yield np.asarray(pending)

    def outputs(self, volumes: np.ndarray) -> dict[str, np.ndarray]:
        """Mode-specific output columns for a stack of volumes; raises on non-finite output."""
        chunks = [volumes[i : i + self.batch_size] for i in range(0, len(volumes), self.batch_size)]

        def padded():
            for chunk in chunks:
                batch = np.zeros((self.batch_size, *self.input_shape), np.float32)
                batch[: len(chunk)] = chunk
                yield batch

        raw = np.concatenate([out[: len(c)] for c, out in zip(chunks, self._launched(padded()), strict=True)])
        if not np.all(np.isfinite(raw)):
            raise FloatingPointError("the model produced NaN or Inf")
        if self.mode == "embed":
            return {"embedding": raw.astype(np.float32)}
        score, probabilities = scores_from_logits(raw)
        return {"score": score, "probabilities": probabilities}

    def _score_rows(self, batch, rows, outputs, errors, stages):
        """Score ``rows`` together; if that fails, one at a time so only the bad scan fails."""
        volumes = np.stack([np.frombuffer(batch["volume"][i], np.float32).reshape(self.input_shape) for i in rows])
        try:
            results = dict(zip(rows, _rows(self.outputs(volumes)), strict=True))
        except Exception:
            results = {}
            for i, volume in zip(rows, volumes, strict=True):
                try:
                    results[i] = next(_rows(self.outputs(volume[None])))
                except Exception as e:
                    errors[i] = f"{batch['path'][i]}: inference failed: {type(e).__name__}: {e}"
                    stages[i] = "infer"
        for i, row in results.items():
            for key, value in row.items():
                outputs[key][i] = value

    def _window_outputs(self, scans):
        """Raw model outputs (windows, width) of each scan in ``scans`` [(volume, grid)], their windows packed into
        the compiled batch size across scans (only the last batch is padded). Windows are copied into the batch
        buffer one at a time: a scan's windows never exist all at once."""
        raw = [np.empty((grid.count, self.width), np.float32) for _, grid in scans]
        owners: list[list[tuple[int, int]]] = []  # (scan, window) of each slot of each launched batch

        def batches():  # a new buffer per batch: the launched one may still be in use (jobs.run.scorer._launched)
            buffer, slots = np.zeros((self.batch_size, *self.input_shape), np.float32), []
            for scan, (volume, grid) in enumerate(scans):
                for window, crop in enumerate(sliding.iter_windows(volume, grid)):
                    buffer[len(slots)] = crop
                    slots.append((scan, window))
                    if len(slots) == self.batch_size:
                        owners.append(slots)
                        yield buffer
                        buffer, slots = np.zeros((self.batch_size, *self.input_shape), np.float32), []
            if slots:  # the last batch, padded with zeros
                owners.append(slots)
                yield buffer

        for k, out in enumerate(self._launched(batches())):
            for slot, (scan, window) in enumerate(owners[k]):
                raw[scan][window] = out[slot]
        for values in raw:
            if not np.all(np.isfinite(values)):
                raise FloatingPointError("the model produced NaN or Inf")
        return raw

    def _window_rows(self, batch, rows, outputs, errors, stages):
        """Score the windows of ``rows`` together; if that fails, scan by scan so only the bad scan fails."""
        roi = self.input_shape[:3]
        scans = {}
        for i in rows:
            shape = tuple(int(n) for n in batch["volume_shape"][i])
            volume = np.frombuffer(batch["volume"][i], np.float32).reshape(*shape, self.input_shape[3])
            scans[i] = (volume, sliding.window_grid(shape, roi, self.windows["overlap"]))
        try:
            raws = dict(zip(rows, self._window_outputs([scans[i] for i in rows]), strict=True))
        except Exception:
            raws = {}
            for i in rows:
                try:
                    raws[i] = self._window_outputs([scans[i]])[0]
                except Exception as e:
                    errors[i] = f"{batch['path'][i]}: inference failed: {type(e).__name__}: {e}"
                    stages[i] = "infer"
        for i, raw in raws.items():
            volume, grid = scans[i]
            to_ras = np.asarray(batch["to_ras"][i], np.float64).reshape(4, 4)
            to_source = np.asarray(batch["to_source"][i], np.float64).reshape(4, 4)
            outputs["window_grid"][i] = grid.shape
            outputs["window_affine"][i] = grid.grid_affine(to_ras).reshape(-1)
            outputs["window_starts"][i] = json.dumps(grid.unpadded_starts)
            outputs["window_size"][i] = grid.roi_size
            if self.mode == "embed":
                outputs["embedding"][i] = raw.mean(axis=0)  # the scan's embedding: the mean of its windows'
                continue
            scores, probabilities = scores_from_logits(raw)
            taken = _aggregated_windows(scores, self.windows["aggregate"])
            outputs["score"][i] = sliding.aggregate(scores, self.windows["aggregate"])
            outputs["probabilities"][i] = probabilities[taken].mean(axis=0)
            outputs["window_scores"][i] = scores.tobytes()
            best = int(np.argmax(scores))
            centre = grid.centre_voxel(best)
            outputs["max_window_ras"][i] = _apply(to_ras, centre)
            outputs["max_window_voxel"][i] = _source_voxel(to_source, centre, batch["original_shape"][i])
            # The review picture's slices cross where the high-scoring windows overlap, inside the highest one.
            try:
                focus = sliding.heat_peak(grid, scores, best)
            except Exception:  # only where the picture looks: never a failed scan
                focus = centre
            outputs["focus_voxel"][i] = _source_voxel(to_source, focus, batch["original_shape"][i])
            outputs["focus_ras"][i] = _apply(to_ras, focus)
            if self._enters_review(float(outputs["score"][i])):
                outputs["review_png"][i] = self._review_picture(volume[..., 0], to_ras, focus, grid, scores, best)

    def _enters_review(self, score):
        """Whether ``score`` is among this actor's ``review`` highest so far (then the run's top may need it)."""
        if not self.review or not math.isfinite(score):
            return False
        if len(self._review_heap) < self.review:
            heapq.heappush(self._review_heap, score)
            return True
        if score > self._review_heap[0]:
            heapq.heapreplace(self._review_heap, score)
            return True
        return False

    def _review_picture(
        self,
        volume: np.ndarray,
        to_ras: np.ndarray,
        centre: np.ndarray,
        grid: sliding.WindowGrid | None = None,
        scores: np.ndarray | None = None,
        best: int | None = None,
    ) -> bytes:
        """The scan's review PNG (:func:`jobs.report.review.review_png`); b"" if it cannot be drawn: a picture
        never fails a scan or the run (the first failure is logged)."""
        try:
            from jobs.report.review import review_png

            spacing = np.linalg.norm(to_ras[:3, :3], axis=0)
            return review_png(volume, spacing, centre.tolist(), grid=grid, window_scores=scores, max_window=best)
        except Exception as e:
            if not self._review_failed:
                logger.warning("could not draw a review picture (the report page shows fewer): %s", e)
                self._review_failed = True
            return b""

    def _empty_outputs(self, count):
        """NaN placeholders as wide as the model's output (classes, or the embedding size), for any model, and the
        window columns' empty encodings (jobs.output.sink reads them as nulls)."""
        if self.mode == "embed":
            outputs = {"embedding": np.full((count, self.width), np.nan, np.float32)}
        else:
            outputs = {
                "score": np.full(count, np.nan, np.float32),
                "probabilities": np.full((count, self.width), np.nan, np.float32),
            }
        return {
            **outputs,
            "window_scores": np.full(count, b"", dtype=object),
            "window_grid": np.zeros((count, 3), np.int32),
            "window_affine": np.full((count, 16), np.nan, np.float64),
            "window_starts": np.full(count, "", dtype=object),  # JSON: per axis, starts in the unpadded volume
            "window_size": np.zeros((count, 3), np.int32),
            "max_window_ras": np.full((count, 3), np.nan, np.float64),
            "max_window_voxel": np.full((count, 3), -1, np.int32),
            # Where the review picture looks (the highest window, or the volume's centre): for the report only.
            "focus_ras": np.full((count, 3), np.nan, np.float64),
            "focus_voxel": np.full((count, 3), -1, np.int32),
            "review_png": np.full(count, b"", dtype=object),
        }

    def _whole_volume_review(self, batch, rows, outputs):
        """The review columns of whole-volume rows: the centre of the model input, and its picture if it may be in
        the run's top."""
        centre = (np.asarray(self.input_shape[:3], np.float64) - 1) / 2.0
        for i in rows:
            if not np.isfinite(outputs["score"][i]) or "to_ras" not in batch:
                continue
            to_ras = np.asarray(batch["to_ras"][i], np.float64).reshape(4, 4)
            to_source = np.asarray(batch["to_source"][i], np.float64).reshape(4, 4)
            outputs["focus_ras"][i] = _apply(to_ras, centre)
            outputs["focus_voxel"][i] = _source_voxel(to_source, centre, batch["original_shape"][i])
            if self._enters_review(float(outputs["score"][i])):
                volume = np.frombuffer(batch["volume"][i], np.float32).reshape(self.input_shape)[..., 0]
                outputs["review_png"][i] = self._review_picture(volume, to_ras, centre)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["scan_id"])
        errors = np.asarray(batch["error"], dtype=object).copy()
        stages = np.asarray(batch["stage"], dtype=object).copy()
        outputs = self._empty_outputs(count)
        ok = [i for i in range(count) if not errors[i]]

        def fail(i, reason):
            errors[i], stages[i] = f"{batch['path'][i]}: {reason}", "infer"

        def score(rows):
            if self.windows:
                self._window_rows(batch, rows, outputs, errors, stages)
            else:
                self._score_rows(batch, rows, outputs, errors, stages)
                if self.review:
                    self._whole_volume_review(batch, [i for i in rows if not errors[i]], outputs)

        started = time.perf_counter()
        process_guarded(self.ledger_name, batch["scan_id"], ok, score, fail, "scoring", self.before_attempt)
        infer_s = (time.perf_counter() - started) / max(1, len(ok))
        dropped = ("volume", "volume_shape", "to_ras", "to_source")  # the scans themselves stop here
        out = {k: v for k, v in batch.items() if k not in dropped}
        out.update(outputs)
        out["error"], out["stage"] = errors, stages
        out["infer_s"] = np.full(count, infer_s, np.float32)
        out["worker_pid"] = np.full(count, os.getpid(), np.int64)
        out["device"] = np.full(count, self.device, dtype=object)
        out["precision"] = np.full(count, self.precision, dtype=object)
        out["model_loads"] = np.full(count, LOADS_PER_PROCESS["count"], np.int64)
        out["scoring_node"] = np.full(count, self.node_id, dtype=object)  # for the report, not a result column
        metrics.observe_stages(out, ("infer",))  # Ray metrics (jobs.observe.metrics)
        return out


def _aggregated_windows(scores: np.ndarray, how: str) -> np.ndarray:
    """Indices of the windows ``how`` takes (max: the highest; mean: all; top3: the three highest): the scan's
    probabilities are their mean, so that the score is the same function of them as for one window."""
    if how == "max":
        return np.array([int(np.argmax(scores))])
    if how == "mean":
        return np.arange(len(scores))
    return np.argsort(scores, kind="stable")[-3:]


def _apply(affine: np.ndarray, point: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(point, np.float64) + affine[:3, 3]


def _source_voxel(to_source: np.ndarray, point: np.ndarray, source_shape: ArrayLike) -> np.ndarray:
    """The nearest voxel index of the stored volume to ``point`` (a model-input voxel), inside the volume."""
    index = np.rint(_apply(to_source, point))
    return np.clip(index, 0, np.asarray(source_shape, np.float64) - 1).astype(np.int32)


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # no Ray at all: a bench or a notebook using Scorer directly
        return ""


def _rows(outputs):
    """Iterate over a dict of column arrays as dicts of row values."""
    keys = list(outputs)
    for values in zip(*(outputs[k] for k in keys), strict=True):
        yield dict(zip(keys, values, strict=True))
