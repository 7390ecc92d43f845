"""BatchNormalization that runs TensorFlow's fused kernel for NHWC feature maps.

Keras 3 builds every BatchNormalization from generic ops (`Mean`, `SquaredDifference`,
then a multiply-add), forward and backward; Keras 2 ran one `FusedBatchNormV3` (and one
`FusedBatchNormGradV3` in the backward pass). Issue 17 measured the same MobileFaceNet body
train about a quarter slower per CPU-second under Keras 3 than under Keras 2 and traced the
difference to these ops. This subclass puts the fused kernel back where it applies and
otherwise behaves exactly as its parent (docs/training.md has what it measured here).
"""
import keras

_FUSED_INPUT_DTYPES = ("float16", "bfloat16", "float32")


@keras.saving.register_keras_serializable(package="xcos_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by `FusedBatchNormV3` where it can be.

    The fused path runs for 4-D channels-last inputs (`axis=-1` or `3`) on the TensorFlow
    backend, in training and inference, without a mask, renorm or `synchronized`. It
    computes in float32 like the parent (float16/bfloat16 inputs under mixed precision are
    cast up, the output cast back to the compute dtype) and updates the moving statistics
    as the parent does: `moving = moving * momentum + batch * (1 - momentum)` with the
    batch's *biased* variance (Keras 3 uses no Bessel correction; the fused kernel's own
    variance output has one, which is undone here). Everything else goes to the parent.

    The class keeps the parent's name, arguments, config and weights (`gamma`, `beta`,
    `moving_mean`, `moving_variance`), so `.weights.h5` files and checkpoints of models
    built with `keras.layers.BatchNormalization` load into models built with this layer
    and back. In a `.keras` file it is `xcos_tf>BatchNormalization`.

    Args:
        **kwargs: the arguments of `keras.layers.BatchNormalization`.

    Example:
    >>> bn = BatchNormalization(epsilon=1e-5, momentum=0.9)
    >>> bn(keras.random.normal((2, 7, 7, 32)), training=True).shape
    (2, 7, 7, 32)
    """

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # Only reached on the TensorFlow backend.

        x = tf.cast(inputs, "float32")
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels], "float32")
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels], "float32")
        moving_mean = tf.cast(self.moving_mean, "float32")
        moving_variance = tf.cast(self.moving_variance, "float32")
        # Called on the raw op: tf.compat.v1.nn.fused_batch_norm raises epsilon to cuDNN's
        # minimum 1.001e-5, which would differ from the parent at the PyTorch-style 1e-5.
        if training and self.trainable:
            outputs, mean, corrected_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=self.epsilon, data_format="NHWC", is_training=True,
            )
            # The kernel reports the variance times n / (n - 1) (n / max(n - 1, 1) for n = 1);
            # Keras 3 keeps the biased variance, so scale it back.
            count = tf.cast(tf.size(x, out_type=tf.int64) // channels, "float32")
            variance = corrected_variance * (tf.maximum(count - 1.0, 1.0) / count)
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=moving_mean, variance=moving_variance,
                epsilon=self.epsilon, data_format="NHWC", is_training=False,
            )[0]
        return tf.cast(outputs, self.compute_dtype)

    def _can_fuse(self, inputs, mask):
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.renorm
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and keras.backend.standardize_dtype(inputs.dtype) in _FUSED_INPUT_DTYPES
        )
