"""Models used only by the tests; importable by the fresh-process worker."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vit3d_tests")
class SeedBlock(keras.layers.Layer):
    """A block with NO build(): its children build lazily when call() first runs."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.dense = keras.layers.Dense(dim, name="dense")

    def call(self, x):
        return x + self.dense(self.norm(x))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(package="vit3d_tests")
class SeedViT(keras.Model):
    """The write-up's fix: the top-level build() builds its children — but SeedBlock
    has no build() of its own, so its Dense and LayerNorm stay unbuilt on load."""

    def __init__(self, img=8, patch=4, dim=16, depth=2, **kwargs):
        super().__init__(**kwargs)
        self.img, self.patch, self.dim, self.depth = img, patch, dim, depth
        self.patch_embedding = keras.layers.Conv3D(dim, patch, strides=patch, name="patch_embedding")
        self.blocks = [SeedBlock(dim, name=f"block_{i}") for i in range(depth)]
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.head = keras.layers.Dense(1, name="head")

    def build(self, input_shape):
        self.patch_embedding.build(input_shape)
        tokens = (self.img // self.patch) ** 3 + 1
        self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, self.dim), initializer="zeros")
        for block in self.blocks:
            block.build((None, tokens, self.dim))
        self.norm.build((None, tokens, self.dim))
        self.head.build((None, self.dim))
        self.built = True

    def call(self, x):
        x = self.patch_embedding(x)
        x = ops.reshape(x, (-1, (self.img // self.patch) ** 3, self.dim))
        cls = ops.broadcast_to(self.cls_token, (ops.shape(x)[0], 1, self.dim))
        x = ops.concatenate([cls, x], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def get_config(self):
        return {**super().get_config(), "img": self.img, "patch": self.patch, "dim": self.dim, "depth": self.depth}
