"""The exact decomposition of a linear-tail face model's cosine into per-cell contributions.

When a face model's tail after its 7x7 map is linear (`backbones.read_linear_tail`), each
embedding is `e = sum_i p_i + t`: cell i's partial embedding `p_i` plus the tail's bias `t`.
The cosine of two faces then splits exactly:

    cos(e_a, e_b) = sum_i (<p_a_i, e_b> + <e_a, p_b_i>) / 2 / (|e_a| |e_b|)
                    + (<t, e_b> + <e_a, t>) / 2 / (|e_a| |e_b|)

since `sum_i <p_a_i, e_b> + <t, e_b> = <e_a, e_b>` (and the same for b). The first sum is the
contribution map, the last term the bias: the share of the score no cell accounts for. Both
halves are averaged so the map is symmetric in the two faces. This explains the model's own
decision at its own accuracy (Stylianou et al., "Visualizing Deep Similarity Networks", WACV
2019, do the same for average-pooled networks).

Example:

```python
from xcos_tf import backbones
from xcos_tf.explanations import decomposition

body = backbones.from_onnx("../shared/models/teacher_mobilefacenet.onnx")
tail = backbones.read_linear_tail("../shared/models/teacher_mobilefacenet.onnx")
model = decomposition.decomposition_model(body, tail)
out = model({"image_a": faces_a, "image_b": faces_b})  # RGB pixels 0..255
out["score"]  # the teacher's cosine == sum(out["contribution_map"]) + out["bias"]
```
"""
import keras
from keras import ops

from xcos_tf.layers.positionwise_grid_head import PositionwiseGridHead

_EPSILON = 1e-6


@keras.saving.register_keras_serializable(package="xcos_tf")
class CosineDecomposition(keras.layers.Layer):
    """Splits the cosine of two faces' embeddings into per-cell contributions and a bias.

    Holds the tail's bias `t` `[D]` as a non-trainable weight `tail_bias` (zeros until set).

    Call arguments:
        partials_a: float tensor `(batch, H, W, D)`, face a's partial embeddings.
        partials_b: float tensor of the same shape.

    Returns:
        A dict with `"score"` `(batch,)` (the cosine of `e = sum of partials + t`),
        `"contribution_map"` `(batch, H, W)` and `"bias"` `(batch,)`, float32, with
        `score == sum(contribution_map) + bias`.
    """

    def build(self, partials_a_shape, partials_b_shape=None):
        self.tail_bias = self.add_weight((partials_a_shape[-1],), initializer="zeros", trainable=False, name="tail_bias")

    def call(self, partials_a, partials_b):
        partials_a, partials_b = ops.cast(partials_a, "float32"), ops.cast(partials_b, "float32")
        tail_bias = ops.cast(self.tail_bias, "float32")
        embedding_a = ops.sum(partials_a, axis=(1, 2)) + tail_bias
        embedding_b = ops.sum(partials_b, axis=(1, 2)) + tail_bias
        norms = ops.maximum(ops.norm(embedding_a, axis=-1), _EPSILON) * ops.maximum(ops.norm(embedding_b, axis=-1), _EPSILON)
        score = ops.sum(embedding_a * embedding_b, axis=-1) / norms
        cell_terms = ops.sum(partials_a * embedding_b[:, None, None, :], axis=-1) + ops.sum(
            embedding_a[:, None, None, :] * partials_b, axis=-1
        )
        contribution_map = cell_terms / (2.0 * norms[:, None, None])
        bias = ops.sum(tail_bias * (embedding_a + embedding_b), axis=-1) / (2.0 * norms)
        return {"score": score, "contribution_map": contribution_map, "bias": bias}

    def compute_output_spec(self, partials_a, partials_b):
        batch, height, width = partials_a.shape[:3]
        return {
            "score": keras.KerasTensor((batch,), dtype="float32"),
            "contribution_map": keras.KerasTensor((batch, height, width), dtype="float32"),
            "bias": keras.KerasTensor((batch,), dtype="float32"),
        }


def decomposition_model(body, tail, name="decomposition"):
    """The face model as body + linear tail, with its cosine decomposed per cell.

    Args:
        body: a `keras.Model` from RGB pixels 0..255 `[N, H, W, 3]` to the map the tail starts
            at `[N, h, w, C]` (e.g. `backbones.from_onnx(path)`).
        tail: the `backbones.LinearTail` of the same model after the same cut
            (`backbones.read_linear_tail(path)`).
        name: str, the model name.

    Returns:
        A `keras.Model` from `{"image_a", "image_b"}` (as `verify`) to `{"score",
        "contribution_map", "bias"}` with `score == sum(contribution_map) + bias` (float32
        rounding aside): `score` is the model's own cosine of the two faces.

    Raises:
        ValueError: a body whose map does not fit the tail.
    """
    map_shape = tuple(body.output.shape[1:])
    cells, in_channels, dims = tail.cell_weights.shape
    if map_shape != (*tail.grid_shape, in_channels):
        raise ValueError(
            f"The body's map {map_shape} does not fit the tail, which reads a {tail.grid_shape} grid of "
            f"{in_channels} channels after {tail.feature_map!r}: cut the body at the same feature map."
        )
    # The partial embeddings: one linear map per cell, no bias, no centring (the bias is the
    # decomposition's own term).
    partials = PositionwiseGridHead(dims, name="partial_embeddings")
    partials.build((None, *map_shape))
    partials.set_kernel(tail.cell_weights)
    decompose = CosineDecomposition(name="cosine_decomposition")
    decompose.build((None, *tail.grid_shape, dims))
    decompose.tail_bias.assign(tail.bias)

    image_shape = tuple(body.input.shape[1:])
    image_a, image_b = keras.Input(image_shape, name="image_a"), keras.Input(image_shape, name="image_b")
    outputs = decompose(partials(body(image_a, training=False)), partials(body(image_b, training=False)))
    named = {key: keras.layers.Identity(name=key)(value) for key, value in outputs.items()}
    return keras.Model({"image_a": image_a, "image_b": image_b}, named, name=name)
