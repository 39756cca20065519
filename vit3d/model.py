"""ViT3D: a 3-D Vision Transformer with MONAI's argument names and token layout."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import keras
from keras import ops

from vit3d.layers import PACKAGE, PatchEmbedding3D, TransformerBlock, as_triple

POST_ACTIVATIONS: dict[str | None, Callable[[Any], Any] | None] = {None: None, "tanh": ops.tanh}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ViT3D(keras.Model):
    """3-D ViT on channels-last volumes ``(B, D, H, W, C)``.

    ``model(x)`` gives logits ``(B, num_classes)`` with ``classification=True``,
    else patch-token features ``(B, N, hidden_size)`` after the final norm.
    ``model.embed(x)`` gives ``(B, hidden_size)``: the class token when
    classification is on, else the mean patch token — so one saved classifier
    yields both anomaly scores and embeddings.

    ``post_activation`` (None or "tanh") is applied to the head output; MONAI's
    default is Tanh, ours is None so that ``call`` returns logits.

    Args:
        img_size: int or 3 ints. Input volume size (D, H, W); must tile exactly by ``patch_size``.
        patch_size: int or 3 ints. Patch size along (D, H, W).
        in_channels: int. Input channels. Defaults to ``1``.
        hidden_size: int. Token width. Defaults to ``768``.
        mlp_dim: int. Width of each block's MLP. Defaults to ``3072``.
        num_layers: int. Transformer blocks. Defaults to ``12``.
        num_heads: int. Attention heads; must divide ``hidden_size``. Defaults to ``12``.
        classification: bool. Add a class token and a dense head. Defaults to ``False``.
        num_classes: int. Head outputs (with ``classification``). Defaults to ``2``.
        dropout_rate: float. Dropout everywhere, in [0, 1]. Defaults to ``0.0``.
        qkv_bias: bool. Bias on the fused qkv projection. Defaults to ``False``.
        layer_norm_epsilon: float. LayerNorm epsilon. Defaults to ``1e-5`` (torch's).
        post_activation: str or None. ``"tanh"`` on the head output, or None (logits). Defaults to ``None``.

    Example:

    >>> model = vit3d.ViT3D(img_size=(96, 96, 64), patch_size=(16, 16, 8), hidden_size=384, mlp_dim=1536,
    ...                     num_layers=8, num_heads=6, classification=True)
    >>> model.build(model.volume_shape)
    >>> logits, vectors = model(x), model.embed(x)  # x: float32 (B, 96, 96, 64, 1)
    """

    def __init__(
        self,
        img_size: int | Iterable[int],
        patch_size: int | Iterable[int],
        in_channels: int = 1,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        classification: bool = False,
        num_classes: int = 2,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        layer_norm_epsilon: float = 1e-5,
        post_activation: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "vit3d")
        super().__init__(**kwargs)
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate}")
        if isinstance(post_activation, str):
            post_activation = post_activation.lower()
        if post_activation not in POST_ACTIVATIONS:
            raise ValueError(f"post_activation must be None or 'tanh', got {post_activation!r}")
        self.img_size = as_triple(img_size, "img_size")
        self.patch_size = as_triple(patch_size, "patch_size")
        self.in_channels = int(in_channels)
        self.hidden_size = int(hidden_size)
        self.mlp_dim = int(mlp_dim)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.classification = bool(classification)
        self.num_classes = int(num_classes)
        self.dropout_rate = float(dropout_rate)
        self.qkv_bias = bool(qkv_bias)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.post_activation = post_activation

        self.patch_embedding = PatchEmbedding3D(
            self.img_size,
            self.patch_size,
            self.in_channels,
            self.hidden_size,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype_policy,
            name="patch_embedding",
        )
        self.blocks = [
            TransformerBlock(
                self.hidden_size,
                self.mlp_dim,
                self.num_heads,
                dropout_rate=self.dropout_rate,
                qkv_bias=self.qkv_bias,
                layer_norm_epsilon=self.layer_norm_epsilon,
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )
        self.head = (
            keras.layers.Dense(self.num_classes, dtype=self.dtype_policy, name="classification_head")
            if self.classification
            else None
        )

    @property
    def num_tokens(self) -> int:
        """Tokens seen by the transformer blocks: patches, plus one class token."""
        return self.patch_embedding.num_patches + int(self.classification)

    @property
    def volume_shape(self) -> tuple[None, int, int, int, int]:
        """The input shape the model takes, batch dimension None."""
        return (None, *self.img_size, self.in_channels)

    def build(self, input_shape: tuple[int | None, ...] | None = None) -> None:
        if input_shape is not None and tuple(input_shape[1:]) != self.volume_shape[1:]:
            raise ValueError(f"ViT3D expects inputs of shape {self.volume_shape}, got {tuple(input_shape)}")
        self.patch_embedding.build(self.volume_shape)
        if self.classification:
            self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, self.hidden_size), initializer="zeros")
        token_shape = (None, self.num_tokens, self.hidden_size)
        for block in self.blocks:
            block.build(token_shape)
        self.norm.build(token_shape)
        if self.head is not None:
            self.head.build((None, self.hidden_size))
        self.built = True

    def get_build_config(self) -> dict[str, Any] | None:
        # Everything build() needs comes from the config; record the shape so
        # that Keras rebuilds the model on load even if build() got no shape.
        return {"input_shape": self.volume_shape} if self.built else None

    def encode(self, inputs: Any, training: bool | None = None) -> Any:
        """All tokens after the final norm: ``(B, num_tokens, hidden_size)``."""
        if not self.built:
            self.build(self.volume_shape)
        x = self.patch_embedding(inputs, training=training)
        if self.classification:
            cls = ops.cast(self.cls_token, x.dtype)
            cls = ops.broadcast_to(cls, (ops.shape(x)[0], 1, self.hidden_size))
            x = ops.concatenate([cls, x], axis=1)
        for block in self.blocks:
            x = block(x, training=training)
        return self.norm(x)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        tokens = self.encode(inputs, training=training)
        if not self.classification:
            return tokens
        out = self.head(tokens[:, 0])  # type: ignore[misc]  # a classifier always has a head
        activation = POST_ACTIVATIONS[self.post_activation]
        return out if activation is None else activation(out)

    def embed(self, inputs: Any) -> Any:
        """One vector per volume: ``(B, hidden_size)``, inference mode."""
        tokens = self.encode(inputs, training=False)
        return tokens[:, 0] if self.classification else ops.mean(tokens, axis=1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        if self.classification:
            return (input_shape[0], self.num_classes)
        return (input_shape[0], self.patch_embedding.num_patches, self.hidden_size)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "hidden_size": self.hidden_size,
            "mlp_dim": self.mlp_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "classification": self.classification,
            "num_classes": self.num_classes,
            "dropout_rate": self.dropout_rate,
            "qkv_bias": self.qkv_bias,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "post_activation": self.post_activation,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ViT3D:
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)
