"""The PReLU with a hand-written gradient against keras.layers.PReLU: numerics, saving, export."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.layer_checks import run_layer_check, trained_conv_twins
from xcos_tf.layers import PReLU


def _pair(input_shape, seed=1, **kwargs):
    """A Keras PReLU and ours with the same random slopes."""
    layers = keras.layers.PReLU(**kwargs), PReLU(**kwargs)
    for layer in layers:
        layer.build(input_shape)
    alpha = np.random.default_rng(seed).uniform(-0.5, 0.5, layers[0].alpha.shape).astype("float32")
    for layer in layers:
        layer.set_weights([alpha])
    return layers


def _value_and_gradients(layer, x, upstream, training=True):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
    grad_x, grad_alpha = tape.gradient(loss, [x, layer.alpha])
    return np.asarray(y, "float32"), np.asarray(grad_x, "float32"), np.asarray(grad_alpha, "float32")


def _op_types(layer, x, training):
    def call(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = layer(t, training=training)
        return y, tape.gradient(y, [t, layer.alpha])

    graph = tf.function(call).get_concrete_function(tf.TensorSpec(x.shape)).graph
    return sorted(op.type for op in graph.get_operations())


@pytest.fixture
def maps():
    # No exact zeros (their gradient is the one documented difference, tested on its own).
    return np.random.default_rng(0).normal(0.0, 2.0, (4, 7, 7, 8)).astype("float32")


def test_layer_contract(maps):
    run_layer_check(PReLU, {"shared_axes": [1, 2]}, (maps,), maps.shape)


@pytest.mark.parametrize(
    "shape, kwargs",
    [((4, 7, 7, 8), {"shared_axes": [1, 2]}), ((4, 7, 7, 8), {}), ((3, 5, 6), {"shared_axes": [1]}), ((6, 10), {})],
)
def test_training_values_and_gradients_equal_keras(shape, kwargs):
    x = np.random.default_rng(0).normal(0.0, 2.0, shape).astype("float32")
    upstream = np.random.default_rng(2).normal(size=shape).astype("float32")
    keras_prelu, prelu = _pair(shape, **kwargs)
    expected = _value_and_gradients(keras_prelu, x, upstream)
    got = _value_and_gradients(prelu, x, upstream)
    np.testing.assert_array_equal(got[0], expected[0])  # max(x,0) + a*min(x,0) == relu(x) - a*relu(-x), bit for bit
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[2], expected[2], rtol=1e-6, atol=1e-6)  # a sum: the order may differ


def test_training_runs_the_hand_written_gradient_and_inference_the_parent_ops(maps):
    keras_prelu, prelu = _pair(maps.shape, shared_axes=[1, 2])
    training_ops = _op_types(prelu, maps, training=True)
    assert "SelectV2" in training_ops and "ReluGrad" not in training_ops
    assert "ReluGrad" in _op_types(keras_prelu, maps, training=True)
    # Inference (what every export traces) is the parent's graph, op for op.
    assert _op_types(prelu, maps, training=False) == _op_types(keras_prelu, maps, training=False)


def test_gradient_at_zero_takes_the_slope_as_torch_does():
    x = np.array([[-1.0, 0.0, 2.0]], "float32")
    prelu = PReLU()
    prelu.build(x.shape)
    prelu.set_weights([np.full((3,), 0.25, "float32")])
    _, grad_x, grad_alpha = _value_and_gradients(prelu, x, np.ones_like(x))
    np.testing.assert_array_equal(grad_x, [[0.25, 0.25, 1.0]])  # torch.nn.PReLU's backward; Keras' autodiff: 0 at 0
    np.testing.assert_array_equal(grad_alpha, [-1.0, 0.0, 0.0])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_training_steps_match_keras(jit_compile):
    """Five SGD steps of conv -> PReLU on changing batches: every weight agrees to 1e-6."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(0.0, 2.0, (4, 9, 9, 3)).astype("float32") for _ in range(5)]
    slope = keras.initializers.Constant(0.25)
    models = trained_conv_twins(
        [lambda: keras.layers.PReLU(shared_axes=[1, 2], alpha_initializer=slope),
         lambda: PReLU(shared_axes=[1, 2], alpha_initializer=slope)],
        batches, jit_compile,
    )
    for expected, got in zip(models[0].weights, models[1].weights):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6, rtol=1e-6, err_msg=expected.path)
    assert np.abs(models[1].layers[-1].alpha.numpy() - 0.25).max() > 1e-3  # the slopes were trained


def test_mixed_precision_returns_the_compute_dtype_and_float32_slope_gradients(maps):
    keras_prelu = keras.layers.PReLU(shared_axes=[1, 2], dtype="mixed_bfloat16")
    prelu = PReLU(shared_axes=[1, 2], dtype="mixed_bfloat16")
    for layer in (keras_prelu, prelu):
        layer.build(maps.shape)
        layer.set_weights([np.full((1, 1, 8), 0.2, "float32")])
    upstream = np.ones_like(maps)
    x = tf.constant(maps)
    with tf.GradientTape() as tape:
        y = prelu(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
    assert y.dtype == "bfloat16" and prelu.alpha.dtype == "float32"
    assert tape.gradient(loss, prelu.alpha).dtype == "float32"
    expected, got = _value_and_gradients(keras_prelu, maps, upstream), _value_and_gradients(prelu, maps, upstream)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=2e-2, atol=2e-2)


def _small_model(prelu_class):
    image = keras.Input((7, 7, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(image)
    x = prelu_class(shared_axes=[1, 2], name="prelu")(x)
    return keras.Model(image, keras.layers.GlobalAveragePooling2D()(x))


def _set_slopes(model):
    model.get_layer("prelu").set_weights([np.array([[[0.1, -0.2, 0.3, 0.4]]], "float32")])


def test_keras_file_round_trip(tmp_path, maps):
    model = _small_model(PReLU)
    _set_slopes(model)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.get_layer("prelu")) is PReLU
    x = maps[..., :3]
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert loaded.get_layer("prelu").get_config() == model.get_layer("prelu").get_config()


@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
def test_weight_files_and_checkpoints_load_across_the_two_classes(tmp_path, maps, direction):
    classes = (keras.layers.PReLU, PReLU)
    source_class, target_class = classes if direction == "keras_to_ours" else classes[::-1]
    source = _small_model(source_class)
    _set_slopes(source)
    x = maps[..., :3]
    expected = np.asarray(source(x))

    from_h5 = _small_model(target_class)
    source.save_weights(tmp_path / "model.weights.h5")
    from_h5.load_weights(tmp_path / "model.weights.h5")
    np.testing.assert_array_equal(np.asarray(from_h5(x)), expected)

    # What xcos_tf.train resumes from: a tf.train.Checkpoint of the model.
    from_checkpoint = _small_model(target_class)
    path = tf.train.Checkpoint(model=source).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=from_checkpoint).restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(np.asarray(from_checkpoint(x)), expected)


def test_tflite_graph_is_the_one_keras_prelu_gives(tmp_path, monkeypatch):
    """The exported verifier of a tiny trainer (our PReLU in its grid head and xCos attention)
    converts to the same TFLite ops, PRELU included, as the same trainer built with
    keras.layers.PReLU."""
    import export_testing
    from xcos_tf import model as xcos_model
    from xcos_tf.export import saved_model, tflite
    from xcos_tf.layers import grid_head, xcos_layer

    def tflite_ops(trainer, path):
        saved_model.write_saved_model(xcos_model.build_verifier(trainer), path)
        return sorted(op for _, op, _, _ in tflite._model_ops(tflite.convert_tflite(path)))

    ours = export_testing.tiny_trainer()
    assert any(type(layer) is PReLU for layer in ours._flatten_layers())
    for module in (grid_head, xcos_layer):
        monkeypatch.setattr(module, "PReLU", keras.layers.PReLU)
    reference = export_testing.tiny_trainer()
    assert not any(type(layer) is PReLU for layer in reference._flatten_layers())
    reference.set_weights(ours.get_weights())

    ops = tflite_ops(ours, str(tmp_path / "ours"))
    assert "PRELU" in ops
    assert ops == tflite_ops(reference, str(tmp_path / "keras"))
