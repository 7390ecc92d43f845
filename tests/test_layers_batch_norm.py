"""The fused BatchNormalization against keras.layers.BatchNormalization: numerics, saving, export."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.layer_checks import run_layer_check, trained_conv_twins
from xcos_tf.layers import BatchNormalization

# The two layers' settings as the backbones and heads use them (PyTorch's epsilon and momentum).
BN_KWARGS = {"epsilon": 1e-5, "momentum": 0.9}


def _pair(**kwargs):
    """A Keras BN and a fused BN with the same (non-trivial) weights."""
    kwargs = {**BN_KWARGS, **kwargs}
    keras_bn, fused_bn = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    return keras_bn, fused_bn


def _set_weights(layers, channels, seed=1):
    rng = np.random.default_rng(seed)
    values = {
        "gamma": rng.uniform(0.5, 2.0, channels), "beta": rng.normal(0.0, 0.5, channels),
        "moving_mean": rng.normal(0.0, 1.0, channels), "moving_variance": rng.uniform(0.5, 2.0, channels),
    }
    weights = [values[w.name].astype("float32") for w in layers[0].weights]
    for layer in layers:
        layer.set_weights(weights)


def _op_types(layer, x, training):
    graph = tf.function(lambda t: layer(t, training=training)).get_concrete_function(tf.TensorSpec(x.shape)).graph
    return {op.type for op in graph.get_operations()}


@pytest.fixture
def maps():
    # Off-centre, off-unit data, so that mean, variance and the Bessel factor all matter.
    return np.random.default_rng(0).normal(3.0, 2.0, (4, 7, 7, 8)).astype("float32")


def test_layer_contract(maps):
    run_layer_check(BatchNormalization, BN_KWARGS, (maps,), maps.shape)


def test_nhwc_maps_run_the_fused_kernel_and_other_ranks_the_parent(maps):
    layer = BatchNormalization(**BN_KWARGS)
    layer(maps)
    assert "FusedBatchNormV3" in _op_types(layer, maps, training=True)
    assert "FusedBatchNormV3" in _op_types(layer, maps, training=False)
    vectors = maps.reshape(-1, 8)
    dense_bn = BatchNormalization(**BN_KWARGS)
    dense_bn(vectors)
    assert "FusedBatchNormV3" not in _op_types(dense_bn, vectors, training=True)
    channels_first = BatchNormalization(axis=1, **BN_KWARGS)
    channels_first(maps)
    assert "FusedBatchNormV3" not in _op_types(channels_first, maps, training=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"center": False, "scale": False}, {"epsilon": 1e-3, "momentum": 0.99}])
def test_outputs_and_gradients_match_keras(maps, training, kwargs):
    keras_bn, fused_bn = _pair(**kwargs)
    for layer in (keras_bn, fused_bn):
        layer.build(maps.shape)
    if keras_bn.scale:
        _set_weights((keras_bn, fused_bn), maps.shape[-1])
    upstream = np.random.default_rng(2).normal(size=maps.shape).astype("float32")
    results = []
    for layer in (keras_bn, fused_bn):
        x = tf.constant(maps)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * upstream)
        results.append((y, *tape.gradient(loss, [x, *layer.trainable_weights])))
    for expected, got in zip(*results):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_training_steps_match_keras_in_weights_and_moving_statistics(jit_compile):
    """Five SGD steps of conv -> BN on changing batches: every weight agrees to 1e-5."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(1.0, 2.0, (4, 9, 9, 3)).astype("float32") for _ in range(5)]
    models = trained_conv_twins(
        [lambda: keras.layers.BatchNormalization(**BN_KWARGS), lambda: BatchNormalization(**BN_KWARGS)],
        batches, jit_compile, use_bias=False,
    )
    bn_weights = [w.name for w in models[0].layers[-1].weights]
    assert bn_weights == ["gamma", "beta", "moving_mean", "moving_variance"]
    for expected, got in zip(models[0].weights, models[1].weights):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5, rtol=1e-5, err_msg=expected.path)
    # The statistics moved: the comparison is not between two sets of initial values.
    assert np.abs(models[1].layers[-1].moving_variance.numpy() - 1.0).max() > 0.1


def test_one_pixel_batches_keep_a_zero_variance_like_keras():
    x = np.arange(4, dtype="float32").reshape(1, 1, 1, 4)
    keras_bn, fused_bn = _pair()
    for layer in (keras_bn, fused_bn):
        layer(x, training=True)
    np.testing.assert_allclose(fused_bn.moving_variance.numpy(), keras_bn.moving_variance.numpy(), atol=1e-6)


def test_mixed_precision_computes_in_float32_and_returns_the_compute_dtype(maps):
    keras_bn = keras.layers.BatchNormalization(dtype="mixed_bfloat16", **BN_KWARGS)
    fused_bn = BatchNormalization(dtype="mixed_bfloat16", **BN_KWARGS)
    outputs = [layer(maps, training=True) for layer in (keras_bn, fused_bn)]
    assert outputs[1].dtype == "bfloat16" and fused_bn.moving_mean.dtype == "float32"
    np.testing.assert_allclose(np.asarray(outputs[1], "float32"), np.asarray(outputs[0], "float32"), atol=1e-2)
    np.testing.assert_allclose(fused_bn.moving_mean.numpy(), keras_bn.moving_mean.numpy(), atol=1e-3)


def _small_model(bn_class):
    image = keras.Input((7, 7, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(image)
    x = bn_class(name="bn", **BN_KWARGS)(x)
    return keras.Model(image, keras.layers.GlobalAveragePooling2D()(x))


def test_keras_file_round_trip(tmp_path, maps):
    model = _small_model(BatchNormalization)
    _set_weights((model.get_layer("bn"),), 4)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.get_layer("bn")) is BatchNormalization
    x = maps[..., :3]
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)
    assert loaded.get_layer("bn").get_config() == model.get_layer("bn").get_config()


@pytest.mark.parametrize("direction", ["keras_to_fused", "fused_to_keras"])
def test_weight_files_and_checkpoints_load_across_the_two_classes(tmp_path, maps, direction):
    classes = (keras.layers.BatchNormalization, BatchNormalization)
    source_class, target_class = classes if direction == "keras_to_fused" else classes[::-1]
    source = _small_model(source_class)
    _set_weights((source.get_layer("bn"),), 4)
    x = maps[..., :3]
    expected = np.asarray(source(x))

    from_h5 = _small_model(target_class)
    source.save_weights(tmp_path / "model.weights.h5")
    from_h5.load_weights(tmp_path / "model.weights.h5")
    np.testing.assert_allclose(np.asarray(from_h5(x)), expected, atol=1e-6)

    # What xcos_tf.train resumes from: a tf.train.Checkpoint of the model.
    from_checkpoint = _small_model(target_class)
    path = tf.train.Checkpoint(model=source).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=from_checkpoint).restore(path).assert_existing_objects_matched()
    np.testing.assert_allclose(np.asarray(from_checkpoint(x)), expected, atol=1e-6)
    np.testing.assert_array_equal(
        from_checkpoint.get_layer("bn").moving_variance.numpy(), source.get_layer("bn").moving_variance.numpy()
    )


def _with_fused_batch_norm(model):
    """A copy of a functional model with every keras.layers.BatchNormalization made fused."""

    def clone(layer):
        if type(layer) is keras.layers.BatchNormalization:
            return BatchNormalization.from_config(layer.get_config())
        if isinstance(layer, keras.Model):
            return _with_fused_batch_norm(layer)
        return layer.__class__.from_config(layer.get_config())

    fused = keras.models.clone_model(model, clone_function=clone)
    fused.set_weights(model.get_weights())
    return fused


def test_exports_keep_their_parity_and_fold_batch_norm(tmp_path, shared_dir):
    """A tiny model, fused BN in backbone and heads, through every export format.

    Each format stays within the bounds test_export.py holds today's exports to, and the
    float32 TFLite graph has the same ops as the Keras-BN model's (BN folded into the convs).
    """
    import export_testing
    from xcos_tf import export, runtime
    from xcos_tf import model as xcos_model

    reference = export_testing.tiny_trainer()
    fused_backbone = _with_fused_batch_norm(reference.backbone)
    assert any(type(layer) is BatchNormalization for layer in fused_backbone._flatten_layers())
    fused = xcos_model.build_trainer(fused_backbone, num_classes=6)
    fused.set_weights(reference.get_weights())
    faces = export.load_faces(shared_dir / "data" / "glint_sample" / "images", limit=96)
    is_test = np.arange(len(faces)) % 4 == 0
    pair_a, pair_b = faces[is_test][0::2], faces[is_test][1::2]

    expected = export_testing.keras_outputs(
        xcos_model.build_verifier(reference).verify, {"image_a": pair_a, "image_b": pair_b}
    )
    fused_verifier = xcos_model.build_verifier(fused)
    got = export_testing.keras_outputs(fused_verifier.verify, {"image_a": pair_a, "image_b": pair_b})
    export_testing.assert_within(got, expected, 1e-5, "Keras, fused BN")

    fused.save(tmp_path / "fused.keras")
    formats = ("saved_model", "tflite", "tflite_int8", "onnx")
    export.export_model(str(tmp_path / "fused.keras"), str(tmp_path / "deploy"), formats=formats,
                        calibration_images=faces[~is_test])
    for model_format in formats:
        outputs = runtime.load(str(tmp_path / "deploy"), format=model_format).verify(pair_a, pair_b)
        export_testing.assert_within(
            {key: np.asarray(outputs[key]) for key in expected}, expected, export_testing.BOUNDS[model_format],
            f"{model_format}, fused BN",
        )

    from xcos_tf.export import saved_model, tflite

    def tflite_ops(verifier, path):
        saved_model.write_saved_model(verifier, path)
        return sorted(op for _, op, _, _ in tflite._model_ops(tflite.convert_tflite(path)))

    keras_ops = tflite_ops(xcos_model.build_verifier(reference), str(tmp_path / "keras_bn"))
    assert tflite_ops(fused_verifier, str(tmp_path / "fused_bn")) == keras_ops
