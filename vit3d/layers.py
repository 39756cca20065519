"""Building blocks of the 3-D ViT.

Every layer creates its own weights and builds every child in ``build()`` from
shapes derived from its config. Keras can then restore all variables on load
without tracing ``call`` — the property whose absence makes ``load_model``
succeed silently with random weights (see the project README).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import keras
from keras import ops

PACKAGE = "vit3d"


def as_triple(value: int | Iterable[int], name: str) -> tuple[int, int, int]:
    """An int or a length-3 sequence of positive ints, as a tuple of 3 ints."""
    triple = (value, value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(triple) != 3 or any(v < 1 for v in triple):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return triple


def grid_shape(img_size: int | Iterable[int], patch_size: int | Iterable[int]) -> tuple[int, ...]:
    """Number of patches along (D, H, W); img_size must tile exactly."""
    img, patch = as_triple(img_size, "img_size"), as_triple(patch_size, "patch_size")
    if any(i % p for i, p in zip(img, patch, strict=True)):
        raise ValueError(f"img_size {img} is not divisible by patch_size {patch}")
    return tuple(i // p for i, p in zip(img, patch, strict=True))


def patchify(volumes: Any, patch_size: Sequence[int]) -> Any:
    """``(B, D, H, W, C)`` → ``(B, N, pD·pH·pW·C)``: each non-overlapping patch flattened, row-major.

    Patches follow (D', H', W') row-major order and each patch's values follow (pD, pH, pW, C), the
    order in which a Conv3D kernel of shape ``(pD, pH, pW, C, out)`` flattens; so one matmul with that
    kernel reshaped to ``(pD·pH·pW·C, out)`` is the strided Conv3D, without TensorFlow's Conv3D
    filter gradient, which takes minutes per step on CPUs where oneDNN is off (AVX2-only x86).
    """
    pd, ph, pw = patch_size
    _, d, h, w, c = volumes.shape
    gd, gh, gw = d // pd, h // ph, w // pw
    x = ops.reshape(volumes, (-1, gd, pd, gh, ph, gw, pw, c))
    x = ops.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
    return ops.reshape(x, (-1, gd * gh * gw, pd * ph * pw * c))


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchProjection3D(keras.layers.Layer):
    """A Conv3D with kernel = stride = patch, computed as :func:`patchify` + one matmul.

    The weights are Conv3D's, in Conv3D's order and layout (``kernel`` ``(pD, pH, pW, C, filters)``,
    then ``bias``), so artifacts saved when this layer was a ``keras.layers.Conv3D`` load unchanged.

    Args:
        patch_size: int or 3 ints. Kernel size and stride along (D, H, W).
        in_channels: int. Channels of the input volume.
        filters: int. Output features per patch (the ViT's hidden size).

    Example:

    >>> PatchProjection3D(patch_size=8, in_channels=1, filters=48)(np.zeros((2, 32, 32, 32, 1), "float32")).shape
    TensorShape([2, 64, 48])
    """

    def __init__(self, patch_size: int | Iterable[int], in_channels: int, filters: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.patch_size = as_triple(patch_size, "patch_size")
        self.in_channels = int(in_channels)
        self.filters = int(filters)

    def build(self, input_shape: tuple[int | None, ...] | None = None) -> None:
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.patch_size, self.in_channels, self.filters),
            initializer="glorot_uniform",  # Conv3D's default
        )
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        self.built = True

    def call(self, inputs: Any) -> Any:
        patches = patchify(inputs, self.patch_size)
        kernel = ops.reshape(self.kernel, (-1, self.filters))
        return ops.matmul(patches, kernel) + self.bias

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        # The spatial dims are known here (patchify reshapes with them); only the batch dim may be None.
        grid = grid_shape(input_shape[1:4], self.patch_size)  # type: ignore[arg-type]
        return (input_shape[0], grid[0] * grid[1] * grid[2], self.filters)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(patch_size=self.patch_size, in_channels=self.in_channels, filters=self.filters)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchEmbedding3D(keras.layers.Layer):
    """Patch projection (:class:`PatchProjection3D`) + learnable position embeddings.

    Tokens come out in row-major (D', H', W') order, as MONAI's ViT lays them out.

    Args:
        img_size: int or 3 ints. Input volume size (D, H, W); must tile exactly by ``patch_size``.
        patch_size: int or 3 ints. Patch size along (D, H, W).
        in_channels: int. Channels of the input volume.
        hidden_size: int. Token width.
        dropout_rate: float. Dropout on the embedded tokens. Defaults to ``0.0``.

    Example:

    >>> PatchEmbedding3D((32, 32, 16), (8, 8, 4), in_channels=1, hidden_size=48)(np.zeros((2, 32, 32, 16, 1))).shape
    TensorShape([2, 64, 48])
    """

    def __init__(
        self,
        img_size: int | Iterable[int],
        patch_size: int | Iterable[int],
        in_channels: int,
        hidden_size: int,
        dropout_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.img_size = as_triple(img_size, "img_size")
        self.patch_size = as_triple(patch_size, "patch_size")
        self.in_channels = int(in_channels)
        self.hidden_size = int(hidden_size)
        self.dropout_rate = float(dropout_rate)
        self.grid = grid_shape(self.img_size, self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        # The attribute name is part of the saved weights' paths (patch_embedding/projection/...): keep it.
        self.projection = PatchProjection3D(
            self.patch_size, self.in_channels, self.hidden_size, dtype=self.dtype_policy, name="projection"
        )
        self.dropout = keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape: tuple[int | None, ...] | None = None) -> None:
        self.projection.build((None, *self.img_size, self.in_channels))
        self.position_embeddings = self.add_weight(
            name="position_embeddings",
            shape=(1, self.num_patches, self.hidden_size),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )
        self.dropout.build((None, self.num_patches, self.hidden_size))
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = self.projection(inputs)
        x = x + ops.cast(self.position_embeddings, x.dtype)
        return self.dropout(x, training=training)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], self.num_patches, self.hidden_size)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            hidden_size=self.hidden_size,
            dropout_rate=self.dropout_rate,
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiHeadSelfAttention(keras.layers.Layer):
    """Self-attention with one fused qkv projection laid out [q | k | v], head-major.

    The fused layout is MONAI's, so its weights map onto this layer by a transpose.

    Args:
        hidden_size: int. Token width; must divide by ``num_heads``.
        num_heads: int. Attention heads.
        qkv_bias: bool. Whether the qkv projection has a bias. Defaults to ``False`` (MONAI's default).
        dropout_rate: float. Dropout on the attention weights and the output. Defaults to ``0.0``.

    Example:

    >>> attention = MultiHeadSelfAttention(hidden_size=64, num_heads=4)
    >>> attention(np.zeros((2, 9, 64), "float32")).shape
    TensorShape([2, 9, 64])
    """

    def __init__(
        self, hidden_size: int, num_heads: int, qkv_bias: bool = False, dropout_rate: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.hidden_size = int(hidden_size)
        self.num_heads = int(num_heads)
        self.qkv_bias = bool(qkv_bias)
        self.dropout_rate = float(dropout_rate)
        self.head_dim = self.hidden_size // self.num_heads
        self.qkv = keras.layers.Dense(3 * self.hidden_size, use_bias=self.qkv_bias, dtype=self.dtype_policy, name="qkv")
        self.out_proj = keras.layers.Dense(self.hidden_size, dtype=self.dtype_policy, name="out_proj")
        self.attention_dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="attention_dropout"
        )
        self.output_dropout = keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy, name="output_dropout")

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        batch, tokens = input_shape[0], input_shape[1]
        self.qkv.build((batch, tokens, self.hidden_size))
        self.out_proj.build((batch, tokens, self.hidden_size))
        self.attention_dropout.build((batch, self.num_heads, tokens, tokens))
        self.output_dropout.build((batch, tokens, self.hidden_size))
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        tokens = ops.shape(inputs)[1]
        # The projections see (batch * tokens, hidden): see MLPBlock.call.
        qkv = self.qkv(ops.reshape(inputs, (-1, self.hidden_size)))
        qkv = ops.reshape(qkv, (-1, tokens, 3, self.num_heads, self.head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # (3, B, heads, N, head_dim)
        query, key, value = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2)))
        scores = scores * ops.cast(self.head_dim**-0.5, scores.dtype)
        weights = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), scores.dtype)
        weights = self.attention_dropout(weights, training=training)
        out = ops.transpose(ops.matmul(weights, value), (0, 2, 1, 3))
        out = ops.reshape(self.out_proj(ops.reshape(out, (-1, self.hidden_size))), (-1, tokens, self.hidden_size))
        return self.output_dropout(out, training=training)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            dropout_rate=self.dropout_rate,
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MLPBlock(keras.layers.Layer):
    """Dense → exact (erf) GELU → dropout → Dense → dropout.

    Args:
        hidden_size: int. Token width (input and output).
        mlp_dim: int. Width of the hidden layer.
        dropout_rate: float. Dropout after the GELU and after the output. Defaults to ``0.0``.

    Example:

    >>> MLPBlock(hidden_size=64, mlp_dim=256)(np.zeros((2, 9, 64), "float32")).shape
    TensorShape([2, 9, 64])
    """

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hidden_size = int(hidden_size)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.linear1 = keras.layers.Dense(self.mlp_dim, dtype=self.dtype_policy, name="linear1")
        self.linear2 = keras.layers.Dense(self.hidden_size, dtype=self.dtype_policy, name="linear2")
        self.hidden_dropout = keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy, name="hidden_dropout")
        self.output_dropout = keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy, name="output_dropout")

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        batch, tokens = input_shape[0], input_shape[1]
        self.linear1.build((batch, tokens, self.hidden_size))
        self.hidden_dropout.build((batch, tokens, self.mlp_dim))
        self.linear2.build((batch, tokens, self.mlp_dim))
        self.output_dropout.build((batch, tokens, self.hidden_size))
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        # Tokens flattened into rows: on a 2-D input Dense is one plain matrix product, which TensorFlow's oneDNN
        # path fuses with the bias add and the GELU; on a 3-D input Keras goes through tensordot (reshape, product,
        # reshape) and each of them is a pass over memory of its own (bench.infer, ViT-B in bfloat16: 0.65 -> 0.84 of
        # the matrix-product ceiling).
        shape = ops.shape(inputs)
        x = ops.gelu(self.linear1(ops.reshape(inputs, (-1, self.hidden_size))), approximate=False)
        x = self.linear2(self.hidden_dropout(x, training=training))
        return self.output_dropout(ops.reshape(x, shape), training=training)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(hidden_size=self.hidden_size, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(keras.layers.Layer):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Args:
        hidden_size: int. Token width.
        mlp_dim: int. Width of the MLP's hidden layer.
        num_heads: int. Attention heads; must divide ``hidden_size``.
        dropout_rate: float. Dropout in attention and MLP. Defaults to ``0.0``.
        qkv_bias: bool. Whether the qkv projection has a bias. Defaults to ``False``.
        layer_norm_epsilon: float. LayerNorm epsilon. Defaults to ``1e-5`` (torch's, so MONAI weights match).

    Example:

    >>> block = TransformerBlock(hidden_size=64, mlp_dim=256, num_heads=4)
    >>> block(np.zeros((2, 9, 64), "float32")).shape
    TensorShape([2, 9, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        layer_norm_epsilon: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = int(hidden_size)
        self.mlp_dim = int(mlp_dim)
        self.num_heads = int(num_heads)
        self.dropout_rate = float(dropout_rate)
        self.qkv_bias = bool(qkv_bias)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm1"
        )
        self.attn = MultiHeadSelfAttention(
            self.hidden_size,
            self.num_heads,
            qkv_bias=self.qkv_bias,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype_policy,
            name="attn",
        )
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm2"
        )
        self.mlp = MLPBlock(self.hidden_size, self.mlp_dim, self.dropout_rate, dtype=self.dtype_policy, name="mlp")

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        shape = (input_shape[0], input_shape[1], self.hidden_size)
        self.norm1.build(shape)
        self.attn.build(shape)
        self.norm2.build(shape)
        self.mlp.build(shape)
        self.built = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = inputs + self.attn(self.norm1(inputs), training=training)
        return x + self.mlp(self.norm2(x), training=training)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            hidden_size=self.hidden_size,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            qkv_bias=self.qkv_bias,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config
