"""One verified artifact: a single ``.keras`` file that carries its own proof.

Keras 3 can load a subclassed model without any error and still leave layers at
random initial values (a child that was not built when the weights were
assigned builds itself later, lazily, with fresh weights). So an artifact
written by :func:`save` carries, inside Keras's own ``metadata.json``, the
preprocessing spec, the number of weight arrays and a probe (a deterministic
input's outputs), and :func:`load` refuses any model that does not reproduce
them. The record lives in ``metadata.json`` rather than in extra zip entries
because Keras extracts the whole archive to disk when it has more than three.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import h5py
import keras
import numpy as np

import vit3d.model  # noqa: F401  (registers ViT3D's classes, so load() knows them in any process)
from vit3d import storage
from vit3d.preprocessing import normalize_spec

if TYPE_CHECKING:
    from typing_extensions import Unpack

FORMAT = "vit3d-artifact"
FORMAT_VERSION = 1
PROBE_SEED = 20240611
PROBE_ATOL = 1e-5
logger = logging.getLogger(__name__)
_METADATA = "metadata.json"
_CONFIG = "config.json"
_WEIGHTS = "model.weights.h5"
T = TypeVar("T")


class ArtifactError(Exception):
    """An artifact cannot be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ChecksumMismatchError(ArtifactError):
    """The file's sha256 is not the one the caller expected."""


class CorruptArtifactError(ArtifactError):
    """The file is truncated, damaged, or not a vit3d artifact."""


class UnsafeArtifactError(ArtifactError):
    """The model needs unsafe deserialization (e.g. a Lambda layer's bytecode)."""


class ModelReloadError(ArtifactError):
    """Keras loaded the model, but not the weights that were saved."""


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    """What an artifact is, read without building its model."""

    path: str
    sha256: str
    size_bytes: int
    class_name: str
    config: dict[str, Any]
    input_shape: tuple[int | None, ...]
    preprocessing: dict[str, Any]
    weight_count: int
    keras_version: str
    saved_at: str


def probe_input(shape: Sequence[int], seed: int = PROBE_SEED) -> np.ndarray:
    """A deterministic input in [-2, 2), identical across NumPy versions.

    Built from PCG64's raw bit stream, which NumPy keeps stable, rather than
    from a distribution method, which NumPy may change.
    """
    count = int(np.prod(shape))
    raw = np.random.PCG64(seed).random_raw(count)
    unit = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (4.0 * unit - 2.0).astype(np.float32).reshape(shape)


def without_tf32(fn: Callable[[], T]) -> T:
    """Run ``fn`` with TF32 matmuls off, so a GPU reproduces a float32 probe to 1e-5."""
    import tensorflow as tf

    was_enabled = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        return fn()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(was_enabled)


def probe_outputs(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of ``model(x)`` (and ``model.embed(x)`` if it has one), as float64 arrays."""

    def run() -> dict[str, np.ndarray]:
        outputs = {"call": model(x, training=False)}
        if callable(getattr(model, "embed", None)):
            outputs["embed"] = model.embed(x)
        return {
            f"{name}/{i}": np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64)
            for name, out in outputs.items()
            for i, t in enumerate(keras.tree.flatten(out))
        }

    return without_tf32(run)


def model_input_shape(model: keras.Model) -> tuple[None, Unpack[tuple[int, ...]]]:
    """The model's input shape, batch dimension None, from its inputs or its build."""
    try:
        inputs = model.inputs  # functional and sequential models
    except (AttributeError, ValueError):
        inputs = None
    shape: tuple[Any, ...] | None
    if inputs:
        if len(inputs) != 1:
            raise ValueError(f"vit3d artifacts hold single-input models; this one has {len(inputs)}")
        shape = tuple(inputs[0].shape)
    else:
        shape = (model.get_build_config() or {}).get("input_shape")
        if shape is None or not isinstance(shape[0], (int, type(None))):
            raise ValueError("the model's input shape is unknown: build it with model.build(shape) first")
        shape = tuple(shape)
    if any(d is None for d in shape[1:]):
        raise ValueError(f"the model's input shape {shape} must be fully known but for the batch")
    return (None, *(int(d) for d in shape[1:]))


def unbuilt_layers(layer: keras.layers.Layer, prefix: str = "") -> list[str]:
    """Paths (``model/block_0/dense``) of every layer, ``layer`` included, that is not built."""
    path = f"{prefix}/{layer.name}" if prefix else layer.name
    found = [] if layer.built else [path]
    for child in layer._flatten_layers(include_self=False, recursive=False):
        found += unbuilt_layers(child, path)
    return found


def _encode_arrays(arrays):
    buf = io.BytesIO()
    np.savez(buf, **{k.replace("/", "__"): v for k, v in arrays.items()})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_arrays(text):
    with np.load(io.BytesIO(base64.b64decode(text))) as npz:
        return {k.replace("__", "/"): npz[k] for k in npz.files}


def save(model: keras.Model, path: str | os.PathLike[str], preprocessing: dict[str, Any] | None = None) -> ArtifactInfo:
    """Write ``model`` as ONE verified ``.keras`` file at ``path`` (local or URI).

    The file also carries the preprocessing spec, the weight-array count and a probe (a fixed input and
    the model's outputs on it), which :func:`load` checks before it returns a model.

    Args:
        model: keras.Model. A built single-input model of a registered class (e.g. :class:`vit3d.ViT3D`).
        path: str or path-like. Where to write; the name must end in ``.keras``. Local path or URI (s3://…).
        preprocessing: dict or None. The preprocessing spec (see ``vit3d.preprocessing``). Defaults to
            ``None`` (RAS, resize to the model's input, z-score).

    Returns the :class:`ArtifactInfo` of what was written, sha256 included.

    Example:

    >>> model = vit3d.ViT3D(32, 8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, classification=True)
    >>> model.build(model.volume_shape)
    >>> info = vit3d.save(model, "/tmp/tiny.keras")
    >>> len(info.sha256)
    64
    """
    path = os.fspath(path)
    if not storage.name_of(path).endswith(".keras"):
        raise ValueError(f"{path}: a vit3d artifact's name must end in .keras")
    unbuilt = unbuilt_layers(model)
    if unbuilt:
        raise ValueError(f"cannot save a model with unbuilt layers {unbuilt}: build or call it first")
    input_shape = model_input_shape(model)
    size = input_shape[1:4] if len(input_shape) == 5 else None
    spec = normalize_spec(preprocessing, size=size)
    json.dumps(spec)  # must stay JSON-able
    x = probe_input((1, *input_shape[1:]))
    outputs = probe_outputs(model, x)

    with tempfile.TemporaryDirectory(prefix="vit3d-save-") as tmp:
        local = os.path.join(tmp, "model.keras")
        keras.saving.save_model(model, local)
        with zipfile.ZipFile(local) as keras_zip:
            entries = [(info, keras_zip.read(info.filename)) for info in keras_zip.infolist()]

    weight_count = _count_weight_arrays(dict((i.filename, d) for i, d in entries)[_WEIGHTS])
    if weight_count != len(model.weights):
        raise ValueError(
            f"Keras wrote {weight_count} weight arrays for a model with {len(model.weights)} "
            "weights: a layer's state is not tracked, so it could not be restored"
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info, data in entries:
            if info.filename == _METADATA:
                metadata = json.loads(data)
                metadata["vit3d"] = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "input_shape": list(input_shape),
                    "preprocessing": spec,
                    "weight_count": weight_count,
                    "probe": {
                        "seed": PROBE_SEED,
                        "shape": list(x.shape),
                        "atol": PROBE_ATOL,
                        "outputs": _encode_arrays(outputs),
                    },
                }
                data = json.dumps(metadata).encode()
            out.writestr(info, data)
    blob = buf.getvalue()
    storage.write_bytes(path, blob)
    info = _info(path, blob, zipfile.ZipFile(io.BytesIO(blob)))
    logger.info("saved %s (%d weight arrays, sha256 %s)", path, weight_count, info.sha256[:12])
    return info


def _count_weight_arrays(h5_source):
    """Arrays in a Keras weights file, optimizer state excluded."""
    source = io.BytesIO(h5_source) if isinstance(h5_source, bytes) else h5_source
    names = []
    with h5py.File(source, "r") as h5:
        h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sum(1 for n in names if not n.startswith("optimizer/"))


def _read(path):
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise ArtifactError(path, "no such file") from None
    except (OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid for a URI it cannot use
        raise ArtifactError(path, f"cannot be read: {e}") from e


def _open_archive(path, data):
    """The verified zip of an artifact; raises CorruptArtifactError on any damage."""
    if not data:
        raise CorruptArtifactError(path, "the file is empty")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CorruptArtifactError(path, f"not a readable .keras archive (truncated or damaged?): {e}") from e
    if damaged is not None:
        raise CorruptArtifactError(path, f"archive member {damaged} fails its CRC check (damaged file)")
    missing = {_METADATA, _CONFIG, _WEIGHTS} - set(archive.namelist())
    if missing:
        raise CorruptArtifactError(path, f"not a Keras model archive: missing {sorted(missing)}")
    return archive


def _info(path, data, archive):
    try:
        metadata = json.loads(archive.read(_METADATA))
        config = json.loads(archive.read(_CONFIG))
    except ValueError as e:
        raise CorruptArtifactError(path, f"unreadable metadata: {e}") from e
    record = metadata.get("vit3d")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptArtifactError(
            path, "a plain Keras file, not a vit3d artifact (no probe to verify it): save it with vit3d.save"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise CorruptArtifactError(
            path, f"artifact format version {record.get('format_version')} is not {FORMAT_VERSION}"
        )
    return ArtifactInfo(
        path=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        class_name=config.get("class_name", "?"),
        config=config.get("config", {}),
        input_shape=tuple(record["input_shape"]),
        preprocessing=record["preprocessing"],
        weight_count=int(record["weight_count"]),
        keras_version=metadata.get("keras_version", "?"),
        saved_at=metadata.get("date_saved", "?"),
    )


def inspect(path: str | os.PathLike[str]) -> ArtifactInfo:
    """Read an artifact's :class:`ArtifactInfo` (sha256, preprocessing, config) without building it.

    Args:
        path: str or path-like. The ``.keras`` file (local path or URI).

    Raises :class:`ArtifactError` (a subclass saying which) if the file is missing, damaged or not an artifact.

    Example:

    >>> vit3d.inspect("/tmp/tiny.keras").input_shape
    (None, 32, 32, 32, 1)
    """
    path = os.fspath(path)
    data = _read(path)
    return _info(path, data, _open_archive(path, data))


def _check_sha256(path, actual, expected):
    if expected is not None and actual.lower() != str(expected).strip().lower():
        raise ChecksumMismatchError(path, f"sha256 is {actual}, expected {expected}")


def with_dtype_policy(model: keras.Model, policy: str) -> keras.Model:
    """``model`` rebuilt under ``policy`` (e.g. "mixed_bfloat16") with the same weights.

    ``load_model`` has no dtype argument and ignores the global policy (saved configs say float32), so the
    config is rewritten and the already-verified float32 weights are copied in; variables stay float32.
    """

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and node.get("module") == "keras":
                return {**node, "config": {**node["config"], "name": policy}}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    rebuilt = keras.saving.deserialize_keras_object(rewrite(keras.saving.serialize_keras_object(model)))
    if not rebuilt.built:
        rebuilt.build(model_input_shape(model))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def load_with_info(
    path: str | os.PathLike[str],
    expected_sha256: str | None = None,
    probe_atol: float = PROBE_ATOL,
    dtype_policy: str | None = None,
) -> tuple[keras.Model, ArtifactInfo]:
    """Like :func:`load`, also returning the artifact's :class:`ArtifactInfo`."""
    path = os.fspath(path)
    data = _read(path)
    _check_sha256(path, hashlib.sha256(data).hexdigest(), expected_sha256)
    archive = _open_archive(path, data)
    info = _info(path, data, archive)
    record = json.loads(archive.read(_METADATA))["vit3d"]
    with tempfile.TemporaryDirectory(prefix="vit3d-load-") as tmp:
        local = os.path.join(tmp, "model.keras")
        with open(local, "wb") as f:
            f.write(data)
        try:
            model = keras.saving.load_model(local, compile=False, safe_mode=True)
        except Exception as e:
            message = str(e)
            if "arbitrary code execution" in message or "safe_mode" in message:
                raise UnsafeArtifactError(
                    path, f"the model needs unsafe deserialization, which vit3d never enables: {message}"
                ) from e
            raise ArtifactError(path, f"Keras could not rebuild the model: {type(e).__name__}: {message}") from e
    with archive.open(_WEIGHTS) as weights:
        saved_arrays = _count_weight_arrays(weights)
    verify(model, path, saved_arrays, record["probe"], probe_atol)
    logger.debug("loaded %s: %d variables, probe reproduced", path, saved_arrays)
    if dtype_policy and dtype_policy != "float32":
        model = with_dtype_policy(model, dtype_policy)
    return model, info


def load(
    path: str | os.PathLike[str],
    expected_sha256: str | None = None,
    probe_atol: float = PROBE_ATOL,
    dtype_policy: str | None = None,
) -> keras.Model:
    """Load a vit3d artifact (``safe_mode=True``) and prove it holds the saved weights.

    Before returning, checks that every layer is built, that the model has as
    many variables as the file has weight arrays, and that the stored probe is
    reproduced within ``probe_atol``. Raises :class:`ArtifactError` (a subclass
    saying which check failed) naming the file and the reason.

    Args:
        path: str or path-like. The ``.keras`` file (local path or URI).
        expected_sha256: str or None. Refuse the file (ChecksumMismatchError) unless its sha256 is this.
            Defaults to ``None``.
        probe_atol: float. Largest accepted deviation from the stored probe outputs. Defaults to ``1e-5``.
        dtype_policy: str or None. E.g. ``"mixed_bfloat16"`` (GPUs), applied after the float32
            verification. Defaults to ``None`` (float32).

    Example:

    >>> model = vit3d.load("/tmp/tiny.keras", expected_sha256=info.sha256)
    >>> logits, vectors = model(x), model.embed(x)
    """
    return load_with_info(path, expected_sha256, probe_atol, dtype_policy)[0]


def verify(
    model: keras.Model, path: str, saved_arrays: int, probe: dict[str, Any], probe_atol: float = PROBE_ATOL
) -> None:
    """Raise ModelReloadError unless ``model`` provably holds the saved weights."""
    unbuilt = unbuilt_layers(model)
    if unbuilt:
        raise ModelReloadError(
            path,
            f"{len(unbuilt)} layer(s) were not built when the weights were loaded, so they hold "
            f"random values: {', '.join(unbuilt)} (every layer's build() must build its children)",
        )
    if len(model.weights) != saved_arrays:
        raise ModelReloadError(
            path, f"the loaded model has {len(model.weights)} variables but the file holds {saved_arrays} weight arrays"
        )
    expected = _decode_arrays(probe["outputs"])
    actual = probe_outputs(model, probe_input(tuple(probe["shape"]), probe["seed"]))
    if set(actual) != set(expected):
        raise ModelReloadError(path, f"probe outputs {sorted(actual)} differ from the saved {sorted(expected)}")
    for name in sorted(expected):
        if actual[name].shape != expected[name].shape:
            raise ModelReloadError(
                path, f"probe output {name} has shape {actual[name].shape}, saved {expected[name].shape}"
            )
        deviation = float(np.max(np.abs(actual[name] - expected[name]), initial=0.0))
        if not deviation <= probe_atol:
            raise ModelReloadError(
                path,
                f"probe output {name} deviates from the saved output by {deviation:.3g} "
                f"(tolerance {probe_atol:g}): the loaded weights are not the saved ones",
            )
