"""PositionwiseGridHead: one linear map per grid cell, centred per cell, for xCos cells."""
import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="xcos_tf")
class PositionwiseGridHead(keras.layers.Layer):
    """Projects each cell of a (H, W, C_in) map with its own linear map to `channels`.

    Cell `i` (index `h * W + w`) gives `c_i = map_i @ kernel[i] + bias[i] - centre[i]`.
    Initialised from a face model's linear tail (`set_kernel`), the uncentred outputs are
    that model's partial embeddings, whose sum is its embedding. `centre` (not trainable, set
    by `adapt`) is each cell's mean over training faces: without it every cell of every face
    points the same way (cell cosines near 0.95 for any pair), with it the cell cosines are
    calibrated from the start.

    With a context term, `q_i = c_i + beta_i * sum_j c_j`: every cell also sees the whole
    face's (centred) embedding, by a per-cell weight `beta` (one scalar per cell).

    Args:
        channels: int, channels of each output cell (the tail's embedding size D when
            initialised from a tail).
        context_init: float, initial `beta` of the context term. Defaults to `0.0`.
        learn_context: bool, whether `beta` is trained. With `False` and `context_init=0`
            (the default) there is no context term at all.
        **kwargs: other keyword arguments passed to `keras.layers.Layer`.

    Call arguments:
        feature_map: float tensor `(batch, H, W, C_in)`, H and W fixed.

    Returns:
        `(batch, H, W, channels)`.

    Example:

    ```python
    tail = backbones.read_linear_tail("teacher.onnx")
    head = PositionwiseGridHead(tail.cell_weights.shape[-1])
    head.build((None, *tail.grid_shape, tail.cell_weights.shape[1]))
    head.set_kernel(tail.cell_weights, tail.bias)
    head.adapt(training_maps)  # batches of body maps of training faces
    ```
    """

    def __init__(self, channels, context_init=0.0, learn_context=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
            raise ValueError(f"`channels` must be a positive int. Received: channels={channels!r}")
        if not isinstance(context_init, (int, float)) or not np.isfinite(context_init):
            raise ValueError(f"`context_init` must be a finite float. Received: context_init={context_init!r}")
        if not isinstance(learn_context, bool):
            raise ValueError(f"`learn_context` must be a bool. Received: learn_context={learn_context!r}")
        self.channels = channels
        self.context_init = float(context_init)
        self.learn_context = learn_context

    @property
    def has_context(self):
        return self.learn_context or self.context_init != 0.0

    def build(self, input_shape):
        height, width, in_channels = tuple(input_shape)[1:]
        if height is None or width is None or in_channels is None:
            raise ValueError(f"PositionwiseGridHead needs a fixed grid and channels. Received: input_shape={input_shape}")
        self.grid_shape = (height, width)
        cells = height * width
        fan_in = keras.initializers.VarianceScaling(1.0, "fan_avg", "uniform")
        self.kernel = self.add_weight((cells, in_channels, self.channels), initializer=fan_in, name="kernel")
        self.bias = self.add_weight((cells, self.channels), initializer="zeros", name="bias")
        self.centre = self.add_weight((cells, self.channels), initializer="zeros", trainable=False, name="centre")
        if self.has_context:
            self.context = self.add_weight(
                (cells,), initializer=keras.initializers.Constant(self.context_init), trainable=self.learn_context, name="context"
            )

    def _cells(self, feature_map, centred):
        """Per-cell outputs `[batch, cells, channels]`, one matmul per cell."""
        feature_map = ops.cast(feature_map, self.compute_dtype)
        cells = ops.reshape(feature_map, (-1, self.kernel.shape[0], self.kernel.shape[1]))
        offset = self.bias - self.centre if centred else self.bias
        # One matmul per cell, not one batched matmul: the int8 TFLite converter then gives
        # each cell its own weight scale. One batched matmul gets one scale for all cells,
        # which cost 1.5 in score in int8. The centre is folded into the bias so that int8
        # activations span the centred range, not the cells' large common offset.
        outputs = [ops.matmul(cells[:, i], self.kernel[i]) + offset[i] for i in range(self.kernel.shape[0])]
        return ops.stack(outputs, axis=1)

    def call(self, feature_map):
        cells = self._cells(feature_map, centred=True)
        if self.has_context:
            whole_face = ops.sum(cells, axis=1, keepdims=True)
            cells = cells + ops.cast(self.context, cells.dtype)[None, :, None] * whole_face
        return ops.reshape(cells, (-1, *self.grid_shape, self.channels))

    def set_kernel(self, cell_weights, bias=None):
        """Sets the per-cell maps, e.g. from a `backbones.LinearTail`.

        Args:
            cell_weights: `[cells, C_in, channels]`.
            bias: None (zeros), `[channels]` (the tail's bias, spread as `bias / cells` over
                the cells, so the uncentred cells still sum to the tail's embedding) or
                `[cells, channels]`. The centring subtracts each cell's mean, so any bias
                constant over the faces has no effect on the output once `adapt` has run.
        """
        cell_weights = np.asarray(cell_weights, dtype="float32")
        if tuple(cell_weights.shape) != tuple(self.kernel.shape):
            raise ValueError(f"`cell_weights` must have shape {tuple(self.kernel.shape)}. Received: shape {cell_weights.shape}")
        cells = cell_weights.shape[0]
        bias = np.zeros((cells, self.channels), "float32") if bias is None else np.asarray(bias, dtype="float32")
        if bias.shape == (self.channels,):
            bias = np.broadcast_to(bias / cells, (cells, self.channels))
        if bias.shape != (cells, self.channels):
            raise ValueError(f"`bias` must have shape ({self.channels},) or {(cells, self.channels)}. Received: shape {bias.shape}")
        self.kernel.assign(cell_weights)
        self.bias.assign(bias)

    def adapt(self, data):
        """Sets `centre` to each cell's mean uncentred output over `data`.

        Args:
            data: a `tf.data.Dataset` or an iterable of float arrays `[batch, H, W, C_in]` of
                feature maps (maps only, no labels), read once, in float64 running sums.
        """
        total, count = None, 0
        for maps in data:
            if isinstance(maps, (tuple, list, dict)):
                raise ValueError("`adapt` takes batches of feature maps only (no labels). Received: a batch of type " f"{type(maps).__name__}")
            if not self.built:
                self.build(tuple(maps.shape))
            outputs = ops.convert_to_numpy(self._cells(maps, centred=False)).astype("float64")
            total = outputs.sum(axis=0) if total is None else total + outputs.sum(axis=0)
            count += outputs.shape[0]
        if count == 0:
            raise ValueError("`adapt` received no feature maps (an empty dataset).")
        self.centre.assign((total / count).astype("float32"))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.channels,)

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "context_init": self.context_init, "learn_context": self.learn_context})
        return config
