"""Margin-softmax heads (SphereFace / ArcFace / CosFace) over L2-normalised embeddings."""
import math

import keras
from keras import ops

_COS_LIMIT = 1.0 - 1e-6


@keras.saving.register_keras_serializable(package="xcos_tf")
class MarginSoftmax(keras.layers.Layer):
    """Scaled cosine logits with the combined margin `cos(m1 * theta + m2) - m3`.

    The embedding and the class centres are L2-normalised and the logits are computed in
    float32 whatever the dtype policy, so the head is safe under `mixed_float16`. The
    margin only touches the true class, and only when labels are given with
    `training=True`; otherwise the plain scaled cosines are returned. Where
    `m1 * theta + m2` would pass pi (cos would rise again and reward a worse angle), the
    target logit continues as `cos(theta) - m3 - m2 * sin(pi - m2)`, insightface's
    fallback, so the loss stays monotone in theta.

    Args:
        num_classes: int, number of identities.
        scale: float, the logit scale `s`. Defaults to 64.
        m1: float, multiplicative angular margin (SphereFace). Defaults to 1.
        m2: float, additive angular margin (ArcFace). Defaults to 0.
        m3: float, additive cosine margin (CosFace). Defaults to 0.
        **kwargs: other keyword arguments passed to `keras.layers.Layer`.

    Call arguments:
        embedding: float tensor `(batch, dim)`; normalised inside.
        labels: optional int tensor `(batch,)` of class indices.
        training: bool; the margin applies only when True and labels are given.

    Reference:
        insightface `arcface_torch/losses.py` (`CombinedMarginLoss`).
    """

    def __init__(self, num_classes, scale=64.0, m1=1.0, m2=0.0, m3=0.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive int. Received: num_classes={num_classes}")
        if scale <= 0 or m1 < 1 or not 0 <= m2 < math.pi / 2 or m3 < 0:
            raise ValueError(
                "Margins must satisfy scale > 0, m1 >= 1, 0 <= m2 < pi/2, m3 >= 0. "
                f"Received: scale={scale}, m1={m1}, m2={m2}, m3={m3}"
            )
        self.num_classes = num_classes
        self.scale = float(scale)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def build(self, embedding_shape, labels_shape=None):
        self.centres = self.add_weight(
            shape=(embedding_shape[-1], self.num_classes),
            initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype="float32",
            name="centres",
        )

    def cosine(self, embedding):
        """Cosine of each embedding to each class centre, float32 `(batch, num_classes)`."""
        embedding = ops.cast(embedding, "float32")
        embedding = embedding / ops.maximum(ops.norm(embedding, axis=-1, keepdims=True), 1e-12)
        centres = self.centres / ops.maximum(ops.norm(self.centres, axis=0, keepdims=True), 1e-12)
        return ops.clip(ops.matmul(embedding, centres), -1.0, 1.0)

    def target_logit(self, cos):
        """The margin-adjusted cosine for the true class (before scaling)."""
        if self.m1 == 1.0:
            # cos(theta + m2) by the angle-sum identity: exact near theta = 0, where float32
            # arccos of a cosine rounded to 1 would be off by ~1e-3 rad. The floor on sin^2
            # keeps the gradient finite at theta = 0 and pi.
            sin = ops.sqrt(ops.clip(1.0 - ops.square(cos), 1e-10, 1.0))
            margined = cos * math.cos(self.m2) - sin * math.sin(self.m2) - self.m3
            past_pi = cos <= -math.cos(self.m2)
        else:
            theta = ops.arccos(ops.clip(cos, -_COS_LIMIT, _COS_LIMIT))
            angle = self.m1 * theta + self.m2
            margined = ops.cos(angle) - self.m3
            past_pi = angle >= math.pi
        fallback = cos - self.m3 - self.m2 * math.sin(math.pi - self.m2)
        return ops.where(past_pi, fallback, margined)

    def call(self, embedding, labels=None, training=False):
        cos = self.cosine(embedding)
        if labels is not None and training:
            one_hot = ops.one_hot(ops.cast(labels, "int32"), self.num_classes, dtype="float32")
            cos = cos + one_hot * (self.target_logit(cos) - cos)
        return self.scale * cos

    def compute_output_shape(self, embedding_shape, labels_shape=None):
        return (embedding_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"num_classes": self.num_classes, "scale": self.scale, "m1": self.m1, "m2": self.m2, "m3": self.m3}
        )
        return config


class _SingleMarginHead(MarginSoftmax):
    """A MarginSoftmax whose only margin is `margin`, stored in m2 or m3 by subclasses."""

    _MARGIN_ARG = None

    def __init__(self, num_classes, scale, margin, **kwargs):
        for key in ("m1", "m2", "m3"):
            kwargs.pop(key, None)
        super().__init__(num_classes, scale=scale, **{self._MARGIN_ARG: margin}, **kwargs)
        self.margin = float(margin)

    def get_config(self):
        config = super().get_config()
        for key in ("m1", "m2", "m3"):
            config.pop(key)
        config["margin"] = self.margin
        return config


@keras.saving.register_keras_serializable(package="xcos_tf")
class CosFace(_SingleMarginHead):
    """Large-margin cosine loss head: `s * (cos(theta) - m)` for the true class.

    Args:
        num_classes: int, number of identities.
        scale: float, defaults to 30 (the xCos paper's setting).
        margin: float, defaults to 0.35.
    """

    _MARGIN_ARG = "m3"

    def __init__(self, num_classes, scale=30.0, margin=0.35, **kwargs):
        super().__init__(num_classes, scale, margin, **kwargs)


@keras.saving.register_keras_serializable(package="xcos_tf")
class ArcFace(_SingleMarginHead):
    """Additive angular margin head: `s * cos(theta + m)` for the true class.

    Args:
        num_classes: int, number of identities.
        scale: float, defaults to 64.
        margin: float, defaults to 0.5.
    """

    _MARGIN_ARG = "m2"

    def __init__(self, num_classes, scale=64.0, margin=0.5, **kwargs):
        super().__init__(num_classes, scale, margin, **kwargs)
