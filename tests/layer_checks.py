"""One shared layer check, in the spirit of keras-hub's `run_layer_test`."""
import keras
import numpy as np


def run_layer_check(layer_cls, init_kwargs, inputs, expected_output_shapes, call_kwargs=None):
    """Builds, calls symbolically and eagerly, trains one step and round-trips the config.

    `inputs` is a tuple of numpy arrays passed positionally; `expected_output_shapes` is a
    shape or a dict of shapes, without the batch checks being skipped.
    """
    call_kwargs = call_kwargs or {}
    layer = layer_cls(**init_kwargs)
    outputs = layer(*inputs, **call_kwargs)

    def shapes(tree):
        return {k: tuple(v.shape) for k, v in tree.items()} if isinstance(tree, dict) else tuple(tree.shape)

    assert shapes(outputs) == expected_output_shapes
    symbolic = layer_cls(**init_kwargs)(*[keras.KerasTensor((None,) + x.shape[1:]) for x in inputs], **call_kwargs)
    none_batch = (
        {k: (None,) + v[1:] for k, v in expected_output_shapes.items()}
        if isinstance(expected_output_shapes, dict)
        else (None,) + expected_output_shapes[1:]
    )
    assert shapes(symbolic) == none_batch

    # A training step: every trainable weight receives a finite, non-zero gradient.
    if layer.trainable_weights:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            out = layer(*inputs, training=True, **call_kwargs)
            leaves = out.values() if isinstance(out, dict) else [out]
            loss = sum(tf.reduce_sum(tf.square(tf.cast(v, "float32"))) for v in leaves)
        grads = tape.gradient(loss, layer.trainable_weights)
        for weight, grad in zip(layer.trainable_weights, grads):
            assert grad is not None, f"no gradient for {weight.path}"
            assert np.isfinite(grad.numpy()).all(), weight.path

    # Config round trip: same config, same weights -> same outputs.
    clone = layer_cls.from_config(layer.get_config())
    clone(*inputs, **call_kwargs)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    expected = layer(*inputs, **call_kwargs)
    got = clone(*inputs, **call_kwargs)
    for key in expected if isinstance(expected, dict) else [None]:
        e = expected[key] if key else expected
        g = got[key] if key else got
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6)
    return layer
