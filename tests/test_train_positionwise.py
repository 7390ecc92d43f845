"""xcos_tf.train with --grid_head=positionwise: the head started from a tiny ONNX model's linear tail,
centred before step 1 (cached maps or backbone maps), trained, resumed, saved and exported."""
import dataclasses
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import onnx
import pytest

import export_testing
import tiny_onnx_tails
from training_testing import shard_faces_and_mirrors, train_on_batch
from xcos_tf import backbones, layers, runtime
from xcos_tf import model as xcos_model
from xcos_tf.data import records
from xcos_tf.training import config as train_config, factory, loop, run_folder

# 112x112 faces (the feature cache and the export take no other size), a 4x4 max pooling, then
# tiny_onnx_tails' 28x28 -> 4x4x16 body and GDConv tail to a 10-d embedding.
IMAGE_SHAPE = tiny_onnx_tails.FACE_SHAPE
CELLS = 16
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # where `python -m xcos_tf.export` runs


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny_gdconv_112.onnx"
    onnx.save(tiny_onnx_tails.tiny_face_model_112(), str(path))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    records.write_synthetic_shards(str(root / "faces"), num_shards=2, records_per_shard=12, num_classes=3,
                                   image_shape=IMAGE_SHAPE, embedding_dim=tiny_onnx_tails.EMBEDDING)
    return root / "faces"


def _config(tmp_path, onnx_path, shards, **overrides):
    values = dict(
        model_dir=str(tmp_path / "run"), train_shards=(str(shards / "*.tfrecord"),), image_size=IMAGE_SHAPE[0],
        init_backbone=f"onnx:{onnx_path}", freeze_backbone=True, cache_backbone_features=True,
        grid_head="positionwise", grid_init="teacher_tail", grid_channels=0, attention_prior=True,
        ce_weight=0.0, batch_size=8, train_steps=4, steps_per_epoch=2, checkpoint_every=2, log_every=2,
        optimizer="adam", learning_rate=1e-2, attention_learning_rate=1e-2, deterministic=True,
        shuffle_buffer=32, export_formats=(),
    )
    values.update(overrides)
    return train_config.TrainConfig(**values)


def _expected_centre(onnx_path, faces):
    """Each cell's mean partial embedding (plus its share of the bias) under the ONNX tail."""
    tail = backbones.read_linear_tail(str(onnx_path), input_shape=IMAGE_SHAPE)
    body = backbones.from_onnx(str(onnx_path), input_shape=IMAGE_SHAPE)
    partial = tail.partial_embeddings(np.asarray(body(faces)))
    return (partial.mean(axis=0) + tail.bias / CELLS).astype("float32")


def _load(path):
    return keras.saving.load_model(path, compile=False)


def test_fresh_head_is_the_teacher_tail_centred_on_theshard_faces_and_mirrors(tmp_path, onnx_path, shards):
    config = _config(tmp_path, onnx_path, shards, cache_backbone_features=False, context_init=0.0)
    config.validate()
    trainer = factory.build_model(config)
    assert isinstance(trainer.grid_head, layers.PositionwiseGridHead) and trainer.grid_head.channels == tiny_onnx_tails.EMBEDDING
    assert loop.centre_grid_head(config, trainer) == 24  # every face (with its mirror image)
    faces = shard_faces_and_mirrors(shards)
    np.testing.assert_allclose(np.asarray(trainer.grid_head.centre), _expected_centre(onnx_path, faces), atol=1e-4)
    # The grid's cells sum to the ONNX model's embedding minus the centre's sum.
    pixels = np.random.default_rng(0).uniform(0, 255, (3, *IMAGE_SHAPE)).astype("float32")
    grid = np.asarray(trainer.grid_head(trainer.backbone(pixels)))
    (embedding,) = tiny_onnx_tails.run_onnx(tiny_onnx_tails.tiny_face_model_112(), pixels)
    expected = embedding - np.asarray(trainer.grid_head.centre).sum(axis=0)
    np.testing.assert_allclose(grid.reshape(3, CELLS, -1).sum(axis=1), expected, atol=1e-3)


def test_cached_run_centres_before_step_1_trains_resumes_and_round_trips(tmp_path, onnx_path, shards):
    config = _config(tmp_path, onnx_path, shards, context_init=0.1)
    history = loop.train(config)
    assert history["step"] == [1, 2, 3, 4] and np.all(np.isfinite(history["loss"]))
    first = _load(os.path.join(config.model_dir, run_folder.FINAL_MODEL))
    assert first.get_config()["grid_head"] == "positionwise" and first.get_config()["attention_prior"]
    centre = np.asarray(first.grid_head.centre)
    # Centred from the cached float16 maps with the tail's kernel, before any step changed it.
    np.testing.assert_allclose(centre, _expected_centre(onnx_path, shard_faces_and_mirrors(shards)), atol=2e-2)
    tail = backbones.read_linear_tail(str(onnx_path), input_shape=IMAGE_SHAPE)
    assert not np.allclose(np.asarray(first.grid_head.kernel), tail.cell_weights)  # the head trained

    # Resumed for two more steps: the centre comes back from the checkpoint, not recomputed
    # (the trained kernel would give another one).
    history = loop.train(dataclasses.replace(config, train_steps=6))
    assert history["step"] == [5, 6]
    resumed = _load(os.path.join(config.model_dir, run_folder.FINAL_MODEL))
    np.testing.assert_array_equal(np.asarray(resumed.grid_head.centre), centre)

    # The .keras round trip keeps the kind of head, the centre and the outputs.
    path = tmp_path / "again.keras"
    resumed.save(path)
    again = _load(path)
    assert isinstance(again.grid_head, layers.PositionwiseGridHead) and again.grid_head.has_context
    pixels = np.random.default_rng(1).uniform(0, 255, (2, *IMAGE_SHAPE)).astype("float32")
    inputs = {"image_a": pixels, "image_b": pixels[::-1]}
    for key, value in resumed(inputs).items():
        np.testing.assert_allclose(np.asarray(again(inputs)[key]), np.asarray(value), atol=1e-6, err_msg=key)


def test_frozen_grid_head_stays_the_teacher_tail_while_the_attention_trains(tmp_path, onnx_path, shards):
    config = _config(tmp_path, onnx_path, shards, context_init=0.2, freeze_grid_head=True)
    history = loop.train(config)
    assert np.all(np.isfinite(history["loss"]))
    trained = _load(os.path.join(config.model_dir, run_folder.FINAL_MODEL))
    tail = backbones.read_linear_tail(str(onnx_path), input_shape=IMAGE_SHAPE)
    np.testing.assert_array_equal(np.asarray(trained.grid_head.kernel), tail.cell_weights)
    logit_kernel = [w for w in trained.xcos.weights if "logit_conv" in w.path][0]
    assert np.abs(np.asarray(logit_kernel)).max() > 0  # zero-initialised under the prior, then trained


def test_freezing_a_random_grid_head_is_refused(tmp_path, onnx_path, shards):
    config = _config(tmp_path, onnx_path, shards, grid_init="random", grid_channels=8, freeze_grid_head=True)
    with pytest.raises(train_config.ConfigError, match="freeze_grid_head"):
        config.validate()


def test_init_from_copies_the_centre_and_does_not_recentre(tmp_path, onnx_path, shards):
    config = _config(tmp_path, onnx_path, shards, train_steps=2)
    loop.train(config)
    best = os.path.join(config.model_dir, run_folder.BEST_MODEL)
    centre = np.asarray(_load(best).grid_head.centre)
    stage2 = dataclasses.replace(config, model_dir=str(tmp_path / "stage2"), init_from=best, freeze_backbone=False,
                                 cache_backbone_features=False, train_steps=1)
    loop.train(stage2)
    np.testing.assert_array_equal(np.asarray(_load(os.path.join(stage2.model_dir, run_folder.FINAL_MODEL)).grid_head.centre), centre)


def test_margin_head_trains_on_the_flattened_positionwise_grid(onnx_path):
    keras.utils.set_random_seed(0)
    body = backbones.from_onnx(str(onnx_path), input_shape=IMAGE_SHAPE)
    body.trainable = False
    trainer = xcos_model.build_trainer(body, num_classes=3, image_shape=IMAGE_SHAPE, grid_channels=6,
                                       grid_head="positionwise", attention_prior=True, ce_weight=1.0)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(0)
    batch = {"image_a": rng.uniform(0, 255, (4, *IMAGE_SHAPE)).astype("float32"),
             "image_b": rng.uniform(0, 255, (4, *IMAGE_SHAPE)).astype("float32"),
             "label_a": np.array([0, 1, 2, 0]), "label_b": np.array([0, 2, 1, -1]),
             "teacher_cos": np.array([0.9, 0.1, 0.0, 0.5], "float32")}
    assert trainer(batch)["embedding"].shape == (8, CELLS * 6)
    losses = train_on_batch(trainer, batch, steps=8)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("overrides, message", [
    (dict(grid_head="conv"), "--grid_init teacher_tail needs --grid_head=positionwise"),
    (dict(init_backbone=""), "--grid_init teacher_tail reads the tail of an ONNX model"),
    (dict(grid_init="random"), "--grid_channels 0 .* needs --grid_init=teacher_tail"),
    (dict(grid_head="conv", grid_init="random", grid_channels=8, context_init=0.1), "--context_init and --learn_context need"),
    (dict(attention="fixed"), "--attention_prior needs --attention=learned"),
    (dict(context_init=float("nan")), "--context_init must be finite"),
])
def test_impossible_combinations_are_named(tmp_path, onnx_path, shards, overrides, message):
    with pytest.raises(train_config.ConfigError, match=message):
        _config(tmp_path, onnx_path, shards, **overrides).validate()


def test_grid_channels_other_than_the_tail_width_is_refused(tmp_path, onnx_path, shards):
    config = _config(tmp_path, onnx_path, shards, grid_channels=7)
    config.validate()
    with pytest.raises(train_config.ConfigError, match="--grid_channels must be 0 or the tail's width 10"):
        factory.build_model(config)


def test_conv_head_trainers_still_load_without_the_new_config_keys(onnx_path):
    """A .keras trainer saved before the positionwise head (no grid_head key) loads as a conv head."""
    body = backbones.from_onnx(str(onnx_path), input_shape=IMAGE_SHAPE)
    trainer = xcos_model.build_trainer(body, num_classes=3, image_shape=IMAGE_SHAPE)
    config = trainer.get_config()
    assert config["grid_head"] == "conv"
    for key in ("grid_head", "context_init", "learn_context", "attention_prior"):
        del config[key]
    assert isinstance(xcos_model.XCosTrainer.from_config(config).grid_head, layers.GridHead)


def test_export_cli_writes_every_float_format_of_a_trained_positionwise_run(tmp_path, onnx_path, shards):
    config = _config(tmp_path, onnx_path, shards, context_init=0.1, train_steps=2)
    loop.train(config)
    best = os.path.join(config.model_dir, run_folder.BEST_MODEL)
    out = tmp_path / "deploy"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "xcos_tf.export", f"--weights={best}", f"--out={out}", "--formats=saved_model,tflite,onnx"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    verifier = xcos_model.build_verifier(best)
    pixels = np.random.default_rng(2).uniform(0, 255, (4, *IMAGE_SHAPE)).astype("float32")
    expected = export_testing.keras_outputs(verifier.verify, {"image_a": pixels[:2], "image_b": pixels[2:]})
    for model_format in ("saved_model", "tflite", "onnx"):
        outputs = runtime.load(str(out), format=model_format).verify(pixels[:2], pixels[2:])
        export_testing.assert_within(
            {key: np.asarray(outputs[key]) for key in expected}, expected, export_testing.BOUNDS[model_format], model_format
        )
