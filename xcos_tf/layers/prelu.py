"""PReLU whose training pass has a hand-written gradient on the TensorFlow backend.

Keras' PReLU computes `relu(x) - alpha * relu(-x)`: four element-wise ops forward, and
autodiff turns them into about ten backward (two `ReluGrad`s, negations, products,
broadcasts). Issue 17's profile of a MobileFaceNet training step found the PReLUs taking
as much CPU time as all the convolutions together. The same function with its gradient
written out (`dx = dy` where `x > 0`, else `dy * alpha`; `dalpha = sum(dy * min(x, 0))`
over the shared axes) made the whole step 1.06x-1.18x as fast per CPU-second in three idle side-by-side runs
(docs/training.md, "Fused batch normalization, XLA and bfloat16").

Inference is left to the parent's ops, so SavedModel, TFLite (its PRELU pattern) and ONNX
exports are what they were.
"""
import keras

_CUSTOM_GRADIENT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@keras.saving.register_keras_serializable(package="xcos_tf")
class PReLU(keras.layers.PReLU):
    """`keras.layers.PReLU` with a hand-written gradient when training on TensorFlow.

    The forward value is bit-identical to the parent's (`max(x, 0) + alpha * min(x, 0)`
    equals `relu(x) - alpha * relu(-x)` exactly: negation is exact in floating point);
    the gradients with respect to the input and `alpha` are the exact derivatives. At
    `x == 0` the input's gradient takes the slope `alpha`, as `torch.nn.PReLU`'s backward
    does; the parent's autodiff gives 0 there, so a layer whose inputs all start at exactly
    0 would never move. The custom pass runs with `training=True` on the TensorFlow
    backend; otherwise the parent's `call` runs. Arguments, config and the `alpha` weight
    are the parent's, so weights and checkpoints move between the two; in a `.keras` file
    it is `xcos_tf>PReLU`.

    Args:
        **kwargs: the arguments of `keras.layers.PReLU`.

    Example:
    >>> layer = PReLU(shared_axes=[1, 2])
    >>> layer(keras.random.normal((2, 7, 7, 16)), training=True).shape
    (2, 7, 7, 16)
    """

    def call(self, inputs, training=None):
        if not (training and self._can_use_custom_gradient(inputs)):
            return super().call(inputs)
        import tensorflow as tf  # Only reached on the TensorFlow backend.

        # A tensor input (not the variable), so the gradient reaches `alpha` through the
        # read; under mixed precision the read is already in the compute dtype.
        return _prelu_with_gradient(inputs, tf.convert_to_tensor(self.alpha))

    def _can_use_custom_gradient(self, inputs):
        return (
            keras.backend.backend() == "tensorflow"
            and keras.backend.standardize_dtype(inputs.dtype) in _CUSTOM_GRADIENT_DTYPES
        )


def _prelu_with_gradient(x, alpha):
    import tensorflow as tf

    # Axes where alpha is shared (size 1 against a larger input), and the batch axis.
    reduce_axes = [0] + [
        axis for axis in range(1, x.shape.rank) if alpha.shape[axis - 1] == 1 and x.shape[axis] != 1
    ]

    @tf.custom_gradient
    def prelu(x, alpha):
        negative_part = tf.minimum(x, 0)
        y = tf.maximum(x, 0) + alpha * negative_part

        def gradient(dy):
            dx = tf.where(x > 0, dy, dy * alpha)
            dalpha = tf.reduce_sum(dy * negative_part, axis=reduce_axes, keepdims=True)
            return dx, tf.reshape(dalpha, tf.shape(alpha))

        return y, gradient

    return prelu(x, alpha)
