"""One shared layer check, in the spirit of keras-hub's `run_layer_test`."""
import keras
import numpy as np

# Plain gradient steps on a simple loss before a weight that has had only zero gradients counts
# as dead. A weight behind a zero-initialised one (XCosLayer(attention_prior=True) starts its
# last attention conv at zero) gets its first non-zero gradient a step later; a dead path (a
# PReLU held at exactly 0, where both of its slopes give 0) gets none, ever.
LEARNING_STEPS = 3
LEARNING_RATE = 0.01


def run_layer_check(layer_cls, init_kwargs, inputs, expected_output_shapes, call_kwargs=None):
    """Builds, calls symbolically and eagerly, checks that every weight learns
    (`check_every_weight_learns`) and round-trips the config.

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

    if layer.trainable_weights:
        check_every_weight_learns(layer, inputs, call_kwargs)

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


def check_every_weight_learns(layer, inputs, call_kwargs=None, steps=LEARNING_STEPS, learning_rate=LEARNING_RATE):
    """Takes `steps` plain gradient steps on a fixed random projection of the outputs (training
    mode): every gradient must be finite, and every trainable weight must get a non-zero
    gradient in one of the steps. Changes the layer's weights.

    A random projection, not the sum of squares: the loss's gradient is then non-zero on every
    output. The sum of squares has a zero gradient wherever an output is 0, e.g. on the negative
    side of a PReLU whose slope starts at 0, so that slope would never move for the check alone."""
    import tensorflow as tf

    call_kwargs = call_kwargs or {}
    weights = layer.trainable_weights
    learned = {weight.path: False for weight in weights}
    rng = np.random.default_rng(0)
    projections = None
    for _ in range(steps):
        with tf.GradientTape() as tape:
            out = layer(*inputs, training=True, **call_kwargs)
            leaves = [tf.cast(v, "float32") for v in (out.values() if isinstance(out, dict) else [out])]
            if projections is None:
                projections = [rng.normal(size=v.shape).astype("float32") for v in leaves]
            loss = sum(tf.reduce_sum(v * p) for v, p in zip(leaves, projections))
        for weight, grad in zip(weights, tape.gradient(loss, weights)):
            assert grad is not None, f"no gradient for {weight.path}"
            grad = np.asarray(grad)
            assert np.isfinite(grad).all(), weight.path
            learned[weight.path] |= bool(np.any(grad != 0))
            weight.assign(np.asarray(weight) - learning_rate * grad)
        if all(learned.values()):
            return
    dead = [path for path, has_learned in learned.items() if not has_learned]
    raise AssertionError(f"only zero gradients in {steps} steps for {dead}")


def trained_conv_twins(make_layers, batches, jit_compile, use_bias=True):
    """conv -> layer models, one per factory in `make_layers` (e.g. Keras' layer and ours), with
    equal starting weights, each after one SGD step (momentum 0.9) per batch in `batches`, with
    or without XLA: the drop-in layers' tests compare the models' weights afterwards."""
    import tensorflow as tf

    models = []
    for make_layer in make_layers:
        keras.utils.set_random_seed(0)
        image = keras.Input(batches[0].shape[1:])
        x = keras.layers.Conv2D(6, 3, use_bias=use_bias)(image)
        models.append(keras.Model(image, make_layer()(x)))
    for model in models[1:]:
        model.set_weights(models[0].get_weights())
    for model in models:
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)

        @tf.function(jit_compile=jit_compile)
        def step(x, model=model, optimizer=optimizer):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True) - 0.5))
            optimizer.apply(tape.gradient(loss, model.trainable_weights), model.trainable_weights)

        for batch in batches:
            step(tf.constant(batch))
    return models
