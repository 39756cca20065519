"""ViT3D's architecture and its explicit-build contract (in process)."""

import inspect as pyinspect

import keras
import numpy as np
import pytest

from vit3d import ViT3D
from vit3d.artifact import unbuilt_layers
from vit3d.layers import MLPBlock, MultiHeadSelfAttention, PatchEmbedding3D, TransformerBlock

TINY = dict(hidden_size=16, mlp_dim=24, num_layers=2, num_heads=2)


def tiny(**overrides):
    return ViT3D(**{"img_size": (8, 12, 16), "patch_size": (2, 4, 8), **TINY, **overrides})


@pytest.mark.parametrize("classification,num_classes", [(False, 2), (True, 1), (True, 3)])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_output_shapes(rng, classification, num_classes, in_channels):
    model = tiny(classification=classification, num_classes=num_classes, in_channels=in_channels)
    x = rng.normal(size=(3, 8, 12, 16, in_channels)).astype("float32")
    out, emb = model(x), model.embed(x)
    patches = (8 // 2) * (12 // 4) * (16 // 8)
    expected = (3, num_classes) if classification else (3, patches, 16)
    assert tuple(out.shape) == expected
    assert tuple(model.compute_output_shape(x.shape)) == expected
    assert tuple(emb.shape) == (3, 16)


def test_build_creates_every_variable_without_calling(rng):
    model = tiny(classification=True, num_classes=3, qkv_bias=True)
    model.build((None, 8, 12, 16, 1))
    assert unbuilt_layers(model) == []
    built_count = len(model.weights)
    model(rng.normal(size=(1, 8, 12, 16, 1)).astype("float32"))
    assert len(model.weights) == built_count, "call() created variables that build() did not"


@pytest.mark.parametrize(
    "layer,shape",
    [
        (PatchEmbedding3D((8, 8, 8), 4, 2, 16), (None, 8, 8, 8, 2)),
        (MultiHeadSelfAttention(16, 4, qkv_bias=True), (None, 9, 16)),
        (MLPBlock(16, 32), (None, 9, 16)),
        (TransformerBlock(16, 32, 4, qkv_bias=True), (None, 9, 16)),
    ],
)
def test_every_layer_builds_its_children_and_round_trips_its_config(rng, layer, shape):
    layer.build(shape)
    assert unbuilt_layers(layer) == []
    count = len(layer.weights)
    x = rng.normal(size=(2, *shape[1:])).astype("float32")
    assert tuple(layer(x).shape) == tuple(layer.compute_output_shape((2, *shape[1:])))
    assert len(layer.weights) == count
    config = layer.get_config()
    own_args = set(pyinspect.signature(type(layer).__init__).parameters) - {"self", "kwargs"}
    assert own_args <= set(config)
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


def test_model_config_is_exactly_the_constructor_arguments():
    model = tiny(classification=True, num_classes=3, qkv_bias=True, dropout_rate=0.1, post_activation="tanh")
    config = model.get_config()
    own_args = set(pyinspect.signature(ViT3D.__init__).parameters) - {"self", "kwargs"}
    assert set(config) == own_args | {"name", "trainable", "dtype"}
    assert ViT3D.from_config(config).get_config() == config


def test_patch_tokens_are_row_major_with_position_embeddings(rng):
    """Tokens follow (D', H', W') row-major order: compare against a NumPy patchify."""
    model = tiny(classification=False, num_layers=1)
    model.build((None, 8, 12, 16, 1))
    embedding = model.patch_embedding
    x = rng.normal(size=(1, 8, 12, 16, 1)).astype("float32")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in embedding.projection.weights)
    pos = keras.ops.convert_to_numpy(embedding.position_embeddings)[0]
    (gd, gh, gw), (pd, ph, pw) = embedding.grid, embedding.patch_size
    patches = x[0].reshape(gd, pd, gh, ph, gw, pw, 1).transpose(0, 2, 4, 1, 3, 5, 6).reshape(gd * gh * gw, -1)
    expected = patches @ kernel.reshape(-1, 16) + bias + pos
    actual = keras.ops.convert_to_numpy(embedding(x))[0]
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_class_token_gets_no_position_embedding_and_embed_uses_it(rng):
    model = tiny(classification=True, num_classes=2)
    x = rng.normal(size=(2, 8, 12, 16, 1)).astype("float32")
    tokens = keras.ops.convert_to_numpy(model.encode(x))
    num_patches = model.patch_embedding.num_patches
    assert tokens.shape == (2, num_patches + 1, 16)
    assert tuple(model.patch_embedding.position_embeddings.shape) == (1, num_patches, 16)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.embed(x)), tokens[:, 0])
    features = tiny(classification=False)
    tokens = keras.ops.convert_to_numpy(features.encode(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(features.embed(x)), tokens.mean(axis=1), atol=1e-6)


def test_dropout_is_inactive_at_inference(rng):
    model = tiny(classification=True, dropout_rate=0.5)
    x = rng.normal(size=(2, 8, 12, 16, 1)).astype("float32")
    first = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_array_equal(first, keras.ops.convert_to_numpy(model(x)))
    np.testing.assert_array_equal(first, keras.ops.convert_to_numpy(model(x, training=False)))
    trained = keras.ops.convert_to_numpy(model(x, training=True))
    assert not np.array_equal(first, trained), "dropout should act in training mode"


def test_post_activation_tanh_bounds_the_head(rng):
    model = tiny(classification=True, num_classes=3, post_activation="tanh")
    out = keras.ops.convert_to_numpy(model(rng.normal(size=(2, 8, 12, 16, 1)).astype("float32") * 10))
    assert np.all(np.abs(out) < 1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(img_size=(8, 12, 15)), "not divisible by patch_size"),
        (dict(num_heads=3), "not divisible by num_heads"),
        (dict(patch_size=(2, 4)), "patch_size"),
        (dict(post_activation="relu"), "post_activation"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match="expects inputs of shape"):
        tiny().build((None, 8, 8, 8, 1))


def test_vit3d_imports_neither_ray_nor_nibabel():
    """vit3d is the model package: Ray and NIfTI belong to jobs. Checked in a fresh process."""
    from conftest import fresh_python

    script = (
        "import sys, vit3d, vit3d.artifact, vit3d.model, vit3d.layers, vit3d.storage, vit3d.preprocessing\n"
        "import vit3d.__main__, vit3d.demo\n"
        "vit3d.ViT3D(8, 4, hidden_size=8, mlp_dim=8, num_layers=1, num_heads=2).build((None, 8, 8, 8, 1))\n"
        "print(sorted(m for m in ('ray', 'nibabel') if m in sys.modules))\n"
    )
    proc = fresh_python(["-c", script])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
