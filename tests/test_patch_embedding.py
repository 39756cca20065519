"""The patch projection is patchify + one matmul: Conv3D's math and weights, without Conv3D's gradient.

TensorFlow's CPU filter gradient of a strided Conv3D takes minutes per step where oneDNN is off (every
x86 CPU without AVX-512: AMD EPYC, older Intel). These tests hold the replacement to Conv3D's outputs
and gradients, to the saved weights of artifacts written while the projection was a Conv3D, and to a
training graph with no convolution in it.
"""

import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import vit3d
from vit3d.layers import PatchEmbedding3D, PatchProjection3D

ATOL = 1e-5
# Written by `vit3d.save` at commit 4a59016, when PatchEmbedding3D.projection was a keras.layers.Conv3D:
# ViT3D((8, 12, 16), (2, 4, 8), in_channels=2, hidden_size=16, mlp_dim=24, num_layers=2, num_heads=2,
# classification=True, num_classes=3, qkv_bias=True), every weight moved off its initializer.
CONV3D_ERA_ARTIFACT = Path(__file__).parent / "data" / "vit3d-conv3d-era.keras"
CONV3D_ERA_SHA256 = "f91ab40d68e7588bc766a15367edf5cc31ab9de8980aa4b723bc408f2e3fef87"

# (img_size, patch_size, in_channels): cubic, anisotropic, odd-sized and 2-channel patches.
CASES = [
    ((16, 16, 16), (8, 8, 8), 1),
    ((8, 12, 16), (2, 4, 8), 2),
    ((12, 8, 9), (4, 2, 3), 2),
    ((6, 6, 6), (1, 2, 3), 1),
]
IDS = [f"img{'x'.join(map(str, i))}-patch{'x'.join(map(str, p))}-c{c}" for i, p, c in CASES]


def conv3d_with_weights_of(projection):
    """A keras.layers.Conv3D holding ``projection``'s kernel and bias: the formulation it replaces."""
    conv = keras.layers.Conv3D(projection.filters, projection.patch_size, strides=projection.patch_size)
    conv.build((None, None, None, None, projection.in_channels))
    conv.set_weights([keras.ops.convert_to_numpy(w) for w in projection.weights])
    return conv


def perturbed(layer, rng, scale=0.05):
    for v in layer.weights:
        v.assign(keras.ops.convert_to_numpy(v) + rng.normal(0, scale, v.shape).astype("float32"))
    return layer


@pytest.mark.parametrize("img_size,patch_size,in_channels", CASES, ids=IDS)
def test_projection_equals_keras_conv3d(rng, img_size, patch_size, in_channels):
    projection = PatchProjection3D(patch_size, in_channels, 16)
    projection.build((None, *img_size, in_channels))
    perturbed(projection, rng)
    conv = conv3d_with_weights_of(projection)
    x = rng.normal(size=(3, *img_size, in_channels)).astype("float32")
    expected = keras.ops.convert_to_numpy(conv(x)).reshape(3, -1, 16)  # channels-last flatten: row-major tokens
    actual = keras.ops.convert_to_numpy(projection(x))
    assert actual.shape == expected.shape == projection.compute_output_shape(x.shape)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("img_size,patch_size,in_channels", CASES[1:], ids=IDS[1:])
def test_projection_gradients_equal_conv3d_gradients(rng, img_size, patch_size, in_channels):
    """Training sees the same gradients (kernel, bias and input) as it did through Conv3D."""
    projection = PatchProjection3D(patch_size, in_channels, 16)
    projection.build((None, *img_size, in_channels))
    perturbed(projection, rng)
    conv = conv3d_with_weights_of(projection)
    x = tf.constant(rng.normal(size=(2, *img_size, in_channels)).astype("float32"))
    target = tf.constant(rng.normal(size=(2, projection.compute_output_shape(x.shape)[1], 16)).astype("float32"))

    def grads(layer, flatten):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum((flatten(layer(x)) - target) ** 2)
        return [g.numpy() for g in tape.gradient(loss, [x, *layer.trainable_variables])]

    ours = grads(projection, lambda y: y)
    theirs = grads(conv, lambda y: tf.reshape(y, (2, -1, 16)))
    for name, a, b in zip(("input", "kernel", "bias"), ours, theirs, strict=True):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


def op_types(concrete_function):
    """Every op type in a traced function, including the functions in its library (gradients among them)."""
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types |= {node.op for node in function.node_def}
    return types


def test_training_and_inference_graphs_have_no_convolution():
    model = vit3d.ViT3D((8, 12, 16), (2, 4, 8), in_channels=2, hidden_size=16, mlp_dim=24, num_layers=1, num_heads=2,
                        classification=True)  # fmt: skip
    model.build(model.volume_shape)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    spec = tf.TensorSpec((4, 8, 12, 16, 2), tf.float32)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.zeros(4, tf.int32), model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    @tf.function
    def infer(x):
        return model(x, training=False), model.embed(x)

    for name, fn in (("training", train_step), ("inference", infer)):
        types = op_types(fn.get_concrete_function(spec))
        assert {"MatMul", "BatchMatMulV2"} & types, f"{name}: no matmul traced: {sorted(types)}"
        convolutions = sorted(t for t in types if "Conv" in t and t not in {"Const"})
        assert not convolutions, f"{name} graph runs {convolutions}"


def conv3d_formulation(model, x):
    """ViT3D's forward with its patch projection computed by keras.layers.Conv3D, from its own layers."""
    embedding = model.patch_embedding
    conv = conv3d_with_weights_of(embedding.projection)
    tokens = keras.ops.reshape(conv(x), (x.shape[0], embedding.num_patches, model.hidden_size))
    tokens = tokens + embedding.position_embeddings
    if model.classification:
        cls = keras.ops.broadcast_to(model.cls_token, (x.shape[0], 1, model.hidden_size))
        tokens = keras.ops.concatenate([cls, tokens], axis=1)
    for block in model.blocks:
        tokens = block(tokens)
    tokens = model.norm(tokens)
    out = model.head(tokens[:, 0]) if model.classification else tokens
    return keras.ops.convert_to_numpy(out)


def test_conv3d_era_artifact_loads_and_reproduces_its_probe():
    """An artifact saved while the projection was a Conv3D loads, passes vit3d.load's probe check and
    computes what the Conv3D formulation computes on new inputs."""
    data = CONV3D_ERA_ARTIFACT.read_bytes()
    assert hashlib.sha256(data).hexdigest() == CONV3D_ERA_SHA256, "the committed fixture was changed"
    model, info = vit3d.load_with_info(str(CONV3D_ERA_ARTIFACT), expected_sha256=CONV3D_ERA_SHA256)
    assert info.weight_count == len(model.weights) == 32
    projection = model.patch_embedding.projection
    assert isinstance(projection, PatchProjection3D)
    assert [(w.path, tuple(w.shape)) for w in projection.weights] == [
        ("vit3d/patch_embedding/projection/kernel", (2, 4, 8, 2, 16)),
        ("vit3d/patch_embedding/projection/bias", (16,)),
    ]
    x = np.random.default_rng(3).normal(size=(3, 8, 12, 16, 2)).astype("float32")
    ours = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(ours, conv3d_formulation(model, x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("classification", [False, True])
def test_model_outputs_equal_the_conv3d_formulation(rng, classification):
    model = vit3d.ViT3D((12, 8, 9), (4, 2, 3), in_channels=2, hidden_size=16, mlp_dim=24, num_layers=2,
                        num_heads=2, classification=classification, num_classes=3)  # fmt: skip
    model.build(model.volume_shape)
    perturbed(model, rng, scale=0.2)
    x = rng.normal(size=(2, 12, 8, 9, 2)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), conv3d_formulation(model, x), rtol=0, atol=ATOL)


def test_patch_embedding_refuses_volumes_that_do_not_tile():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        PatchEmbedding3D((8, 12, 15), (2, 4, 8), 1, 16)
