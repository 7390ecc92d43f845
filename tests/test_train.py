"""Tests of the training loop: the loss goes down, mirrored == default, kill -9 and resume,
a finished run is not restarted, flag errors name the flag."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from common_testing import REPO_ROOT, TINY_BACKBONE_SPEC
from training_testing import IMAGE_SHAPE, checkpoint_counters, run_python
from xcos_tf.training import config as train_config, factory, in_graph_teacher, inputs, run_folder
from xcos_tf.data import pipeline

TIMEOUT = 240
TINY_BACKBONE = TINY_BACKBONE_SPEC




def tiny_config(model_dir, data_dir, **overrides):
    values = dict(
        model_dir=str(model_dir), train_shards=(str(data_dir / "faces" / "*.tfrecord"),), image_size=IMAGE_SHAPE[0],
        backbone=TINY_BACKBONE, batch_size=16, train_steps=12, learning_rate=0.05, checkpoint_every=6, log_every=3,
        eval_every=6, deterministic=True, shuffle_buffer=32, export_formats=(),
    )
    values.update(overrides)
    return train_config.TrainConfig(**values)


@pytest.fixture(scope="module")
def default_and_mirrored(tmp_path_factory, data_dir):
    """One subprocess (2 logical CPUs must be set before TensorFlow starts): a default run with
    evaluation, then the same global batch of 16 pairs as 2 replicas x 8 under `mirrored`."""
    runs = tmp_path_factory.mktemp("runs")
    eval_pairs = (str(data_dir / "pairs" / "*.tfrecord"),)
    default = tiny_config(runs / "default", data_dir, eval_pairs=eval_pairs)
    mirrored = tiny_config(runs / "mirrored", data_dir, strategy="mirrored", batch_size=8, train_steps=3,
                           eval_pairs=eval_pairs, eval_every=3)
    script = textwrap.dedent(f"""
        import json
        from xcos_tf.training import config as train_config, factory, in_graph_teacher, inputs, loop, run_folder
        factory.configure_cpu_devices(2)
        histories = [loop.train(train_config.TrainConfig.from_json(path)) for path in {[str(runs / "default.json"), str(runs / "mirrored.json")]!r}]
        print("HISTORIES", json.dumps(histories))
    """)
    (runs / "default.json").write_text(default.to_json())
    (runs / "mirrored.json").write_text(mirrored.to_json())
    result = run_python(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("HISTORIES"))
    history_default, history_mirrored = json.loads(line[len("HISTORIES"):])
    return default, history_default, history_mirrored


def _event_tags(log_dir):
    tags = set()
    for name in os.listdir(log_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_training_lowers_the_loss_and_writes_the_run(default_and_mirrored):
    config, history, _ = default_and_mirrored
    assert history["step"] == list(range(1, 13))
    assert np.mean(history["loss"][-3:]) < 0.8 * np.mean(history["loss"][:3])
    run_dir = config.model_dir
    for name in ("params.json", "best.keras", "final.keras", "checkpoints/ckpt-12.index"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "params.json")) as f:
        assert json.load(f)["num_classes"] == 4  # from the shards' manifest
    tags = _event_tags(os.path.join(run_dir, "logs"))
    for tag in ("train/loss", "train/ce_loss", "train/xcos_loss", "eval/xcos_accuracy", "eval/cosine_accuracy",
                "eval/pairs_cos_attention"):
        assert tag in tags, tag
    assert any(tag.startswith("learning_rate/") for tag in tags)

    # The export tool's entry: the trainer rebuilt from params.json and the latest checkpoint
    # equals the final model, every weight included.
    restored = run_folder.load_trainer(run_dir)
    final = keras.saving.load_model(os.path.join(run_dir, "final.keras"), compile=False)
    for restored_weight, final_weight in zip(restored.weights, final.weights):
        np.testing.assert_allclose(restored_weight.numpy(), final_weight.numpy(), err_msg=final_weight.path)
    batch = next(iter(pipeline.synthetic_pair_dataset(2, IMAGE_SHAPE, num_classes=4)))
    np.testing.assert_allclose(restored(batch)["score"], final(batch)["score"], atol=1e-6)


def test_mirrored_matches_default_for_the_same_global_batch(default_and_mirrored):
    _, history_default, history_mirrored = default_and_mirrored
    # Same data and initial weights; only batch-norm statistics are per replica (8 pairs, not 16).
    np.testing.assert_allclose(history_mirrored["loss"], history_default["loss"][:3], rtol=0.05)
    assert history_mirrored["loss"] != history_default["loss"][:3]  # it really ran on two replicas


def test_kill_and_resume_continues_from_the_saved_step(tmp_path):
    model_dir = tmp_path / "run"
    command = [
        "-m", "xcos_tf.train", "--data=synthetic", "--num_classes=4", f"--backbone={TINY_BACKBONE}",
        f"--image_size={IMAGE_SHAPE[0]}", "--batch_size=4", "--train_steps=150", "--checkpoint_every=10",
        "--log_every=10", "--export_formats=", f"--model_dir={model_dir}",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT))
    first = subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + TIMEOUT
        while not (model_dir / "checkpoints" / "ckpt-20.index").exists():
            assert first.poll() is None, "the first run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    saved_step, _ = checkpoint_counters(model_dir)
    # The kill can land after ckpt-20's files but before the checkpoint state file names it:
    # then ckpt-10 is the last complete checkpoint, and resuming from it is right.
    assert 10 <= saved_step < 150

    second = run_python(command)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming at step {saved_step}" in second.stderr
    step, iterations = checkpoint_counters(model_dir)
    # Every optimizer applied exactly one update per step: no step ran twice or was lost.
    assert step == 150 and iterations and all(i == 150 for i in iterations)

    third = run_python(command)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "is finished" in third.stderr
    assert checkpoint_counters(model_dir)[0] == 150


def test_flag_errors_name_the_flag(tmp_path):
    """A missing shard path: exit code 2 and the flag named, no traceback, nothing written."""
    result = run_python(["-m", "xcos_tf.train", f"--model_dir={tmp_path}", "--train_shards=/nonexistent/*.tfrecord"])
    assert result.returncode == 2
    assert "--train_shards matches no file: '/nonexistent/*.tfrecord'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)
    # Values outside a flag's choices fail in absl's parser, which names the flag too.
    flag_values = train_config.define_flags(flags.FlagValues())
    with pytest.raises(flags.IllegalFlagValueError, match="--strategy=tpu"):
        flag_values(["xcos_tf.train", "--strategy=tpu"])


def test_every_config_field_is_a_flag_with_the_same_default():
    """The flags are generated from TrainConfig: same names, defaults, and list fields as lists."""
    flag_values = train_config.define_flags(flags.FlagValues())
    fields = {field.name: field for field in dataclasses.fields(train_config.TrainConfig)}
    assert set(flag_values) == set(fields)
    for name, field in fields.items():
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        assert flag_values[name].default == default, name
        assert flag_values[name].help.endswith(field.metadata["help"]), name  # enums prepend <choices>:
    flag_values(["xcos_tf.train", "--model_dir=/tmp/run", "--margin=arcface"])
    config = train_config.TrainConfig.from_flags(flag_values)
    assert (config.margin_scale, config.margin_value) == (64.0, 0.5)  # ArcFace's own defaults, not CosFace's


def test_margin_defaults_follow_the_margin_unless_given_and_params_record_them():
    cosface = train_config.TrainConfig(model_dir="x")
    arcface = train_config.TrainConfig(model_dir="x", margin="arcface")
    given = train_config.TrainConfig(model_dir="x", margin="arcface", margin_scale=32.0, margin_value=0.3)
    assert (cosface.margin_scale, cosface.margin_value) == (30.0, 0.35)
    assert (arcface.margin_scale, arcface.margin_value) == (64.0, 0.5)
    assert (given.margin_scale, given.margin_value) == (32.0, 0.3)
    params = json.loads(arcface.to_json())
    assert (params["margin_scale"], params["margin_value"]) == (64.0, 0.5)


def test_config_errors_name_the_flag(tmp_path, data_dir):
    with pytest.raises(train_config.ConfigError, match="--backbone"):
        tiny_config(tmp_path, data_dir, backbone="resnet9000").validate()
    with pytest.raises(train_config.ConfigError, match="--init_backbone"):
        tiny_config(tmp_path, data_dir, init_backbone="onnx:/nonexistent.onnx").validate()
    with pytest.raises(train_config.ConfigError, match="--teacher"):
        tiny_config(tmp_path, data_dir, teacher="/nonexistent_saved_model").validate()
    with pytest.raises(train_config.ConfigError, match="num_classes=2"):
        inputs.resolve_data(tiny_config(tmp_path, data_dir, num_classes=2))  # the shards hold labels 0..3


def test_in_graph_teacher_gives_the_cosine_and_no_gradient(tmp_path):
    from common_testing import tiny_backbone

    teacher_model = keras.Sequential([tiny_backbone(IMAGE_SHAPE), keras.layers.GlobalAveragePooling2D()])
    teacher_model.save(tmp_path / "teacher.keras")
    teacher = in_graph_teacher.load_teacher(str(tmp_path / "teacher.keras"))
    rng = np.random.default_rng(0)
    image_a, image_b = (tf.constant(rng.uniform(0, 255, (3, *IMAGE_SHAPE)), tf.float32) for _ in range(2))
    with tf.GradientTape() as tape:
        teacher_cos = in_graph_teacher.teacher_cosine(teacher, image_a, image_b)
    embedding_a, embedding_b = (teacher_model(x, training=False).numpy() for x in (image_a, image_b))
    expected = np.sum(embedding_a * embedding_b, -1) / np.linalg.norm(embedding_a, axis=-1) / np.linalg.norm(embedding_b, axis=-1)
    np.testing.assert_allclose(teacher_cos.numpy(), expected, atol=1e-5)
    assert all(g is None for g in tape.gradient(teacher_cos, teacher.trainable_weights + teacher.weights))


def test_pretrained_backbone_frozen_or_at_a_lower_rate(tmp_path, data_dir):
    from common_testing import tiny_backbone

    pretrained = tiny_backbone(IMAGE_SHAPE)
    pretrained.save_weights(tmp_path / "tiny.weights.h5")
    config = tiny_config(tmp_path, data_dir, backbone="common_testing:tiny_backbone", num_classes=4,
                         init_backbone=str(tmp_path / "tiny.weights.h5"), backbone_lr_multiplier=0.1,
                         attention_optimizer="adam")
    trainer = factory.build_model(config)
    for loaded, saved in zip(trainer.backbone.weights, pretrained.weights):
        np.testing.assert_array_equal(loaded.numpy(), saved.numpy())
    groups = {id(optimizer): (optimizer, variables) for optimizer, variables in trainer.optimizer_groups()}
    backbone_optimizer, backbone_variables = groups[id(trainer.backbone_optimizer)]
    assert {id(v) for v in backbone_variables} == {id(v) for v in trainer.backbone.trainable_variables}
    assert float(backbone_optimizer.learning_rate) == pytest.approx(0.1 * float(trainer.optimizer.learning_rate))

    frozen = factory.build_model(dataclasses.replace(config, freeze_backbone=True, backbone_lr_multiplier=1.0))
    trained = {id(v) for _, variables in frozen.optimizer_groups() for v in variables}
    assert not trained & {id(v) for v in frozen.backbone.weights}
    assert trained  # the grid head, attention and margin head still train


def test_init_from_a_trained_run_copies_every_part(tmp_path, data_dir):
    """--init_from: a head trained with the backbone frozen (e.g. on cached maps) goes on with
    the backbone trainable; each part starts from the saved weights, the optimizers afresh."""
    from common_testing import tiny_backbone

    tiny_backbone(IMAGE_SHAPE).save_weights(tmp_path / "tiny.weights.h5")
    base = dict(backbone="common_testing:tiny_backbone", num_classes=4, init_backbone=str(tmp_path / "tiny.weights.h5"))
    first = factory.build_model(tiny_config(tmp_path / "a", data_dir, freeze_backbone=True, ce_weight=0.0, **base))
    for weight in first.grid_head.weights + first.xcos.weights:
        weight.assign(np.random.default_rng(0).normal(size=weight.shape).astype("float32"))
    first.save(tmp_path / "first.keras")
    config = tiny_config(tmp_path / "b", data_dir, ce_weight=0.0, backbone_lr_multiplier=0.1,
                         init_from=str(tmp_path / "first.keras"), **base)
    config.validate()
    second = factory.build_model(config)
    assert second.backbone.trainable_weights  # fine-tuned now
    for part in ("backbone", "grid_head", "xcos"):
        for copied, saved in zip(getattr(second, part).weights, getattr(first, part).weights):
            np.testing.assert_array_equal(copied.numpy(), saved.numpy(), err_msg=part)
    with pytest.raises(train_config.ConfigError, match="--init_from"):
        dataclasses.replace(config, init_from=str(tmp_path / "missing.keras")).validate()
    with pytest.raises(train_config.ConfigError, match="grid_head .* does not match"):
        factory.build_model(dataclasses.replace(config, grid_channels=4))


def test_init_backbone_from_the_onnx_teacher(tmp_path, data_dir, shared_dir):
    config = tiny_config(tmp_path, data_dir, image_size=112,
                         init_backbone="onnx:" + str(shared_dir / "models" / "teacher_mobilefacenet.onnx"))
    config.validate()
    backbone = factory.build_backbone(config)
    assert tuple(backbone.output_shape[1:]) == (7, 7, 512)


def _parsed_flags(flagfile):
    flag_values = train_config.define_flags(flags.FlagValues())
    flag_values(["xcos_tf.train", f"--flagfile={flagfile}"])
    return flag_values


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(train_config.__file__), "..", "configs"))))
def test_shipped_flagfiles_parse_and_hold_a_consistent_config(name):
    """Every flag in xcos_tf/configs is a flag of xcos_tf.train, and the combinations pass the
    checks that do not look at files (those paths exist only after the data commands)."""
    path = os.path.join(os.path.dirname(train_config.__file__), "..", "configs", name)
    config = train_config.TrainConfig.from_flags(_parsed_flags(path))
    assert config.train_shards and config.model_dir and config.train_steps > 0
    # validate() without the data: globs and the pretrained file are checked elsewhere.
    # (An onnx: --init_backbone keeps its kind, pointing at an existing file: --grid_init=teacher_tail needs one.)
    init_backbone = "onnx:" + path if config.init_backbone.startswith("onnx:") else ""
    checked = dataclasses.replace(config, train_shards=(), data="synthetic", num_classes=max(config.num_classes, 2),
                                  eval_pairs=(), init_backbone=init_backbone, init_from="", cache_backbone_features=False,
                                  occlusion_fraction=0.0, occlusion_weight=0.0)  # occlusion needs the caches
    checked.validate()
    if name == "local_mobilefacenet.flags":  # the shipped default model's recipe
        assert config.init_backbone.startswith("onnx:") and config.freeze_backbone and config.cache_backbone_features
        assert config.ce_weight == 0 and config.attention == "learned" and config.attention_prior
        assert (config.grid_head, config.grid_init, config.grid_channels) == ("positionwise", "teacher_tail", 0)
    if name == "local_mobilefacenet_finetune.flags":  # its second stage: the same model, backbone trainable
        assert config.init_from.endswith("best.keras") and not config.freeze_backbone
        assert not config.cache_backbone_features and 0 < config.backbone_lr_multiplier < 1
        assert config.init_backbone.startswith("onnx:") and config.ce_weight == 0 and config.grid_head == "positionwise"
    if name == "local_mobilefacenet_occlusion.flags":  # the shipped model's stage 2: stage 1's run, occluded pairs
        stage_1 = train_config.TrainConfig.from_flags(
            _parsed_flags(os.path.join(os.path.dirname(path), "local_mobilefacenet.flags")))
        assert config.init_from == os.path.join(stage_1.model_dir, "best.keras")
        assert config.occlusion_fraction > 0 and config.occlusion_weight > 0 and not config.freeze_grid_head
        assert config.cache_backbone_features and config.freeze_backbone and config.attention_learning_rate == 0
        assert config.feature_cache_dir != stage_1.feature_cache_dir  # the occluded caches replace the clean ones
