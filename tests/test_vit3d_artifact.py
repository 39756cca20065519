"""vit3d.save / vit3d.load: bit-identical reloads in a fresh process, and refusals."""

import hashlib
import io
import itertools
import json
import zipfile

import h5py
import keras
import numpy as np
import pytest
from conftest import fresh_python
from keras_test_models import SeedViT

import vit3d

GRID = [
    dict(classification=c, num_classes=k, patch_size=p, in_channels=ch, qkv_bias=q)
    for c, k, p, ch, q in itertools.product([False, True], [1, 3], [4, (2, 4, 8)], [1, 2], [False, True])
]
IMG = (8, 12, 16)  # non-cubic


def perturb(model, rng):
    """Move every weight away from its initializer: zeros/ones hide reload bugs."""
    for v in model.weights:
        v.assign(keras.ops.convert_to_numpy(v) + rng.normal(0, 0.3, v.shape).astype("float32"))


def outputs_of(model, x):
    out = {"call": keras.ops.convert_to_numpy(model(x))}
    if hasattr(model, "embed"):
        out["embed"] = keras.ops.convert_to_numpy(model.embed(x))
    return out


@pytest.fixture(scope="module")
def fresh_reload(tmp_path_factory):
    """Save every grid model and the seed's model, reload all in ONE fresh process."""
    root = tmp_path_factory.mktemp("reload")
    rng = np.random.default_rng(7)
    tasks, before = [], {}

    def add(name, loader, artifact, model, x):
        np.save(root / f"{name}.npy", x)
        inputs, out = root / f"{name}.npy", root / f"{name}.out.npz"
        tasks.append({"loader": loader, "artifact": str(artifact), "inputs": str(inputs), "out": str(out)})
        before[name] = outputs_of(model, x)

    for i, cfg in enumerate(GRID):
        model = vit3d.ViT3D(IMG, hidden_size=16, mlp_dim=24, num_layers=2, num_heads=2, **cfg)
        model.build((None, *IMG, cfg["in_channels"]))
        perturb(model, rng)
        vit3d.save(model, root / f"grid{i}.keras")
        x = rng.normal(size=(2, *IMG, cfg["in_channels"])).astype("float32")
        add(f"grid{i}", "vit3d", root / f"grid{i}.keras", model, x)

    seed = SeedViT(name="seed")
    x = rng.normal(size=(2, 8, 8, 8, 1)).astype("float32")
    seed(x)  # the lazily built children exist once call() has run
    perturb(seed, rng)
    keras.saving.save_model(seed, root / "seed_plain.keras")
    vit3d.save(seed, root / "seed_vit3d.keras")
    add("seed_keras", "keras", root / "seed_plain.keras", seed, x)
    add("seed_vit3d", "vit3d", root / "seed_vit3d.keras", seed, x)

    (root / "tasks.json").write_text(json.dumps(tasks))
    proc = fresh_python(["-m", "reload_worker", str(root / "tasks.json")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = {t["out"].rsplit("/", 1)[1][: -len(".out.npz")]: dict(np.load(t["out"])) for t in tasks}
    return before, after


@pytest.mark.parametrize("i", range(len(GRID)), ids=[json.dumps(c, separators=(",", ":")) for c in GRID])
def test_reload_in_fresh_process_is_bit_identical(fresh_reload, i):
    before, after = fresh_reload
    loaded = after[f"grid{i}"]
    assert "error" not in loaded, str(loaded.get("error"))
    for key in ("call", "embed"):
        np.testing.assert_array_equal(before[f"grid{i}"][key], loaded[key], err_msg=key)


def test_seed_failure_keras_loads_silently_with_wrong_weights(fresh_reload):
    before, after = fresh_reload
    loaded = after["seed_keras"]
    assert "error" not in loaded, "Keras raised; the silent failure was not reproduced"
    deviation = np.max(np.abs(before["seed_keras"]["call"] - loaded["call"]))
    assert deviation > 1e-3, f"Keras restored the seed model correctly (max diff {deviation})"


def test_seed_failure_is_refused_by_vit3d_load(fresh_reload):
    _, after = fresh_reload
    loaded = after["seed_vit3d"]
    assert str(loaded["error_type"]) == "ModelReloadError"
    message = str(loaded["error"])
    assert "seed_vit3d.keras" in message
    assert "not built" in message
    assert "seed/block_0/dense" in message and "seed/block_1/norm" in message


def test_inspect_reads_sha256_and_preprocessing_without_loading(tmp_path):
    model = vit3d.ViT3D(IMG, 4, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2, classification=True)
    model.build((None, *IMG, 1))
    spec = {"spacing": [1.5, 1.5, 2.0], "intensity": {"kind": "clip", "window": [-1000, 400]}}
    saved = vit3d.save(model, tmp_path / "m.keras", preprocessing=spec)
    info = vit3d.inspect(tmp_path / "m.keras")
    assert info.sha256 == hashlib.sha256((tmp_path / "m.keras").read_bytes()).hexdigest() == saved.sha256
    assert info.preprocessing == {
        "orientation": "RAS",
        "spacing": [1.5, 1.5, 2.0],
        "size": list(IMG),
        "intensity": {"kind": "clip", "window": [-1000.0, 400.0]},
        "interpolation_order": 1,
    }
    assert info.input_shape == (None, *IMG, 1)
    assert info.weight_count == len(model.weights)
    assert info.config["classification"] is True


def test_default_preprocessing_is_documented_default(tmp_path):
    model = vit3d.ViT3D(IMG, 4, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    model.build((None, *IMG, 1))
    info = vit3d.save(model, tmp_path / "m.keras")
    assert info.preprocessing == {**vit3d.DEFAULT_PREPROCESSING, "size": list(IMG)}
    assert info.preprocessing["orientation"] == "RAS" and info.preprocessing["intensity"] == {"kind": "zscore"}


def test_generic_functional_model_round_trips(tmp_path, rng):
    inputs = keras.Input((6, 6, 6, 1))
    x = keras.layers.Conv3D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling3D()(x))
    model = keras.Model(inputs, outputs)
    perturb(model, rng)
    vit3d.save(model, tmp_path / "f.keras")
    loaded = vit3d.load(tmp_path / "f.keras")
    x = rng.normal(size=(3, 6, 6, 6, 1)).astype("float32")
    np.testing.assert_array_equal(model(x), loaded(x))


@pytest.fixture
def saved(tmp_path, rng):
    model = vit3d.ViT3D(IMG, 4, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2, classification=True)
    model.build((None, *IMG, 1))
    perturb(model, rng)
    path = tmp_path / "model.keras"
    return path, vit3d.save(model, path)


def rewrite_member(src, dst, member, transform):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, transform(data) if info.filename == member else data)


def test_wrong_sha256_is_refused(saved):
    path, info = saved
    with pytest.raises(vit3d.ChecksumMismatchError, match="model.keras.*expected 0{64}"):
        vit3d.load(path, expected_sha256="0" * 64)
    assert vit3d.load(path, expected_sha256=info.sha256.upper()) is not None


@pytest.mark.parametrize("cut", [0, 100, 0.5, -1])
def test_truncated_file_is_refused(saved, tmp_path, cut):
    path, _ = saved
    data = path.read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(data[:keep])
    with pytest.raises(vit3d.CorruptArtifactError, match="broken.keras: .*(empty|truncated)"):
        vit3d.load(broken)


def test_damaged_bytes_are_refused(saved, tmp_path):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken = tmp_path / "flipped.keras"
    broken.write_bytes(bytes(data))
    with pytest.raises(vit3d.CorruptArtifactError, match="flipped.keras: .*CRC"):
        vit3d.load(broken)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(vit3d.ArtifactError, match="nowhere.keras: no such file"):
        vit3d.load(tmp_path / "nowhere.keras")


def test_plain_keras_file_is_not_trusted(tmp_path):
    model = vit3d.ViT3D(IMG, 4, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    model.build((None, *IMG, 1))
    model.save(tmp_path / "plain.keras")
    with pytest.raises(vit3d.CorruptArtifactError, match="plain.keras: .*not a vit3d artifact"):
        vit3d.load(tmp_path / "plain.keras")


def test_lambda_layer_needs_unsafe_deserialization_and_is_refused(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    vit3d.save(model, tmp_path / "lambda.keras")
    with pytest.raises(vit3d.UnsafeArtifactError, match="lambda.keras: .*unsafe deserialization"):
        vit3d.load(tmp_path / "lambda.keras")


def test_changed_weight_values_fail_the_probe(saved, tmp_path):
    """Same structure, same variable count, different values: only the probe can tell."""
    path, _ = saved

    def bump_first_array(data):
        buf = io.BytesIO(data)
        with h5py.File(buf, "r+") as h5:
            names = []
            h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            # Not a constant shift: LayerNorm would cancel that, leaving an equivalent model.
            target = h5[names[0]]
            target[...] = target[...] + np.linspace(-0.5, 0.5, target.size).reshape(target.shape)
        return buf.getvalue()

    rewrite_member(path, tmp_path / "tampered.keras", "model.weights.h5", bump_first_array)
    with pytest.raises(vit3d.ModelReloadError, match="tampered.keras: probe output .* deviates"):
        vit3d.load(tmp_path / "tampered.keras")


def test_unregistered_class_is_named(saved, tmp_path):
    path, _ = saved
    rename = lambda data: data.replace(b'"vit3d>ViT3D"', b'"vit3d>NoSuchModel"')  # noqa: E731
    rewrite_member(path, tmp_path / "renamed.keras", "config.json", rename)
    assert vit3d.inspect(tmp_path / "renamed.keras").sha256  # readable without building
    with pytest.raises(vit3d.ArtifactError, match="renamed.keras: Keras could not rebuild .*NoSuchModel"):
        vit3d.load(tmp_path / "renamed.keras")


def test_unbuilt_model_cannot_be_saved(tmp_path):
    model = vit3d.ViT3D(IMG, 4, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="unbuilt layers"):
        vit3d.save(model, tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"intensity": {"kind": "clip", "window": [400, -1000]}}, "lo < hi"),
        ({"spacing": [1, 0, 1]}, "spacing"),
        ({"orientation": "LPS"}, "orientation"),
        ({"colour": "blue"}, "unknown preprocessing keys"),
    ],
)
def test_invalid_preprocessing_is_refused_at_save(tmp_path, spec, message):
    model = vit3d.ViT3D(IMG, 4, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    model.build((None, *IMG, 1))
    with pytest.raises(ValueError, match=message):
        vit3d.save(model, tmp_path / "m.keras", preprocessing=spec)


def test_mixed_bfloat16_is_applied_at_load_after_float32_verification(saved, rng):
    path, _ = saved
    reference = vit3d.load(path)
    mixed = vit3d.load(path, dtype_policy="mixed_bfloat16")
    assert mixed.dtype_policy.name == "mixed_bfloat16"
    assert {v.dtype for v in mixed.weights} == {"float32"}  # variables stay float32
    assert all(layer.dtype_policy.name == "mixed_bfloat16" for layer in mixed._flatten_layers())
    x = rng.normal(size=(2, *IMG, 1)).astype("float32")
    out, ref = keras.ops.convert_to_numpy(mixed(x)), keras.ops.convert_to_numpy(reference(x))
    assert keras.backend.standardize_dtype(mixed(x).dtype) == "bfloat16"
    assert not np.array_equal(out.astype("float32"), ref)  # it really computes in bfloat16...
    np.testing.assert_allclose(out.astype("float32"), ref, atol=0.15)  # ...with the same weights
