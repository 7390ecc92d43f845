"""XCosLayer: the explainable cosine of Lin et al., "xCos" (ACM TOMM 2021)."""
import keras
import numpy as np
from keras import ops

from xcos_tf.layers.batch_norm import BatchNormalization
from xcos_tf.layers.prelu import PReLU

ATTENTION_MODES = ("learned", "uniform", "fixed")
_EPSILON = 1e-6


def _conv_bn_prelu(filters, dtype_policy, name):
    return [
        keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, dtype=dtype_policy, name=f"{name}_conv"),
        BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=dtype_policy, name=f"{name}_bn"),
        PReLU(shared_axes=[1, 2], dtype=dtype_policy, name=f"{name}_prelu"),
    ]


@keras.saving.register_keras_serializable(package="xcos_tf")
class XCosLayer(keras.layers.Layer):
    """Compares two grids of face cells and says which cells matched and which counted.

    `cos_map[i, j]` is the cosine of the two faces' cells at (i, j) (0 for an all-zero
    cell). `attention_map` weighs the cells and sums to 1. `score = sum(cos_map *
    attention_map)`, a similarity in [-1, 1] that reads like a cosine.

    Args:
        attention: str, one of `"learned"` (the paper's attention module: a shared
            conv3x3 -> 16 + BN + PReLU on each grid, concatenated, conv3x3 -> 16 and
            conv3x3 -> 1 with BN + PReLU each, softmax over the cells), `"uniform"` (the
            paper's plain patched cosine, 1 / cells each) or `"fixed"` (a given weight
            map, the paper's "correlated" variant). Defaults to `"learned"`.
        fixed_weights: array-like of shape `(H, W)`, non-negative, not all zero; required
            with `attention="fixed"` and normalised to sum 1.
        symmetric: bool, with learned attention average the attention logits of both
            input orders, so that `score(a, b) == score(b, a)`. `False` is the paper's
            exact form. Defaults to `True`.
        temperature: float > 0, divides the attention logits before the softmax.
            Defaults to `1.0`.
        attention_prior: bool, with learned attention add `log(|a_i| |b_i| + eps)` (the
            norms of the two faces' cells) to the learned logits, so attention starts at
            the norm product: for centred partial embeddings of a face model's linear tail
            that prior alone ranks cells well. The last attention conv is then
            zero-initialised (and its BN offset starts at 1, where PReLU passes gradients),
            so training starts exactly at the prior. The temperature
            divides the sum. `False` (the default) is the paper's form.
        **kwargs: other keyword arguments passed to `keras.layers.Layer`.

    Call arguments:
        grid_a: float tensor of shape `(batch, H, W, C)`.
        grid_b: float tensor of the same shape.
        training: bool, whether the attention's batch normalisation uses batch statistics.

    Returns:
        A dict with `"score"` `(batch,)`, `"cos_map"` `(batch, H, W)` and
        `"attention_map"` `(batch, H, W)`, all float32.

    Example:
    >>> layer = XCosLayer(attention="uniform")
    >>> grid = keras.random.normal((2, 7, 7, 32))
    >>> layer(grid, grid)["score"]  # identical faces
    [1., 1.]

    Reference:
        Lin et al., "xCos: An Explainable Cosine Metric for Face Verification Task",
        ACM TOMM 2021 (arXiv:2003.05383).
    """

    def __init__(
        self, attention="learned", fixed_weights=None, symmetric=True, temperature=1.0, attention_prior=False, **kwargs
    ):
        super().__init__(**kwargs)
        if attention not in ATTENTION_MODES:
            raise ValueError(f"`attention` must be one of {ATTENTION_MODES}. Received: attention={attention!r}")
        if (attention == "fixed") != (fixed_weights is not None):
            raise ValueError(
                "`fixed_weights` is required with attention='fixed' and only then. "
                f"Received: attention={attention!r}, fixed_weights={fixed_weights!r}"
            )
        if attention_prior and attention != "learned":
            raise ValueError(
                "`attention_prior` adds to learned attention logits; it needs attention='learned'. "
                f"Received: attention={attention!r}, attention_prior={attention_prior!r}"
            )
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
        if fixed_weights is not None:
            weights = np.asarray(fixed_weights, dtype="float64")
            if weights.ndim != 2 or (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
                raise ValueError(
                    "`fixed_weights` must be a finite, non-negative (H, W) map that is not all zero. "
                    f"Received: fixed_weights with shape {weights.shape}"
                )
            fixed_weights = (weights / weights.sum()).tolist()
        self.attention = attention
        self.fixed_weights = fixed_weights
        self.symmetric = symmetric
        self.temperature = float(temperature)
        self.attention_prior = bool(attention_prior)

    def build(self, grid_a_shape, grid_b_shape=None):
        grid_shape = tuple(grid_a_shape)
        if self.attention == "fixed" and tuple(np.shape(self.fixed_weights)) != grid_shape[1:3]:
            raise ValueError(
                f"`fixed_weights` has shape {np.shape(self.fixed_weights)} but the grid is "
                f"{grid_shape[1:3]}."
            )
        if self.attention != "learned":
            return
        # `shared` runs on each face's grid alone, `fuse` on the two concatenated. Sequential
        # stacks, not plain lists: TF checkpoints only follow layers held in attributes.
        self._shared = keras.Sequential(_conv_bn_prelu(16, self.dtype_policy, "shared"), name="shared")
        self._shared.build(grid_shape)
        shared_shape = self._shared.compute_output_shape(grid_shape)
        self._fuse = keras.Sequential(
            _conv_bn_prelu(16, self.dtype_policy, "fuse") + _conv_bn_prelu(1, self.dtype_policy, "logit"), name="fuse"
        )
        self._fuse.build(shared_shape[:-1] + (2 * shared_shape[-1],))
        if self.attention_prior:
            # Constant learned logits, so training starts at the prior: the last conv starts at
            # zero and its BN's offset at 1 (conv 0 -> BN 1 -> PReLU 1 in every cell, which the
            # softmax ignores). Not at 0: PReLU's gradient at exactly 0 is 0 on both sides, and
            # the whole attention module would get zero gradients, in every step.
            logit_conv = self._fuse.get_layer("logit_conv")
            logit_conv.kernel.assign(ops.zeros(logit_conv.kernel.shape, logit_conv.kernel.dtype))
            logit_bn = self._fuse.get_layer("logit_bn")
            logit_bn.beta.assign(ops.ones(logit_bn.beta.shape, logit_bn.beta.dtype))

    def _attention_logits(self, shared_a, shared_b, training):
        fused = ops.concatenate([shared_a, shared_b], axis=-1)
        return ops.cast(self._fuse(fused, training=training)[..., 0], "float32")

    def _attention_map(self, grid_a, grid_b, norm_product, training):
        batch = ops.shape(grid_a)[0]
        height, width = ops.shape(grid_a)[1], ops.shape(grid_a)[2]
        if self.attention == "uniform":
            return ops.ones((batch, height, width), "float32") / ops.cast(height * width, "float32")
        if self.attention == "fixed":
            weights = ops.convert_to_tensor(self.fixed_weights, "float32")
            return ops.broadcast_to(weights[None], (batch, height, width))
        shared_a = self._shared(grid_a, training=training)
        shared_b = self._shared(grid_b, training=training)
        logits = self._attention_logits(shared_a, shared_b, training)
        if self.symmetric:
            logits = 0.5 * (logits + self._attention_logits(shared_b, shared_a, training))
        if self.attention_prior:  # symmetric in a and b, like the averaged logits
            logits = logits + ops.log(norm_product + _EPSILON)
        flat = ops.softmax(ops.reshape(logits / self.temperature, (batch, -1)), axis=-1)
        return ops.reshape(flat, (batch, height, width))

    def call(self, grid_a, grid_b, training=False):
        grid_a = ops.cast(grid_a, self.compute_dtype)
        grid_b = ops.cast(grid_b, self.compute_dtype)
        # Cosines in float32 with clamped norms: all-zero cells give 0, not NaN.
        a32, b32 = ops.cast(grid_a, "float32"), ops.cast(grid_b, "float32")
        norm_a = ops.maximum(ops.sqrt(ops.sum(ops.square(a32), axis=-1)), _EPSILON)
        norm_b = ops.maximum(ops.sqrt(ops.sum(ops.square(b32), axis=-1)), _EPSILON)
        cos_map = ops.clip(ops.sum(a32 * b32, axis=-1) / (norm_a * norm_b), -1.0, 1.0)
        attention_map = self._attention_map(grid_a, grid_b, norm_a * norm_b, training)
        # A weighted mean of cosines in [-1, 1]; float32 rounding of the sum may step past 1 by an ulp.
        score = ops.clip(ops.sum(cos_map * attention_map, axis=(1, 2)), -1.0, 1.0)
        return {"score": score, "cos_map": cos_map, "attention_map": attention_map}

    def compute_output_shape(self, grid_a_shape, grid_b_shape=None):
        map_shape = tuple(grid_a_shape[:3])
        return {"score": map_shape[:1], "cos_map": map_shape, "attention_map": map_shape}

    def compute_output_spec(self, grid_a, grid_b, training=False):
        map_shape = tuple(grid_a.shape[:3])
        return {
            "score": keras.KerasTensor(map_shape[:1], dtype="float32"),
            "cos_map": keras.KerasTensor(map_shape, dtype="float32"),
            "attention_map": keras.KerasTensor(map_shape, dtype="float32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "attention": self.attention,
                "fixed_weights": self.fixed_weights,
                "symmetric": self.symmetric,
                "temperature": self.temperature,
                "attention_prior": self.attention_prior,
            }
        )
        return config
