"""Tests of the training loop: loss goes down, mirrored == default, kill -9 and resume, flag errors."""
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from xcos_tf import train
from xcos_tf.data import align, records

IMAGE_SHAPE = (32, 32, 3)
# In this process pytest imported conftest as `conftest`; a subprocess started in the repo root imports it
# as `tests.conftest`.
TINY_BACKBONE = "conftest:tiny_backbone"
TINY_BACKBONE_CLI = "tests.conftest:tiny_backbone"


@pytest.fixture(scope="module")
def face_shards(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("faces")
    records.write_synthetic_shards(str(out_dir), num_shards=2, records_per_shard=16, num_classes=4, image_shape=IMAGE_SHAPE)
    return str(out_dir / "*.tfrecord")


@pytest.fixture(scope="module")
def eval_pair_shards(tmp_path_factory):
    """20 random pairs in 10 folds, written as evaluation pair shards."""
    out_dir = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(1)

    def image():
        return align.encode_image(rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8), "png")

    pairs = [
        records.encode_pair_example(image(), image(), "png", i % 2 == 0, i // 2, "a", "b", "a.png", "b.png")
        for i in range(20)
    ]
    records.write_shard(str(out_dir / records.shard_name("pairs", 0)), pairs)
    return str(out_dir / "*.tfrecord")


def tiny_config(model_dir, train_shards, **overrides):
    values = dict(
        model_dir=str(model_dir), train_shards=(train_shards,), image_size=IMAGE_SHAPE[0], backbone=TINY_BACKBONE,
        batch_size=8, train_steps=20, learning_rate=0.05, checkpoint_every=10, log_every=5, eval_every=10,
        deterministic=True, shuffle_buffer=32, export_formats=(),
    )
    values.update(overrides)
    return train.TrainConfig(**values)


def _event_tags(log_dir):
    tags = set()
    for name in os.listdir(log_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_training_lowers_the_loss_and_writes_the_run(tmp_path, face_shards, eval_pair_shards):
    config = tiny_config(tmp_path / "run", face_shards, eval_pairs=(eval_pair_shards,))
    history = train.train(config)

    assert history["step"] == list(range(1, 21))
    assert np.mean(history["loss"][-5:]) < 0.7 * np.mean(history["loss"][:5])
    run_dir = tmp_path / "run"
    for name in ("params.json", "best.keras", "final.keras", "checkpoints/ckpt-20.index"):
        assert (run_dir / name).exists(), name
    params = json.loads((run_dir / "params.json").read_text())
    assert params["num_classes"] == 4  # from the shards' manifest
    tags = _event_tags(run_dir / "logs")
    for tag in ("train/loss", "train/ce_loss", "train/xcos_loss", "eval/xcos_accuracy", "eval/cosine_accuracy",
                "eval/pairs_cos_attention"):
        assert tag in tags, tag
    assert any(tag.startswith("learning_rate/") for tag in tags)

    # The export tool's entry: the trainer rebuilt from params.json and the latest checkpoint.
    restored = train.load_trainer(str(run_dir))
    final = keras.saving.load_model(str(run_dir / "final.keras"), compile=False)
    batch = next(iter(train.pipeline.synthetic_pair_dataset(2, IMAGE_SHAPE, num_classes=4)))
    np.testing.assert_allclose(restored(batch)["score"], final(batch)["score"], atol=1e-5)
