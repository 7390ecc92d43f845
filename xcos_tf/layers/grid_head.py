"""The grid head: a 1x1 conv + BN + PReLU that turns the backbone map into xCos cells."""
import keras

from xcos_tf.layers.batch_norm import BatchNormalization
from xcos_tf.layers.prelu import PReLU


@keras.saving.register_keras_serializable(package="xcos_tf")
class GridHead(keras.layers.Layer):
    """Projects a (H, W, 512) feature map to a (H, W, `channels`) grid of face cells.

    Flattened and L2-normalised, the grid is also the identity embedding (7x7x32 =
    1568-d) that the margin head trains.

    Args:
        channels: int, channels of each grid cell. Defaults to 32 (the paper's 7x7x32).
        **kwargs: other keyword arguments passed to `keras.layers.Layer`.

    Call arguments:
        feature_map: float tensor of shape `(batch, H, W, C_in)`.
        training: bool, whether batch normalisation uses batch statistics.

    Example:
    >>> GridHead(32)(keras.random.normal((2, 7, 7, 512))).shape
    (2, 7, 7, 32)
    """

    def __init__(self, channels=32, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"`channels` must be a positive int. Received: channels={channels}")
        self.channels = channels

    def build(self, input_shape):
        self._conv = keras.layers.Conv2D(
            self.channels, 1, use_bias=False, dtype=self.dtype_policy, name="conv"
        )
        self._conv.build(input_shape)
        grid_shape = tuple(input_shape[:-1]) + (self.channels,)
        self._bn = BatchNormalization(
            epsilon=1e-5, momentum=0.9, dtype=self.dtype_policy, name="bn"
        )
        self._bn.build(grid_shape)
        self._prelu = PReLU(shared_axes=[1, 2], dtype=self.dtype_policy, name="prelu")
        self._prelu.build(grid_shape)

    def call(self, feature_map, training=False):
        return self._prelu(self._bn(self._conv(feature_map), training=training), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.channels,)

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels})
        return config
